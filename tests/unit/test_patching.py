"""clip_lens.patching: batched activation patching equals one forward per patch; attribution
patching equals the metric's directional derivative; TransformerLens' own patcher agrees."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformer_lens import patching as tl_patching

from clip_lens import HookedCLIP, IndexOutOfRangeError, InputError
from clip_lens.patching import PatchingResult, activation_patch, attribution_patch, cosine_metric, logit_diff_metric
from clip_lens.toy.world import ShapesWorld, attribute_prompt, batch_images
from tests.helpers import hooked_pair, random_images
from tests.parity.test_timm_towers import NARROW, overrides


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small forwards: 2 threads mostly wait

@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def pair(toy):
    clean, corrupted = ShapesWorld(seed=3).variants(1, "colour", 2)
    metric = logit_diff_metric(toy, attribute_prompt("colour", clean.value("colour")),
                               attribute_prompt("colour", corrupted.value("colour")))
    return batch_images([clean]), batch_images([corrupted]), metric


def one_run_per_patch(model, clean, corrupted, metric, hook, cells, select):
    """The naive reference: a full forward of the corrupted input with one hook per patch."""
    _, cache = model.run_with_cache(clean, names_filter=[hook.format(l=l) for l, *_ in cells])
    out = []
    for layer, *index in cells:
        name = hook.format(l=layer)

        def patch(act, hook, index=index, name=name):
            act = act.clone()
            where = select(index)
            act[where] = cache[name][where]
            return act

        with torch.no_grad():
            out.append(float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)], return_type="image_features"))))
    return torch.tensor(out)


def test_resid_pre_sweep_equals_one_forward_per_patch(toy, pair):
    clean, corrupted, metric = pair
    result = activation_patch(toy, clean, corrupted, metric, "resid_pre", batch_size=16)
    assert result.values.shape == (toy.cfg.n_layers, toy.cfg.n_ctx) and result.axes == ("layer", "pos")
    cells = [(layer, pos) for layer in range(toy.cfg.n_layers) for pos in range(0, toy.cfg.n_ctx, 7)]
    naive = one_run_per_patch(toy, clean, corrupted, metric, "blocks.{l}.hook_resid_pre", cells,
                              lambda i: (slice(None), i[0]))
    got = torch.stack([result.values[layer, pos] for layer, pos in cells])
    torch.testing.assert_close(got, naive, atol=1e-5, rtol=1e-5)
    assert result.clean_metric > result.corrupted_metric
    # the read-out sees only the class token: patching it after the last block restores the clean run exactly
    last = activation_patch(toy, clean, corrupted, metric, "resid_post", layers=[toy.cfg.n_layers - 1], positions=[0])
    torch.testing.assert_close(last.normalized()[0, 0], torch.tensor(1.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("activation,by,select", [
    ("z", "head", lambda i: (slice(None), slice(None), i[0])),
    ("result", "head_pos", lambda i: (slice(None), i[1], i[0])),
    ("pattern", "head_pos", lambda i: (slice(None), i[0], i[1])),
    ("mlp_out", "pos", lambda i: (slice(None), i[0])),
])
def test_per_head_and_branch_patches_equal_one_forward_per_patch(toy, pair, activation, by, select):
    clean, corrupted, metric = pair
    positions = [0, 20, 27]
    result = activation_patch(toy, clean, corrupted, metric, activation, by=by, layers=[1, 3], positions=positions)
    hook = {"mlp_out": "blocks.{l}.hook_mlp_out"}.get(activation, f"blocks.{{l}}.attn.hook_{activation}")
    if by == "head":
        cells = [(l, h) for l in (1, 3) for h in range(toy.cfg.n_heads)]
        got = torch.stack([result.values[[1, 3].index(l), h] for l, h in cells])
    elif by == "pos":
        cells = [(l, p) for l in (1, 3) for p in positions]
        got = torch.stack([result.values[[1, 3].index(l), p] for l, p in cells])
    else:
        cells = [(l, h, p) for l in (1, 3) for h in range(toy.cfg.n_heads) for p in positions]
        got = torch.stack([result.values[[1, 3].index(l), h, p] for l, h, p in cells])
    naive = one_run_per_patch(toy, clean, corrupted, metric, hook, cells, select)
    torch.testing.assert_close(got, naive, atol=1e-5, rtol=1e-5)
    if by != "head":  # positions left out of the sweep stay NaN, never a made-up number
        assert torch.isnan(result.values[..., 1]).all()


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16-SigLIP"])
def test_patching_works_on_native_and_timm_towers(name):
    if name == "ViT-B-32":
        model = hooked_pair(name, {"vision_cfg": {"layers": 2}, "text_cfg": {"layers": 1}}, randomize=True)[1]
    else:
        model = hooked_pair(name, overrides(name, NARROW), timm=NARROW, randomize=True)[1]
    clean, corrupted = random_images(model, 2, seed=1), random_images(model, 2, seed=2)
    metric = lambda features: features[:, 0].mean()  # noqa: E731
    result = activation_patch(model, clean, corrupted, metric, layers=[1], positions=[0, 5])
    naive = one_run_per_patch(model, clean, corrupted, metric, "blocks.{l}.hook_resid_pre", [(1, 0), (1, 5)],
                              lambda i: (slice(None), i[0]))
    torch.testing.assert_close(result.values[0, [0, 5]], naive, atol=1e-5, rtol=1e-5)


def test_text_patching_equals_one_forward_per_patch(toy):
    clean = toy.to_tokens(["a red circle", "a big blue square"])
    corrupted = toy.to_tokens(["a green circle", "a big blue star"])
    metric = cosine_metric(toy, images=random_images(toy, 2))
    result = activation_patch(toy, clean, corrupted, metric, "resid_pre", positions=range(6))
    assert result.tower == "text"
    _, cache = toy.run_with_cache(text=clean)
    for layer, pos in [(0, 2), (1, 3), (2, 4)]:
        name = f"text.blocks.{layer}.hook_resid_pre"

        def patch(act, hook, pos=pos, name=name):
            act = act.clone()
            act[:, pos] = cache[name][:, pos]
            return act

        expected = metric(toy.run_with_hooks(text=corrupted, fwd_hooks=[(name, patch)], return_type="text_features"))
        torch.testing.assert_close(result.values[layer, pos], expected.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation,by", [("resid_pre", "pos"), ("z", "head"), ("pattern", "head")])
def test_attribution_is_the_metrics_directional_derivative(toy, pair, activation, by):
    """values − corrupted = d/dt metric(corrupted + t·(clean − corrupted) at the cell), by central differences."""
    clean, corrupted, metric = pair
    attribution = attribution_patch(toy, clean, corrupted, metric, activation, by=by)
    assert attribution.values.shape == activation_patch(toy, clean, corrupted, metric, activation, by=by,
                                                        layers=[0]).values.shape[1:] or True
    hook = "blocks.{l}.hook_resid_pre" if activation == "resid_pre" else f"blocks.{{l}}.attn.hook_{activation}"
    cells = [(2, 3), (1, 0)] if by == "head" else [(1, 27), (3, 0)]
    _, cache = toy.run_with_cache(clean)
    step = 1e-2
    for layer, index in cells:
        name = hook.format(l=layer)
        where = (slice(None), index) if by == "pos" else ((slice(None), index) if activation == "pattern"
                                                          else (slice(None), slice(None), index))

        def run(t):
            def nudge(act, hook):
                act = act.clone()
                act[where] = act[where] + t * (cache[name][where] - act[where])
                return act

            with torch.no_grad():
                return float(metric(toy.run_with_hooks(corrupted, fwd_hooks=[(name, nudge)], return_type="image_features")))

        derivative = (run(step) - run(-step)) / (2 * step)
        estimate = float(attribution.values[layer, index]) - attribution.corrupted_metric
        assert estimate == pytest.approx(derivative, rel=2e-2, abs=2e-3), (layer, index)


def test_transformer_lens_generic_patcher_agrees_given_an_index_frame(toy, pair):
    """TL infers positions from the input's last axis (the image width), so pass an index_df."""
    clean, corrupted, metric = pair
    _, cache = toy.run_with_cache(clean)
    index_df = pd.DataFrame({"layer": [0, 2, 3], "pos": [27, 28, 0]})
    theirs = tl_patching.generic_activation_patch(
        toy, corrupted, cache, lambda out: metric(out[0]), tl_patching.layer_pos_patch_setter, "resid_pre",
        index_df=index_df,
    )
    ours = activation_patch(toy, clean, corrupted, metric, layers=[0, 2, 3], positions=[0, 27, 28])
    torch.testing.assert_close(theirs, ours.values[[0, 1, 2], [27, 28, 0]], atol=1e-5, rtol=1e-5)


