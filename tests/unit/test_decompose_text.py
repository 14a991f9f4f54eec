"""The text-tower decomposition is exact, per prompt at its own pooled position."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clip_lens import HookedCLIP, IndexOutOfRangeError, InputError, UnsupportedArchitectureError
from clip_lens.decompose_text import decompose_text
from tests.helpers import build_open_clip, hooked_pair
from tests.parity.test_open_clip_parity import make_tokens

TEXT = {"layers": 2, "width": 128, "heads": 4}
VISION = {"layers": 1, "width": 64, "head_width": 32, "patch_size": 32}  # the image tower only has to build

# One config per way the text tower pools or projects: name -> (open_clip overrides, timm kwargs).
TEXT_CONFIGS = {
    "toy-shapes": None,  # the bundled model: argmax (EOT) pooling, causal, Parameter projection
    # argmax, causal; LayerScale in the text blocks (folded into W_O / b_O, scales the MLP)
    "ViT-B-32": ({"embed_dim": 64, "vision_cfg": VISION, "text_cfg": {**TEXT, "ls_init_value": 0.1}}, None),
    # CoCa: CLS appended at the end and pooled, pad mask, ln_final after pooling
    "coca_ViT-B-32": ({"embed_dim": 64, "vision_cfg": VISION, "text_cfg": TEXT,
                       "multimodal_cfg": {"layers": 1, "width": 128, "heads": 4}}, None),
    # 'eos' pooling on eos_id=2 (make_tokens keeps eos away from the argmax position)
    "ViT-H-14-worldwide": ({"embed_dim": 64, "vision_cfg": {**VISION, "head_width": 64},
                            "text_cfg": {**TEXT, "vocab_size": 1000}}, None),
    # SigLIP: 'last' pooling, bidirectional (no causal mask), nn.Linear projection with a bias
    "ViT-B-16-SigLIP": ({"embed_dim": 128, "text_cfg": {**TEXT, "vocab_size": 1000}},
                        {"depth": 1, "embed_dim": 128, "num_heads": 2}),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


@pytest.fixture(scope="module", params=list(TEXT_CONFIGS))
def text_case(request, one_torch_thread):
    """(name, HookedCLIP, tokens of three lengths, reference un-normalised text embedding)."""
    name = request.param
    if TEXT_CONFIGS[name] is None:
        model = HookedCLIP.from_pretrained(name)
        tokens = model.to_tokens(["a red circle", "a small blue square on a green background", "blue"])
        with torch.no_grad():
            reference = model.encode_text(tokens)
    else:
        overrides, timm = TEXT_CONFIGS[name]
        open_clip_model, model = hooked_pair(name, overrides, randomize=True, timm=timm)
        tokens = make_tokens(model)
        with torch.no_grad():
            reference = open_clip_model.encode_text(tokens, normalize=False)  # CoCa normalises by default
    return name, model, tokens, reference


def _expected_positions(model: HookedCLIP, tokens: torch.Tensor) -> torch.Tensor:
    """Pooled residual positions, worked out here from the tokens (not from the tower)."""
    tower = model.text
    if tower.cls_emb is not None:  # the appended CLS
        return torch.full((len(tokens),), tokens.shape[1])
    if tower.pool_type == "last":
        return torch.full((len(tokens),), tokens.shape[1] - 1)
    if tower.pool_type == "eos":
        return torch.tensor([row.tolist().index(tower.eos_id) for row in tokens])
    assert tower.pool_type == "argmax"
    return tokens.argmax(-1)


def _read_out(model: HookedCLIP, cache, positions: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
    """``written [batch, ..., d_model]`` at the pooled positions, through ln_final with its cached
    scale (centred, / σ, ⊙ γ) and the projection's matrix (no bias: a direct term has none)."""
    batch = torch.arange(len(positions))
    scale = cache["text.ln_final.hook_scale"]
    sigma = scale[:, 0] if scale.ndim == 2 else scale[batch, positions, 0]  # CoCa: LN after pooling
    centred = written - written.mean(-1, keepdim=True)
    normed = centred / sigma.view(-1, *[1] * (written.ndim - 1)) * model.text.ln_final.weight
    proj = model.text.text_projection
    if proj is None:
        return normed
    return normed @ (proj.weight.T if isinstance(proj, nn.Linear) else proj)


