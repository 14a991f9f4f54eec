"""The convolutional towers (ResNet, ConvNeXt, FastViT) inside the rest of clip_lens: stores, plugins,
mutual knowledge, the CLI. Parity and exactness of each tower: tests/parity/test_<family>_tower.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import clip_lens.analyses
from clip_lens import HookedCLIP
from clip_lens.collect import Store, collect
from clip_lens.errors import InputError, UnsupportedArchitectureError
from tests.helpers import randomize_batch_norms, randomize_vectors

SMALL_TEXT = {"layers": 1, "width": 64, "heads": 2}
RESNET = ("RN50", {"vision_cfg": {"layers": [1, 1, 1, 1], "width": 8, "image_size": 96, "head_width": 64},
                   "text_cfg": SMALL_TEXT}, {})
CONVNEXT = ("convnext_base", {"vision_cfg": {"image_size": 64}, "text_cfg": SMALL_TEXT},
            {"depths": (1, 2, 1, 1), "dims": (16, 24, 32, 40)})
FASTVIT = ("MobileCLIP-S2", {"vision_cfg": {"image_size": 80}, "text_cfg": SMALL_TEXT},
           {"layers": (1, 1, 2, 2), "embed_dims": (8, 16, 32, 64)})
FAMILIES = {"resnet": RESNET, "convnext": CONVNEXT, "fastvit": FASTVIT}


def _model(family: str) -> HookedCLIP:
    from tests.helpers import build_open_clip

    name, overrides, timm = FAMILIES[family]
    model = build_open_clip(name, overrides, seed=0, timm=timm or None)
    randomize_vectors(model, 1)
    randomize_batch_norms(model, 2)
    return HookedCLIP.from_open_clip(model, name)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def conv(request) -> HookedCLIP:
    return _model(request.param)


def _images(model: HookedCLIP, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, *model.cfg.image_size, generator=torch.Generator().manual_seed(seed))


def test_collected_store_holds_exactly_the_terms_the_tower_has(conv, tmp_path):
    """The store's arrays sum to the unit embedding per image, and no absent term is stored as zeros."""
    images = _images(conv, 6)
    store = collect(conv, images, tmp_path / "store", tokens="all", chunk_size=4, batch_size=3, progress=False)
    arrays = set(store.arrays)
    family = conv.visual.family
    expected = {"resnet": {"attn", "attn_bias", "heads", "pos_embed", "tokens", "positions"},
                "convnext": {"embed", "blocks", "bias", "block_positions", "positions"},
                "fastvit": {"feature_map", "bias", "positions"}}[family]
    assert expected <= arrays, arrays
    assert not {"mlp", "blocks", "feature_map"} & arrays if family == "resnet" else not {"mlp", "attn", "heads"} & arrays
    total = sum(store.read(name).reshape(6, -1, store.read("embedding").shape[-1]).sum(1)
                for name in ("embed", "attn", "blocks", "bias", "feature_map") if name in arrays)
    np.testing.assert_allclose(total, store.read("embedding"), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(store.read("embedding"), axis=-1), 1.0, atol=1e-5)
    reopened = Store.open(tmp_path / "store")
    np.testing.assert_array_equal(reopened.read("positions"), store.read("positions"))


def test_spatial_tokens_are_the_last_feature_map_on_the_grid(conv):
    images = _images(conv, 2)
    _, cache = conv.run_with_cache(images, names_filter=[conv.spatial_hook], return_type=None)
    tokens = cache[conv.spatial_hook]
    gh, gw = conv.cfg.grid_size
    assert conv.spatial_hook == "hook_spatial_tokens"
    assert tokens.shape == (2, gh * gw, conv.cfg.d_model)
    assert conv.cfg.n_prefix_tokens == 0


def test_mutual_knowledge_features_come_from_the_spatial_tokens(conv):
    """GDC foreground and parts run on a convolutional tower's last feature map; 'keys' is a ViT's."""
    from clip_lens_plugins.mutual_knowledge import regions

    images = _images(conv, 4)
    feats = regions.patch_features(conv, images)
    gh, gw = regions.grid_size(conv)
    assert feats.shape == (4, gh * gw, conv.cfg.d_model)
    foreground = regions.prominent_region(feats, (gh, gw), joint=True, vector="auto")
    assert foreground.shape == (4, gh, gw) and foreground.any()
    with pytest.raises(InputError, match="tokens"):
        regions.patch_features(conv, images, "keys")


