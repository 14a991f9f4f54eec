"""Hook points of HookedCLIP: names, firing order, interventions, caching and error messages."""

from __future__ import annotations

import pytest
import torch

from clip_lens import HookNameError
from tests.helpers import hooked_pair, random_images, random_tokens, randomize_vectors

TINY = {
    "vision_cfg": {"layers": 2, "width": 64, "patch_size": 32, "head_width": 16},
    "text_cfg": {"layers": 2, "width": 64, "heads": 4},
    "embed_dim": 32,
}
# CoCa: adds the attentional pooler's hooks and the CoCa text tower (CLS appended, pad mask)
TINY_COCA = {
    "vision_cfg": {"layers": 2, "width": 64, "patch_size": 32, "head_width": 16, "attn_pooler_heads": 4},
    "text_cfg": {"layers": 2, "width": 64, "heads": 4},
    "multimodal_cfg": {"layers": 1, "width": 64, "heads": 4},
    "embed_dim": 32,
}

BLOCK_HOOKS = [
    "hook_resid_pre",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "attn.hook_result",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
]

# Written out in full (TransformerLens test_cache_hook_names style): firing order, 2 layers.
EXPECTED_VISION_HOOKS = [
    "hook_embed",
    "hook_pos_embed",
    "ln_pre.hook_scale",
    "ln_pre.hook_normalized",
    "blocks.0.hook_resid_pre",
    "blocks.0.ln1.hook_scale",
    "blocks.0.ln1.hook_normalized",
    "blocks.0.attn.hook_q",
    "blocks.0.attn.hook_k",
    "blocks.0.attn.hook_v",
    "blocks.0.attn.hook_attn_scores",
    "blocks.0.attn.hook_pattern",
    "blocks.0.attn.hook_z",
    "blocks.0.attn.hook_result",
    "blocks.0.hook_attn_out",
    "blocks.0.hook_resid_mid",
    "blocks.0.ln2.hook_scale",
    "blocks.0.ln2.hook_normalized",
    "blocks.0.mlp.hook_pre",
    "blocks.0.mlp.hook_post",
    "blocks.0.hook_mlp_out",
    "blocks.0.hook_resid_post",
    "blocks.1.hook_resid_pre",
    "blocks.1.ln1.hook_scale",
    "blocks.1.ln1.hook_normalized",
    "blocks.1.attn.hook_q",
    "blocks.1.attn.hook_k",
    "blocks.1.attn.hook_v",
    "blocks.1.attn.hook_attn_scores",
    "blocks.1.attn.hook_pattern",
    "blocks.1.attn.hook_z",
    "blocks.1.attn.hook_result",
    "blocks.1.hook_attn_out",
    "blocks.1.hook_resid_mid",
    "blocks.1.ln2.hook_scale",
    "blocks.1.ln2.hook_normalized",
    "blocks.1.mlp.hook_pre",
    "blocks.1.mlp.hook_post",
    "blocks.1.hook_mlp_out",
    "blocks.1.hook_resid_post",
    "ln_post.hook_scale",
    "ln_post.hook_normalized",
    "hook_pooled",
    "hook_image_embed",
]

EXPECTED_TEXT_HOOKS = [
    "text.hook_embed",
    "text.hook_pos_embed",
    "text.blocks.0.hook_resid_pre",
    "text.blocks.0.ln1.hook_scale",
    "text.blocks.0.ln1.hook_normalized",
    "text.blocks.0.attn.hook_q",
    "text.blocks.0.attn.hook_k",
    "text.blocks.0.attn.hook_v",
    "text.blocks.0.attn.hook_attn_scores",
    "text.blocks.0.attn.hook_pattern",
    "text.blocks.0.attn.hook_z",
    "text.blocks.0.attn.hook_result",
    "text.blocks.0.hook_attn_out",
    "text.blocks.0.hook_resid_mid",
    "text.blocks.0.ln2.hook_scale",
    "text.blocks.0.ln2.hook_normalized",
    "text.blocks.0.mlp.hook_pre",
    "text.blocks.0.mlp.hook_post",
    "text.blocks.0.hook_mlp_out",
    "text.blocks.0.hook_resid_post",
    "text.blocks.1.hook_resid_pre",
    "text.blocks.1.ln1.hook_scale",
    "text.blocks.1.ln1.hook_normalized",
    "text.blocks.1.attn.hook_q",
    "text.blocks.1.attn.hook_k",
    "text.blocks.1.attn.hook_v",
    "text.blocks.1.attn.hook_attn_scores",
    "text.blocks.1.attn.hook_pattern",
    "text.blocks.1.attn.hook_z",
    "text.blocks.1.attn.hook_result",
    "text.blocks.1.hook_attn_out",
    "text.blocks.1.hook_resid_mid",
    "text.blocks.1.ln2.hook_scale",
    "text.blocks.1.ln2.hook_normalized",
    "text.blocks.1.mlp.hook_pre",
    "text.blocks.1.mlp.hook_post",
    "text.blocks.1.hook_mlp_out",
    "text.blocks.1.hook_resid_post",
    "text.ln_final.hook_scale",
    "text.ln_final.hook_normalized",
    "text.hook_pooled",
    "text.hook_text_embed",
]

