"""convention="reference": Gandelsman et al.'s split of the image embedding, checked against an
oracle written straight from the formula on raw cached activations."""

from __future__ import annotations

import pytest
import torch

from clip_lens import HookedCLIP, InputError, UnsupportedArchitectureError
from clip_lens.decompose import reference_difference
from tests.helpers import hooked_pair, random_images

NARROW_B32 = {"vision_cfg": {"layers": 2, "width": 256}, "text_cfg": {"layers": 1}}  # 4 heads of 64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-term relative error ‖a − b‖ / ‖b‖ (last axis = the embedding)."""
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


@pytest.fixture(scope="module", params=["toy-shapes", "ViT-B-32"])
def model64(request):
    """float64 CLS-pooled models: the bundled toy model and a narrow random ViT-B-32 (random 1-d params)."""
    if request.param == "toy-shapes":
        model = HookedCLIP.from_pretrained("toy-shapes")
    else:
        _, model = hooked_pair("ViT-B-32", NARROW_B32, randomize=True)
    return model.to(torch.float64)


@torch.no_grad()
def _oracle(model: HookedCLIP, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference split from the notes' formula, on raw activations of run_with_cache:

    c[l,t,h] = α^{l,h}_{0,t} · (v_t W_O^h) + b_O / (N·H); the "MLP" terms are the ln_pre output
    (index 0) and each MLP's output at CLS; each piece c maps to P^T[γ⊙(c − μ/K)/σ + β/K] with
    K = (2L+1)·N·H for token-head terms and K = 2L+1 for the L+1 "MLP" terms.
    """
    L, H = model.cfg.n_layers, model.cfg.n_heads
    _, cache = model.run_with_cache(images)
    ln, P = model.visual.ln_post, model.visual.proj
    z = cache[f"blocks.{L - 1}.hook_resid_post"][:, 0]  # the CLS residual that ln_post reads
    mu = z.mean(-1)[:, None]  # [batch, 1]
    sigma = cache["ln_post.hook_scale"][:, 0]  # [batch, 1]

    def through_ln(c: torch.Tensor, K: int) -> torch.Tensor:  # c [batch, ..., d_model]
        shape = (-1,) + (1,) * (c.ndim - 1)
        return (ln.weight * (c - mu.view(shape) / K) / sigma.view(shape) + ln.bias / K) @ P

    mlps = [cache["blocks.0.hook_resid_pre"][:, 0]] + [cache[f"blocks.{l}.hook_mlp_out"][:, 0] for l in range(L)]
    mlps = through_ln(torch.stack(mlps, 1), 2 * L + 1)  # [batch, L+1, D]
    tokens = []
    for l in range(L):
        attn = model.blocks[l].attn
        pattern = cache[f"blocks.{l}.attn.hook_pattern"][:, :, 0]  # [batch, head, token]: query CLS
        v = cache[f"blocks.{l}.attn.hook_v"]  # [batch, token, head, d_head] (value bias included)
        N = v.shape[1]
        c = torch.einsum("bht,bthk,hkm->bhtm", pattern, v, attn.W_O) + attn.b_O / (N * H)
        tokens.append(through_ln(c, (2 * L + 1) * N * H))
    tokens = torch.stack(tokens, 1)  # [batch, L, H, N, D]
    return {"embed": mlps[:, 0], "mlp": mlps[:, 1:], "tokens": tokens, "heads": tokens.sum(3),
            "attn": tokens.sum((2, 3)), "embedding": model.visual(images)}


def test_reference_convention_matches_the_formula_on_raw_activations(model64):
    images = random_images(model64, batch=3).to(torch.float64)
    oracle = _oracle(model64, images)
    # the shares 1/K add up to one: the oracle's pieces alone reproduce the embedding
    total = oracle["embed"] + oracle["mlp"].sum(1) + oracle["attn"].sum(1)
    assert _rel(total, oracle["embedding"]) <= 1e-10
    parts = model64.decompose(images, heads="all", tokens="all", convention="reference")
    assert parts.convention == "reference"
    for name in ("embed", "mlp", "attn", "heads", "tokens"):
        assert _rel(getattr(parts, name), oracle[name]) <= 1e-6, name
    assert parts.bias.abs().max().item() == 0 and parts.attn_bias.abs().max().item() == 0


def test_both_conventions_sum_to_the_embedding_and_aggregates_agree():
    open_clip_model, model = hooked_pair("ViT-B-32", NARROW_B32, randomize=True)
    images = random_images(model, batch=2)
    with torch.no_grad():
        embedding = open_clip_model.encode_image(images, normalize=False)
    for convention in ("default", "reference"):
        parts = model.decompose(images, tokens="all", convention=convention)
        assert _rel(parts.total(), embedding) <= 1e-4, convention
        torch.testing.assert_close(parts.heads.sum(2) + parts.attn_bias, parts.attn, rtol=0, atol=1e-5)
        torch.testing.assert_close(parts.tokens.sum(3), parts.heads, rtol=0, atol=1e-5)
    # reference: attn[l] = Σ_h heads[l, h] = Σ_{h,t} tokens[l, h, t] with nothing left in attn_bias
    torch.testing.assert_close(parts.tokens.sum((2, 3)), parts.attn, rtol=0, atol=1e-5)
    unit = parts.normalized()  # the reference's own pieces: ours / ‖y‖
    assert unit.convention == "reference"
    torch.testing.assert_close(unit.total(), embedding / embedding.norm(dim=-1, keepdim=True), rtol=0, atol=1e-5)


def test_default_convention_is_unchanged():
    _, model = hooked_pair("ViT-B-32", NARROW_B32, randomize=True)
    images = random_images(model, batch=2)
    plain = model.decompose(images, tokens=[1])
    explicit = model.decompose(images, tokens=[1], convention="default")
    assert plain.convention == explicit.convention == "default"
    for name in ("embed", "attn", "attn_bias", "mlp", "bias", "heads", "tokens"):
        assert torch.equal(getattr(plain, name), getattr(explicit, name)), name
    # and still the centred head result through the frozen ln_post (independent of the new code)
    _, cache = model.run_with_cache(images)
    cache.compute_head_results()
    result = cache["blocks.1.attn.hook_result"][:, 0]
    centred = result - result.mean(-1, keepdim=True)
    expected = (centred / cache["ln_post.hook_scale"][:, 0, None] * model.visual.ln_post.weight) @ model.visual.proj
    torch.testing.assert_close(plain.heads[:, 1], expected, rtol=1e-4, atol=1e-5)
    assert plain.bias.abs().max().item() > 0 and plain.attn_bias.abs().max().item() > 0


def test_difference_term_is_reference_minus_default_and_the_documented_formula(model64):
    images = random_images(model64, batch=2, seed=4).to(torch.float64)
    default = model64.decompose(images, tokens=[0])
    reference = model64.decompose(images, tokens=[0], convention="reference")
    difference = reference_difference(model64, images, tokens=[0])
    assert difference.convention == "difference"
    for name in ("embed", "attn", "attn_bias", "mlp", "bias", "heads", "tokens"):
        delta = getattr(reference, name) - getattr(default, name)
        torch.testing.assert_close(getattr(difference, name), delta, rtol=0, atol=1e-12)
    assert difference.total().abs().max().item() <= 1e-10  # it only moves pieces around

    # (mean(c) − μ/K) · (γ @ P)/σ + (β @ P)/K, per head plus the uncentred out_proj bias b_O ⊙ γ/σ @ P / H
    L, H = model64.cfg.n_layers, model64.cfg.n_heads
    _, cache = model64.run_with_cache(images)
    ln, P = model64.visual.ln_post, model64.visual.proj
    mu = cache[f"blocks.{L - 1}.hook_resid_post"][:, 0].mean(-1, keepdim=True)
    sigma = cache["ln_post.hook_scale"][:, 0]
    u, beta = ln.weight @ P, ln.bias @ P

    def formula(c: torch.Tensor, K: int) -> torch.Tensor:
        return (c.mean(-1, keepdim=True) - mu / K) * u / sigma + beta / K

    embed = cache["blocks.0.hook_resid_pre"][:, 0]
    torch.testing.assert_close(difference.embed, formula(embed, 2 * L + 1), rtol=0, atol=1e-12)
    mlp = cache["blocks.1.hook_mlp_out"][:, 0]
    torch.testing.assert_close(difference.mlp[:, 1], formula(mlp, 2 * L + 1), rtol=0, atol=1e-12)
    cache.compute_head_results()
    head = cache["blocks.0.attn.hook_result"][:, 0, 2]  # [batch, d_model], no bias
    b_O = model64.blocks[0].attn.b_O
    expected = formula(head, (2 * L + 1) * H) + (b_O * ln.weight / sigma) @ P / H
    torch.testing.assert_close(difference.heads[:, 0, 2], expected, rtol=0, atol=1e-12)


def test_reference_convention_with_directions_projects_every_term():
    _, model = hooked_pair("ViT-B-32", NARROW_B32, randomize=True)
    images = random_images(model, batch=2, seed=2)
    directions = torch.randn(5, model.cfg.d_embed, generator=torch.Generator().manual_seed(3))
    full = model.decompose(images, tokens="all", convention="reference")
    projected = model.decompose(images, tokens="all", directions=directions, convention="reference")
    assert projected.projected and projected.tokens.shape[-1] == 5
    for name in ("embed", "attn", "mlp", "heads", "tokens"):
        torch.testing.assert_close(getattr(projected, name), getattr(full, name) @ directions.T, rtol=1e-4, atol=1e-5)
    assert _rel(projected.total(), full.embedding @ directions.T) <= 1e-4


@pytest.mark.parametrize("overrides, feature", [
    ({"vision_cfg": {"layers": 1, "width": 128, "pool_type": "avg"}, "text_cfg": {"layers": 1}}, "pool_type='avg'"),
    ({"vision_cfg": {"layers": 1, "width": 128, "final_ln_after_pool": True}, "text_cfg": {"layers": 1}},
     "LayerNorm after pooling"),
    ({"vision_cfg": {"layers": 1, "width": 128, "attentional_pool": True, "attn_pooler_queries": 4,
                     "attn_pooler_heads": 2}, "text_cfg": {"layers": 1}}, "attentional pooler"),
])
def test_reference_convention_refuses_towers_it_does_not_define(overrides, feature):
    _, model = hooked_pair("ViT-B-32", overrides)
    images = random_images(model, batch=1)
    with pytest.raises(UnsupportedArchitectureError, match="CLS-pooled ViTs") as error:
        model.decompose(images, convention="reference")
    assert feature in str(error.value) and "convention='default'" in str(error.value)
    assert model.decompose(images).relative_error().max().item() <= 1e-4  # the default still works


def test_unknown_convention_names_the_choices():
    _, model = hooked_pair("ViT-B-32", NARROW_B32)
    with pytest.raises(InputError, match="'default' or 'reference', got 'textspan'"):
        model.decompose(random_images(model, batch=1), convention="textspan")


@pytest.mark.parametrize("name", ["EVA02-B-16", "EVA02-E-14"])  # LayerNorm over the heads; residual post-norm
def test_reference_convention_on_timm_cls_towers_sums_and_aggregates(name):
    narrow = {"depth": 2, "embed_dim": 256, "num_heads": 4}
    open_clip_model, model = hooked_pair(name, {"text_cfg": {"layers": 1, "vocab_size": 1000}}, timm=narrow,
                                         randomize=True)
    images = random_images(model, batch=2)
    with torch.no_grad():
        embedding = open_clip_model.encode_image(images, normalize=False)
    parts = model.decompose(images, tokens="all", convention="reference")
    assert _rel(parts.total(), embedding) <= 1e-4
    torch.testing.assert_close(parts.tokens.sum((2, 3)), parts.attn, rtol=0, atol=1e-5)
    torch.testing.assert_close(parts.tokens.sum(3), parts.heads, rtol=0, atol=1e-5)
