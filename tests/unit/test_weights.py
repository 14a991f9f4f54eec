"""TransformerLens' weight API (stacked ``W_Q`` … ``W_proj``, ``QK``/``OV``) and weight processing
(``fold_ln``, ``center_writing_weights``).

The stacked weights must reproduce the cached activations (q/k/v from the ``ln1`` output, the MLP,
the embeddings, the read-out) on native and timm towers; processing must leave both towers' outputs
unchanged (≤1e-5 relative, fp32), keep the wrapped open_clip model in sync (shared parameters), keep
the decomposition exact, and refuse where centring would change the model.
"""

from __future__ import annotations

import einops
import pytest
import torch

from clip_lens import HookedCLIP, UnsupportedArchitectureError
from clip_lens.weights import process_weights
from tests.helpers import hooked_pair, random_images, random_tokens, randomize_vectors
from tests.parity.test_timm_towers import overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# LayerScale on the image tower (randomised to 0.5 ± 0.1): W_O/W_out fold it, centring folds it away
TINY = {
    "vision_cfg": {"layers": 2, "width": 64, "patch_size": 32, "head_width": 16, "ls_init_value": 0.1},
    "text_cfg": {"layers": 2, "width": 64, "heads": 4},
    "embed_dim": 32,
}
TINY_COCA = {
    "vision_cfg": {"layers": 2, "width": 64, "patch_size": 32, "head_width": 16, "attn_pooler_heads": 4},
    "text_cfg": {"layers": 2, "width": 64, "heads": 4},
    "multimodal_cfg": {"layers": 1, "width": 64, "heads": 4},
    "embed_dim": 32,
}
TIMM = {"depth": 2, "embed_dim": 128, "num_heads": 2, "img_size": 112}
RTOL = 1e-5
ATOL = 1e-5  # weights against activations (fp32, width ≤ 682)


def build(label: str):
    """``(open_clip model, HookedCLIP)`` with every 1-d parameter randomised."""
    if label == "ViT-B-32":
        model, hooked = hooked_pair("ViT-B-32", TINY)
    elif label == "coca":
        model, hooked = hooked_pair("coca_ViT-B-32", TINY_COCA)
    else:
        over = overrides(label, TIMM)
        over = {**over, "text_cfg": {**over["text_cfg"], "width": 128, "heads": 2}}
        model, hooked = hooked_pair(label, over, timm=TIMM)
    randomize_vectors(model)
    return model, hooked


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> bool:
    return (a - b).abs().max().item() <= atol * max(1.0, b.abs().max().item())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --- stacked weights ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["ViT-B-32", "ViT-B-16-SigLIP", "EVA02-B-16"])
def cached(request):
    _, hooked = build(request.param)
    images, tokens = random_images(hooked, batch=2), random_tokens(hooked, batch=2, length=6)
    with torch.no_grad():
        _, cache = hooked.run_with_cache(images, tokens)
    return request.param, hooked, images, tokens, cache


def test_weight_shapes(cached):
    label, hooked, *_ = cached
    for tower in (hooked, hooked.text):
        cfg = tower.cfg
        L, h, m, d, d_mlp = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_mlp
        for name in ("W_Q", "W_K", "W_V"):
            assert getattr(tower, name).shape == (L, h, m, d)
        for name in ("b_Q", "b_K", "b_V"):
            assert getattr(tower, name).shape == (L, h, d)
        assert tower.W_O.shape == (L, h, d, m) and tower.b_O.shape == (L, m)
        assert tower.W_in.shape == (L, m, d_mlp) and tower.b_in.shape == (L, d_mlp)
        assert tower.W_out.shape == (L, d_mlp, m) and tower.b_out.shape == (L, m)
        assert tower.QK.shape == (L, h, m, m) and tower.OV.shape == (L, h, m, m)
        assert tower.W_proj.shape == (m, cfg.d_embed) and tower.b_proj.shape == (cfg.d_embed,)
        assert tower.W_pos.shape == (cfg.n_ctx, m)
    gated = label == "EVA02-B-16"
    assert (hooked.W_gate is not None) == gated and (hooked.text.W_gate is None)
    if gated:
        assert hooked.W_gate.shape == hooked.W_in.shape and hooked.b_gate.shape == hooked.b_in.shape
    p_h, p_w = hooked.cfg.patch_size
    assert hooked.W_E.shape == (3 * p_h * p_w, hooked.cfg.d_model)
    assert hooked.text.W_E.shape == (hooked.text.cfg.vocab_size, hooked.text.cfg.d_model)
    assert hooked.blocks[0].ln1.w is hooked.blocks[0].ln1.weight and hooked.blocks[0].ln1.b is hooked.blocks[0].ln1.bias


