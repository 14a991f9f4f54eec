"""SAE features on the shapes world: detectors of the world's attribute values, named through the read-out.

An SAE trained on the class token of the bundled model's last residual stream has features that
detect attribute values (AUROC on held-out scenes, the feature chosen on other scenes) and are
named after them by the read-out (the nearest of the 29 attribute prompts to the decoder direction
carried to the embedding). Every claim is compared in the same run with baselines that could match
it (random directions, PCA components of the same activations) and carries a bootstrap interval.

The issue's bar (≥ 80% of the 29 values detected with AUROC ≥ 0.95 and named after the value) is
not asserted: it is met by some training seeds and not others (docs/concepts/sae.md, "Ground truth
on the shapes world", and docs/scripts/sae_ground_truth.py measure it per seed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clip_lens import HookedCLIP
from clip_lens.errors import InputError
from clip_lens.sae import SAE, SAEConfig
from clip_lens.sae.naming import (
    feature_auroc,
    feature_directions_to_embedding,
    image_feature_acts,
    name_features,
    readout_kind,
    shapes_world_ground_truth,
    top_activating,
)
from clip_lens.stats import bootstrap_ci
from clip_lens.toy.world import ShapesWorld, batch_images
from tests.seeds import TEST_SEEDS

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small forwards: 2 threads mostly wait

SMOKE = dict(n_train=2000, steps=600, token_batch=256, n_select=1000, n_eval=1000, train_seed=TEST_SEEDS[4], eval_seed=TEST_SEEDS[5])
"""A short run for the default suite (2,000 scenes, 600 steps of 256 rows; ~15 s on one loaded core), on test worlds."""


@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def smoke(toy):
    return shapes_world_ground_truth(toy, **SMOKE)


def _random_sae(hook_name: str, d_in: int, d_sae: int = 16, seed: int = 0) -> SAE:
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=4, hook_name=hook_name))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=generator))
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=generator))
    return sae


# --- AUROC ---------------------------------------------------------------------------------------
def test_feature_auroc_is_the_probability_that_a_positive_outranks_a_negative():
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.integers(0, 5, size=(60, 3)).astype(np.float32))  # many ties
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    greater = (pos[:, None, :] > neg[None, :, :]).float().mean((0, 1))
    equal = (pos[:, None, :] == neg[None, :, :]).float().mean((0, 1))
    torch.testing.assert_close(feature_auroc(scores, labels), greater + 0.5 * equal)
    perfect = torch.tensor([[0.0], [0.0], [1.0], [2.0]])
    assert feature_auroc(perfect, [False, False, True, True]).item() == 1.0
    assert feature_auroc(-perfect, [False, False, True, True]).item() == 0.0
    assert feature_auroc(torch.zeros(4, 1), [False, True, False, True]).item() == 0.5  # a silent feature: chance
    with pytest.raises(InputError, match="both classes"):
        feature_auroc(perfect, [True] * 4)


# --- the read-out --------------------------------------------------------------------------------
def _cls_nudge(model, pixels, hook_name, direction, alpha, frozen_scale):
    def add(act, hook):
        act = act.clone()
        act[:, 0] += alpha * direction
        return act

    def freeze(scale, hook):
        return frozen_scale

    hooks = [(hook_name, add)] + ([("ln_post.hook_scale", freeze)] if frozen_scale is not None else [])
    with model.hooks(fwd_hooks=hooks):
        return model.encode_image(pixels)


@torch.no_grad()
def test_decoder_directions_reach_the_embedding_exactly_through_the_frozen_readout(toy):
    """Adding α·W_dec[i] to the last residual stream at the class token, with ln_post's scale σ held
    at its clean value, moves the image embedding by exactly α·e_i / σ."""
    last = f"blocks.{toy.cfg.n_layers - 1}.hook_resid_post"
    sae = _random_sae(last, toy.cfg.d_model)
    carried = feature_directions_to_embedding(toy, sae)
    assert carried.shape == (16, toy.cfg.d_embed) and readout_kind(toy, last) == "exact"
    pixels = batch_images([ShapesWorld(seed=TEST_SEEDS[0]).scene(i) for i in range(4)])
    _, cache = toy.run_with_cache(pixels, names_filter="ln_post.hook_scale")
    scale = cache["ln_post.hook_scale"]  # [batch, n, 1]
    clean = toy.encode_image(pixels)
    for i in (0, 7):
        moved = _cls_nudge(toy, pixels, last, sae.W_dec[i], 2.0, scale)
        torch.testing.assert_close(moved - clean, 2.0 * carried[i] / scale[:, 0], rtol=1e-4, atol=1e-5)
    # an earlier residual stream: the direct path only (the later blocks read the direction too)
    assert readout_kind(toy, "blocks.1.hook_resid_post") == "direct"
    pooled = _random_sae("hook_pooled", toy.cfg.d_model)
    torch.testing.assert_close(feature_directions_to_embedding(toy, pooled), pooled.W_dec @ toy.visual.proj)


def test_naming_refuses_activations_that_do_not_write_the_residual_stream(toy):
    sae = _random_sae("blocks.1.mlp.hook_post", toy.visual.cfg.d_mlp)
    with pytest.raises(InputError, match="residual"):
        feature_directions_to_embedding(toy, sae)
    narrow = _random_sae("blocks.3.hook_resid_post", 64)
    with pytest.raises(InputError, match="width"):
        feature_directions_to_embedding(toy, narrow)


def test_names_are_the_bank_texts_nearest_to_the_carried_direction(toy):
    """A decoder row that the read-out carries onto a text's embedding is named after that text."""
    texts = ["a red shape", "a circle", "a shape at the top left", "a shape on a striped background"]
    sae = _random_sae("blocks.3.hook_resid_post", toy.cfg.d_model, d_sae=4)
    with torch.no_grad():
        targets = toy.encode_text(toy.to_tokens(texts), normalize=True)
        ln = toy.visual.ln_post.weight
        centre = torch.eye(toy.cfg.d_model) - 1 / toy.cfg.d_model
        readout = centre @ torch.diag(ln) @ toy.visual.proj  # d ↦ (γ ⊙ centre(d)) @ W_proj
        sae.W_dec.copy_(torch.linalg.lstsq(readout.T, targets.T).solution.T)
    names = name_features(toy, sae, texts, top=2)
    assert names.names() == texts
    assert bool((names.scores[:, 0] > 0.99).all()) and bool((names.scores[:, 0] >= names.scores[:, 1]).all())
    assert names.top(2)[0] == (texts[2], pytest.approx(float(names.scores[2, 0])))