def test_text_decomposition_sums_to_text_embedding(text_case):
    name, model, tokens, reference = text_case
    parts = decompose_text(model, tokens, heads="all", token_layers="all")
    assert _rel(parts.total(), reference) <= 1e-4
    assert parts.relative_error().max().item() <= 1e-4
    torch.testing.assert_close(parts.embedding, reference, rtol=1e-4, atol=1e-5)
    # Each level of detail adds up to the level above it.
    torch.testing.assert_close(parts.heads.sum(2) + parts.attn_bias, parts.attn, rtol=0, atol=1e-5)
    torch.testing.assert_close(parts.tokens.sum(3), parts.heads, rtol=0, atol=1e-5)
    n_pos = tokens.shape[1] + (1 if model.text.cls_emb is not None else 0)
    cfg = model.text.cfg
    assert parts.tokens.shape == (len(tokens), cfg.n_layers, cfg.n_heads, n_pos, cfg.d_embed)
    assert parts.head_layers == parts.token_layers == list(range(cfg.n_layers)) and parts.pooler_mlp is None


def test_head_term_is_cached_z_at_each_prompts_pooled_position_through_frozen_ln_final(text_case):
    """Independent check from the cache: z at each prompt's own pooled position, through W_O,
    centred, divided by that position's ln_final scale, scaled by γ and projected."""
    _, model, tokens, _ = text_case
    positions = _expected_positions(model, tokens)
    assert len(set(positions.tolist())) > 1 or model.text.pool_type == "last" or model.text.cls_emb is not None
    parts = decompose_text(model, tokens)
    _, cache = model.run_with_cache(text=tokens)
    batch = torch.arange(len(tokens))
    for layer in range(model.text.cfg.n_layers):
        z = cache[f"text.blocks.{layer}.attn.hook_z"][batch, positions]  # [batch, head, d_head]
        written = torch.einsum("bhk,hkm->bhm", z, model.text.blocks[layer].attn.W_O)
        expected = _read_out(model, cache, positions, written)
        torch.testing.assert_close(parts.heads[:, layer], expected, rtol=1e-4, atol=1e-5)
        # the whole layer: hook_attn_out at the pooled position, out_proj bias included
        attn_out = cache[f"text.blocks.{layer}.hook_attn_out"][batch, positions]
        torch.testing.assert_close(parts.attn[:, layer], _read_out(model, cache, positions, attn_out),
                                   rtol=1e-4, atol=1e-5)
    embed = cache["text.hook_embed"][batch, positions] + cache["text.hook_pos_embed"][batch, positions]
    torch.testing.assert_close(parts.embed, _read_out(model, cache, positions, embed), rtol=1e-4, atol=1e-5)


def test_tokens_the_pooled_position_cannot_attend_to_get_exactly_zero(text_case):
    _, model, tokens, _ = text_case
    positions = _expected_positions(model, tokens)
    layer = model.text.cfg.n_layers - 1
    parts = decompose_text(model, tokens, token_layers=[layer])
    _, cache = model.run_with_cache(text=tokens, names_filter=[f"text.blocks.{layer}.attn.hook_pattern"])
    row = cache[f"text.blocks.{layer}.attn.hook_pattern"][torch.arange(len(tokens)), :, positions]  # [b, h, t]
    masked = row == 0
    terms = parts.tokens[:, 0]  # [batch, head, token, out]
    assert (terms[masked] == 0).all()
    assert (terms[~masked].norm(dim=-1) > 0).all()
    n_pos = row.shape[-1]
    after = torch.arange(n_pos)[None, :] > positions[:, None]  # [batch, token]
    if model.text.cfg.causal:  # every later position is masked
        assert masked.all(1)[after].all()
    if model.text.cfg.causal and model.text.cls_emb is None:  # prompts pool at different depths, before the end
        assert after.any() and len(set(positions.tolist())) == len(tokens)
    if model.text.pad_mask:  # CoCa: padding is masked too, so some earlier positions get 0 as well
        assert (masked.all(1) & ~after).any()
    if not model.text.cfg.causal and not model.text.pad_mask:  # SigLIP: every token reaches the pooled one
        assert not masked.any()


def test_each_prompt_decomposes_as_if_it_were_alone(text_case):
    """Batching prompts of different lengths changes nothing: row i equals decomposing prompt i alone."""
    _, model, tokens, _ = text_case
    together = decompose_text(model, tokens, token_layers=[0])
    for i in range(len(tokens)):
        alone = decompose_text(model, tokens[i:i + 1], token_layers=[0])
        for field in ("embedding", "embed", "attn", "mlp", "bias", "heads", "tokens"):
            torch.testing.assert_close(getattr(alone, field)[0], getattr(together, field)[i], rtol=1e-4, atol=1e-5)


