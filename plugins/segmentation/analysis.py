"""The ``segmentation`` and ``contrastive_segmentation`` analyses (CLIP-InterpreT's topic maps).

A map shows, per patch, that patch's direct contribution through the chosen heads projected on a
unit text embedding: its additive share of the image–text cosine. Unlike CLIP-InterpreT's released
code, ``"all"`` in the contrastive analysis really sums every head (that code compared a string to
an int and used only the last layer's last head).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from clip_lens.errors import InputError
from clip_lens_plugins.segmentation.heads import HeadSpec, parse_heads
from clip_lens_plugins.segmentation.maps import has_head_terms, head_token_maps, position_maps, split_tokens
from clip_lens_plugins.segmentation.results import ContrastiveResult, HeatmapResult

if TYPE_CHECKING:
    from clip_lens import HookedCLIP

HEADS_HELP = "'L{l}H{h}', 'all' (every head of every layer, summed), a list of keys, or layer indices (all their heads)"


def encode_texts(model: "HookedCLIP", texts: Sequence[str]) -> Float[Tensor, "text d_embed"]:
    """Unit text embeddings of non-empty strings."""
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"texts must be non-empty strings, got {text!r}.")
    with torch.no_grad():
        return model.encode_text(model.to_tokens(list(texts)), normalize=True)


def checked_images(model: "HookedCLIP", images) -> Float[Tensor, "batch 3 H W"]:
    """The model's image validation, plus: at least one image."""
    images = model.check_images(images)
    if len(images) == 0:
        raise InputError("images is empty: give at least one preprocessed image [batch, 3, H, W].")
    return images


def _final_map(model: "HookedCLIP", heads: HeadSpec) -> list[str]:
    """The label of a ConvNeXt's or FastViT's per-position map; refuses a head selection (it has no heads)."""
    if heads != "all":
        raise InputError(
            f"a {model.visual.family} image tower has no attention heads with direct terms: its map is the "
            f"final feature map's per-position terms; pass heads='all' (got {heads!r})."
        )
    return ["final map"]


def _required(model: "HookedCLIP", name: str) -> "HookedCLIP":
    if model is None:
        raise InputError(f"the {name} analysis needs a model: analyses.get('{name}')(HookedCLIP.from_pretrained(...)).")
    return model


class Segmentation:
    """Per-head topic segmentation: where the chosen heads write a text's direction."""

    name = "segmentation"
    description = "Per-patch direct contribution of chosen heads projected on a text (topic heatmap)."
    parameters = {
        "images": "preprocessed images [batch, 3, H, W]",
        "text": "the topic text, e.g. 'a red shape'",
        "head": HEADS_HELP,
        "batch_size": "images decomposed at once (default 32)",
    }
    needs = ("model",)

    def __init__(self, model: "HookedCLIP"):
        self.model = _required(model, self.name)

    def run(self, images: Float[Tensor, "batch 3 H W"], text: str, head: HeadSpec = "all", batch_size: int = 32) -> HeatmapResult:
        cfg = self.model.cfg
        images = checked_images(self.model, images)
        direction = encode_texts(self.model, [text])
        if not has_head_terms(self.model):
            labels = _final_map(self.model, head)
            token_maps = position_maps(self.model, images, direction, batch_size)[:, 0]
        else:
            selection = parse_heads(head, cfg.n_layers, cfg.n_heads)
            labels = selection.labels
            token_maps = head_token_maps(self.model, images, direction, selection, batch_size).sum(1)[:, 0]
        prefix, grid = split_tokens(token_maps, cfg.grid_size)
        return HeatmapResult(text, labels, grid.cpu(), prefix.cpu(), cfg.image_size)


class ContrastiveSegmentation:
    """Contrastive segmentation: where the chosen heads favour text A over text B, and the reverse."""

    name = "contrastive_segmentation"
    description = "Maps of (A − B) and (B − A) text shares of the chosen heads' patch contributions."
    parameters = {
        "images": "preprocessed images [batch, 3, H, W]",
        "text_a": "first text",
        "text_b": "second text",
        "heads": HEADS_HELP + "; default 'all'",
        "batch_size": "images decomposed at once (default 32)",
    }
    needs = ("model",)

    def __init__(self, model: "HookedCLIP"):
        self.model = _required(model, self.name)

    def run(
        self, images: Float[Tensor, "batch 3 H W"], text_a: str, text_b: str, heads: HeadSpec = "all", batch_size: int = 32
    ) -> ContrastiveResult:
        cfg = self.model.cfg
        images = checked_images(self.model, images)
        directions = encode_texts(self.model, [text_a, text_b])
        if not has_head_terms(self.model):
            labels = _final_map(self.model, heads)
            per_text = position_maps(self.model, images, directions, batch_size)  # [batch, 2, token]
        else:
            selection = parse_heads(heads, cfg.n_layers, cfg.n_heads)
            labels = selection.labels
            per_text = head_token_maps(self.model, images, directions, selection, batch_size).sum(1)  # [batch, 2, token]
        _, grid = split_tokens(per_text.cpu(), cfg.grid_size)
        return ContrastiveResult(text_a, text_b, labels, grid[:, 0] - grid[:, 1], grid[:, 1] - grid[:, 0], cfg.image_size)
