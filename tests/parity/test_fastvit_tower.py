"""The hooked MobileCLIP FastViT image tower reproduces open_clip exactly and decomposes exactly.

Two reduced random-init FastViTs (every timm argument narrowed, open_clip otherwise unchanged):
``fastvit_mci2`` as MobileCLIP-S2 (four stages, the last one attention, BatchNorm2d) and
``fastvit_mci3`` as MobileCLIP2-S3 (five stages, two attention stages of different head counts,
LayerNorm2d). The image sizes give odd maps (5×5 → 3×3), so the grid arithmetic is exercised.
Every 1-d parameter, BatchNorm statistic and LayerScale is randomised and the linear layers are
re-drawn at unit gain, so a dropped bias, norm, LayerScale or attention term shows.

Checked: image/text/logit parity (≤1e-5 after normalisation), every hook's shape and value
against timm's own modules, interventions at every hook, the decomposition's sum check (fp32 and
float64), its per-position terms against an oracle that never touches the decomposition code,
directions, refusals, reparameterised trunks. ``@pytest.mark.slow``: full-size MobileCLIP-S1.
"""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clip_lens import HookedCLIP, InputError, UnsupportedArchitectureError
from clip_lens.loading import model_config
from clip_lens.towers.conv import as_tokens
from clip_lens.towers.fastvit import FastViTTower, check_fastvit
from tests.helpers import build_open_clip, random_images, randomize_batch_norms, randomize_vectors
from tests.parity.test_open_clip_parity import ATOL, _forward_parts, _max_diff, assert_forward_matches, make_tokens

TEXT = {"layers": 1, "vocab_size": 1000}

# label -> (open_clip name, image size, timm kwargs, expected cfg)
VARIANTS = {
    "mci2": ("MobileCLIP-S2", 80, {"layers": (1, 1, 2, 2), "embed_dims": (8, 16, 32, 64)},
             dict(n_layers=2, n_heads=2, d_head=32, d_model=128, grid_size=(3, 3), n_ctx=9, d_embed=512, d_mlp=192)),
    "mci3": ("MobileCLIP2-S3", 160, {"layers": (1, 1, 1, 1, 1), "embed_dims": (8, 16, 32, 64, 128)},
             dict(n_layers=2, n_heads=4, d_head=32, d_model=256, grid_size=(3, 3), n_ctx=9, d_embed=768, d_mlp=512)),
}
FASTVIT_NAMES = sorted(
    name for name in open_clip.list_models()
    if str(model_config(name).get("vision_cfg", {}).get("timm_model_name", "")).startswith("fastvit")
)


