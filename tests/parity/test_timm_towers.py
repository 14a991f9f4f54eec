"""timm image towers (SigLIP/SigLIP2, EVA/EVA02, PE-Core, CLIP-style timm ViTs, ViTamin, MobileCLIP-B)
reproduce open_clip exactly and decompose exactly.

Each family is built offline at random init with 2 layers (``depth=2`` passed to timm; the wide
ones also narrowed), every 1-d parameter randomised (:func:`tests.helpers.randomize_vectors`: biases,
LayerNorms, LayerScale), and compared with open_clip on the same weights: image and text features
≤1e-5 max abs after normalisation, forward outputs, and the decomposition's sum check ≤1e-4
relative. ``@pytest.mark.slow`` repeats the check at full size, one model per family.
"""

from __future__ import annotations

import open_clip
import pytest
import torch

from clip_lens import HookedCLIP, UnsupportedArchitectureError
from clip_lens.loading import model_config
from clip_lens.towers.timm_vit import TimmVisionTower
from tests.helpers import build_open_clip, hooked_pair, random_images, randomize_vectors, timm_kwargs
from tests.parity.test_open_clip_parity import ATOL, _forward_parts, _max_diff, assert_forward_matches, make_tokens

TEXT = {"layers": 2, "vocab_size": 1000}  # the real 32k-256k vocabularies only cost memory here
NARROW = {"depth": 2, "embed_dim": 256, "num_heads": 4}  # 4 heads of 64; keeps 2 CPU cores fast


def overrides(name: str, timm: dict) -> dict:
    """open_clip overrides matching a narrowed timm tower: SigLIP's image embedding *is* the trunk's
    width (no projection), so the text tower and embed_dim narrow with it."""
    config = model_config(name)
    if config["vision_cfg"].get("timm_proj") == "none" and "embed_dim" in timm:
        width = timm["embed_dim"]
        return {"embed_dim": width, "text_cfg": {**TEXT, "width": width, "heads": 4}}
    return {"text_cfg": TEXT}