# CoCa image tower: ln_pre, blocks, then the attentional pooler (LN on keys, LN on the learned
# queries, cross-attention), ln_post on the pooled queries.
EXPECTED_COCA_VISION_HOOKS = (
    ["hook_embed", "hook_pos_embed", "ln_pre.hook_scale", "ln_pre.hook_normalized"]
    + [f"blocks.{l}.{h}" for l in range(2) for h in BLOCK_HOOKS]
    + [
        "attn_pool.ln_k.hook_scale",
        "attn_pool.ln_k.hook_normalized",
        "attn_pool.ln_q.hook_scale",
        "attn_pool.ln_q.hook_normalized",
        "attn_pool.attn.hook_q",
        "attn_pool.attn.hook_k",
        "attn_pool.attn.hook_v",
        "attn_pool.attn.hook_attn_scores",
        "attn_pool.attn.hook_pattern",
        "attn_pool.attn.hook_z",
        "attn_pool.attn.hook_result",
        "attn_pool.hook_out",
        "ln_post.hook_scale",
        "ln_post.hook_normalized",
        "hook_pooled",
        "hook_image_embed",
    ]
)


def _build(name, overrides):
    model, hooked = hooked_pair(name, overrides)
    randomize_vectors(model)
    images = random_images(hooked, batch=2)
    tokens = random_tokens(hooked, batch=2)
    tokens[1, 5:10] = 0  # rows of different length (EOT at position 4 in row 1)
    tokens[1, 4] = hooked.text.cfg.vocab_size - 1
    return model, hooked, images, tokens


@pytest.fixture(scope="module")
def tiny():
    return _build("ViT-B-32", TINY)


@pytest.fixture(scope="module")
def tiny_coca():
    return _build("coca_ViT-B-32", TINY_COCA)


@pytest.fixture(scope="module")
def base_outputs(tiny):
    _, hooked, images, tokens = tiny
    with torch.no_grad():
        return hooked.encode_image(images), hooked.encode_text(tokens)


def _firing_order(hooked, images, tokens):
    order = []
    hooked.add_hook(lambda name: True, lambda act, hook: order.append(hook.name))
    try:
        with torch.no_grad():
            hooked(images, tokens)
    finally:
        hooked.reset_hooks()
    return order


# --- names and order --------------------------------------------------------------------------


def test_tiny_model_builds(tiny):
    model, hooked, _, _ = tiny
    assert len(hooked.blocks) == 2 and len(hooked.text.blocks) == 2
    assert hooked.cfg.n_heads == 4 and hooked.cfg.d_head == 16 and hooked.cfg.n_ctx == 50
    assert hooked.text.cfg.n_heads == 4 and hooked.text.cfg.d_embed == 32


def test_hook_dict_names(tiny):
    _, hooked, _, _ = tiny
    names = list(hooked.hook_dict)
    assert sorted(names) == sorted(EXPECTED_VISION_HOOKS + EXPECTED_TEXT_HOOKS)
    assert len(names) == len(set(names)) == 86
    # the image tower's hooks come first, then the text tower's
    assert all(not n.startswith("text.") for n in names[: len(EXPECTED_VISION_HOOKS)])
    # every hook point knows its public name (used by caching and by hook functions)
    assert all(hp.name == n for n, hp in hooked.hook_dict.items())
    assert all(hooked.mod_dict[n] is hooked.hook_dict[n] for n in names)


def test_hook_firing_order(tiny):
    _, hooked, images, tokens = tiny
    order = _firing_order(hooked, images, tokens)
    assert order == EXPECTED_VISION_HOOKS + EXPECTED_TEXT_HOOKS