def test_projected_text_decomposition_equals_projecting_each_term(text_case):
    _, model, tokens, _ = text_case
    directions = torch.randn(5, model.text.cfg.d_embed, generator=torch.Generator().manual_seed(3))
    full = decompose_text(model, tokens, token_layers="all")
    projected = decompose_text(model, tokens, token_layers="all", directions=directions)
    assert projected.projected and not full.projected
    for field in ("embedding", "embed", "attn", "attn_bias", "mlp", "bias", "heads", "tokens"):
        torch.testing.assert_close(getattr(projected, field), getattr(full, field) @ directions.T,
                                   rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(projected.embedding_norm, full.embedding.norm(dim=-1))
    assert projected.relative_error().max().item() <= 1e-4


def test_strings_layer_selection_and_normalized_terms():
    model = HookedCLIP.from_pretrained("toy-shapes")
    texts = ["a red circle", "a small blue square"]
    parts = decompose_text(model, texts, heads=[0], token_layers=[-1])
    ids = model.decompose_text(model.to_tokens(texts), heads=[0], token_layers=[-1])  # the HookedCLIP method
    torch.testing.assert_close(parts.total(), ids.total(), rtol=0, atol=0)
    assert parts.head_layers == [0, 2] and parts.token_layers == [2]
    assert parts.heads.shape == (2, 2, 4, 128) and parts.tokens.shape == (2, 1, 4, 32, 128)
    torch.testing.assert_close(parts.tokens[:, 0].sum(2), parts.heads[:, 1], rtol=0, atol=1e-5)
    assert parts.head_labels[:2] == ["L0H0", "L0H1"]
    unit = parts.normalized()
    torch.testing.assert_close(unit.total().norm(dim=-1), torch.ones(2), rtol=1e-4, atol=1e-4)
    none = decompose_text(model, texts, heads=None)
    assert none.heads is None and none.tokens is None and none.relative_error().max().item() <= 1e-4
    torch.testing.assert_close(none.attn, parts.attn, rtol=0, atol=1e-5)


def test_text_tower_without_projection_decomposes_in_d_model():
    open_clip_model, model = hooked_pair(
        "ViT-B-32", {"vision_cfg": VISION, "text_cfg": {**TEXT, "proj_type": "none"}}, randomize=True)
    assert model.text.text_projection is None and model.text.cfg.d_embed is None
    tokens = make_tokens(model)
    parts = decompose_text(model, tokens, token_layers=[1])
    with torch.no_grad():
        reference = open_clip_model.encode_text(tokens)
    assert parts.embedding.shape == (3, 128)
    assert _rel(parts.total(), reference) <= 1e-4
    directions = torch.randn(2, 128, generator=torch.Generator().manual_seed(0))
    projected = decompose_text(model, tokens, directions=directions)
    torch.testing.assert_close(projected.heads, parts.heads @ directions.T, rtol=1e-4, atol=1e-5)


def test_bad_arguments_raise_clear_errors():
    model = HookedCLIP.from_pretrained("toy-shapes")
    tokens = model.to_tokens(["a red circle"])
    with pytest.raises(IndexOutOfRangeError, match="token_layers: layer 3 is out of range for a 3-layer"):
        decompose_text(model, tokens, token_layers=[3])
    with pytest.raises(IndexOutOfRangeError, match="heads: layer -4 is out of range"):
        decompose_text(model, tokens, heads=[-4])
    with pytest.raises(InputError, match="'all', None or a list"):
        decompose_text(model, tokens, heads="some")
    with pytest.raises(InputError, match=r"directions must be a tensor \[n_directions, 128\]"):
        decompose_text(model, tokens, directions=torch.randn(3, 7))
    with pytest.raises(InputError, match="NaN"):
        decompose_text(model, tokens, directions=torch.full((2, 128), float("nan")))
    with pytest.raises(InputError, match="integer token ids"):
        decompose_text(model, tokens.float())
    with pytest.raises(InputError, match=r"token ids must lie in \[0, 128\)"):
        decompose_text(model, tokens + 1000)
    with pytest.raises(InputError, match="batched"):
        decompose_text(model, tokens[0])


def test_per_token_text_embeddings_cannot_be_decomposed():
    _, model = hooked_pair("ViT-B-32", {"vision_cfg": VISION, "text_cfg": {**TEXT, "layers": 1, "pool_type": "none"}})
    with pytest.raises(UnsupportedArchitectureError, match="pool_type='none'"):
        decompose_text(model, make_tokens(model))


def test_hugging_face_text_tower_is_refused(tmp_path):
    pytest.importorskip("transformers")
    from tests.parity.test_hf_text_tower import _hf_config, _overrides

    _hf_config("roberta").save_pretrained(str(tmp_path))
    model = HookedCLIP.from_open_clip(build_open_clip("roberta-ViT-B-32", _overrides("roberta-mean-mlp", tmp_path)),
                                      "roberta-ViT-B-32")
    with pytest.raises(UnsupportedArchitectureError, match="Hugging Face text tower"):
        decompose_text(model, torch.zeros(1, 8, dtype=torch.long))