# --- dashboards ----------------------------------------------------------------------------------
def test_top_activating_images_agree_with_a_full_pass(toy):
    sae = _random_sae("blocks.2.hook_resid_post", toy.cfg.d_model, d_sae=6, seed=1)
    sae.cfg.metadata["clip_lens_training"] = {"args": {"source": {"positions": "patches"}}}
    pixels = batch_images([ShapesWorld(seed=TEST_SEEDS[1]).scene(i) for i in range(40)])
    top = top_activating(toy, sae, pixels, k=5, batch_size=16)
    full = image_feature_acts(toy, sae, pixels, batch_size=16)  # [40, 6], largest over patches
    values, indices = full.topk(5, dim=0)
    torch.testing.assert_close(top.values, values.T)
    fired = top.values > 0
    assert torch.equal(top.indices[fired], indices.T[fired])
    assert top.maps.shape == (6, 5, *toy.cfg.grid_size)
    torch.testing.assert_close(top.maps.amax((-1, -2)), top.values)  # the image's value is its hottest patch
    torch.testing.assert_close(top.frequency, (full > 0).float().mean(0))
    fig = top.plot(int(top.values[:, 0].argmax()))
    assert len(fig.axes) == 6  # 5 thumbnails in a 2 × 3 grid


# --- ground truth --------------------------------------------------------------------------------
@pytest.mark.slow  # trains an SAE in its fixture (10 s); the default suite stays under 5 minutes
def test_sae_features_detect_shapes_world_values_beyond_random_directions(smoke):
    """A short run already finds detectors of many values, far beyond random directions."""
    sae = [r.detected(smoke.threshold) for r in smoke.rows]
    random = [r.baselines["random"] >= smoke.threshold for r in smoke.rows]
    low, _ = bootstrap_ci(np.asarray(sae, dtype=float))
    _, random_high = bootstrap_ci(np.asarray(random, dtype=float))
    assert low > random_high, smoke.table()
    assert smoke.summary["sae"]["ci"][0] == pytest.approx(low)
    # colours and backgrounds are the easy values: found even by a short run
    easy = [r.detected(smoke.threshold) for r in smoke.rows if r.attribute in ("colour", "background")]
    assert sum(easy) >= 10, smoke.table()


@pytest.mark.slow  # trains an SAE in its fixture (10 s); the default suite stays under 5 minutes
def test_features_that_detect_a_value_are_named_after_it_by_the_readout(smoke):
    """Naming through the read-out agrees with detection: a feature with held-out AUROC ≥ 0.95
    for a value has that value's prompt as its nearest attribute prompt (chance: 1/29)."""
    detectors = [r for r in smoke.rows if r.auroc >= smoke.threshold]
    assert len(detectors) >= 12, smoke.table()
    named = np.mean([r.name_match for r in detectors])
    assert named >= 0.9, smoke.table()


def test_ground_truth_refuses_to_evaluate_on_the_training_world(toy):
    with pytest.raises(InputError, match="eval_seed"):
        shapes_world_ground_truth(toy, train_seed=5, eval_seed=5)


@pytest.mark.slow
def test_documented_run_finds_most_values_and_beats_pca(toy):
    """The run of docs/concepts/sae.md (2,000 steps of 256 class-token rows of 8,000 scenes; ~40 s on one core): every colour
    is found and named, more values are found than with PCA components or random directions, and
    detectors are named after their value, on test worlds (training and held-out scenes). (Measured over 5 training seeds by
    docs/scripts/sae_ground_truth.py; the issue's bar of 80% is met by 5 of 10 seeds.)"""
    result = shapes_world_ground_truth(toy, train_seed=TEST_SEEDS[4], eval_seed=TEST_SEEDS[5])
    found = {r.value: r.detected(result.threshold) for r in result.rows}
    assert all(found[v] for v in ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")), result.table()
    assert result.fraction("sae") > result.fraction("pca") > result.fraction("random"), result.table()
    assert result.summary["sae"]["ci"][0] > result.summary["random"]["ci"][1], result.table()
    detectors = [r for r in result.rows if r.auroc >= result.threshold]
    assert np.mean([r.name_match for r in detectors]) >= 0.9, result.table()