def test_run_with_cache_keys_in_firing_order(tiny):
    _, hooked, images, tokens = tiny
    with torch.no_grad():
        _, cache = hooked.run_with_cache(images, tokens)
    assert list(cache.keys()) == EXPECTED_VISION_HOOKS + EXPECTED_TEXT_HOOKS


def test_coca_hook_order(tiny_coca):
    _, hooked, images, tokens = tiny_coca
    order = _firing_order(hooked, images, tokens)
    assert order == EXPECTED_COCA_VISION_HOOKS + EXPECTED_TEXT_HOOKS
    assert sorted(hooked.hook_dict) == sorted(order)


def test_clipa_hook_order_without_ln_pre():
    """No ln_pre hooks when the tower has none; ln_post fires after average pooling."""
    _, hooked = hooked_pair("ViT-L-14-CLIPA", {**TINY, "text_cfg": {"layers": 1, "width": 64, "heads": 4}})
    images = random_images(hooked, batch=2)
    shapes = {}

    def record(act, hook):
        shapes[hook.name] = tuple(act.shape)

    hooked.add_hook(lambda name: not name.startswith("text."), record)
    try:
        with torch.no_grad():
            hooked.encode_image(images)
    finally:
        hooked.reset_hooks()
    expected = (["hook_embed", "hook_pos_embed"] + [f"blocks.{l}.{h}" for l in range(2) for h in BLOCK_HOOKS]
                + ["ln_post.hook_scale", "ln_post.hook_normalized", "hook_pooled", "hook_image_embed"])
    assert list(shapes) == expected
    assert sorted(n for n in hooked.hook_dict if not n.startswith("text.")) == sorted(expected)
    assert shapes["ln_post.hook_scale"] == (2, 1)  # LN on the pooled vector
    assert shapes["ln_post.hook_normalized"] == (2, 64)


# --- every hook's return value is used --------------------------------------------------------


def _perturb(name):
    if name.endswith("hook_pattern"):
        return lambda act, hook: torch.ones_like(act) / act.shape[-1]  # uniform: still a valid pattern
    if name.endswith("hook_scale"):
        return lambda act, hook: act * 2
    # not a per-vector affine map (which a following LayerNorm would undo): a ramp over features
    return lambda act, hook: act * 1.5 + torch.linspace(-0.5, 0.5, act.shape[-1])


def _encode(hooked, name, images, tokens):
    """The un-normalised output of the tower that ``name`` belongs to."""
    return hooked.encode_text(tokens) if name.startswith("text.") else hooked.encode_image(images)


def _assert_intervention_changes_output(built, reference, name):
    _, hooked, images, tokens = built
    ref = reference[1] if name.startswith("text.") else reference[0]
    with torch.no_grad(), hooked.hooks(fwd_hooks=[(name, _perturb(name))]):
        out = _encode(hooked, name, images, tokens)
    assert (out - ref).abs().max().item() > 1e-4, f"intervening on {name} did not change the output"


@pytest.mark.parametrize("name", EXPECTED_VISION_HOOKS + EXPECTED_TEXT_HOOKS)
def test_every_hook_output_is_used(tiny, base_outputs, name):
    _assert_intervention_changes_output(tiny, base_outputs, name)


@pytest.fixture(scope="module")
def coca_base(tiny_coca):
    _, hooked, images, tokens = tiny_coca
    with torch.no_grad():
        return hooked.encode_image(images), hooked.encode_text(tokens)


@pytest.mark.parametrize("name", EXPECTED_COCA_VISION_HOOKS + EXPECTED_TEXT_HOOKS)
def test_every_coca_hook_output_is_used(tiny_coca, coca_base, name):
    _assert_intervention_changes_output(tiny_coca, coca_base, name)


# --- caching ------------------------------------------------------------------------------------


def test_run_with_cache_names_filter_str(tiny):
    _, hooked, images, tokens = tiny
    with torch.no_grad():
        _, cache = hooked.run_with_cache(images, tokens, names_filter="blocks.1.attn.hook_pattern")
    assert list(cache.keys()) == ["blocks.1.attn.hook_pattern"]
    assert cache["blocks.1.attn.hook_pattern"].shape == (2, 4, 50, 50)


