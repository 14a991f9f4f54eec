"""Results of the map analyses: `HeatmapResult` (one text) and `ContrastiveResult` (two)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import einops
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from clip_lens.results import JSONResult
from clip_lens.errors import InputError
from clip_lens.figures import plain
from clip_lens_plugins.segmentation.maps import minmax, upsample


def _describe(heads: list[str]) -> str:
    return heads[0] if len(heads) == 1 else f"{len(heads)} heads"


def _displayable(images: Tensor, n: int):
    """``[n, H, W, 3]`` numpy images in [0, 1] (each preprocessed image contrast-stretched, colours kept)."""
    channels_last = einops.rearrange(images[:n].detach().float().cpu(), "b c h w -> b h w c")
    stretched = minmax(einops.rearrange(channels_last, "b h w c -> b h (w c)"))
    return einops.rearrange(stretched, "b h (w c) -> b h w c", c=3).numpy()


MAP_CMAP = "jet"


def _overlay_figure(columns: list[tuple[str, Tensor]], images: Optional[Tensor], max_images: int,
                    scale: str = "map value (0: image min, 1: image max)"):
    """One row per image: the image, then one column per ``(title, maps [B, H, W] in [0, 1])``
    drawn over it with opacity rising with the map value, so low values leave the image visible;
    a colour bar (labelled ``scale``) for the maps at the right."""
    from matplotlib.figure import Figure

    n = min(max_images, len(columns[0][1]))
    pictures = _displayable(images, n) if images is not None else None
    offset = 0 if pictures is None else 1
    fig = Figure(figsize=(2.2 * (len(columns) + offset), 2.2 * n), layout="constrained")
    axes = fig.subplots(n, len(columns) + offset, squeeze=False)
    for row in range(n):
        if pictures is not None:
            axes[row, 0].imshow(pictures[row])
            axes[row, 0].set_axis_off()
            if row == 0:
                axes[row, 0].set_title("image", fontsize=8)
        for col, (title, maps) in enumerate(columns, start=offset):
            ax = axes[row, col]
            values = maps[row].cpu().numpy()
            if pictures is not None:
                ax.imshow(pictures[row])
            ax.imshow(values, cmap=MAP_CMAP, vmin=0, vmax=1, alpha=(0.1 + 0.8 * values) if pictures is not None else 1.0)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=8)
    _map_colour_bar(fig, axes.ravel().tolist(), n, scale)
    return fig


def _map_colour_bar(fig, axes: list, rows: int, label: str):
    """The maps' colour bar (``jet``, 0 to 1) beside ``axes``, kept as ``fig.map_colour_bar``; its label
    (this one and any later ``set_label``) wrapped to the bar's height, so that no part of it is cut off."""
    import textwrap

    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), MAP_CMAP), ax=axes, shrink=0.9, aspect=25, pad=0.02)
    characters = max(16, int(2.2 * rows * 0.9 * 11))  # ~11 characters of 7-pt text per inch of bar
    set_label = bar.set_label

    def wrapped(text: str, **options) -> None:
        set_label(textwrap.fill(str(text), characters), **{"fontsize": 7, **options})

    bar.set_label = wrapped
    bar.set_label(label)
    bar.ax.tick_params(labelsize=7)
    fig.map_colour_bar = bar
    return bar


