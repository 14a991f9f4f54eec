"""The hooked ConvNeXt image tower reproduces open_clip exactly and decomposes exactly.

Reduced random-init towers (depths (1, 2, 1, 1), dims (16, 24, 32, 40), 64 px: a 2×2 final map;
every 1-d parameter randomised, so LayerNorm affines, conv biases and LayerScale all matter):
``convnext_base`` (linear projection), ``convnext_large_d`` (MLP projection head) and a
``conv_mlp`` tower with the overlapping stem. They are compared with open_clip on the same
weights; the decomposition is checked against its own sum and against an independent float64
oracle that re-runs the tower with the downsample and head LayerNorm scales frozen and removes
one block's write (everywhere, or inside one final cell). ``@pytest.mark.slow``: full-size
``convnext_base`` at 224 px.
"""

from __future__ import annotations

from functools import lru_cache

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel

from clip_lens import HookedCLIP, InputError, UnsupportedArchitectureError
from clip_lens.loading import model_config, unsupported_feature
from clip_lens.towers.convnext import ConvNeXtTower, check_convnext
from tests.helpers import build_open_clip, random_images, randomize_vectors
from tests.parity.test_open_clip_parity import ATOL, _forward_parts, _max_diff, assert_forward_matches, make_tokens

SMALL = {"vision_cfg": {"image_size": 64}, "text_cfg": {"layers": 1, "width": 64, "heads": 2}}
REDUCED = {"depths": (1, 2, 1, 1), "dims": (16, 24, 32, 40)}
# label -> (open_clip name, timm kwargs)
CONFIGS = {
    "convnext_base": ("convnext_base", REDUCED),
    "convnext_large_d": ("convnext_large_d", REDUCED),  # timm_proj="mlp": two-layer MLP head
    "conv_mlp+overlap_stem": ("convnext_base", {**REDUCED, "conv_mlp": True, "stem_type": "overlap_tiered"}),
}
LABELS = ["S0B0", "S1B0", "S1B1", "S2B0", "S3B0"]


@lru_cache(maxsize=None)
def _pair(label: str, double: bool = False):
    """(open_clip model, HookedCLIP) sharing parameters, built once per module run."""
    name, timm_kwargs = CONFIGS[label]
    model = build_open_clip(name, SMALL, seed=0, timm=timm_kwargs)
    randomize_vectors(model)
    hooked = HookedCLIP.from_open_clip(model, name)
    if double:
        hooked.double()
    return model, hooked


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    model, hooked = _pair(request.param)
    return request.param, model, hooked, random_images(hooked, batch=2)


@pytest.fixture(scope="module")
def base():
    model, hooked = _pair("convnext_base")
    return model, hooked, random_images(hooked, batch=2)


@pytest.fixture(scope="module")
def base64():
    model, hooked = _pair("convnext_base", double=True)
    return model, hooked, random_images(hooked, batch=2).double()


def _vision_hooks(hooked: HookedCLIP) -> list[str]:
    return [name for name in hooked.hook_dict if not name.startswith("text.")]


def _expected_shapes(hooked: HookedCLIP, batch: int) -> dict[str, tuple]:
    """Every documented vision hook and its shape, from the tower's structure (64 px, stem /4)."""
    cfg = hooked.cfg
    shapes, size = {}, 16
    head = hooked.visual.head_module
    shapes["stem.ln.hook_scale"] = (batch, 1, size, size)
    shapes["stem.ln.hook_normalized"] = shapes["hook_stem_out"] = (batch, 16, size, size)
    prev = 16
    for s, (depth, dim) in enumerate(zip(cfg.extra["stage_depths"], cfg.extra["stage_dims"])):
        shapes[f"stages.{s}.hook_in"] = (batch, prev, size, size)
        if s > 0:
            size //= 2
            shapes[f"stages.{s}.downsample.ln.hook_scale"] = (batch, 1, 2 * size, 2 * size)
            shapes[f"stages.{s}.downsample.ln.hook_normalized"] = (batch, prev, 2 * size, 2 * size)
            shapes[f"stages.{s}.downsample.hook_out"] = (batch, dim, size, size)
        for b in range(depth):
            p = f"stages.{s}.blocks.{b}."
            for name in ("hook_resid_pre", "hook_dwconv", "ln.hook_normalized", "hook_out", "hook_resid_post"):
                shapes[p + name] = (batch, dim, size, size)
            shapes[p + "ln.hook_scale"] = (batch, 1, size, size)
            shapes[p + "mlp.hook_pre"] = shapes[p + "mlp.hook_post"] = (batch, 4 * dim, size, size)
        prev = dim
    shapes["hook_spatial_tokens"] = (batch, size * size, prev)
    shapes["head.ln.hook_scale"] = (batch, 1)
    shapes["head.ln.hook_normalized"] = shapes["hook_pooled"] = (batch, prev)
    if head.mlp is not None:
        shapes["head.mlp.hook_pre"] = shapes["head.mlp.hook_post"] = (batch, 2 * cfg.d_embed)
    shapes["hook_image_embed"] = (batch, cfg.d_embed)
    return shapes