def test_run_with_cache_names_filter_list(tiny):
    _, hooked, images, tokens = tiny
    names = ["text.blocks.0.hook_resid_post", "hook_image_embed", "blocks.0.ln1.hook_scale"]
    with torch.no_grad():
        out, cache = hooked.run_with_cache(images, tokens, names_filter=names)
    assert sorted(cache.keys()) == sorted(names)
    # the cached embedding is the un-normalised embedding behind the returned one
    assert torch.allclose(torch.nn.functional.normalize(cache["hook_image_embed"], dim=-1), out[0], atol=1e-6)


def test_run_with_cache_names_filter_callable(tiny):
    _, hooked, images, tokens = tiny
    with torch.no_grad():
        _, cache = hooked.run_with_cache(images, tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    assert list(cache.keys()) == [
        "blocks.0.attn.hook_pattern",
        "blocks.1.attn.hook_pattern",
        "text.blocks.0.attn.hook_pattern",
        "text.blocks.1.attn.hook_pattern",
    ]


def test_run_with_cache_remove_batch_dim(tiny):
    _, hooked, images, tokens = tiny
    with torch.no_grad():
        _, full = hooked.run_with_cache(images, tokens)
        _, single = hooked.run_with_cache(images[:1], tokens[:1], remove_batch_dim=True)
    assert single.has_batch_dim is False
    expected_shapes = {
        "hook_embed": (50, 64),
        "ln_pre.hook_scale": (50, 1),
        "blocks.0.attn.hook_q": (50, 4, 16),
        "blocks.0.attn.hook_pattern": (4, 50, 50),
        "blocks.1.attn.hook_result": (50, 4, 64),
        "hook_pooled": (64,),
        "hook_image_embed": (32,),
        "text.blocks.1.attn.hook_pattern": (4, 77, 77),
        "text.hook_text_embed": (32,),
    }
    for name, shape in expected_shapes.items():
        assert tuple(single[name].shape) == shape, name
        assert torch.allclose(single[name], full[name][0], atol=1e-5), name


def test_cache_missing_key_raises_hook_name_error(tiny):
    _, hooked, images, tokens = tiny
    with torch.no_grad():
        _, cache = hooked.run_with_cache(images, tokens, names_filter=["blocks.0.attn.hook_pattern"])
    with pytest.raises(HookNameError):
        cache["missing"]
    with pytest.raises(HookNameError) as info:
        cache["blocks.0.attn.hook_patern"]
    assert "blocks.0.attn.hook_pattern" in str(info.value)
    with pytest.raises(KeyError):  # HookNameError is a KeyError, as for a dict
        cache["blocks.1.attn.hook_pattern"]  # a real hook, filtered out


# --- temporary and permanent hooks -------------------------------------------------------------


def _zero(act, hook):
    return torch.zeros_like(act)


def _no_hooks_left(hooked):
    return all(not hp._forward_hooks and not hp._backward_hooks for hp in hooked.hook_dict.values())


def test_run_with_hooks_applies_then_removes(tiny):
    _, hooked, images, tokens = tiny
    with torch.no_grad():
        before = hooked(images, tokens)
        during = hooked.run_with_hooks(
            images, tokens, fwd_hooks=[("blocks.0.hook_attn_out", _zero), ("text.blocks.1.hook_mlp_out", _zero)]
        )
        after = hooked(images, tokens)
    assert (during[0] - before[0]).abs().max() > 1e-4
    assert (during[1] - before[1]).abs().max() > 1e-4
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert _no_hooks_left(hooked)


def test_run_with_hooks_callable_name(tiny):
    _, hooked, images, tokens = tiny
    seen = []
    with torch.no_grad():
        hooked.run_with_hooks(images, tokens, fwd_hooks=[(lambda n: n.endswith("hook_z"), lambda a, hook: seen.append(hook.name))])
    assert seen == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z", "text.blocks.0.attn.hook_z", "text.blocks.1.attn.hook_z"]
    assert _no_hooks_left(hooked)


def test_hooks_context_manager(tiny, base_outputs):
    _, hooked, images, tokens = tiny
    with torch.no_grad():
        with hooked.hooks(fwd_hooks=[("blocks.1.mlp.hook_post", _zero)]):
            inside = hooked.encode_image(images)
        outside = hooked.encode_image(images)
    assert (inside - base_outputs[0]).abs().max() > 1e-4
    assert torch.equal(outside, base_outputs[0])
    assert _no_hooks_left(hooked)


def test_zero_ablation_matches_manual_computation(tiny):
    """Zeroing the last MLP out makes the pooled vector LN(resid_mid) at the CLS token."""
    _, hooked, images, tokens = tiny
    with torch.no_grad():
        _, cache = hooked.run_with_cache(images, names_filter=["blocks.1.hook_resid_mid"])
        with hooked.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", _zero)]):
            out = hooked.encode_image(images)
        ln = hooked.visual.ln_post
        expected = torch.nn.functional.layer_norm(
            cache["blocks.1.hook_resid_mid"][:, 0], ln.normalized_shape, ln.weight, ln.bias, ln.eps
        ) @ hooked.visual.proj
    assert torch.allclose(out, expected, atol=1e-5)


def test_reset_hooks_removes_add_hook(tiny, base_outputs):
    _, hooked, images, tokens = tiny
    hooked.add_hook("text.blocks.0.attn.hook_v", _zero)
    try:
        with torch.no_grad():
            hooked_out = hooked.encode_text(tokens)
        assert (hooked_out - base_outputs[1]).abs().max() > 1e-4
        with torch.no_grad():  # add_hook persists across runs until reset
            assert torch.equal(hooked.encode_text(tokens), hooked_out)
    finally:
        hooked.reset_hooks()
    with torch.no_grad():
        assert torch.equal(hooked.encode_text(tokens), base_outputs[1])
    assert _no_hooks_left(hooked)


# --- unknown hook names ------------------------------------------------------------------------

TYPO, CLOSEST = "blocks.0.attn.hook_patern", "blocks.0.attn.hook_pattern"


def test_unknown_name_in_run_with_hooks(tiny):
    _, hooked, images, tokens = tiny
    with pytest.raises(HookNameError) as info:
        hooked.run_with_hooks(images, tokens, fwd_hooks=[(TYPO, _zero)])
    assert CLOSEST in str(info.value) and TYPO in str(info.value)
    assert _no_hooks_left(hooked)


def test_unknown_name_in_hooks_context(tiny):
    _, hooked, _, _ = tiny
    with pytest.raises(HookNameError) as info:
        with hooked.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", _zero), ("text.blocks.0.hook_resid_pots", _zero)]):
            pass
    assert "text.blocks.0.hook_resid_post" in str(info.value)
    assert _no_hooks_left(hooked)  # the valid hook added before the typo was removed again


def test_unknown_name_in_add_hook(tiny):
    _, hooked, _, _ = tiny
    with pytest.raises(HookNameError) as info:
        hooked.add_hook(TYPO, _zero)
    assert CLOSEST in str(info.value)
    assert _no_hooks_left(hooked)


@pytest.mark.parametrize("names_filter", [[TYPO], [CLOSEST, TYPO], TYPO])
def test_unknown_name_in_names_filter(tiny, names_filter):
    _, hooked, images, tokens = tiny
    with pytest.raises(HookNameError) as info:
        hooked.run_with_cache(images, tokens, names_filter=names_filter)
    assert CLOSEST in str(info.value)
    assert _no_hooks_left(hooked)


def test_hook_name_error_is_key_error():
    assert issubclass(HookNameError, KeyError)


# --- shapes and config --------------------------------------------------------------------------


def test_activation_shapes(tiny):
    _, hooked, images, tokens = tiny
    with torch.no_grad():
        _, cache = hooked.run_with_cache(images, tokens)
    b, n, t, h, d, m, mlp = 2, 50, 77, 4, 16, 64, 256
    expected = {
        "hook_embed": (b, n, m),
        "hook_pos_embed": (b, n, m),
        "ln_pre.hook_scale": (b, n, 1),
        "ln_pre.hook_normalized": (b, n, m),
        "blocks.0.hook_resid_pre": (b, n, m),
        "blocks.0.attn.hook_q": (b, n, h, d),
        "blocks.0.attn.hook_k": (b, n, h, d),
        "blocks.0.attn.hook_v": (b, n, h, d),
        "blocks.0.attn.hook_attn_scores": (b, h, n, n),
        "blocks.0.attn.hook_pattern": (b, h, n, n),
        "blocks.0.attn.hook_z": (b, n, h, d),
        "blocks.0.attn.hook_result": (b, n, h, m),
        "blocks.0.mlp.hook_pre": (b, n, mlp),
        "blocks.0.mlp.hook_post": (b, n, mlp),
        "blocks.1.hook_resid_post": (b, n, m),
        "ln_post.hook_scale": (b, n, 1),
        "hook_pooled": (b, m),
        "hook_image_embed": (b, 32),
        "text.hook_embed": (b, t, m),
        "text.blocks.1.attn.hook_q": (b, t, h, d),
        "text.blocks.1.attn.hook_pattern": (b, h, t, t),
        "text.blocks.1.attn.hook_result": (b, t, h, m),
        "text.ln_final.hook_scale": (b, t, 1),
        "text.hook_pooled": (b, m),
        "text.hook_text_embed": (b, 32),
    }
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name


def test_pattern_values(tiny):
    """Patterns are distributions over keys; the text pattern is causal."""
    _, hooked, images, tokens = tiny
    with torch.no_grad():
        names = [n for n in hooked.hook_dict if n.endswith("hook_pattern")]
        _, cache = hooked.run_with_cache(images, tokens, names_filter=names)
    assert len(cache) == 4
    for name in cache.keys():
        p = cache[name]
        assert torch.allclose(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5), name
        assert (p >= 0).all()
    text = cache["text.blocks.0.attn.hook_pattern"]
    assert torch.all(text.triu(diagonal=1) == 0)
    assert (cache["blocks.0.attn.hook_pattern"].triu(diagonal=1) > 0).any()  # the image tower is not causal


def test_result_and_z_consistent_with_attn_out(tiny):
    """hook_attn_out = sum over heads of hook_result + b_O, and hook_result = z W_O."""
    _, hooked, images, tokens = tiny
    with torch.no_grad():
        _, cache = hooked.run_with_cache(images, tokens)
    for prefix, tower in (("", hooked.visual), ("text.", hooked.text)):
        for layer in range(2):
            attn = tower.blocks[layer].attn
            result = cache[f"{prefix}blocks.{layer}.attn.hook_result"]
            z = cache[f"{prefix}blocks.{layer}.attn.hook_z"]
            assert torch.allclose(result, torch.einsum("bnhd,hdm->bnhm", z, attn.W_O), atol=1e-5)
            attn_out = cache[f"{prefix}blocks.{layer}.hook_attn_out"]
            assert torch.allclose(result.sum(-2) + attn.b_O, attn_out, atol=1e-5)


def test_cfg_matches_open_clip_modules(tiny):
    model, hooked, _, _ = tiny
    towers = (
        (hooked.cfg, model.visual.transformer),
        (hooked.text.cfg, model.transformer),
    )
    for cfg, transformer in towers:
        first = transformer.resblocks[0]
        assert cfg.n_layers == len(transformer.resblocks) == 2
        assert cfg.n_heads == first.attn.num_heads == 4
        assert cfg.d_model == transformer.width == first.attn.embed_dim == 64
        assert cfg.d_head == first.attn.head_dim == 16
        assert cfg.d_mlp == first.mlp.c_fc.out_features == 256
        assert cfg.n_heads * cfg.d_head == cfg.d_model
    assert hooked.cfg.tower == "vision" and hooked.text.cfg.tower == "text"
    assert hooked.cfg.n_ctx == model.visual.positional_embedding.shape[0] == 50
    assert hooked.cfg.d_embed == model.visual.proj.shape[1] == 32
    assert hooked.text.cfg.n_ctx == hooked.text.cfg.context_length == 77
    assert hooked.text.cfg.vocab_size == model.token_embedding.num_embeddings == 49408
    assert hooked.text.cfg.d_embed == model.text_projection.shape[1] == 32
    assert hooked.cfg.normalization_type == hooked.text.cfg.normalization_type == "LN"
    assert hooked.cfg.has_ln_pre is True and hooked.text.cfg.causal is True


def test_coca_cfg_matches_open_clip_modules(tiny_coca):
    model, hooked, _, _ = tiny_coca
    for cfg, transformer in ((hooked.cfg, model.visual.transformer), (hooked.text.cfg, model.text.transformer)):
        first = transformer.resblocks[0]
        assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_mlp) == (
            len(transformer.resblocks), first.attn.num_heads, transformer.width, first.attn.head_dim,
            first.mlp.c_fc.out_features,
        ) == (2, 4, 64, 16, 256)
    assert hooked.cfg.attn_pooler_heads == model.visual.attn_pool.attn.num_heads == 4
    assert hooked.cfg.attn_pooler_queries == model.visual.attn_pool.query.shape[0] == 256
    assert hooked.text.cfg.context_length == 76 and hooked.text.cfg.n_ctx == 77
