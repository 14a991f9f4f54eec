"""The ResNet image tower (open_clip ``ModifiedResNet``: RN50, RN101, RN50x4/x16/x64) reproduces
open_clip exactly, exposes every documented hook, and decomposes its embedding exactly.

Models are built offline at random init, reduced (one or two bottlenecks per stage, width 8, 96 px
images: a 3×3 final map, 4 pool heads of 64), with every 1-d parameter and every BatchNorm's running
statistics randomised (open_clip zero-inits ``bn3.weight``, which would hide a dropped branch).
The decomposition is checked against its own identities and against a float64 oracle that
recomputes terms from open_clip's weights and cached activations without the decomposition code.
``@pytest.mark.slow`` repeats parity at full size and builds every RN config by name.
"""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clip_lens import HookedCLIP, UnsupportedArchitectureError
from clip_lens.errors import IndexOutOfRangeError
from clip_lens.towers.resnet import ResNetTower
from tests.helpers import build_open_clip, random_images, randomize_batch_norms, randomize_vectors
from tests.parity.test_open_clip_parity import ATOL, _forward_parts, _max_diff, assert_forward_matches, make_tokens

WIDTH, IMAGE, HEAD_WIDTH, EMBED = 8, 96, 64, 64
DEPTHS = [1, 2, 1, 1]
OVERRIDES = {
    "embed_dim": EMBED,
    "vision_cfg": {"layers": DEPTHS, "width": WIDTH, "image_size": IMAGE, "head_width": HEAD_WIDTH},
    "text_cfg": {"layers": 1, "width": 64, "heads": 2, "vocab_size": 1000},
}
NAMES = ["RN50", "RN50-quickgelu"]  # quick_gelu only changes the text tower
C_LAST = WIDTH * 32  # 256 channels in the last map
N_HEADS = C_LAST // HEAD_WIDTH  # 4
GRID = IMAGE // 32  # 3×3 final map
HW = GRID * GRID


def _build(name: str, seed: int = 0, overrides: dict = OVERRIDES):
    model = build_open_clip(name, overrides, seed)
    randomize_vectors(model, seed + 1)
    randomize_batch_norms(model, seed + 2)
    return model, HookedCLIP.from_open_clip(model, name)


@pytest.fixture(scope="module", params=NAMES)
def pair(request):
    """(name, open_clip model, HookedCLIP, images, tokens, open_clip reference outputs)."""
    name = request.param
    model, hooked = _build(name)
    images = random_images(hooked, batch=2)
    tokens = make_tokens(hooked)
    with torch.no_grad():
        ref = {
            "image": model.encode_image(images, normalize=True),
            "image_raw": model.encode_image(images),
            "forward": _forward_parts(model(images, tokens)),
        }
    return name, model, hooked, images, tokens, ref


@pytest.fixture(scope="module")
def double_pair():
    """A float64 RN50 (open_clip model and HookedCLIP sharing parameters) and images."""
    model, hooked = _build("RN50", seed=3)
    model.double()
    images = random_images(hooked, batch=2, seed=1).double()
    return model, hooked, images


def image_hooks(hooked: HookedCLIP) -> list[str]:
    return [name for name in hooked.hook_dict if not name.startswith("text.")]