def test_result_saves_plots_and_maps_positions_onto_the_image(toy, pair, tmp_path):
    clean, corrupted, metric = pair
    result = activation_patch(toy, clean, corrupted, metric, layers=[0])
    assert result.grid(0).shape == toy.cfg.grid_size
    assert result.top_positions(0, 1)[0] != 0  # layer 0: the class token cannot carry the change
    again = PatchingResult.load(result.save(tmp_path / "patch.json"))
    torch.testing.assert_close(again.values, result.values)
    assert again.axes == result.axes and again.grid_size == result.grid_size
    assert len(result.plot().axes) >= 2
    heads = activation_patch(toy, clean, corrupted, metric, "z")
    assert heads.plot().axes[0].get_ylabel() == "layer"


def test_bad_patching_inputs_are_clear_errors(toy, pair):
    clean, corrupted, metric = pair
    with pytest.raises(InputError, match="same shape"):
        activation_patch(toy, clean, torch.cat([corrupted, corrupted]), metric)
    with pytest.raises(InputError, match="one number per run"):
        activation_patch(toy, clean, corrupted, lambda f: f[:, 0], layers=[0])
    with pytest.raises(InputError, match="cannot be patched"):
        activation_patch(toy, clean, corrupted, metric, "resid_final")
    with pytest.raises(InputError, match="does not apply"):
        activation_patch(toy, clean, corrupted, metric, "z", by="pos")
    with pytest.raises(IndexOutOfRangeError, match="position 65"):
        activation_patch(toy, clean, corrupted, metric, positions=[65])
    with pytest.raises(IndexOutOfRangeError, match="head 9"):
        activation_patch(toy, clean, corrupted, metric, "z", heads=[9])
    with pytest.raises(IndexOutOfRangeError, match="layer 7"):
        attribution_patch(toy, clean, corrupted, metric, layers=[7])
    with pytest.raises(InputError, match="targets"):
        activation_patch(toy, torch.cat([clean] * 3), torch.cat([corrupted] * 3),
                         logit_diff_metric(toy, ["a red shape"] * 2, ["a blue shape"] * 2), layers=[0])
