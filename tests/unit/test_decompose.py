"""The decomposition is exact: its terms add up to open_clip's image embedding."""

from __future__ import annotations

import pytest
import torch

from clip_lens import IndexOutOfRangeError, InputError, UnsupportedArchitectureError
from tests.helpers import hooked_pair, random_images

# One config per way the image tower pools (each keeps the real architecture's features).
POOLING_CONFIGS = {
    "ViT-B-32": None,  # CLS token, ln_pre, LayerNorm over all tokens then pooling
    "ViT-M-16-alt": None,  # LayerScale on attention and MLP
    "ViT-L-14-CLIPA": {"vision_cfg": {"layers": 2, "width": 256}, "text_cfg": {"layers": 1}},  # avg pool, LN after pool, no ln_pre
    "coca_ViT-B-32": None,  # attentional pooler (8 pooler heads, 256 queries), ln_post on pooler output
    "ViT-B-16-plus-240": {"vision_cfg": {"layers": 2}, "text_cfg": {"layers": 1}},  # 240 px, 15x15 grid
}


@pytest.fixture(scope="module", params=list(POOLING_CONFIGS))
def pair(request):
    return hooked_pair(request.param, POOLING_CONFIGS[request.param], randomize=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def test_decomposition_sums_to_image_embedding(pair):
    open_clip_model, model = pair
    images = random_images(model, batch=3)
    parts = model.decompose(images, heads="all", tokens=[-1])
    with torch.no_grad():
        reference = open_clip_model.encode_image(images, normalize=False)
    assert _rel(parts.total(), reference) <= 1e-4
    assert parts.relative_error().max().item() <= 1e-4
    # Each level of detail adds up to the level above it.
    torch.testing.assert_close(parts.heads.sum(2) + parts.attn_bias, parts.attn, rtol=0, atol=1e-5)
    torch.testing.assert_close(parts.tokens.sum(3), parts.heads[:, -1:], rtol=0, atol=1e-5)


def test_projected_decomposition_equals_projecting_each_term(pair):
    _, model = pair
    images = random_images(model, batch=2, seed=1)
    directions = torch.randn(5, model.cfg.d_embed, generator=torch.Generator().manual_seed(3))
    full = model.decompose(images, tokens="all")
    projected = model.decompose(images, tokens="all", directions=directions)
    assert projected.tokens.shape == (2, model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_ctx, 5)
    torch.testing.assert_close(projected.tokens, full.tokens @ directions.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(projected.heads, full.heads @ directions.T, rtol=1e-4, atol=1e-5)
    assert _rel(projected.total(), full.embedding @ directions.T) <= 1e-4


def test_head_term_matches_cached_head_result_through_frozen_ln_post():
    """Independent check on a CLS-pooled model: the head term is its result at the CLS
    position, centred, divided by the cached ln_post scale, scaled by γ and projected."""
    _, model = hooked_pair("ViT-B-32", randomize=True)
    images = random_images(model, batch=2)
    parts = model.decompose(images)
    _, cache = model.run_with_cache(images)
    cache.compute_head_results()
    layer = model.cfg.n_layers - 1
    result = cache[f"blocks.{layer}.attn.hook_result"][:, 0]  # [batch, head, d_model]
    scale = cache["ln_post.hook_scale"][:, 0]  # [batch, 1]
    centred = result - result.mean(-1, keepdim=True)
    expected = (centred / scale[:, None] * model.visual.ln_post.weight) @ model.visual.proj
    torch.testing.assert_close(parts.heads[:, layer], expected, rtol=1e-4, atol=1e-5)


def test_token_term_is_pattern_times_value_through_w_o():
    _, model = hooked_pair("ViT-B-32", randomize=True)
    images = random_images(model, batch=1)
    layer = 1
    parts = model.decompose(images, tokens=[layer])
    _, cache = model.run_with_cache(images)
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, 0]  # [head, token] (CLS query)
    v = cache[f"blocks.{layer}.attn.hook_v"][0]  # [token, head, d_head]
    written = torch.einsum("ht,thk,hkm->htm", pattern, v, model.blocks[layer].attn.W_O)
    centred = written - written.mean(-1, keepdim=True)
    scale = cache["ln_post.hook_scale"][0, 0]
    expected = (centred / scale * model.visual.ln_post.weight) @ model.visual.proj
    torch.testing.assert_close(parts.tokens[0, 0], expected, rtol=1e-4, atol=1e-6)


def test_planted_single_writer_head_receives_everything_but_embed_and_bias():
    """Ground truth: silence every MLP and every head's output except one; the decomposition
    must attribute all of the layers' contribution to that head."""
    open_clip_model, model = hooked_pair("ViT-B-32", seed=5, randomize=True)
    keep_layer, keep_head, d_head = 1, 3, model.cfg.d_head
    with torch.no_grad():
        for layer, block in enumerate(open_clip_model.visual.transformer.resblocks):
            block.mlp.c_proj.weight.zero_()
            block.mlp.c_proj.bias.zero_()
            block.attn.out_proj.bias.zero_()
            weight = block.attn.out_proj.weight
            mask = torch.zeros_like(weight)
            if layer == keep_layer:
                mask[:, keep_head * d_head:(keep_head + 1) * d_head] = 1
            weight.mul_(mask)
    parts = model.decompose(random_images(model, batch=2))
    heads = parts.heads.clone()
    planted = heads[:, keep_layer, keep_head].clone()
    heads[:, keep_layer, keep_head] = 0
    assert heads.abs().max().item() == 0
    assert parts.mlp.abs().max().item() == 0
    expected = parts.embedding - parts.embed - parts.bias
    torch.testing.assert_close(planted, expected, rtol=1e-4, atol=1e-5)
    assert planted.norm(dim=-1).min().item() > 1e-3


def test_layer_selection_and_normalized_terms():
    _, model = hooked_pair("ViT-B-32", randomize=True)
    images = random_images(model, batch=2)
    parts = model.decompose(images, heads=[0], tokens=None)
    assert parts.heads.shape == (2, 1, model.cfg.n_heads, model.cfg.d_embed)
    assert parts.tokens is None and parts.head_layers == [0]
    assert parts.relative_error().max().item() <= 1e-4
    assert len(parts.head_labels) == model.cfg.n_heads and parts.head_labels[0] == "L0H0"
    unit = parts.normalized()
    torch.testing.assert_close(unit.total().norm(dim=-1), torch.ones(2), rtol=1e-4, atol=1e-4)
    none = model.decompose(images, heads=None)
    assert none.heads is None and none.relative_error().max().item() <= 1e-4


def test_bad_arguments_raise_clear_errors():
    _, model = hooked_pair("ViT-B-32", randomize=True)
    images = random_images(model, batch=1)
    with pytest.raises(IndexOutOfRangeError, match="layer 2 is out of range for a 2-layer"):
        model.decompose(images, tokens=[2])
    with pytest.raises(InputError, match="'all', None or a list"):
        model.decompose(images, heads="some")
    with pytest.raises(InputError, match=r"directions must be a tensor \[n_directions, 512\]"):
        model.decompose(images, directions=torch.randn(3, 7))
    with pytest.raises(InputError, match="NaN"):
        model.decompose(images, directions=torch.full((2, 512), float("nan")))
    with pytest.raises(InputError, match="3x224x224|224x224"):
        model.decompose(torch.randn(1, 3, 32, 32))


def test_per_token_embeddings_cannot_be_decomposed():
    _, model = hooked_pair("ViT-B-32", {"vision_cfg": {"layers": 1, "pool_type": "none"}, "text_cfg": {"layers": 1}})
    with pytest.raises(UnsupportedArchitectureError, match="pool_type='none'"):
        model.decompose(random_images(model, batch=1))


def test_bfloat16_model_matches_open_clip_and_decomposes_to_bf16_precision():
    open_clip_model, model = hooked_pair("ViT-B-32")
    open_clip_model.to(torch.bfloat16)
    images = random_images(model, batch=2).to(torch.bfloat16)
    with torch.no_grad():
        reference = open_clip_model.encode_image(images, normalize=True).float()
        hooked = model.encode_image(images, normalize=True).float()
    assert (reference - hooked).abs().max().item() <= 4e-3  # bf16 resolution is 2**-8
    parts = model.decompose(images, tokens=[-1])
    assert parts.tokens.dtype == torch.bfloat16
    assert parts.relative_error().max().item() <= 2e-2


def test_from_clip_lens_import_decompose_is_the_function_after_its_module_was_imported():
    import importlib

    importlib.import_module("clip_lens.decompose")  # as clip_lens.collect does: the package attribute is now the module
    importlib.import_module("clip_lens.decompose_text")
    from clip_lens import HookedCLIP, decompose, decompose_text

    model = HookedCLIP.from_pretrained("toy-shapes")
    assert decompose(model, torch.zeros(1, 3, 64, 64)).heads.shape[1:3] == (4, 4)
    assert decompose_text(model, ["a red circle"]).embedding.shape == (1, 128)
    assert decompose.reference_difference is not None  # still the module, for attribute access
