"""The bundled shapes-world CLIP loads offline, matches open_clip and knows the world's attributes."""

from __future__ import annotations

import functools
import json
import math
from importlib import resources

import pytest
import torch
from open_clip.model import CLIP

from clip_lens import HookedCLIP, list_models
from clip_lens.toy import ShapesWorld, batch_images, zero_shot_accuracy
from clip_lens.toy.evaluate import ZeroShotResult
from tests.seeds import TEST_SEEDS

# One line per bundled model: its name and the shapes-world issue's zero-shot targets.
MODELS = [
    ("toy-shapes", {"colour": 0.95, "shape": 0.95, "position": 0.90, "size": 0.90, "background": 0.90}),
    # the issue asks 0.90 for every one-object attribute of world v2; shape sits at about 0.90 (0.9075 on the
    # bundle's 2,000 scenes, 0.912 and 0.897 on the two test worlds' 2,000), so the target holds for the mean
    # over both test worlds, as docs/concepts/shapes_world.md states it. Count had no target: its claim is
    # per count (tests/acceptance/test_shapes_world_claims.py)
    ("toy-shapes-v2", {"colour": 0.95, "shape": 0.90, "position": 0.90, "size": 0.90, "background": 0.90}),
    # the ResNet tower distilled from toy-shapes (clip_lens.toy.distill): held to toy-shapes' targets
    ("toy-shapes-rn", {"colour": 0.95, "shape": 0.95, "position": 0.90, "size": 0.90, "background": 0.90}),
]
REMEASURED_IMAGES = 500  # the recorded figures' check (default suite)
TARGET_IMAGES = 2000  # the targets' check (slow): as many scenes as the recorded figures


@pytest.fixture(scope="module")
def model():
    return HookedCLIP.from_pretrained("toy-shapes")


def _meta(name: str) -> dict:
    return json.loads(resources.files("clip_lens").joinpath(f"toy/weights/{name}.json").read_text())


@functools.lru_cache(maxsize=None)
def _remeasured(name: str, n_images: int = REMEASURED_IMAGES, seed: int = TEST_SEEDS[0]) -> ZeroShotResult:
    """Zero-shot accuracy of ``name`` on scenes of a test world (`tests/seeds.py`), not the recorded figures'."""
    return zero_shot_accuracy(HookedCLIP.from_pretrained(name), n_images=n_images, seed=seed)


# toy-shapes-camo (float16 weights, camouflage scenes) has no plain-world targets; its claims are in
# tests/acceptance/test_camouflage_truth.py, its parity here
@pytest.mark.parametrize("name", [name for name, _ in MODELS] + ["toy-shapes-camo"])
def test_bundled_model_is_listed_small_and_matches_open_clip(name):
    model = HookedCLIP.from_pretrained(name)
    assert name in list_models()
    weights = resources.files("clip_lens").joinpath(f"toy/weights/{name}.safetensors")
    assert weights.stat().st_size <= 25 * 2**20
    reference = CLIP(**_meta(name)["model_cfg"]).eval()
    reference.load_state_dict(_bundled_state_dict(name), strict=True)
    images = batch_images([ShapesWorld(seed=TEST_SEEDS[0], image_size=model.cfg.image_size[0]).scene(i) for i in range(4)])
    tokens = model.to_tokens(["a red circle", "a shape on a striped background"])
    with torch.no_grad():
        assert (reference.encode_image(images, normalize=True) - model.encode_image(images, normalize=True)).abs().max() <= 1e-5
        assert (reference.encode_text(tokens, normalize=True) - model.encode_text(tokens, normalize=True)).abs().max() <= 1e-5


def test_all_bundled_weights_together_stay_under_40_mib():
    from clip_lens.loading import bundled_models

    package = resources.files("clip_lens")
    total = sum(package.joinpath(entry["weights"]).stat().st_size for entry in bundled_models().values())
    assert total <= 40 * 2**20, f"{total / 2**20:.1f} MiB"


def test_recorded_binding_figures_hold_on_a_test_world():
    """The bundle's binding figures (two-object scenes, chance 0.5) agree with a re-measurement on a test
    world, whatever they are; what they mean against chance is asserted, per test with its interval, by
    tests/acceptance/test_shapes_world_claims.py."""
    from clip_lens.toy.evaluate import binding_accuracy

    recorded = _meta("toy-shapes-v2")["metrics"]["binding"]
    again = binding_accuracy(HookedCLIP.from_pretrained("toy-shapes-v2"), n_scenes=400, seed=TEST_SEEDS[-1])
    assert again.chance == recorded["chance"] == 0.5
    for test, accuracy in again.accuracy.items():
        before = recorded["accuracy"][test]
        bound = 4 * math.sqrt(0.25 * (1 / recorded["n_scenes"] + 1 / again.n_scenes)) + 0.01
        assert abs(accuracy - before) <= bound, (test, accuracy, before)


def _bundled_state_dict(name: str):
    from safetensors.torch import load_file

    with resources.as_file(resources.files("clip_lens").joinpath(f"toy/weights/{name}.safetensors")) as path:
        return load_file(str(path))