def randomize_fastvit(model: torch.nn.Module, seed: int = 5, qkv_gain: float = 8.0) -> None:
    """Random vectors and BatchNorm statistics, LayerScales ~0.5 (timm's are [C, 1, 1] at 1e-5, which
    would make every block a no-op) and linear layers at unit gain (timm draws them at std 0.02,
    which makes attention uniform and the embedding all bias); ``qkv_gain`` sharpens the patterns of
    the reduced models' few-position maps (full-size towers keep 1: their attention is sharp enough)."""
    randomize_vectors(model)
    randomize_batch_norms(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.visual.modules():
            if type(module).__name__ == "LayerScale2d":
                module.gamma.copy_(0.5 + 0.1 * torch.randn(module.gamma.shape, generator=g))
            elif isinstance(module, torch.nn.Linear):
                gain = qkv_gain if module.out_features == 3 * module.in_features else 1.0
                module.weight.copy_(gain * torch.randn(module.weight.shape, generator=g) / module.in_features ** 0.5)


def build(label: str, overrides: dict | None = None):
    name, size, timm, _ = VARIANTS[label]
    model = build_open_clip(name, {"vision_cfg": {"image_size": size, **(overrides or {})}, "text_cfg": TEXT}, timm=timm)
    randomize_fastvit(model)
    return model, HookedCLIP.from_open_clip(model, name)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    """(label, open_clip model, HookedCLIP, images, tokens, reference outputs)."""
    model, hooked = build(request.param)
    images = random_images(hooked, batch=2)
    tokens = make_tokens(hooked)
    with torch.no_grad():
        ref = {
            "image": model.encode_image(images, normalize=True),
            "image_raw": model.encode_image(images),
            "forward": _forward_parts(model(images, tokens)),
        }
    return request.param, model, hooked, images, tokens, ref


def _image_hooks(hooked: HookedCLIP) -> list[str]:
    return [name for name in hooked.hook_dict if not name.startswith("text.")]


def test_config_describes_the_trunk(variant):
    label, model, hooked, *_ = variant
    assert isinstance(hooked.visual, FastViTTower) and hooked.visual.family == "fastvit"
    for key, value in VARIANTS[label][3].items():
        assert getattr(hooked.cfg, key) == value, (key, getattr(hooked.cfg, key), value)
    extra = hooked.cfg.extra
    assert extra["family"] == "fastvit"
    assert extra["stage_depths"] == list(VARIANTS[label][2]["layers"])
    kinds = {"RepMixerBlock": "repmixer", "AttentionBlock": "attention"}
    assert extra["token_mixers"] == [kinds[type(s.blocks[0]).__name__] for s in model.visual.trunk.stages]
    assert extra["attn_heads"] == [b.attn.n_heads for s in hooked.visual.stages for b in s.blocks if hasattr(b, "attn")]
    assert (hooked.cfg.pool_type, hooked.cfg.n_prefix_tokens, hooked.cfg.patch_size) == ("avg", 0, None)
    # parameters are shared, not copied
    assert hooked.visual.fc.weight is model.visual.trunk.head.fc.weight
    assert hooked.visual.stages[-1].blocks[0].attn.source is model.visual.trunk.stages[-1].blocks[0].token_mixer


def test_encode_image_parity(variant):
    _, _, hooked, images, _, ref = variant
    with torch.no_grad():
        assert _max_diff(ref["image"], hooked.encode_image(images, normalize=True)) <= ATOL
        raw = hooked.encode_image(images)
    assert _max_diff(ref["image_raw"], raw) <= ATOL * max(1.0, ref["image_raw"].abs().max().item())


def test_forward_and_logits_match_open_clip(variant):
    _, model, hooked, images, tokens, ref = variant
    with torch.no_grad():
        out = hooked(images, tokens)
        logits = hooked(images, tokens, return_type="logits")
        expected, _ = model.get_logits(images, tokens)
    assert_forward_matches(ref["forward"], out)
    assert _max_diff(logits, expected) <= ATOL * max(1.0, expected.abs().max().item())


def test_parity_while_caching_every_hook(variant):
    """Every image hook cached: the explicit paths (pattern, per-head results, LayerNorm2d scale) are exact too."""
    _, _, hooked, images, _, ref = variant
    with torch.no_grad():
        out, cache = hooked.run_with_cache(images, names_filter=_image_hooks(hooked))
    assert sorted(cache.keys()) == sorted(_image_hooks(hooked))
    assert _max_diff(ref["image"], out[0]) <= ATOL
    assert all(not hp._forward_hooks for hp in hooked.hook_dict.values())


def _timm_outputs(model, images) -> dict[str, torch.Tensor]:
    """What timm's own modules output, keyed by the hook that must equal it."""
    trunk, seen, handles = model.visual.trunk, {}, []

    def keep(key):
        def hook(module, args, output):
            seen[key] = output
        return hook

    handles.append(trunk.stem.register_forward_hook(keep("hook_stem_out")))
    for s, stage in enumerate(trunk.stages):
        handles.append(stage.register_forward_hook(lambda m, a, o, s=s: seen.setdefault(f"stage_out:{s}", o)))
        if not isinstance(stage.downsample, torch.nn.Identity):
            handles.append(stage.downsample.register_forward_hook(keep(f"stages.{s}.downsample.hook_out")))
        if not isinstance(stage.pos_emb, torch.nn.Identity):
            handles.append(stage.pos_emb.register_forward_hook(keep(f"stages.{s}.hook_pos_embed_out")))
        for b, block in enumerate(stage.blocks):
            handles.append(block.register_forward_hook(keep(f"stages.{s}.blocks.{b}.hook_resid_post")))
            if type(block).__name__ == "RepMixerBlock":
                handles.append(block.token_mixer.register_forward_hook(keep(f"stages.{s}.blocks.{b}.hook_mixer_out")))
            else:
                handles.append(block.norm.register_forward_hook(keep(f"stages.{s}.blocks.{b}.norm.hook_normalized")))
    handles.append(trunk.final_conv.register_forward_hook(keep("final_conv")))
    try:
        with torch.no_grad():
            model.encode_image(images)
    finally:
        for handle in handles:
            handle.remove()
    seen["hook_spatial_tokens"] = as_tokens(seen.pop("final_conv"))
    return seen


def _expected_shapes(hooked: HookedCLIP, cache, batch: int) -> dict[str, tuple]:
    """The documented shape of every image hook, from the maps' own sizes."""
    shapes = {}
    for name in _image_hooks(hooked):
        if ".attn." in name:
            block = name.rsplit(".attn.", 1)[0]
            _, c, height, width = cache[f"{block}.hook_resid_pre"].shape
            n, h = height * width, c // 32
            shapes[name] = {"hook_q": (batch, n, h, 32), "hook_k": (batch, n, h, 32), "hook_v": (batch, n, h, 32),
                            "hook_z": (batch, n, h, 32), "hook_attn_scores": (batch, h, n, n),
                            "hook_pattern": (batch, h, n, n), "hook_result": (batch, n, h, c)}[name.rsplit(".", 1)[1]]
        elif name.endswith("norm.hook_scale"):
            _, _, height, width = cache[name.replace("norm.hook_scale", "hook_resid_pre")].shape
            shapes[name] = (batch, 1, height, width)
    cfg = hooked.cfg
    shapes["hook_spatial_tokens"] = (batch, cfg.n_ctx, cfg.d_model)
    shapes["hook_pooled"] = (batch, cfg.d_model)
    shapes["hook_image_embed"] = (batch, cfg.d_embed)
    return shapes


def test_every_hook_fires_with_its_documented_shape_and_value(variant):
    """Map hooks equal timm's module outputs (``[batch, C, H, W]``); attention hooks have their documented shapes."""
    _, model, hooked, images, _, ref = variant
    batch = len(images)
    with torch.no_grad():
        _, cache = hooked.run_with_cache(images, names_filter=_image_hooks(hooked))
    timm_out = _timm_outputs(model, images)
    shapes = _expected_shapes(hooked, cache, batch)
    for name in _image_hooks(hooked):
        act = cache[name]
        if name in shapes:
            assert tuple(act.shape) == shapes[name], (name, tuple(act.shape), shapes[name])
        else:  # every other hook is a [batch, C, H, W] map
            assert act.ndim == 4 and act.shape[0] == batch, name
    for key, value in timm_out.items():
        if key.startswith("stage_out:"):
            s = int(key.split(":")[1])
            last = len(hooked.visual.stages[s].blocks) - 1
            key = f"stages.{s}.blocks.{last}.hook_resid_post"
            if s + 1 < len(hooked.visual.stages):
                assert _max_diff(cache[f"stages.{s + 1}.hook_in"], value) <= 1e-6 * max(1.0, value.abs().max().item())
        assert _max_diff(cache[key], value) <= 1e-5 * max(1.0, value.abs().max().item()), key
    assert _max_diff(cache["stages.0.hook_in"], cache["hook_stem_out"]) == 0.0
    assert _max_diff(cache["hook_pooled"], cache["hook_spatial_tokens"].mean(1)) == 0.0
    assert _max_diff(cache["hook_image_embed"], ref["image_raw"]) <= ATOL * max(1.0, ref["image_raw"].abs().max().item())


def test_stream_and_head_identities_hold(variant):
    """Patterns sum to 1; heads + b_O are the attention write; the stream adds up block by block."""
    _, _, hooked, images, _, _ = variant
    with torch.no_grad():
        _, cache = hooked.run_with_cache(images, names_filter=_image_hooks(hooked))
    n_attention = 0
    for s, stage in enumerate(hooked.visual.stages):
        for b, block in enumerate(stage.blocks):
            key = f"stages.{s}.blocks.{b}"
            pre, post, mlp = cache[f"{key}.hook_resid_pre"], cache[f"{key}.hook_resid_post"], cache[f"{key}.hook_mlp_out"]
            if stage.token_mixer == "attention":
                n_attention += 1
                pattern = cache[f"{key}.attn.hook_pattern"]
                assert _max_diff(pattern.sum(-1), torch.ones_like(pattern[..., 0])) <= 1e-6
                assert pattern.max() > 1.5 / pattern.shape[-1]  # not uniform: the heads are doing something
                attn_out = cache[f"{key}.hook_attn_out"]
                heads = cache[f"{key}.attn.hook_result"].sum(-2) + block.attn.b_O
                assert _max_diff(heads, as_tokens(attn_out)) <= 1e-5 * attn_out.abs().max()
                mid = cache[f"{key}.hook_resid_mid"]
                assert _max_diff(mid, pre + attn_out) <= 1e-6 * mid.abs().max()
                assert _max_diff(post, mid + mlp) <= 1e-6 * post.abs().max()
            else:
                assert _max_diff(post, cache[f"{key}.hook_mixer_out"] + mlp) <= 1e-6 * post.abs().max()
    assert n_attention == hooked.cfg.n_layers


def _perturb(name: str):
    noise_gen = torch.Generator().manual_seed(0)

    def edit(act, hook):
        noise = torch.rand(act.shape, generator=noise_gen) if name.endswith("hook_scale") else torch.randn(
            act.shape, generator=noise_gen)
        if name.endswith("hook_scale"):  # keep a scale positive
            return act * (1.5 + noise)
        return act + 0.5 * (act.abs().max() + 1e-3) * noise

    return edit


def test_perturbing_each_hook_changes_the_output(variant):
    """Every hook's return value feeds the rest of the forward."""
    _, _, hooked, images, _, _ = variant
    with torch.no_grad():
        clean = hooked.encode_image(images)
        for name in _image_hooks(hooked):
            with hooked.hooks(fwd_hooks=[(name, _perturb(name))]):
                edited = hooked.encode_image(images)
            assert (edited - clean).abs().max() > 1e-4 * clean.abs().max(), name


def test_decomposition_sums_to_the_embedding(variant):
    _, _, hooked, images, _, ref = variant
    with torch.no_grad():
        parts = hooked.decompose(images, tokens="all")
        plain = hooked.decompose(images)
    assert parts.family == "fastvit" and not parts.projected
    for field in ("embed", "attn", "attn_bias", "mlp", "heads", "tokens", "blocks", "block_positions", "pos_embed"):
        assert getattr(parts, field) is None, field
    scale = max(1.0, ref["image_raw"].abs().max().item())
    assert _max_diff(parts.embedding, ref["image_raw"]) <= ATOL * scale
    assert _max_diff(parts.total(), parts.embedding) <= 1e-5 * scale
    assert _max_diff(parts.bias, hooked.visual.fc.bias.expand(len(images), -1)) == 0.0
    assert parts.positions.shape == (len(images), hooked.cfg.n_ctx, hooked.cfg.d_embed)
    assert _max_diff(parts.positions.sum(1), parts.feature_map) <= 1e-5 * scale
    assert torch.allclose(parts.embedding_norm, ref["image_raw"].norm(dim=-1))
    assert plain.positions is None and torch.equal(plain.feature_map, parts.feature_map)
    assert parts.feature_map.norm() > 0.1 * parts.bias.norm()  # the features matter, not only the bias


def test_decomposition_with_directions_is_the_projection(variant):
    _, _, hooked, images, _, _ = variant
    directions = F.normalize(torch.randn(5, hooked.cfg.d_embed, generator=torch.Generator().manual_seed(3)), dim=-1)
    with torch.no_grad():
        full = hooked.decompose(images, tokens="all")
        projected = hooked.decompose(images, tokens="all", directions=directions)
    assert projected.projected
    for field in ("embedding", "feature_map", "bias", "positions"):
        a, b = getattr(full, field), getattr(projected, field)
        assert _max_diff(a @ directions.T, b) <= 1e-5 * max(1.0, a.abs().max().item()), field
    assert torch.equal(full.embedding_norm, projected.embedding_norm)
    assert _max_diff(projected.total(), projected.embedding) <= 1e-5 * max(1.0, projected.embedding.abs().max().item())


def test_decomposition_reads_out_in_the_weights_dtype_under_autocast(variant):
    """Under bf16 autocast the forward runs in bf16, the per-position contraction in fp32."""
    _, _, hooked, images, _, _ = variant
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        parts = hooked.decompose(images, tokens="all")
    assert parts.feature_map.dtype == parts.positions.dtype == parts.embedding.dtype == torch.float32
    assert parts.relative_error().max() <= 1e-2  # the forward's own bf16 rounding of the fc output
    assert _max_diff(parts.positions.sum(1), parts.feature_map) <= 1e-5 * max(1.0, parts.feature_map.abs().max().item())


@pytest.mark.parametrize("label", list(VARIANTS))
def test_decomposition_is_exact_in_float64_and_matches_an_oracle(label):
    """Sum check at float64 rounding; each position's term equals what zeroing that position's final
    features removes from the embedding (pooling and fc are linear: the fc bias cancels)."""
    _, hooked = build(label)
    hooked.double()
    images = random_images(hooked, batch=2).double()
    with torch.no_grad():
        parts = hooked.decompose(images, tokens="all")
        full = hooked.encode_image(images)
        oracle = []
        for p in range(hooked.cfg.n_ctx):
            def zero(act, hook, p=p):
                act = act.clone()
                act[:, p] = 0.0
                return act
            with hooked.hooks(fwd_hooks=[("hook_spatial_tokens", zero)]):
                oracle.append(full - hooked.encode_image(images))
    oracle = torch.stack(oracle, 1)
    assert parts.embedding.dtype == torch.float64
    assert _max_diff(parts.total(), parts.embedding) <= 1e-10
    assert _max_diff(parts.positions.sum(1), parts.feature_map) <= 1e-10
    assert _max_diff(parts.positions, oracle) <= 1e-10
    assert oracle.abs().max() > 1e-3  # the oracle measures something


def test_decompose_refuses_per_head_and_token_layer_requests(variant):
    _, _, hooked, images, _, _ = variant
    blocks = hooked.cfg.extra["attn_blocks"]
    for heads in ([0], 0, "last"):
        with pytest.raises(InputError) as info:
            hooked.decompose(images, heads=heads)
        message = str(info.value)
        assert "heads='all'" in message and "tokens='all'" in message and all(b in message for b in blocks)
    for tokens in ([1], "last"):  # the one token layer is the final map: "all" or [0] (what collect records)
        with pytest.raises(InputError, match="tokens='all'"):
            hooked.decompose(images, tokens=tokens)
    torch.testing.assert_close(hooked.decompose(images, tokens=[0]).positions, hooked.decompose(images, tokens="all").positions)
    assert hooked.decompose(images, heads=None).heads is None
    with pytest.raises(UnsupportedArchitectureError):
        hooked.decompose(images, convention="reference")


def test_layer_ranges_are_refused(variant):
    _, _, hooked, images, _, _ = variant
    cfg = hooked.cfg
    with pytest.raises(UnsupportedArchitectureError, match="stages"):
        hooked(torch.zeros(2, cfg.n_ctx, cfg.d_model), start_at_layer=1)
    with pytest.raises(UnsupportedArchitectureError, match="stages"):
        hooked(images, stop_at_layer=1)


@pytest.mark.parametrize("name", FASTVIT_NAMES)
def test_check_fastvit_accepts_every_open_clip_fastvit(name):
    import timm

    timm_name = model_config(name)["vision_cfg"]["timm_model_name"]
    with torch.device("meta"):
        trunk = timm.create_model(timm_name, pretrained=False)
    assert check_fastvit(trunk) is None


def test_every_open_clip_fastvit_is_covered():
    assert {"MobileCLIP-S1", "MobileCLIP-S2", "MobileCLIP2-S0", "MobileCLIP2-S2", "MobileCLIP2-S3",
            "MobileCLIP2-S4"} <= set(FASTVIT_NAMES)


class _OtherMixer(torch.nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize("edit, reason", [
    (lambda t: t.stages[0].blocks.__setitem__(0, torch.nn.Identity()),
     "block type Identity (known: RepMixerBlock, AttentionBlock) (stages.0.blocks.0)"),
    (lambda t: setattr(t.stages[-1].blocks[0], "token_mixer", _OtherMixer()), "attention _OtherMixer"),
    (lambda t: setattr(t.stages[1].blocks[0], "token_mixer", _OtherMixer()), "token mixer _OtherMixer"),
    (lambda t: setattr(t.stages[-1].blocks[0], "norm", torch.nn.GroupNorm(1, 64)), "normalisation GroupNorm"),
    (lambda t: t.reset_classifier(512, "max"), "global pool 'max'"),
    (lambda t: setattr(t, "fork_feat", True), "fork_feat"),
])
def test_check_fastvit_refuses_a_modified_trunk(edit, reason):
    model = build_open_clip("MobileCLIP-S2", {"vision_cfg": {"image_size": 80}, "text_cfg": TEXT},
                            timm=VARIANTS["mci2"][2])
    assert check_fastvit(model.visual.trunk, model.visual) is None
    edit(model.visual.trunk)
    problem = check_fastvit(model.visual.trunk, model.visual)
    assert problem is not None and reason in problem, problem
    with pytest.raises(UnsupportedArchitectureError, match="not reproduced exactly"):
        HookedCLIP.from_open_clip(model, "MobileCLIP-S2")


def test_a_reparameterised_trunk_is_reproduced_exactly():
    """timm's inference-mode trunk (branches fused into single convs) runs through the same hooks."""
    from timm.utils.model import reparameterize_model

    model, hooked = build("mci2")
    images = random_images(hooked, batch=2)
    fused = copy.deepcopy(model)
    fused.visual.trunk = reparameterize_model(model.visual.trunk)
    assert check_fastvit(fused.visual.trunk, fused.visual) is None
    fused_hooked = HookedCLIP.from_open_clip(fused, "MobileCLIP-S2")
    assert fused_hooked.cfg.extra["reparameterized"] and fused_hooked.cfg.grid_size == hooked.cfg.grid_size
    with torch.no_grad():
        expected = fused.encode_image(images, normalize=True)
        assert _max_diff(fused_hooked.encode_image(images, normalize=True), expected) <= ATOL
        assert _max_diff(expected, model.encode_image(images, normalize=True)) <= 1e-4  # timm's fusion is accurate
        parts = fused_hooked.decompose(images, tokens="all")
    assert _max_diff(parts.total(), parts.embedding) <= 1e-5 * max(1.0, parts.embedding.abs().max().item())


def test_an_open_clip_linear_projection_is_composed_into_the_read_out():
    """timm_proj='linear': timm's fc is Identity and open_clip's bias-free projection maps to the embedding."""
    model, hooked = build("mci2", {"timm_proj": "linear"})
    assert isinstance(model.visual.trunk.head.fc, torch.nn.Identity)
    images = random_images(hooked, batch=2)
    with torch.no_grad():
        assert _max_diff(hooked.encode_image(images, normalize=True), model.encode_image(images, normalize=True)) <= ATOL
        parts = hooked.decompose(images, tokens="all")
    assert parts.bias is None
    assert _max_diff(parts.total(), parts.embedding) <= 1e-5 * max(1.0, parts.embedding.abs().max().item())


@pytest.mark.slow
def test_full_size_mobileclip_s1_parity_and_sum_check():
    model = build_open_clip("MobileCLIP-S1", {})
    randomize_fastvit(model, qkv_gain=1.0)
    hooked = HookedCLIP.from_open_clip(model, "MobileCLIP-S1")
    assert hooked.cfg.grid_size == (8, 8) and hooked.cfg.image_size == (256, 256) and hooked.cfg.n_layers == 4
    images = random_images(hooked, batch=2)
    with torch.no_grad():
        expected = model.encode_image(images, normalize=True)
        assert _max_diff(hooked.encode_image(images, normalize=True), expected) <= ATOL
        cached, cache = hooked.run_with_cache(images, names_filter=_image_hooks(hooked))
        assert _max_diff(cached[0], expected) <= ATOL  # explicit attention paths in all four blocks
        parts = hooked.decompose(images, tokens="all")
    assert len(cache) == len(_image_hooks(hooked))
    scale = max(1.0, parts.embedding.abs().max().item())
    assert _max_diff(F.normalize(parts.embedding, dim=-1), expected) <= ATOL
    assert _max_diff(parts.total(), parts.embedding) <= 1e-5 * scale
    assert _max_diff(parts.positions.sum(1), parts.feature_map) <= 1e-5 * scale