# --- structure and parity ---------------------------------------------------------------------------
def test_config_describes_the_stages(pair):
    label, model, hooked, _ = pair
    cfg = hooked.cfg
    assert isinstance(hooked.visual, ConvNeXtTower) and hooked.visual.family == "convnext"
    assert (cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model, cfg.d_mlp) == (5, 0, 0, 40, 160)
    assert (cfg.grid_size, cfg.n_ctx, cfg.image_size, cfg.n_prefix_tokens) == ((2, 2), 4, (64, 64), 0)
    assert (cfg.pool_type, cfg.final_ln_after_pool, cfg.act_fn, cfg.patch_size) == ("avg", True, "GELU", None)
    assert cfg.d_embed == model_config(CONFIGS[label][0])["embed_dim"]
    assert cfg.extra == {"family": "convnext", "stage_depths": [1, 2, 1, 1], "stage_dims": [16, 24, 32, 40],
                         "block_labels": LABELS}
    # the hooked tower shares open_clip's parameters (no copies)
    assert hooked.visual.stages[1].downsample.conv.weight is model.visual.trunk.stages[1].downsample[1].weight
    assert hooked.visual.head_module.ln.weight is model.visual.trunk.head.norm.weight


def test_encode_image_matches_open_clip(pair):
    _, model, hooked, images = pair
    with torch.no_grad():
        ref = model.encode_image(images, normalize=True)
        raw_ref = model.encode_image(images)
        assert _max_diff(ref, hooked.encode_image(images, normalize=True)) <= ATOL
        raw = hooked.encode_image(images)
    assert _max_diff(raw_ref, raw) <= ATOL * max(1.0, raw_ref.abs().max().item())


def test_forward_and_logits_match_open_clip(pair):
    _, model, hooked, images = pair
    tokens = make_tokens(hooked)
    with torch.no_grad():
        expected = _forward_parts(model(images, tokens))
        assert_forward_matches(expected, hooked(images, tokens))
        logits = hooked(images, tokens, return_type="logits")
    image, text, scale = expected[:3]
    assert _max_diff(scale * image @ text.T, logits) <= ATOL * scale.item()


def test_every_hook_fires_with_its_documented_shape_and_caching_keeps_parity(pair):
    """Caching every hook switches every LayerNorm to its explicit path: still ≤1e-5 from open_clip."""
    _, model, hooked, images = pair
    expected = _expected_shapes(hooked, len(images))
    assert set(_vision_hooks(hooked)) == set(expected)
    with torch.no_grad():
        ref = model.encode_image(images, normalize=True)
        out, cache = hooked.run_with_cache(images, names_filter=lambda name: not name.startswith("text."))
    assert {name: tuple(cache[name].shape) for name in expected} == expected
    assert _max_diff(ref, F.normalize(cache["hook_image_embed"], dim=-1)) <= ATOL
    # the stream is what the hooks say it is: resid_post = resid_pre + out, the last map = tokens
    block = "stages.1.blocks.1."
    assert _max_diff(cache[block + "hook_resid_pre"] + cache[block + "hook_out"], cache[block + "hook_resid_post"]) <= 1e-6
    last = cache["stages.3.blocks.0.hook_resid_post"].flatten(2).transpose(1, 2)
    assert _max_diff(last, cache["hook_spatial_tokens"]) == 0


def test_every_hook_feeds_the_rest_of_the_forward(pair):
    _, _, hooked, images = pair
    with torch.no_grad():
        clean = hooked.encode_image(images)
        g = torch.Generator().manual_seed(0)
        for name in _vision_hooks(hooked):
            def perturb(activation, hook):
                noise = torch.randn(activation.shape, generator=g).to(activation)
                return activation + noise * (activation.abs().mean() + 0.1)  # not a rescaling: LayerNorms undo those

            with hooked.hooks(fwd_hooks=[(name, perturb)]):
                changed = hooked.encode_image(images)
            assert _max_diff(changed, clean) > 1e-4, name