def test_start_at_layer_is_refused_with_the_stage_hooks_named(conv):
    with pytest.raises(UnsupportedArchitectureError, match="stage"):
        conv(torch.zeros(1, 3, *conv.cfg.image_size), start_at_layer=0)
    with pytest.raises(UnsupportedArchitectureError, match="stages"):
        conv.blocks


@pytest.mark.slow  # long; the default suite stays under 5 minutes
def test_textspan_runs_on_the_resnet_attention_pool_heads(tmp_path):
    model = _model("resnet")
    store = collect(model, _images(model, 12), tmp_path / "store", chunk_size=6, batch_size=6, progress=False)
    spans = clip_lens.analyses.get("textspan")(model).run(store, bank="general", m=3)
    assert [h.head for h in spans.heads] == [f"L0H{h}" for h in range(model.cfg.n_heads)]
    for head in spans.heads:
        assert len(head.texts) == 3


def test_topic_and_contrastive_segmentation_run_on_every_family(conv):
    """ResNet: the attention pool's heads per position; ConvNeXt, FastViT: the final map's per-position
    terms. The map sums to the text's share of the cosine carried by those terms (exactly)."""
    images = _images(conv, 2)
    gh, gw = conv.cfg.grid_size
    texts = conv.encode_text(conv.to_tokens(["a red circle", "a blue square"]), normalize=True)
    topic = clip_lens.analyses.get("segmentation")(conv).run(images, "a red circle")
    assert tuple(topic.grid.shape) == (2, gh, gw)
    parts = conv.decompose(images, tokens="all", directions=texts).normalized()
    feature_share = parts.positions.sum(1) if conv.visual.family != "resnet" else parts.tokens.sum((1, 2, 3))
    torch.testing.assert_close(topic.grid.sum((1, 2)) + topic.prefix, feature_share[:, 0], atol=1e-5, rtol=1e-4)
    contrast = clip_lens.analyses.get("contrastive_segmentation")(conv).run(images, "a red circle", "a blue square")
    torch.testing.assert_close(contrast.a_minus_b.sum((1, 2)), feature_share[:, 0] - feature_share[:, 1], atol=1e-5, rtol=1e-4)
    if conv.visual.family != "resnet":
        assert topic.heads == ["final map"]
        with pytest.raises(InputError, match="no attention heads"):
            clip_lens.analyses.get("segmentation")(conv).run(images, "a red circle", head="L0H0")
    else:
        assert topic.heads == [f"L0H{h}" for h in range(conv.cfg.n_heads)]


def test_neighbours_by_a_resnet_pool_head_and_by_the_embedding_of_every_family(conv, tmp_path):
    """Per-head neighbours need per-head terms (a ResNet's pool heads); the embedding search runs on every
    family; both rank the store as a brute-force search over its arrays does."""
    images = _images(conv, 8)
    store = collect(conv, images, tmp_path / "store", chunk_size=4, batch_size=4, progress=False)
    search = clip_lens.analyses.get("neighbors")(conv)
    own = search.run(store, query_texts=["a red circle"], embedding=True, k=3)
    text = conv.encode_text(conv.to_tokens(["a red circle"]), normalize=True)[0]
    expected = (torch.as_tensor(store.read("embedding")) @ text).argsort(descending=True)[:3]
    assert own.indices[0].tolist() == expected.tolist()
    if conv.visual.family == "resnet":
        by_head = search.run(store, query_texts=["a red circle"], head="L0H1", k=3)
        scores = torch.as_tensor(store.read("heads")[:, 0, 1]) @ conv.encode_text(
            conv.to_tokens(["a red circle"]), normalize=True)[0]
        assert by_head.indices[0].tolist() == scores.argsort(descending=True)[:3].tolist()
    else:
        with pytest.raises(InputError, match="per-head"):
            search.run(store, query_texts=["a red circle"], head="L0H0", k=3)