def expected_shapes(batch: int) -> dict[str, tuple]:
    """Every image hook's shape, from the open_clip architecture (not from the tower's code)."""
    side = IMAGE // 4  # stem: stride-2 conv + 2×2 average pool
    shapes = {"hook_stem_out": (batch, WIDTH, side, side)}
    channels = WIDTH
    for s, depth in enumerate(DEPTHS):
        planes = WIDTH * 2**s
        out_side = side if s == 0 else side // 2
        shapes[f"stages.{s}.hook_in"] = (batch, channels, side, side)
        for b in range(depth):
            prefix = f"stages.{s}.blocks.{b}"
            in_side, in_channels = (side, channels) if b == 0 else (out_side, 4 * planes)
            shapes[f"{prefix}.hook_resid_pre"] = (batch, in_channels, in_side, in_side)
            shapes[f"{prefix}.hook_conv1"] = (batch, planes, in_side, in_side)
            shapes[f"{prefix}.hook_conv2"] = (batch, planes, in_side, in_side)
            for hook in ("hook_out", "hook_shortcut", "hook_resid_post"):
                if hook != "hook_shortcut" or b == 0:  # only a stage's first block changes shape
                    shapes[f"{prefix}.{hook}"] = (batch, 4 * planes, out_side, out_side)
        channels, side = 4 * planes, out_side
    d_head, n = C_LAST // N_HEADS, 1 + HW
    shapes.update({
        "hook_spatial_tokens": (batch, HW, C_LAST),
        "attn_pool.hook_tokens": (batch, n, C_LAST),
        "attn_pool.hook_pos_embed": (batch, n, C_LAST),
        "attn_pool.attn.hook_q": (batch, 1, N_HEADS, d_head),
        "attn_pool.attn.hook_k": (batch, n, N_HEADS, d_head),
        "attn_pool.attn.hook_v": (batch, n, N_HEADS, d_head),
        "attn_pool.attn.hook_attn_scores": (batch, N_HEADS, 1, n),
        "attn_pool.attn.hook_pattern": (batch, N_HEADS, 1, n),
        "attn_pool.attn.hook_z": (batch, 1, N_HEADS, d_head),
        "attn_pool.attn.hook_result": (batch, 1, N_HEADS, EMBED),
        "hook_image_embed": (batch, EMBED),
    })
    return shapes


# --- construction and parity -------------------------------------------------------------------


def test_config_describes_the_attention_pool_as_one_layer(pair):
    name, model, hooked, *_ = pair
    assert isinstance(hooked.visual, ResNetTower) and hooked.visual.family == "resnet"
    cfg = hooked.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_mlp) == (1, N_HEADS, C_LAST, HEAD_WIDTH, 0)
    assert (cfg.n_ctx, cfg.d_embed, cfg.grid_size, cfg.image_size) == (1 + HW, EMBED, (GRID, GRID), (IMAGE, IMAGE))
    assert (cfg.pool_type, cfg.act_fn, cfg.n_prefix_tokens, cfg.patch_size) == ("attn", "ReLU", 0, None)
    assert (cfg.attn_pooler_heads, cfg.attn_pooler_queries) == (N_HEADS, 1)
    assert cfg.extra["family"] == "resnet" and cfg.extra["stage_depths"] == DEPTHS
    assert cfg.extra["stage_channels"] == [4 * WIDTH * 2**s for s in range(4)]
    assert hooked.spatial_hook == "hook_spatial_tokens"
    # parameters are shared, not copied
    assert hooked.visual.attn_pool.attn.v_proj.weight is model.visual.attnpool.v_proj.weight
    assert hooked.visual.stages[1].blocks[1].bn2 is model.visual.layer2[1].bn2
    text_act = type(model.transformer.resblocks[0].mlp.gelu).__name__
    assert text_act == ("QuickGELU" if name.endswith("quickgelu") else "GELU")


def test_encode_image_matches_open_clip(pair):
    _, _, hooked, images, _, ref = pair
    with torch.no_grad():
        normalised = hooked.encode_image(images, normalize=True)
        raw = hooked.encode_image(images)
    assert _max_diff(ref["image"], normalised) <= ATOL
    assert _max_diff(ref["image_raw"], raw) <= ATOL * max(1.0, ref["image_raw"].abs().max().item())


def test_forward_and_logits_match_open_clip(pair):
    _, model, hooked, images, tokens, ref = pair
    with torch.no_grad():
        assert_forward_matches(ref["forward"], hooked(images, tokens))
        logits = hooked(images, tokens, return_type="logits")
    image, text, scale = ref["forward"]
    expected = scale * image @ text.T
    assert logits.shape == (len(images), len(tokens))
    assert _max_diff(expected, logits) <= ATOL * max(1.0, expected.abs().max().item())


def test_every_hook_fires_with_its_documented_shape(pair):
    _, _, hooked, images, _, ref = pair
    with torch.no_grad():
        out, cache = hooked.run_with_cache(images, return_type="image_features")
    shapes = expected_shapes(len(images))
    assert image_hooks(hooked) == list(shapes)  # nothing missing, nothing extra, forward order
    for name, shape in shapes.items():
        assert tuple(cache[name].shape) == shape, name
    assert _max_diff(out, ref["image"]) <= ATOL  # parity while every hook is cached