@pytest.mark.parametrize("name", [name for name, _ in MODELS])
def test_recorded_zero_shot_figures_hold_on_scenes_of_a_test_world(name):
    """The json's figures (measured when bundling) against a re-measurement on a test world
    (`tests/seeds.py`): two binomial samples of one accuracy agree within 4 standard errors of their difference
    (pooled p, both sample sizes) plus 0.01 for the world's seed-to-seed variation."""
    recorded = _meta(name)["metrics"]
    result = _remeasured(name)
    assert result.seed != recorded["seed"] and result.n_images >= 500
    assert set(result.accuracy) == set(recorded["accuracy"])
    for attribute, accuracy in result.accuracy.items():
        before, n_before, n_now = recorded["accuracy"][attribute], recorded["n_images"], result.n_images
        pooled = (before * n_before + accuracy * n_now) / (n_before + n_now)
        bound = 4 * math.sqrt(pooled * (1 - pooled) * (1 / n_before + 1 / n_now)) + 0.01
        assert abs(accuracy - before) <= bound, f"{attribute}: {accuracy:.3f} now, {before:.3f} recorded (bound {bound:.3f})"


@pytest.mark.slow  # 2 × 2,000 scenes per model: 36–97 s each on one core of a loaded machine
@pytest.mark.parametrize("name, targets", MODELS)
def test_zero_shot_accuracy_meets_the_issue_targets_on_two_test_worlds(name, targets):
    """The shapes-world issues' targets at their stated values: the mean accuracy over 2,000 scenes of each
    of two test worlds (not the recorded figures') reaches the target, and on each world the lower bound
    of the bootstrap 95% interval over scenes lies well above chance (1 / number of values)."""
    results = [_remeasured(name, TARGET_IMAGES, seed) for seed in TEST_SEEDS[:2]]
    for attribute, target in targets.items():
        shown = ", ".join(f"{r.accuracy[attribute]:.3f} [{r.interval[attribute][0]:.3f}, {r.interval[attribute][1]:.3f}]" for r in results)
        assert sum(r.accuracy[attribute] for r in results) / len(results) >= target, f"{attribute}: {shown} < {target}"
        assert all(r.interval[attribute][0] > r.chance[attribute] + 0.2 for r in results), (attribute, shown)


def test_decomposition_of_the_bundled_model_is_exact(model):
    images = batch_images([ShapesWorld(seed=TEST_SEEDS[1]).scene(i) for i in range(8)])
    parts = model.decompose(images, tokens="all")
    assert parts.relative_error().max().item() <= 1e-4
    assert parts.tokens.shape == (8, 4, 4, 65, 128)


@pytest.mark.slow  # ~23 s (2,000 scenes of head analyses and segmentation); CI also runs the main job itself
def test_readme_main_job_reports_on_the_bundled_model(tmp_path):
    from typer.testing import CliRunner

    from clip_lens.cli import app

    result = CliRunner().invoke(app, ["report", "--n-images", "4", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == "toy-shapes-v2" and summary["random_weights"] is False
    assert summary["images"].startswith("held-out shapes-world scenes")
    assert summary["sum_check"]["max_relative_error"] <= 1e-4
    assert "RANDOM" not in result.output

    heads = summary["heads"]  # the head analyses on 2,000 shapes-world scenes
    assert heads["n_images"] == 2000 and heads["bank"] == "shapes-attributes"
    assert len(heads["spans"]["heads"]) == 16 and all(len(h["texts"]) == 20 for h in heads["spans"]["heads"])
    for attribute, scores in heads["span_replacement"].items():  # spans of 20 texts keep what heads do
        assert scores["m=20"] >= scores["original"] - 0.02, attribute
        low, high = scores["ci95"]["original"]
        assert low <= scores["original"] <= high
    truth = {row["property"]: row for row in heads["ground_truth"]}
    assert set(truth) == {"colour", "shape", "size", "position", "background"}  # every attribute has a row
    # against the ablation ground truth: the strongest colour, position and background heads carry the label
    for attribute in ("colour", "position", "background"):
        assert truth[attribute]["top_ablation_heads"][0] in truth[attribute]["labelled_heads"], attribute
    page = (tmp_path / "report.html").read_text()
    # 8 figures of the decomposition and head sections, and one dashboard per neuron the Neurons section shows
    shown = summary["neurons"]["shown"]
    assert shown and "Head spans" in page and "Checks against ground truth" in page and ">Neurons<" in page
    assert page.count("data:image/png") == 8 + len(shown)
    assert "Zero-shot segmentation against baselines" in page and "chroma (no model)" in page


def test_resnet_colour_and_shape_directions_point_at_the_object_better_than_text_free_maps():
    """On held-out scenes of a test world (`tests/seeds.py`), which no doc figure used: the per-position decomposition of the true
    value's text direction (against the attribute's other values) peaks on the object's cell far above
    chance, and concentrates its positive mass there more than the maps that need no text (the spatial
    tokens' norm, the attention pool's pattern), which find the salient object as often."""
    from clip_lens.toy.evaluate import localisation

    model = HookedCLIP.from_pretrained("toy-shapes-rn")
    for attribute in ("colour", "shape"):
        result = localisation(model, attribute, n_images=300, seed=TEST_SEEDS[2])
        low, _ = result.interval["decomposition"]
        assert low > result.interval["random cell"][1] + 0.5, (attribute, result.hit_rate)
        share = result.object_share
        assert share["decomposition"] > max(share["pool attention"], share["feature norm"]) + 0.2, (attribute, share)
        assert share["decomposition"] > share["wrong value"] + 0.2, (attribute, share)
        parts = model.decompose(batch_images([ShapesWorld(seed=TEST_SEEDS[2], image_size=96).scene(0)]), tokens="all")
        assert parts.relative_error().max().item() <= 1e-5 and parts.positions.shape == (1, 9, 128)
