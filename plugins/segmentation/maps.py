"""Per-patch maps from the decomposition: each source token's direct contribution on a text direction.

A head's direct contribution to the unit image embedding splits exactly over the tokens it attends
to (``Decomposition.tokens``). Projected on a unit text embedding, the token terms are additive
shares of the image–text cosine: the prefix tokens' share (CLS) plus the patches' shares, summed over
the selected heads, is exactly those heads' share. Patches follow the tower's row-major grid order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from clip_lens_plugins.segmentation.heads import HeadSelection

if TYPE_CHECKING:
    from clip_lens import HookedCLIP


def head_token_maps(
    model: "HookedCLIP",
    images: Float[Tensor, "batch 3 H W"],
    directions: Float[Tensor, "direction d_embed"],
    selection: HeadSelection,
    batch_size: int = 32,
) -> Float[Tensor, "batch layer direction token"]:
    """Per selected layer, the sum over its selected heads of each source token's share of the cosine.

    Layers are ``selection.layers``; the terms are divided by ‖image embedding‖ (so a unit
    ``direction`` gives shares of the cosine similarity).
    """
    layers = selection.layers
    head_mask = selection.mask[layers].to(device=model.device, dtype=model.dtype)  # [layer, head]
    chunks = []
    for start in range(0, len(images), batch_size):
        parts = model.decompose(images[start : start + batch_size], heads=None, tokens=layers, directions=directions)
        tokens = parts.normalized().tokens  # [batch, layer, head, token, direction]
        chunks.append(einops.einsum(tokens, head_mask, "b l h t k, l h -> b l k t"))
    return torch.cat(chunks)


def has_head_terms(model: "HookedCLIP") -> bool:
    """Whether the tower's decomposition has per-head, per-token terms (ViTs; a ResNet's attention
    pool). A ConvNeXt or FastViT has per-position terms of the final map instead (`position_maps`)."""
    return model.visual.family in ("vit", "resnet")


def position_maps(
    model: "HookedCLIP", images: Float[Tensor, "batch 3 H W"], directions: Float[Tensor, "direction d_embed"],
    batch_size: int = 32,
) -> Float[Tensor, "batch direction token"]:
    """Each final-map position's share of the cosine with each direction (``Decomposition.positions``
    of a convolutional tower, divided by ‖image embedding‖): a ConvNeXt's stem and every block per
    final cell, a FastViT's final map."""
    chunks = []
    for start in range(0, len(images), batch_size):
        parts = model.decompose(images[start : start + batch_size], tokens="all", directions=directions)
        chunks.append(einops.rearrange(parts.normalized().positions, "b t k -> b k t"))
    return torch.cat(chunks)


def split_tokens(
    token_maps: Float[Tensor, "*batch token"], grid_size: tuple[int, int]
) -> tuple[Float[Tensor, "*batch"], Float[Tensor, "*batch grid_h grid_w"]]:
    """The prefix tokens' (CLS) total and the patch terms on the patch grid."""
    grid_h, grid_w = grid_size
    n_prefix = token_maps.shape[-1] - grid_h * grid_w
    grid = einops.rearrange(token_maps[..., n_prefix:], "... (h w) -> ... h w", h=grid_h, w=grid_w)
    return token_maps[..., :n_prefix].sum(-1), grid


def upsample(grid: Float[Tensor, "*batch grid_h grid_w"], image_size: tuple[int, int]) -> Float[Tensor, "*batch H W"]:
    """Bilinear upsampling of patch-grid maps to the image size (pixel centres, ``align_corners=False``)."""
    flat = grid.reshape(-1, 1, *grid.shape[-2:])
    pixels = F.interpolate(flat, size=tuple(image_size), mode="bilinear", align_corners=False)
    return pixels.reshape(*grid.shape[:-2], *image_size)


def minmax(maps: Float[Tensor, "*batch H W"]) -> Float[Tensor, "*batch H W"]:
    """Each map rescaled to [0, 1]; a constant map becomes all zeros."""
    low = maps.amin((-2, -1), keepdim=True)
    span = maps.amax((-2, -1), keepdim=True) - low
    return (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny)