def test_cached_pool_activations_are_consistent(pair):
    """Pattern rows sum to 1, the mean token is the mean, per-head results add up to the embedding."""
    _, model, hooked, images, _, _ = pair
    with torch.no_grad():
        _, cache = hooked.run_with_cache(images, return_type=None)
    pattern = cache["attn_pool.attn.hook_pattern"]
    assert (pattern.sum(-1) - 1).abs().max() <= 1e-6
    tokens = cache["attn_pool.hook_tokens"]
    assert _max_diff(tokens[:, 1:], cache["hook_spatial_tokens"]) == 0
    assert _max_diff(tokens[:, 0], cache["hook_spatial_tokens"].mean(1)) <= 1e-6
    assert _max_diff(cache["attn_pool.hook_pos_embed"][0], model.visual.attnpool.positional_embedding) == 0
    summed = cache["attn_pool.attn.hook_result"].sum(-2)[:, 0] + model.visual.attnpool.c_proj.bias
    embed = cache["hook_image_embed"]
    assert _max_diff(summed, embed) <= 1e-5 * embed.abs().max()
    # the last block's output is the spatial map, row-major
    last = cache["stages.3.blocks.0.hook_resid_post"]
    assert _max_diff(last.flatten(2).transpose(1, 2), cache["hook_spatial_tokens"]) == 0


def test_perturbing_any_hook_changes_the_embedding(pair):
    """Every hook's return value feeds the forward: noise at any of them moves the embedding."""
    _, _, hooked, images, _, _ = pair
    with torch.no_grad():
        clean = hooked.encode_image(images)

        def noise(act, hook):
            g = torch.Generator().manual_seed(0)
            return act + (act.abs().max() + 1) * torch.randn(act.shape, generator=g)

        changes = {}
        for name in image_hooks(hooked):
            with hooked.hooks(fwd_hooks=[(name, noise)]):
                changes[name] = (hooked.encode_image(images) - clean).abs().max().item()
    unchanged = [name for name, change in changes.items() if not change > 1e-3 * clean.abs().max().item()]
    assert not unchanged, unchanged
    assert len(changes) == len(expected_shapes(1))


# --- decomposition ------------------------------------------------------------------------------


def test_decomposition_sums_to_the_embedding(pair):
    _, _, hooked, images, _, ref = pair
    parts = hooked.decompose(images, heads="all", tokens="all")
    assert parts.family == "resnet" and not parts.projected
    for absent in ("embed", "mlp", "bias", "blocks", "feature_map", "pooler_mlp"):
        assert getattr(parts, absent) is None, absent
    b = len(images)
    assert parts.attn.shape == parts.attn_bias.shape == (b, 1, EMBED)
    assert parts.heads.shape == (b, 1, N_HEADS, EMBED)
    assert parts.tokens.shape == (b, 1, N_HEADS, HW, EMBED)
    assert parts.pos_embed.shape == (b, N_HEADS, EMBED)
    assert parts.positions.shape == (b, HW, EMBED)
    assert parts.head_layers == parts.token_layers == [0]
    assert parts.head_labels == [f"L0H{h}" for h in range(N_HEADS)]
    assert _max_diff(parts.embedding, ref["image_raw"]) <= ATOL * ref["image_raw"].abs().max()
    assert torch.allclose(parts.embedding_norm, ref["image_raw"].norm(dim=-1))
    assert parts.relative_error().max() <= 1e-5
    # attn = Σ heads + c_proj bias
    pool = hooked.visual.attn_pool.attn
    assert _max_diff(parts.attn_bias[:, 0], pool.b_O.expand(b, -1)) == 0
    scale = parts.embedding.abs().max()
    assert _max_diff(parts.attn, parts.heads.sum(2) + parts.attn_bias) <= 1e-6 * scale
    # heads = Σ_p tokens + pos_embed + b_V W_O
    value_bias = torch.einsum("hd,hde->he", pool.b_V, pool.W_O)
    rebuilt = parts.tokens[:, 0].sum(2) + parts.pos_embed + value_bias
    assert _max_diff(parts.heads[:, 0], rebuilt) <= 1e-6 * scale
    assert _max_diff(parts.positions, parts.tokens[:, 0].sum(1)) <= 1e-6 * scale