# --- decomposition ------------------------------------------------------------------------------------
def test_decomposition_sums_to_the_embedding_fp32(base):
    model, hooked, images = base
    parts = hooked.decompose(images, tokens="all")
    with torch.no_grad():
        assert _max_diff(parts.embedding, model.encode_image(images)) <= ATOL * max(1.0, parts.embedding.abs().max().item())
    assert parts.family == "convnext" and parts.block_labels == LABELS and parts.token_layers == list(range(5))
    assert parts.blocks.shape == (2, 5, 512) and parts.embed.shape == parts.bias.shape == (2, 512)
    assert parts.block_positions.shape == (2, 5, 4, 512) and parts.positions.shape == (2, 4, 512)
    assert all(getattr(parts, f) is None for f in ("attn", "attn_bias", "mlp", "heads", "tokens", "feature_map"))
    assert parts.relative_error().max().item() <= 1e-5  # measured ~2e-7
    scale = parts.embedding.abs().max().item()
    assert _max_diff(parts.positions.sum(1), parts.total() - parts.bias) <= 1e-5 * scale
    assert _max_diff(parts.block_positions.sum(2), parts.blocks) <= 1e-5 * scale
    assert torch.allclose(parts.embedding_norm, parts.embedding.norm(dim=-1))


def test_decomposition_sums_for_the_conv_mlp_tower_with_an_overlapping_stem():
    """A deeper stem (two convolutions) and 1×1-conv MLPs only change what the terms are made of."""
    _, hooked = _pair("conv_mlp+overlap_stem")
    parts = hooked.decompose(random_images(hooked, batch=2), tokens=[0])
    assert parts.relative_error().max().item() <= 1e-5
    assert _max_diff(parts.block_positions.sum(2), parts.blocks[:, [0]]) <= 1e-5 * parts.embedding.abs().max().item()


def test_decomposition_sums_exactly_in_float64(base64):
    _, hooked, images = base64
    parts = hooked.decompose(images, tokens="all")
    assert parts.blocks.dtype == torch.float64
    assert parts.relative_error().max().item() <= 1e-10
    assert _max_diff(parts.positions.sum(1), parts.total() - parts.bias) <= 1e-12
    assert _max_diff(parts.block_positions.sum(2), parts.blocks) <= 1e-12


def _oracle(model, hooked: HookedCLIP, images: torch.Tensor):
    """Independent float64 reference from timm's own modules (not the tower's decomposition code).

    Records the forward's stem output, every block's write and the downsample/head LayerNorm scales
    through the hooks, then returns ``f(stem, writes)``: the tower re-run with the residual stream
    rebuilt as the sum of those writes and every scale frozen (so ``f`` is affine in them), plus the
    recorded values.
    """
    trunk, proj = model.visual.trunk, model.visual.head.proj  # open_clip's modules
    names = ["hook_stem_out", "head.ln.hook_scale"] + [
        f"stages.{s}.downsample.ln.hook_scale" for s in (1, 2, 3)
    ] + [f"stages.{s}.blocks.{b}.hook_out" for s, d in enumerate((1, 2, 1, 1)) for b in range(d)]
    with torch.no_grad():
        _, cache = hooked.run_with_cache(images, names_filter=names)
        embedding = hooked.encode_image(images)
    writes = [[cache[f"stages.{s}.blocks.{b}.hook_out"] for b in range(d)] for s, d in enumerate((1, 2, 1, 1))]

    def f(stem, writes):
        r = stem
        for s, stage in enumerate(trunk.stages):
            if not isinstance(stage.downsample, torch.nn.Identity):
                norm, conv = stage.downsample
                sigma = cache[f"stages.{s}.downsample.ln.hook_scale"]
                centred = r - r.mean(1, keepdim=True)
                r = conv(centred / sigma * norm.weight[:, None, None] + norm.bias[:, None, None])
            for w in writes[s]:
                r = r + w
        pooled = r.mean((2, 3))
        norm = trunk.head.norm
        centred = pooled - pooled.mean(1, keepdim=True)
        return proj(centred / cache["head.ln.hook_scale"] * norm.weight + norm.bias)

    return f, cache["hook_stem_out"], writes, embedding


