"""Issue 30: on the camouflage world no colour trick segments the object, and what ``toy-shapes-camo``'s
decomposition maps do there, against their controls, asserted on test worlds no doc figure used
(the last three of `tests/seeds.py`; the docs' table, docs/concepts/segmentation.md, is seed 1000's).

Each claim is the one the docs state, checked on every test world with its bootstrap interval:
colour maps score the object's pixel share; the model reads position but hardly shape; the all-layer
decomposition map beats the colour maps and raw attention; random all-layer controls that keep head
L1H2 come close to it, those without it do not.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from clip_lens import HookedCLIP
from clip_lens.stats import bootstrap_ci
from clip_lens.toy.world import ShapesWorld, attribute_prompt, batch_images
from clip_lens_plugins.segmentation import SegmentationEval, shapes_world_segmentation
from clip_lens_plugins.segmentation.evaluation import CHROMA, CONTRAST, RAW_ATTENTION
from tests.seeds import TEST_SEEDS

pytestmark = pytest.mark.slow

SEEDS = TEST_SEEDS[-3:]
N_SCENES = 500
ALL_LAYERS = "decomposition (all layers)"
ALL_LAYER_CONTROL = "random 16 heads drawn per layer (4/4/4/4)"
COLOUR_MARGIN = 0.015
"""Colour maps: their mAP interval lies within this of the object's pixel share (docs: 4.6 and 4.8 vs 4.4)."""


@functools.lru_cache(maxsize=None)
def _model() -> HookedCLIP:
    return HookedCLIP.from_pretrained("toy-shapes-camo")


@functools.lru_cache(maxsize=None)
def _table(seed: int):
    data = shapes_world_segmentation(N_SCENES, seed=seed, attribute="position", version=2, camouflage=True)
    return SegmentationEval(_model()).run(data, random_draws=10, n_boot=1000, seed=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_colour_maps_rank_object_pixels_at_their_share(seed):
    result = _table(seed)
    share = result.table["uniform"]["mean_ap"]  # a constant map's AP is the object's pixel share
    for row in (CHROMA, CONTRAST):
        low, high = result.intervals[row]["mean_ap"]
        assert share - COLOUR_MARGIN < low and high < share + COLOUR_MARGIN, (seed, row, low, high, share)


@torch.no_grad()
def _accuracy(seed: int, attribute: str) -> tuple[float, float]:
    """Zero-shot accuracy interval of one attribute on one-object camouflage scenes, recomputed here."""
    model = _model()
    world = ShapesWorld(seed=seed, version=2, camouflage=True)
    scenes = [world.scene(i) for i in range(N_SCENES)]
    prompts = model.encode_text(model.to_tokens([attribute_prompt(attribute, v) for v in world.values[attribute]]), normalize=True)
    predicted = (model.encode_image(batch_images(scenes), normalize=True) @ prompts.T).argmax(-1)
    truth = torch.tensor([world.values[attribute].index(s.value(attribute)) for s in scenes])
    return bootstrap_ci((predicted == truth).float().tolist())


@pytest.mark.parametrize("seed", SEEDS)
def test_the_model_reads_position_and_hardly_shape_in_camouflage(seed):
    position_low, _ = _accuracy(seed, "position")
    _, shape_high = _accuracy(seed, "shape")
    assert position_low > 1 / 9 + 0.6, (seed, position_low)  # docs: 90.1 [88.8, 91.5], chance 11.1
    assert shape_high < 1 / 6 + 0.10, (seed, shape_high)  # docs: 21.0 [19.3, 22.8], chance 16.7


@pytest.mark.parametrize("seed", SEEDS)
def test_all_layer_map_beats_colour_maps_and_raw_attention_on_map(seed):
    result = _table(seed)
    low = result.intervals[ALL_LAYERS]["mean_ap"][0]
    colour_high = max(result.intervals[row]["mean_ap"][1] for row in (CHROMA, CONTRAST))
    assert low - colour_high > 0.4, (seed, low, colour_high)  # docs: 71.0 vs 4.8
    assert low > result.intervals[RAW_ATTENTION]["mean_ap"][1], seed  # docs: 71.0 vs 40.3
    assert result.intervals[ALL_LAYERS]["object_iou"][0] > result.intervals[RAW_ATTENTION]["object_iou"][1], seed


def test_random_all_layer_draws_match_the_map_only_with_head_l1h2():
    """Pooled over the test worlds' draws: with L1H2 a per-layer draw scores within a few points of the
    all-layer map's mAP, without it clearly less (docs: 70.3–70.8 vs 60.1–62.5, map 71.0)."""
    with_head, without = [], []
    for seed in SEEDS:
        result = _table(seed)
        control = result.random_heads[ALL_LAYER_CONTROL]
        low = result.intervals[ALL_LAYERS]["mean_ap"][0]
        for labels, ap in zip(control["draws"], control["per_draw"]["mean_ap"]):
            (with_head if "L1H2" in labels else without).append(ap - low)
    assert with_head and without
    assert np.min(with_head) > -0.03  # every draw that keeps L1H2 is within 3 points of the map's interval
    assert np.max(without) < -0.04  # every draw without it is below the map's interval by more than 4 points