# name -> (timm kwargs, what the config covers, expected tower features)
FAMILIES = {
    "ViT-B-16-SigLIP": (NARROW, "SigLIP: no class token, MAP pooler with MLP, bidirectional text with proj bias",
                        dict(pool_type="attn", n_prefix_tokens=0, attn_pooler_queries=1)),
    "ViT-B-32-SigLIP2-256": (NARROW, "SigLIP2: tanh-GELU in both towers",
                             dict(pool_type="attn", act_fn="GELUTanh", n_prefix_tokens=0)),
    "EVA02-B-16": (NARROW, "EVA02: rotary, SwiGLU with LayerNorm, LayerNorm over the heads",
                   dict(pool_type="tok", positional_embedding_type="rotary", gated_mlp=True, n_prefix_tokens=1)),
    "EVA01-g-14": (NARROW, "EVA01: plain Eva blocks, fused qkv with q/v biases", dict(pool_type="tok", gated_mlp=False)),
    "EVA02-E-14": (NARROW, "EVA02-E: residual post-norm blocks", dict(pool_type="tok")),
    "PE-Core-T-16-384": ({"depth": 2, "img_size": 224}, "PE-Core: 2-D rotary, norm_pre, MAP pooler over the class token too",
                         dict(pool_type="attn", has_ln_pre=True, positional_embedding_type="rotary", n_prefix_tokens=1)),
    "PE-Core-bigG-14-448": ({**NARROW, "img_size": 224}, "PE-Core bigG: no class token", dict(pool_type="attn", n_prefix_tokens=0)),
    "MobileCLIP2-L-14": (NARROW, "CLIP-style timm ViT: norm_pre, class token, linear head", dict(pool_type="tok", has_ln_pre=True)),
    "MobileCLIP-B": ({"depth": 2}, "ViT after a convolutional stem (no_embed_class)", dict(pool_type="tok")),
    "ViTamin-S": ({"depth": 2}, "ViTamin: conv stages, GeGLU MLP with input LayerNorm, avg pool, open_clip linear proj",
                  dict(pool_type="avg", gated_mlp=True, n_prefix_tokens=0)),
    "vit_medium_patch16_gap_256": ({**NARROW, "fc_norm": True}, "global average pooling with fc_norm (LN after pooling)",
                                   dict(pool_type="avg", final_ln_after_pool=True)),
    # features no open_clip config has today, passed to timm: register tokens + qk_norm + LayerScale
    "ViT-B-16-SigLIP+reg+qk_norm+ls": (
        {**NARROW, "reg_tokens": 2, "class_token": True, "no_embed_class": True, "qk_norm": True, "init_values": 0.1},
        "register tokens, class token, qk_norm, LayerScale on a MAP ViT", dict(n_prefix_tokens=3, layer_scale=True)),
    "PE-Core-T-16-384+ls": ({"depth": 2, "img_size": 224, "init_values": 0.1}, "Eva LayerScale (gamma_1/gamma_2) with rotary",
                            dict(layer_scale=True)),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """(label, open_clip model, HookedCLIP, images, tokens, reference outputs)."""
    label = request.param
    timm, _, _ = FAMILIES[label]
    name = label.split("+")[0]
    model, hooked = hooked_pair(name, overrides(name, timm), timm=timm)
    randomize_vectors(model)
    tokens = make_tokens(hooked)
    images = random_images(hooked, batch=2)
    with torch.no_grad():
        ref = {
            "image": model.encode_image(images, normalize=True),
            "image_raw": model.encode_image(images),
            "text": model.encode_text(tokens, normalize=True),
            "forward": _forward_parts(model(images, tokens)),
        }
    yield label, model, hooked, images, tokens, ref


def test_family_features(family):
    """The configs exercise what they claim (guards against a silently ignored timm argument)."""
    label, _, hooked, *_ = family
    assert isinstance(hooked.visual, TimmVisionTower)
    assert hooked.cfg.n_layers == 2
    for key, value in FAMILIES[label][2].items():
        assert getattr(hooked.cfg, key) == value, (key, getattr(hooked.cfg, key), value)


def test_encode_image_parity(family):
    _, _, hooked, images, _, ref = family
    with torch.no_grad():
        assert _max_diff(ref["image"], hooked.encode_image(images, normalize=True)) <= ATOL
        raw = hooked.encode_image(images)
    assert _max_diff(ref["image_raw"], raw) <= ATOL * max(1.0, ref["image_raw"].abs().max().item())


def test_encode_text_and_forward_parity(family):
    _, _, hooked, images, tokens, ref = family
    with torch.no_grad():
        assert _max_diff(ref["text"], hooked.encode_text(tokens, normalize=True)) <= ATOL
        out = hooked(images, tokens)
    assert_forward_matches(ref["forward"], out)


def test_parity_while_caching_everything(family):
    """Every hook cached: the explicit paths (pattern, per-head results, LN scales) are exact too."""
    _, _, hooked, images, tokens, ref = family
    with torch.no_grad():
        out, cache = hooked.run_with_cache(images, tokens)
    assert len(cache) == len(hooked.hook_dict)
    assert _max_diff(ref["image"], out[0]) <= ATOL
    assert _max_diff(cache["hook_image_embed"], ref["image_raw"]) <= ATOL * max(1.0, ref["image_raw"].abs().max().item())
    n = hooked.cfg.n_ctx
    assert cache["blocks.1.attn.hook_pattern"].shape == (len(images), hooked.cfg.n_heads, n, n)
    if hooked.cfg.positional_embedding_type == "rotary":  # rotated q/k differ from q/k on the patches only
        q, rot_q = cache["blocks.0.attn.hook_q"], cache["blocks.0.attn.hook_rot_q"]
        prefix = hooked.cfg.n_prefix_tokens
        assert torch.equal(q[:, :prefix], rot_q[:, :prefix])
        assert (q[:, prefix:] - rot_q[:, prefix:]).abs().max() > 1e-3
    block = hooked.blocks[1]
    if block.ln1_post is None:  # per-head results (LayerScale, inner LayerNorm folded) add up to attn_out
        summed = cache["blocks.1.attn.hook_result"].sum(-2) + block.attn.b_O
        assert _max_diff(summed, cache["blocks.1.hook_attn_out"]) <= 1e-4 * cache["blocks.1.hook_attn_out"].abs().max()
    if hooked.cfg.pool_type == "attn":
        pooled = cache["attn_pool.hook_out"][:, 0]
        assert _max_diff(pooled, cache["hook_pooled"]) <= 1e-6 * max(1.0, pooled.abs().max().item())
    assert all(not hp._forward_hooks for hp in hooked.hook_dict.values())


def _noise(act, hook):
    """Add seeded noise ten times the activation's size (a common scale or shift would be undone by
    EVA02's LayerNorm over the heads; random-init attention writes little into the residual)."""
    noise = torch.randn(act.shape, generator=torch.Generator().manual_seed(0))
    return act + 10 * act.abs().max() * noise


def _first_key_only(pattern, hook):
    """All attention on the first key (a random-init pooler's pattern is nearly uniform already)."""
    one_hot = torch.zeros_like(pattern)
    one_hot[..., 0] = 1.0
    return one_hot


def test_hook_interventions_reach_the_output(family):
    """Perturbing z, an MLP output or the pooler's pattern changes what comes next, and the embedding.

    Random-init towers write little into their embedding (biases dominate), so the downstream hook
    is where the size of the change is checked; the embedding must change at all.
    """
    _, _, hooked, images, _, _ = family
    edits = [
        ("blocks.0.attn.hook_z", _noise, "blocks.0.hook_attn_out"),
        ("blocks.1.hook_mlp_out", lambda act, hook: act * 0.5, "blocks.1.hook_resid_post"),
    ]
    if hooked.cfg.pool_type == "attn":
        edits.append(("attn_pool.attn.hook_pattern", _first_key_only, "attn_pool.hook_attn_out"))
    with torch.no_grad():
        clean, clean_cache = hooked.run_with_cache(images)
        for name, edit, downstream in edits:
            with hooked.hooks(fwd_hooks=[(name, edit)]):
                edited, cache = hooked.run_with_cache(images, names_filter=[downstream])
            before, after = clean_cache[downstream], cache[downstream]
            assert (after - before).abs().max() > 1e-2 * before.abs().max(), name
            assert not torch.equal(edited[0], clean[0]), name


def test_decomposition_sums_to_the_image_embedding(family):
    _, _, hooked, images, _, ref = family
    with torch.no_grad():
        parts = hooked.decompose(images, heads="all", tokens="all")
    assert parts.relative_error().max() <= 1e-4
    assert _max_diff(parts.embedding, ref["image_raw"]) <= ATOL * max(1.0, ref["image_raw"].abs().max().item())
    # each head's per-token terms add up to the head; heads + out_proj bias to the layer's attention
    assert _max_diff(parts.tokens.sum(3), parts.heads) <= 1e-4 * parts.heads.abs().max()
    assert _max_diff(parts.heads.sum(2) + parts.attn_bias, parts.attn) <= 1e-4 * parts.attn.abs().max()
    assert (parts.pooler_mlp is not None) == (hooked.cfg.pool_type == "attn")


def test_decomposition_with_directions_is_the_projection(family):
    _, _, hooked, images, _, _ = family
    directions = torch.nn.functional.normalize(torch.randn(5, hooked.cfg.d_embed, generator=torch.Generator().manual_seed(3)), dim=-1)
    with torch.no_grad():
        full = hooked.decompose(images, heads="all", tokens=[1])
        projected = hooked.decompose(images, heads="all", tokens=[1], directions=directions)
    for field in ("embedding", "embed", "attn", "mlp", "bias", "heads", "tokens", "pooler_mlp"):
        a, b = getattr(full, field), getattr(projected, field)
        if a is None:
            assert b is None
            continue
        assert _max_diff(a @ directions.T, b) <= 1e-5 * max(1.0, a.abs().max().item()), field
    assert projected.relative_error().max() <= 1e-4


def test_decomposition_is_exact_in_float64():
    """In float64 the sum check is at float64 rounding: the linearisation itself is exact."""
    for name in ("EVA02-E-14", "EVA02-B-16", "ViT-B-16-SigLIP"):
        model, _ = hooked_pair(name, overrides(name, NARROW), timm=NARROW)
        randomize_vectors(model)
        hooked = HookedCLIP.from_open_clip(model.double(), name)
        with torch.no_grad():
            parts = hooked.decompose(random_images(hooked).double(), heads="all", tokens="all")
        assert parts.relative_error().max() < 1e-12, name


def test_unsupported_timm_block_is_refused_with_its_class_name():
    """A timm ViT with a block type HookedCLIP does not reproduce is refused, naming the class."""
    from timm.models.vision_transformer import ParallelScalingBlock

    model = build_open_clip("ViT-B-16-SigLIP", overrides("ViT-B-16-SigLIP", NARROW), timm=NARROW)
    model.visual.trunk.blocks[1] = ParallelScalingBlock(model.visual.trunk.embed_dim, 4)
    with pytest.raises(UnsupportedArchitectureError, match="ParallelScalingBlock .layer 1."):
        HookedCLIP.from_open_clip(model)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "EVA02-B-16", "PE-Core-B-16", "ViTamin-S", "MobileCLIP2-L-14"])