def test_factored_circuits(cached):
    _, hooked, *_ = cached
    for tower in (hooked, hooked.text):
        assert torch.allclose(tower.OV.AB, tower.W_V @ tower.W_O, atol=1e-6)
        assert torch.allclose(tower.QK.AB, tower.W_Q @ tower.W_K.transpose(-2, -1), atol=1e-6)
        assert torch.allclose(tower.blocks[1].attn.OV.AB, tower.OV.AB[1], atol=1e-6)


def _check_block_weights(tower, cache, prefix: str) -> None:
    """Every block's q/k/v, attention output, MLP hidden and output from the stacked weights."""
    for l, block in enumerate(tower.blocks):
        p = f"{prefix}blocks.{l}."
        x = cache[p + "ln1.hook_normalized"]
        for name in "QKV":
            expected = cache[p + f"attn.hook_{name.lower()}"]
            got = torch.einsum("bnm,hmd->bnhd", x, getattr(tower, f"W_{name}")[l]) + getattr(tower, f"b_{name}")[l]
            assert _close(got, expected), (p, name)
        out = torch.einsum("bnhd,hdm->bnm", cache[p + "attn.hook_z"], tower.W_O[l])
        if block.attn.ln_inner is not None:  # EVA02: the heads' LayerNorm scale divides
            out = out / cache[p + "attn.ln_inner.hook_scale"]
        assert _close(out + tower.b_O[l], cache[p + "hook_attn_out"]), p
        x = cache[p + "ln2.hook_normalized"]
        if tower.W_gate is not None:
            assert _close(x @ tower.W_gate[l] + tower.b_gate[l], cache[p + "mlp.hook_pre"]), p
            assert _close(x @ tower.W_in[l] + tower.b_in[l], cache[p + "mlp.hook_pre_linear"]), p
        else:
            assert _close(x @ tower.W_in[l] + tower.b_in[l], cache[p + "mlp.hook_pre"]), p
        out = cache[p + "mlp.hook_post"] @ tower.W_out[l]
        if block.mlp.ln_inner is not None:
            out = out / cache[p + "mlp.ln_inner.hook_scale"]
        assert _close(out + tower.b_out[l], cache[p + "hook_mlp_out"]), p


def test_stacked_weights_reproduce_the_cached_activations(cached):
    _, hooked, images, tokens, cache = cached
    _check_block_weights(hooked, cache, "")
    _check_block_weights(hooked.text, cache, "text.")
    # embeddings: the patchify convolution as a matrix, the position table, the read-out
    p_h, p_w = hooked.cfg.patch_size
    patches = einops.rearrange(images, "b c (gh ph) (gw pw) -> b (gh gw) (c ph pw)", ph=p_h, pw=p_w)
    prefix = hooked.cfg.n_prefix_tokens
    assert _close(patches @ hooked.W_E + hooked.b_E, cache["hook_embed"][:, prefix:])
    assert torch.equal(hooked.W_pos, cache["hook_pos_embed"][0])
    assert _close(cache["hook_pooled"] @ hooked.W_proj + hooked.b_proj, cache["hook_image_embed"])
    text = hooked.text
    assert torch.equal(text.W_E[tokens], cache["text.hook_embed"])
    assert torch.equal(text.W_pos, cache["text.hook_pos_embed"][0])
    assert _close(cache["text.hook_pooled"] @ text.W_proj + text.b_proj, cache["text.hook_text_embed"])


# --- fold_ln / center_writing_weights -------------------------------------------------------------


FOLD_FAMILIES = {
    # label: LayerNorms folded beyond every block's ln1/ln2 (image tower)
    "ViT-B-32": [],
    "coca": ["attn_pool.ln_k", "attn_pool.ln_q"],
    "ViT-B-16-SigLIP": ["attn_pool.ln", "ln_post"],  # ln_post feeds the MAP pooler's kv
    "EVA02-B-16": ["blocks.0.attn.ln_inner", "blocks.0.mlp.ln_inner", "ln_post"],  # ln_post -> timm head
    "EVA01-g-14": ["ln_post"],  # fused qkv with q/v biases: k_bias becomes a parameter
}