def test_decomposition_is_exact_in_float64(double_pair):
    model, hooked, images = double_pair
    parts = hooked.decompose(images, tokens="all")
    assert parts.embedding.dtype == torch.float64
    assert parts.relative_error().max() <= 1e-10
    with torch.no_grad():
        assert _max_diff(model.encode_image(images), parts.embedding) <= 1e-12 * parts.embedding.abs().max()
    value_bias = torch.einsum("hd,hde->he", hooked.visual.attn_pool.attn.b_V, hooked.visual.attn_pool.attn.W_O)
    rebuilt = parts.tokens[:, 0].sum(2) + parts.pos_embed + value_bias
    assert _max_diff(parts.heads[:, 0], rebuilt) <= 1e-12 * parts.embedding.abs().max()


def _frozen_pool(pool, features, pos, pattern):
    """open_clip's attention pool with its pattern given (float64 oracle; no clip_lens code)."""
    batch, n_heads = features.shape[0], pattern.shape[1]
    x = torch.cat([features.mean(1, keepdim=True), features], 1) + pos
    v = F.linear(x, pool.v_proj.weight, pool.v_proj.bias).unflatten(-1, (n_heads, -1))  # [b, t, h, d]
    z = torch.einsum("bht,bthd->bhd", pattern, v).reshape(batch, -1)
    return F.linear(z, pool.c_proj.weight, pool.c_proj.bias)


def test_decomposition_matches_an_independent_float64_oracle(double_pair):
    """Token terms by hand from open_clip's weights, and positions / pos_embed by differencing a
    frozen-pattern re-implementation with one spatial feature (or the positions) zeroed."""
    model, hooked, images = double_pair
    pool = model.visual.attnpool
    with torch.no_grad():
        embedding, cache = hooked.run_with_cache(images, return_type="image_features")
        parts = hooked.decompose(images, tokens="all")
        features = cache["hook_spatial_tokens"]
        pattern = cache["attn_pool.attn.hook_pattern"][:, :, 0]  # [b, h, 1+HW]
        pos = pool.positional_embedding
        d = C_LAST // N_HEADS
        errors = []
        for b, h, p in [(0, 0, 0), (0, 3, 4), (1, 1, 8), (1, 2, 5)]:
            rows = slice(h * d, (h + 1) * d)
            value = pool.v_proj.weight[rows] @ features[b, p]  # no bias: it is not the position's
            term = (pattern[b, h, 1 + p] + pattern[b, h, 0] / HW) * (pool.c_proj.weight[:, rows] @ value)
            errors.append((parts.tokens[b, 0, h, p] - term).abs().max().item())
        full = _frozen_pool(pool, features, pos, pattern)
        errors.append(_max_diff(full, cache["hook_image_embed"]))  # the oracle is the forward
        for p in (0, 4, HW - 1):
            ablated = features.clone()
            ablated[:, p] = 0
            errors.append(_max_diff(full - _frozen_pool(pool, ablated, pos, pattern), parts.positions[:, p]))
        no_pos = _frozen_pool(pool, features, torch.zeros_like(pos), pattern)
        errors.append(_max_diff(full - no_pos, parts.pos_embed.sum(1)))
    assert max(errors) <= 1e-10, errors


def test_directions_project_every_term(pair):
    _, _, hooked, images, _, _ = pair
    directions = torch.randn(3, EMBED, generator=torch.Generator().manual_seed(5))
    plain = hooked.decompose(images, tokens="all")
    projected = hooked.decompose(images, tokens=0, directions=directions)
    assert projected.projected and projected.tokens.shape == (len(images), 1, N_HEADS, HW, 3)
    assert torch.equal(projected.embedding_norm, plain.embedding_norm)
    scale = (plain.embedding @ directions.T).abs().max()
    for name in ("embedding", "attn", "attn_bias", "heads", "tokens", "pos_embed", "positions"):
        assert _max_diff(getattr(projected, name), getattr(plain, name) @ directions.T) <= 1e-5 * scale, name
    assert projected.relative_error().max() <= 1e-5