def test_decomposition_matches_an_independent_float64_oracle(base64):
    """Block b's term = f(all writes) − f(all but b); per final cell: remove b's write only inside that cell."""
    model, hooked, images = base64
    parts = hooked.decompose(images, tokens="all")
    f, stem, writes, embedding = _oracle(model, hooked, images)
    with torch.no_grad():
        full = f(stem, writes)
        assert _max_diff(full, embedding) <= 1e-10  # the frozen re-run is the forward
        assert _max_diff(full - f(torch.zeros_like(stem), writes), parts.embed) <= 1e-10
        nothing = f(torch.zeros_like(stem), [[torch.zeros_like(w) for w in ws] for ws in writes])
        assert _max_diff(nothing, parts.bias) <= 1e-10
        errors, k = [], 0
        for s, ws in enumerate(writes):
            for b, w in enumerate(ws):
                def without(mask):
                    changed = [list(x) for x in writes]
                    changed[s][b] = w * (1 - mask)
                    return full - f(stem, changed)

                errors.append(_max_diff(without(torch.ones_like(w)), parts.blocks[:, k]))
                factor = w.shape[-1] // 2  # own-grid cells per final cell (final map 2×2)
                for q in range(4):
                    mask = torch.zeros_like(w)
                    qi, qj = divmod(q, 2)
                    mask[..., qi * factor:(qi + 1) * factor, qj * factor:(qj + 1) * factor] = 1
                    errors.append(_max_diff(without(mask), parts.block_positions[:, k, q]))
                k += 1
        # the stem split per final cell: positions minus every block's cell term
        stem_cells = parts.positions - parts.block_positions.sum(1)
        for q in range(4):
            mask = torch.zeros_like(stem)
            qi, qj = divmod(q, 2)
            mask[..., qi * 8:(qi + 1) * 8, qj * 8:(qj + 1) * 8] = 1
            errors.append(_max_diff(full - f(stem * (1 - mask), writes), stem_cells[:, q]))
    assert len(errors) == 5 * 5 + 4 and max(errors) <= 1e-10, max(errors)


def test_directions_project_every_term(base):
    _, hooked, images = base
    directions = torch.randn(3, hooked.cfg.d_embed, generator=torch.Generator().manual_seed(5))
    parts = hooked.decompose(images, tokens="all")
    projected = hooked.decompose(images, tokens="all", directions=directions)
    assert projected.projected and projected.blocks.shape == (2, 5, 3)
    for name in ("embedding", "embed", "bias", "blocks", "block_positions", "positions"):
        expected = getattr(parts, name) @ directions.T
        assert _max_diff(getattr(projected, name), expected) <= 1e-5 * max(1.0, expected.abs().max().item()), name
    assert torch.equal(projected.embedding_norm, parts.embedding_norm)


def test_selected_token_blocks_are_rows_of_all_blocks(base):
    _, hooked, images = base
    every = hooked.decompose(images, tokens="all")
    some = hooked.decompose(images, tokens=[-1, 1])
    none = hooked.decompose(images, heads=None)
    assert some.token_layers == [1, 4] and none.token_layers == [] and none.block_positions is None
    assert torch.equal(some.block_positions, every.block_positions[:, [1, 4]])
    assert torch.equal(none.blocks, every.blocks) and torch.equal(none.positions, every.positions)


def test_carrying_blocks_one_at_a_time_gives_the_same_terms(base, monkeypatch):
    _, hooked, images = base
    together = hooked.decompose(images, tokens=[2, 0])
    monkeypatch.setattr(hooked.visual, "DECOMPOSE_CHUNK", 1)
    alone = hooked.decompose(images, tokens=[2, 0])
    for name in ("embed", "blocks", "block_positions", "positions", "bias"):
        assert _max_diff(getattr(together, name), getattr(alone, name)) <= 1e-6, name


def test_decomposition_under_bf16_autocast_runs_the_readout_in_fp32(base):
    _, hooked, images = base
    exact = hooked.decompose(images, tokens="all")
    with hooked.autocast("bf16"):
        assert hooked.encode_image(images).dtype == torch.bfloat16  # the forward does run in bf16
        mixed = hooked.decompose(images, tokens="all")
    assert mixed.blocks.dtype == mixed.block_positions.dtype == torch.float32
    for name in ("embedding", "blocks", "block_positions"):
        a, b = getattr(exact, name), getattr(mixed, name)
        assert 1e-6 < float((a - b).norm() / a.norm()) < 2e-2, name
    # the terms sum to the bf16 forward's embedding up to that forward's own rounding (residual adds in bf16)
    assert mixed.relative_error().max().item() < 2e-2