@pytest.mark.parametrize("label", list(FOLD_FAMILIES))
@pytest.mark.parametrize("centre", [False, True], ids=["fold_ln", "fold_ln+center"])
def test_processing_leaves_outputs_unchanged(label, centre):
    model, hooked = build(label)
    images, tokens = random_images(hooked, batch=2), random_tokens(hooked, batch=2, length=6)
    with torch.no_grad():
        image_ref, text_ref = hooked.encode_image(images), hooked.encode_text(tokens)
        done = process_weights(hooked, fold_ln=True, center_writing_weights=centre)
        image, text = hooked.encode_image(images), hooked.encode_text(tokens)
        assert _rel(image, image_ref) <= RTOL and _rel(text, text_ref) <= RTOL
        # the wrapped open_clip model reads the same (rewritten) parameters
        assert _rel(model.encode_image(images, normalize=False), image_ref) <= RTOL
        assert _rel(model.encode_text(tokens, normalize=False), text_ref) <= RTOL
        assert hooked.decompose(images).relative_error().max() <= 1e-4

    blocks = [f"{t}blocks.{l}.{ln}" for t, tower in (("", hooked), ("text.", hooked.text))
              for l in range(tower.cfg.n_layers) for ln in ("ln1", "ln2")]
    assert set(blocks + FOLD_FAMILIES[label]) <= set(done["fold_ln"])
    for name in done["fold_ln"]:
        ln = hooked.mod_dict[name]
        assert torch.equal(ln.w, torch.ones_like(ln.w)) and torch.equal(ln.b, torch.zeros_like(ln.b)), name
    if not centre:
        assert done["center_writing_weights"] == []
        return
    for tower in (hooked, hooked.text):
        for name in ("W_O", "W_out", "W_E", "W_pos"):
            assert getattr(tower, name).mean(-1).abs().max() <= 1e-6, name
        for name in ("b_O", "b_out"):
            assert getattr(tower, name).mean(-1).abs().max() <= 1e-6, name
        if hooked.cfg.layer_scale and tower is hooked:  # folded into the writers, then set to 1
            assert torch.equal(tower.blocks[0].attn.layer_scale, torch.ones_like(tower.blocks[0].attn.layer_scale))
    if not hooked.cfg.has_ln_pre:  # every writer is centred, so is the residual stream
        with torch.no_grad():
            _, cache = hooked.run_with_cache(images, tokens, names_filter=lambda n: n.endswith("blocks.1.hook_resid_post"))
        for name, resid in cache.items():
            assert resid.mean(-1).abs().max() <= 1e-5 * resid.abs().max(), name


def test_post_norm_blocks_fold_what_they_can_and_refuse_centring():
    """EVA02-E: no LayerNorm before attention/MLP, so nothing to fold there and centring is invalid."""
    model, hooked = build("EVA02-E-14")
    images = random_images(hooked, batch=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedArchitectureError, match="post-norm"):
        process_weights(hooked, fold_ln=True, center_writing_weights=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused before changing anything
    with torch.no_grad():
        reference = hooked.encode_image(images)
        done = process_weights(hooked, fold_ln=True)
        assert _rel(hooked.encode_image(images), reference) <= RTOL
    assert not any(name.startswith("blocks.") for name in done["fold_ln"])
    assert "ln_post" in done["fold_ln"]
    assert not torch.equal(hooked.blocks[0].ln1_post.w, torch.ones_like(hooked.blocks[0].ln1_post.w))


def test_from_pretrained_processes_the_toy_model():
    plain = HookedCLIP.from_pretrained("toy-shapes")
    processed = HookedCLIP.from_pretrained("toy-shapes", fold_ln=True, center_writing_weights=True)
    images, tokens = random_images(plain, batch=2), random_tokens(plain, batch=2, length=5)
    with torch.no_grad():
        assert _rel(processed.encode_image(images), plain.encode_image(images)) <= RTOL
        assert _rel(processed.encode_text(tokens), plain.encode_text(tokens)) <= RTOL
        assert processed.decompose(images).relative_error().max() <= 1e-4
    assert torch.equal(processed.blocks[0].ln1.w, torch.ones_like(processed.blocks[0].ln1.w))
    assert processed.W_O.mean(-1).abs().max() <= 1e-6