@dataclass
class HeatmapResult(JSONResult):
    """Where the selected heads write a text's direction, per image.

    ``grid.sum((1, 2)) + prefix`` is exactly the selected heads' share of the image–text cosine.
    """

    text: str
    heads: list[str]
    """``"L{l}H{h}"`` keys of the summed heads."""
    grid: Float[Tensor, "batch grid_h grid_w"]
    """Each patch's share of the cosine (contribution · unit text embedding / ‖image embedding‖)."""
    prefix: Float[Tensor, "batch"]
    """The prefix tokens' (CLS) share, which has no place on the image."""
    image_size: tuple[int, int]
    raw: Float[Tensor, "batch H W"] = field(init=False, repr=False)
    """``grid`` bilinearly upsampled to the image size."""

    def __post_init__(self) -> None:
        self.image_size = tuple(self.image_size)
        self.raw = upsample(self.grid, self.image_size)

    @property
    def maps(self) -> Float[Tensor, "batch H W"]:
        """``raw`` min-max normalised per image, for display."""
        return minmax(self.raw)

    def inside_outside(self, masks: Bool[Tensor, "batch H W"]) -> Float[Tensor, "batch 2"]:
        """Mean of `maps` inside and outside each mask (images with an empty side give NaN there)."""
        if masks.shape != self.raw.shape:
            raise InputError(f"masks {tuple(masks.shape)} do not match the maps {tuple(self.raw.shape)}.")
        masks = masks.to(self.raw.device).bool()
        maps = self.maps
        inside = (maps * masks).sum((1, 2)) / masks.sum((1, 2))
        outside = (maps * ~masks).sum((1, 2)) / (~masks).sum((1, 2))
        return torch.stack([inside, outside], 1)

    def to_dict(self) -> dict:
        return {"text": self.text, "heads": self.heads, "grid": self.grid.tolist(), "prefix": self.prefix.tolist(),
                "image_size": list(self.image_size)}

    @classmethod
    def from_dict(cls, data: dict) -> "HeatmapResult":
        return cls(data["text"], data["heads"], torch.tensor(data["grid"]), torch.tensor(data["prefix"]), tuple(data["image_size"]))

    def plot(self, images: Optional[Float[Tensor, "batch 3 H W"]] = None, max_images: int = 4):
        """The normalised maps over the (preprocessed) images, one row per image."""
        return _overlay_figure([(f"'{plain(self.text, 60)}'\n{_describe(self.heads)}", self.maps)], images, max_images,
                               "share of the cosine, min–max per image (0: lowest patch, 1: highest)")


@dataclass
class ContrastiveResult(JSONResult):
    """Where the selected heads write text A's direction more than text B's, and the reverse."""

    text_a: str
    text_b: str
    heads: list[str]
    a_minus_b: Float[Tensor, "batch grid_h grid_w"]
    """Per patch: share of cos(image, A) minus share of cos(image, B)."""
    b_minus_a: Float[Tensor, "batch grid_h grid_w"]
    image_size: tuple[int, int]
    raw_a_minus_b: Float[Tensor, "batch H W"] = field(init=False, repr=False)
    raw_b_minus_a: Float[Tensor, "batch H W"] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.image_size = tuple(self.image_size)
        self.raw_a_minus_b = upsample(self.a_minus_b, self.image_size)
        self.raw_b_minus_a = upsample(self.b_minus_a, self.image_size)

    @property
    def maps(self) -> tuple[Float[Tensor, "batch H W"], Float[Tensor, "batch H W"]]:
        """(A−B, B−A) upsampled and normalised per image with one min/max shared by both maps."""
        pair = torch.stack([self.raw_a_minus_b, self.raw_b_minus_a], 1)
        shared = minmax(einops.rearrange(pair, "b p h w -> b h (p w)"))
        a_minus_b, b_minus_a = einops.rearrange(shared, "b h (p w) -> p b h w", p=2)
        return a_minus_b, b_minus_a

    def to_dict(self) -> dict:
        return {"text_a": self.text_a, "text_b": self.text_b, "heads": self.heads, "a_minus_b": self.a_minus_b.tolist(),
                "b_minus_a": self.b_minus_a.tolist(), "image_size": list(self.image_size)}

    @classmethod
    def from_dict(cls, data: dict) -> "ContrastiveResult":
        return cls(data["text_a"], data["text_b"], data["heads"], torch.tensor(data["a_minus_b"]),
                   torch.tensor(data["b_minus_a"]), tuple(data["image_size"]))

    def plot(self, images: Optional[Float[Tensor, "batch 3 H W"]] = None, max_images: int = 4):
        """A−B and B−A over the (preprocessed) images, one row per image."""
        a_minus_b, b_minus_a = self.maps
        heads = _describe(self.heads)
        a, b = plain(self.text_a, 40), plain(self.text_b, 40)
        columns = [(f"'{a}' − '{b}'\n{heads}", a_minus_b), (f"'{b}' − '{a}'\n{heads}", b_minus_a)]
        return _overlay_figure(columns, images, max_images, "difference of cosine shares, min–max per image over both maps")