def test_head_and_token_specs_select_the_terms(pair):
    _, _, hooked, images, _, _ = pair
    none = hooked.decompose(images, heads=None)
    assert none.heads is None and none.tokens is None and none.pos_embed is None and none.positions is None
    assert none.head_layers == none.token_layers == []
    assert none.relative_error().max() <= 1e-5  # attn is still built from the parts
    heads = hooked.decompose(images, heads=[0])
    assert heads.heads is not None and heads.pos_embed is not None and heads.tokens is None and heads.positions is None
    tokens_only = hooked.decompose(images, heads=None, tokens=-1)  # token layers imply head terms
    assert tokens_only.head_layers == tokens_only.token_layers == [0]
    assert _max_diff(tokens_only.heads, heads.heads) <= 1e-6 * heads.embedding.abs().max()


def test_errors_name_what_exists(pair):
    _, _, hooked, images, _, _ = pair
    with pytest.raises(IndexOutOfRangeError, match="attention pool") as info:
        hooked.decompose(images, tokens=[3])
    assert "layer 0" in str(info.value) and "no direct terms" in str(info.value)
    with pytest.raises(IndexOutOfRangeError, match="attention pool"):
        hooked.decompose(images, heads=1)
    # no residual stream of fixed shape: layer ranges are refused, whatever the input
    with pytest.raises(UnsupportedArchitectureError, match="resnet"):
        hooked.visual(images, start_at_layer=1)
    with pytest.raises(UnsupportedArchitectureError, match="resnet"):
        hooked(torch.zeros(2, 1 + HW, C_LAST), start_at_layer=1)
    with pytest.raises(UnsupportedArchitectureError, match="resnet"):
        hooked(images, stop_at_layer=1)
    with pytest.raises(UnsupportedArchitectureError, match="reference"):
        hooked.decompose(images, convention="reference")
    with pytest.raises(UnsupportedArchitectureError, match="stages"):
        hooked.blocks


def test_from_pretrained_builds_a_reduced_resnet_offline():
    torch.manual_seed(0)
    hooked = HookedCLIP.from_pretrained("RN50", config_overrides=OVERRIDES)
    assert isinstance(hooked.visual, ResNetTower) and hooked.cfg.grid_size == (GRID, GRID)
    model = build_open_clip("RN50", OVERRIDES, seed=0)  # same seed, same config: the same weights
    images = random_images(hooked, batch=1)
    with torch.no_grad():
        expected = model.encode_image(images, normalize=True)
        assert _max_diff(expected, hooked.encode_image(images, normalize=True)) <= ATOL
    assert hooked.decompose(images).relative_error().max() <= 1e-5


# --- full size ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_rn50_parity_and_sum_check():
    model = build_open_clip("RN50", {"text_cfg": {"layers": 1, "vocab_size": 1000}})
    randomize_vectors(model)
    randomize_batch_norms(model)
    hooked = HookedCLIP.from_open_clip(model, "RN50")
    cfg = hooked.cfg
    assert (cfg.n_heads, cfg.d_model, cfg.grid_size, cfg.d_embed) == (32, 2048, (7, 7), 1024)
    images = random_images(hooked, batch=2)
    with torch.no_grad():
        ref = model.encode_image(images, normalize=True)
        assert _max_diff(ref, hooked.encode_image(images, normalize=True)) <= ATOL
    parts = hooked.decompose(images, tokens="all")
    assert parts.tokens.shape == (2, 1, 32, 49, 1024)
    assert parts.relative_error().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in open_clip.list_models() if n.startswith("RN")])
def test_every_rn_config_builds_by_name_and_decomposes(name):
    """Every RN config's widths, heads and image size (one bottleneck per stage)."""
    overrides = {"vision_cfg": {"layers": [1, 1, 1, 1]}, "text_cfg": {"layers": 1, "vocab_size": 1000}}
    hooked = HookedCLIP.from_pretrained(name, config_overrides=overrides)
    config = open_clip.get_model_config(name)["vision_cfg"]
    side = config["image_size"] // 32
    assert hooked.cfg.grid_size == (side, side) and hooked.cfg.d_model == 32 * config["width"]
    images = random_images(hooked, batch=1)
    with torch.no_grad():
        embedding = hooked.encode_image(images)
    parts = hooked.decompose(images, tokens="all")
    assert _max_diff(parts.embedding, embedding) <= 1e-5 * embedding.abs().max()
    assert parts.relative_error().max() <= 1e-5