def test_full_size_parity_and_sum_check(name):
    """One model per family at its real depth and width (minutes on CPU)."""
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None, **({"text_cfg": {"vocab_size": 1000}} if "SigLIP" in name else {}))
    model.eval()
    randomize_vectors(model)
    hooked = HookedCLIP.from_open_clip(model, name)
    images = random_images(hooked, batch=2)
    with torch.no_grad():
        assert _max_diff(model.encode_image(images, normalize=True), hooked.encode_image(images, normalize=True)) <= ATOL
        tokens = make_tokens(hooked)
        assert _max_diff(model.encode_text(tokens, normalize=True), hooked.encode_text(tokens, normalize=True)) <= ATOL
        parts = hooked.decompose(images, heads="all", tokens=[hooked.cfg.n_layers - 1])
    assert parts.relative_error().max() <= 1e-4


def test_collected_store_of_a_siglip_tower_sums_to_the_unit_embedding(tmp_path):
    """collect() keeps the MAP pooler's MLP term, so a SigLIP store's terms still add up."""
    from clip_lens.collect import collect

    model, hooked = hooked_pair("ViT-B-16-SigLIP", overrides("ViT-B-16-SigLIP", NARROW), timm=NARROW)
    randomize_vectors(model)
    store = collect(hooked, random_images(hooked, batch=3), tmp_path / "store", batch_size=2, chunk_size=2)
    total = sum(store.read(name).reshape(3, -1, hooked.cfg.d_embed).sum(1)
                for name in ("embed", "attn", "mlp", "bias", "pooler_mlp"))
    assert (total - store.read("embedding")).abs().max() <= 1e-4