# --- refusals -------------------------------------------------------------------------------------------
def test_heads_other_than_all_or_none_are_refused_naming_the_terms(base):
    _, hooked, images = base
    with pytest.raises(InputError) as error:
        hooked.decompose(images, heads=[0])
    for term in ("no attention heads", "embed", "blocks", "block_positions"):
        assert term in str(error.value)
    with pytest.raises(InputError):
        hooked.decompose(images, tokens=[7])  # 5 blocks
    with pytest.raises(UnsupportedArchitectureError):
        hooked.decompose(images, convention="reference")
    with pytest.raises(UnsupportedArchitectureError, match="stages"):
        hooked.visual(images, stop_at_layer=1)


def test_mlp_projection_head_is_hooked_but_not_decomposed():
    _, hooked = _pair("convnext_large_d")
    assert hooked.visual.head_module.mlp is not None and hooked.cfg.d_embed == 768
    with pytest.raises(UnsupportedArchitectureError, match="not linear"):
        hooked.decompose(random_images(hooked, batch=1))


def test_check_accepts_every_open_clip_convnext_config():
    names = [name for name in open_clip.list_models() if name.startswith("convnext")]
    assert len(names) >= 11
    for name in names:
        config = model_config(name)
        vision = config["vision_cfg"]
        with torch.device("meta"):  # module tree only
            visual = TimmModel(vision["timm_model_name"], config["embed_dim"], image_size=vision["image_size"],
                               pool=vision["timm_pool"], proj=vision["timm_proj"], drop=vision["timm_drop"])
        assert check_convnext(visual.trunk, visual) is None, name
        assert unsupported_feature(config) is None, name


@pytest.mark.parametrize(
    "timm_name, kwargs, reason",
    [
        ("convnextv2_atto", {}, "Global Response Norm"),
        ("convnext_atto", {"head_norm_first": True}, "head_norm_first"),
        ("convnext_atto", {"output_stride": 16}, "stage 3 downsample"),
        ("convnext_atto", {"head_hidden_size": 32}, "hidden layer"),
        ("convnext_atto", {"norm_layer": "rmsnorm2d", "conv_mlp": True}, "RmsNorm2d"),
    ],
)
def test_check_refuses_what_is_not_reproduced(timm_name, kwargs, reason):
    with torch.device("meta"):
        trunk = timm.create_model(timm_name, **kwargs)
    assert reason in check_convnext(trunk)


def test_a_modified_trunk_is_refused_when_wrapping():
    model = build_open_clip("convnext_base", SMALL, timm=REDUCED)

    class OtherBlock(torch.nn.Module):
        def forward(self, x):
            return x

    model.visual.trunk.stages[2].blocks[0] = OtherBlock()
    assert check_convnext(model.visual.trunk, model.visual) == "block type OtherBlock (stage 2 block 0)"
    with pytest.raises(UnsupportedArchitectureError, match="OtherBlock"):
        HookedCLIP.from_open_clip(model, "convnext_base")
    model = build_open_clip("convnext_base", SMALL, timm=REDUCED)
    model.visual.head.add_module("extra", torch.nn.Tanh())
    assert "open_clip head 'extra'" in check_convnext(model.visual.trunk, model.visual)


# --- full size ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_size_convnext_base_parity_and_sum_check():
    model = build_open_clip("convnext_base", {"text_cfg": {"layers": 1}})
    randomize_vectors(model)
    hooked = HookedCLIP.from_open_clip(model, "convnext_base")
    assert hooked.cfg.grid_size == (7, 7) and hooked.cfg.n_layers == 36 and hooked.cfg.d_model == 1024
    images = random_images(hooked, batch=2)
    with torch.no_grad():
        assert _max_diff(model.encode_image(images, normalize=True), hooked.encode_image(images, normalize=True)) <= ATOL
    parts = hooked.decompose(images, tokens=[0, 35])
    assert parts.blocks.shape == (2, 36, 512) and parts.block_positions.shape == (2, 2, 49, 512)
    assert parts.relative_error().max().item() <= 1e-4
