"""HookedCLIP reproduces open_clip exactly (fp32, max abs diff <= 1e-5) on every supported feature.

Models are random-init (no downloads) at 2 layers. open_clip initialises every bias to 0, every
LayerNorm to (1, 0) and LayerScale to 1e-4, which would hide a dropped bias / LN affine / gamma;
:func:`randomize_vectors` therefore gives all those 1-d parameters random values first.
"""

from __future__ import annotations

import open_clip
import pytest
import torch

import clip_lens
import clip_lens.loading
from clip_lens import HookedCLIP, UnsupportedArchitectureError
from tests.helpers import hooked_pair, random_images, randomize_vectors

ATOL = 1e-5
L2 = {"layers": 2}
L2_NARROW = {"layers": 2, "width": 256}  # head_width stays 64: 4 heads
TEXT_NARROW = {"layers": 2, "width": 256, "heads": 4}

# name -> (config overrides, what the config covers)
CONFIGS = {
    # baseline: CLS ('tok') pooling, ln_pre, patch 32, causal text with argmax (EOT) pooling
    "ViT-B-32": ({"vision_cfg": L2, "text_cfg": L2}, "baseline"),
    # patch 16: 197 tokens
    "ViT-B-16": ({"vision_cfg": L2, "text_cfg": L2}, "patch 16"),
    # patch 14 (257 tokens); widths cut to 256 (4 heads of 64) to keep CPU time down
    "ViT-L-14": ({"vision_cfg": L2_NARROW, "text_cfg": TEXT_NARROW}, "patch 14"),
    # QuickGELU activation in both towers
    "ViT-B-32-quickgelu": ({"vision_cfg": L2, "text_cfg": L2}, "quick_gelu"),
    # LayerScale (ls_1 / ls_2) in the image tower
    "ViT-M-16-alt": ({"vision_cfg": L2, "text_cfg": L2}, "LayerScale"),
    # avg pooling + no_ln_pre + final_ln_after_pool; bidirectional text (no causal mask) with
    # 'last' pooling and a 32-token context / 32000 vocab
    "ViT-L-14-CLIPA": ({"vision_cfg": L2_NARROW, "text_cfg": TEXT_NARROW}, "avg pool, no ln_pre, LN after pool, bidirectional text"),
    # attentional pooler (256 queries, first one pooled); CoCa text: appended CLS, pad mask,
    # LN after pooling. The multimodal decoder only matters to open_clip's forward: 1 layer.
    "coca_ViT-B-32": (
        {"vision_cfg": L2, "text_cfg": L2, "multimodal_cfg": {"layers": 1}},
        "attentional pooler, CoCa text (CLS appended, pad mask)",
    ),
    # 240x240 images (non-224 grid 15x15), 896 wide (14 heads), 640-wide text (10 heads)
    "ViT-B-16-plus-240": ({"vision_cfg": L2, "text_cfg": L2}, "non-224 image size"),
    # head_width 80 (width 320 = 4 heads of 80); text 'eos' pooling on eos_id=2. The real
    # 901629-token vocab (3.7 GB of embeddings) is cut to 1000.
    "ViT-H-14-worldwide": (
        {"vision_cfg": {"layers": 2, "width": 320}, "text_cfg": {**TEXT_NARROW, "vocab_size": 1000}},
        "head_width 80, eos text pooling",
    ),
}
NAMES = list(CONFIGS)


