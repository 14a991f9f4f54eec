"""Activation patching on the shapes world finds what the world says changed.

Pairs of scenes differ in one attribute of the object (``ShapesWorld.variants``); patching the
clean residual stream into the corrupted run, position by position, moves the zero-shot logit
difference between the two attribute prompts. Every claim is compared in the same run with a
baseline that could match it (random positions) and carries a bootstrap interval. Pairs come from a
test world (`tests/seeds.py`), not from the docs' seed 7.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from clip_lens import HookedCLIP
from clip_lens.patching import activation_patch, logit_diff_metric
from clip_lens.stats import bootstrap_ci
from clip_lens.toy.world import ShapesWorld, attribute_prompt, batch_images
from tests.seeds import TEST_SEEDS

N_PAIRS = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small forwards: 2 threads mostly wait

@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes")


def _cells(model: HookedCLIP, mask: np.ndarray) -> torch.Tensor:
    """Patch positions (row-major, no CLS) that show any pixel of ``mask``."""
    gh, gw = model.cfg.grid_size
    ph, pw = model.cfg.patch_size
    cover = torch.from_numpy(mask).float().reshape(gh, ph, gw, pw).mean((1, 3)).flatten()
    return cover > 0


@functools.cache
def _sweep(model: HookedCLIP, attribute: str):
    world = ShapesWorld(seed=TEST_SEEDS[0])
    rng = np.random.default_rng(0)
    out = []
    for index in range(N_PAIRS):
        clean, corrupted = world.variants(index, attribute, 2)
        metric = logit_diff_metric(
            model, attribute_prompt(attribute, clean.value(attribute)), attribute_prompt(attribute, corrupted.value(attribute))
        )
        result = activation_patch(model, batch_images([clean]), batch_images([corrupted]), metric, layers=[0, 1, 3])
        before, after = _cells(model, clean.object_masks[0]), _cells(model, corrupted.object_masks[0])
        truth = before | after
        k = int(truth.sum())
        random_pick = torch.from_numpy(rng.choice(truth.numel(), size=k, replace=False))
        out.append({"result": result, "truth": truth, "k": k, "before": before, "after": after,
                    "random": truth[random_pick].float().mean().item()})
    return out


def _precision(pair: dict, layer: int) -> float:
    effect = pair["result"].effects()[pair["result"].layers.index(layer), 1:].abs()  # patches only
    return pair["truth"][effect.topk(pair["k"]).indices].float().mean().item()


@pytest.mark.parametrize("attribute", ["colour", "shape"])
def test_patching_localises_the_changed_object_beyond_random_positions(toy, attribute):
    pairs = _sweep(toy, attribute)
    for pair in pairs:
        assert pair["result"].clean_metric > pair["result"].corrupted_metric  # the model tells the pair apart
    for layer, floor in ((0, 0.9), (1, 0.6)):
        precision = [_precision(p, layer) for p in pairs]
        random = [p["random"] for p in pairs]
        low, _ = bootstrap_ci(precision)
        _, random_high = bootstrap_ci(random)
        assert np.mean(precision) >= floor, (layer, precision)
        assert low > random_high, (layer, low, random_high)


def test_patching_effect_moves_to_the_class_token_with_depth(toy):
    pairs = _sweep(toy, "colour")
    share = {layer: [] for layer in (0, 1, 3)}
    for pair in pairs:
        for layer in share:
            effect = pair["result"].effects()[pair["result"].layers.index(layer)].abs()
            share[layer].append((effect[0] / effect.sum()).item())
    assert max(share[0]) < 1e-6  # layer 0: the class token is the same image-independent embedding
    low, _ = bootstrap_ci(share[3])
    _, high = bootstrap_ci(share[1])
    assert low > high and low > 0.5, share


def test_position_patching_effect_follows_both_cells_of_the_moved_object(toy):
    pairs = _sweep(toy, "position")
    shares = {"before": [], "after": []}
    for pair in pairs:
        effect = pair["result"].effects()[0, 1:].abs()
        shares["before"].append((effect[pair["before"] & ~pair["after"]].sum() / effect.sum()).item())
        shares["after"].append((effect[pair["after"] & ~pair["before"]].sum() / effect.sum()).item())
    for cell, values in shares.items():
        low, _ = bootstrap_ci(values)
        assert low > 0.1, (cell, values)  # both the old and the new cell carry the difference
    precision = [_precision(p, 1) for p in pairs]
    low, _ = bootstrap_ci(precision)
    _, random_high = bootstrap_ci([p["random"] for p in pairs])
    assert low > random_high