def test_checkpoint_for_another_layout_names_the_keys(tmp_path):
    """A checkpoint whose keys match no supported layout: the error names missing and unexpected keys."""
    from safetensors.torch import save_file

    from clip_lens.errors import StateDictMismatchError

    native, _ = hooked_pair("ViT-B-32", {"vision_cfg": {"layers": 1}, "text_cfg": {"layers": 1}})
    path = tmp_path / "vit_b32.safetensors"
    save_file({k: v.contiguous() for k, v in native.state_dict().items() if k.startswith("visual.")}, str(path))
    with pytest.raises(StateDictMismatchError) as info:
        with timm_kwargs(**NARROW):
            HookedCLIP.from_pretrained("ViT-B-16-SigLIP", pretrained=path, config_overrides=overrides("ViT-B-16-SigLIP", NARROW))
    message = str(info.value)
    assert "missing keys" in message and "visual.trunk.blocks.0.attn.qkv.weight" in info.value.missing
    assert "unexpected keys" in message and "visual.conv1.weight" in info.value.unexpected


def test_siglip_checkpoint_round_trip(tmp_path):
    """A local .safetensors of a (shrunk) SigLIP loads with from_pretrained, offline, and matches."""
    from safetensors.torch import save_file

    model, _ = hooked_pair("ViT-B-16-SigLIP", overrides("ViT-B-16-SigLIP", NARROW), timm=NARROW)
    randomize_vectors(model)
    path = tmp_path / "siglip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with timm_kwargs(**NARROW):
        hooked = HookedCLIP.from_pretrained(
            "ViT-B-16-SigLIP", pretrained=path, config_overrides=overrides("ViT-B-16-SigLIP", NARROW))
    images = random_images(hooked)
    with torch.no_grad():
        assert _max_diff(model.encode_image(images, normalize=True), hooked.encode_image(images, normalize=True)) <= ATOL
    assert hooked.pretrained == str(path)


def test_vision_layers_override_sets_the_timm_depth():
    """``config_overrides={"vision_cfg": {"layers": n}}`` shrinks a timm tower too (open_clip alone ignores it)."""
    hooked = HookedCLIP.from_pretrained("EVA02-B-16", config_overrides={"vision_cfg": {"layers": 1}, "text_cfg": TEXT})
    assert hooked.cfg.n_layers == 1 and len(hooked.visual.trunk.blocks) == 1
    assert "blocks.0.attn.hook_rot_q" in hooked.hook_dict and "blocks.1.hook_resid_pre" not in hooked.hook_dict