def make_tokens(hooked: HookedCLIP, seed: int = 0) -> torch.Tensor:
    """Three rows of different lengths (incl. a full row), shaped like tokenizer output.

    CLIP style: SOT = vocab-2, words, EOT = vocab-1 (the argmax), zero padding. With 'eos' pooling
    (XLM-V ids: <s>=0, <pad>=1, </s>=eos_id=2) the words use ids above eos_id, so the eos position
    is never the argmax position and eos pooling cannot pass by accident as argmax pooling.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = hooked.text.cfg
    ctx, vocab = cfg.context_length, cfg.vocab_size
    eos = hooked.text.eos_id if cfg.pool_type == "eos" else None
    lengths = [4, 11, ctx - 1]
    tokens = torch.zeros(len(lengths), ctx, dtype=torch.long)
    for row, length in enumerate(lengths):
        if eos is None:
            tokens[row, 0] = vocab - 2
            tokens[row, 1:length] = torch.randint(1, vocab - 2, (length - 1,), generator=g)
            tokens[row, length] = vocab - 1
        else:
            tokens[row, 0] = 0
            tokens[row, 1:length] = torch.randint(eos + 1, vocab, (length - 1,), generator=g)
            tokens[row, length] = eos
            tokens[row, length + 1:] = 1
    return tokens


def _forward_parts(out):
    """open_clip forward output as (image, text, logit_scale[, logit_bias]); CoCa returns a dict."""
    if isinstance(out, dict):
        parts = [out["image_features"], out["text_features"], out["logit_scale"]]
        if "logit_bias" in out:
            parts.append(out["logit_bias"])
        return tuple(parts)
    return tuple(out)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_forward_matches(expected: tuple, out: tuple) -> None:
    """HookedCLIP's forward tuple equals open_clip's, output by output (≤ ATOL)."""
    assert len(out) == len(expected)
    for r, o in zip(expected, out):
        assert _max_diff(r, o) <= ATOL


@pytest.fixture(scope="module", params=NAMES)
def pair(request):
    """(name, open_clip model, HookedCLIP, images, tokens, open_clip reference outputs)."""
    name = request.param
    overrides, _feature = CONFIGS[name]
    model, hooked = hooked_pair(name, overrides)
    randomize_vectors(model)
    tokens = make_tokens(hooked)
    images = random_images(hooked, batch=len(tokens))  # CoCa's decoder pairs images with texts
    with torch.no_grad():
        ref = {
            "image": model.encode_image(images, normalize=True),
            "image_raw": model.encode_image(images, normalize=False),
            "text": model.encode_text(tokens, normalize=True),
            "text_raw": model.encode_text(tokens, normalize=False),
            "forward": _forward_parts(model(images, tokens)),
        }
    yield name, model, hooked, images, tokens, ref


def test_config_features(pair):
    """The configs really exercise what the comments claim (guards against a silent override)."""
    name, model, hooked, _, _, _ = pair
    v, t = hooked.cfg, hooked.text.cfg
    assert v.n_layers == 2 and t.n_layers == 2
    expected = {
        "ViT-B-32": dict(pool_type="tok", has_ln_pre=True, patch_size=(32, 32)),
        "ViT-B-16": dict(pool_type="tok", patch_size=(16, 16)),
        "ViT-L-14": dict(pool_type="tok", patch_size=(14, 14), grid_size=(16, 16), d_head=64),
        "ViT-B-32-quickgelu": dict(act_fn="QuickGELU"),
        "ViT-M-16-alt": dict(layer_scale=True),
        "ViT-L-14-CLIPA": dict(pool_type="avg", has_ln_pre=False, final_ln_after_pool=True),
        "coca_ViT-B-32": dict(pool_type="attn", attn_pooler_queries=256),
        "ViT-B-16-plus-240": dict(image_size=(240, 240), grid_size=(15, 15)),
        "ViT-H-14-worldwide": dict(d_model=320, n_heads=4, d_head=80),
    }[name]
    for key, value in expected.items():
        assert getattr(v, key) == value, (key, getattr(v, key), value)
    text_expected = {
        "ViT-B-32-quickgelu": dict(act_fn="QuickGELU", pool_type="argmax", causal=True),
        "ViT-L-14-CLIPA": dict(pool_type="last", causal=False, context_length=32),
        "coca_ViT-B-32": dict(pool_type="last", causal=True, context_length=76, n_ctx=77),
        "ViT-H-14-worldwide": dict(pool_type="eos"),
    }.get(name, dict(pool_type="argmax", causal=True))
    for key, value in text_expected.items():
        assert getattr(t, key) == value, (key, getattr(t, key), value)


def test_encode_image_parity(pair):
    _, _, hooked, images, _, ref = pair
    with torch.no_grad():
        out = hooked.encode_image(images, normalize=True)
        raw = hooked.encode_image(images)
    assert _max_diff(ref["image"], out) <= ATOL
    # un-normalised: relative to the embedding's size
    assert _max_diff(ref["image_raw"], raw) <= ATOL * max(1.0, ref["image_raw"].abs().max().item())


def test_encode_text_parity(pair):
    _, _, hooked, _, tokens, ref = pair
    with torch.no_grad():
        out = hooked.encode_text(tokens, normalize=True)
    assert _max_diff(ref["text"], out) <= ATOL


def test_forward_parity(pair):
    _, _, hooked, images, tokens, ref = pair
    with torch.no_grad():
        out = hooked(images, tokens)
    assert_forward_matches(ref["forward"], out)


def test_forward_parity_while_caching_everything(pair):
    """Caching every hook switches attention / LN / head results to the explicit path."""
    _, _, hooked, images, tokens, ref = pair
    with torch.no_grad():
        out, cache = hooked.run_with_cache(images, tokens)
    # the explicit path really ran: patterns, LN scales and per-head results were materialised
    for key in ("blocks.1.attn.hook_pattern", "blocks.0.ln1.hook_scale", "blocks.1.attn.hook_result",
                "text.blocks.1.attn.hook_pattern", "text.ln_final.hook_scale", "ln_post.hook_scale"):
        assert key in cache.cache_dict
    assert len(cache) == len(hooked.hook_dict)
    assert_forward_matches(ref["forward"], out)
    # the embeddings the hooks saw are open_clip's un-normalised embeddings
    for key, r in (("hook_image_embed", ref["image_raw"]), ("text.hook_text_embed", ref["text_raw"])):
        assert _max_diff(cache[key], r) <= ATOL * max(1.0, r.abs().max().item())
    # hooks leave no state behind
    assert all(not hp._forward_hooks for hp in hooked.hook_dict.values())


def test_eos_pooling_is_not_argmax():
    """Sanity for the eos config: the eos position differs from the argmax position in every row."""
    _, hooked = hooked_pair("ViT-H-14-worldwide", {"vision_cfg": {"layers": 1, "width": 160},
                                                   "text_cfg": {"layers": 1, "vocab_size": 1000, "width": 64, "heads": 4},
                                                   "embed_dim": 32})
    tokens = make_tokens(hooked)
    eos_pos = (tokens == hooked.text.eos_id).int().argmax(-1)
    assert (tokens[torch.arange(3), eos_pos] == 2).all()
    assert (eos_pos != tokens.argmax(-1)).all()


def test_logit_bias_forward_parity():
    """A model with a logit bias returns it as the 4th forward output, as open_clip does."""
    model, hooked = hooked_pair("ViT-B-32", {"vision_cfg": L2, "text_cfg": L2, "init_logit_bias": -3.0})
    randomize_vectors(model)
    images, tokens = random_images(hooked), make_tokens(hooked)
    with torch.no_grad():
        ref = model(images, tokens)
        out = hooked(images, tokens)
    assert len(ref) == 4 and len(out) == 4
    for r, o in zip(ref, out):
        assert _max_diff(r, o) <= ATOL
    assert out[3].item() == pytest.approx(-3.0)


# --- supported / unsupported architectures -----------------------------------------------------


def test_list_models_supported_and_unsupported():
    names = clip_lens.list_models()
    for name in NAMES:
        assert name in names
    for name in ("RN50", "RN101", "convnext_base", "MobileCLIP-S2"):  # convolutional towers (clip_lens/towers/)
        assert name in names
    for name in ("swin_base_patch4_window7_224", "vit_relpos_medium_patch16_cls_224"):
        assert name not in names
    assert set(names) <= set(open_clip.list_models()) | set(clip_lens.loading.bundled_models())  # plus the bundled models
    assert names[0] == "toy-shapes"


@pytest.mark.parametrize(
    "name, feature",
    [("swin_base_patch4_window7_224", "Swin"), ("vit_relpos_medium_patch16_cls_224", "relative position")],
)
def test_from_pretrained_rejects_unsupported_before_building(monkeypatch, name, feature):
    def no_build(*args, **kwargs):
        raise AssertionError("the model must not be built (nor anything downloaded)")

    monkeypatch.setattr(open_clip, "create_model", no_build)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_build)
    with pytest.raises(UnsupportedArchitectureError) as info:
        HookedCLIP.from_pretrained(name)
    assert isinstance(info.value, NotImplementedError)
    assert feature in str(info.value)
    assert name in str(info.value)


def test_from_open_clip_rejects_an_image_tower_it_does_not_know():
    torch.manual_seed(0)
    model = open_clip.create_model(
        "RN50", pretrained=None, vision_cfg={"layers": [1, 1, 1, 1], "width": 16, "image_size": 64},
        text_cfg={"layers": 1, "width": 64, "heads": 4}, embed_dim=32,
    )
    model.visual = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 64), torch.nn.Flatten())
    with pytest.raises(UnsupportedArchitectureError, match="Sequential") as info:
        HookedCLIP.from_open_clip(model)
    assert isinstance(info.value, NotImplementedError)
