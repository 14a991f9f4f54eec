"""Figures of the mutual-knowledge analysis: concept regions with their descriptors, and the Venn
diagram of visual vs textual concepts (drawn with matplotlib patches, no extra dependency)."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from clip_lens.figures import plain

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from clip_lens_plugins.mutual_knowledge.analysis import ImageConcepts

PART_COLOURS = ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf", "#999999"]


def displayable(image: Float[Tensor, "3 H W"]) -> Float[Tensor, "H W 3"]:
    """A preprocessed image min-max scaled to [0, 1] for display (channels last)."""
    image = image.detach().float().cpu()
    low, high = image.amin(), image.amax()
    return ((image - low) / (high - low).clamp_min(1e-8)).permute(1, 2, 0)


def concept_figure(
    images: Float[Tensor, "n 3 H W"], records: Sequence["ImageConcepts"], descriptors: list[str], classes: list[str]
) -> "Figure":
    """One column per image: the image, then its concept regions coloured, each region's descriptors below."""
    import matplotlib.colors as mcolors
    from matplotlib.figure import Figure

    n = len(records)
    fig = Figure(figsize=(3.2 * n, 6.4), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    for col, record in enumerate(records):
        image = displayable(images[col])
        height, width = image.shape[:2]
        parts = torch.tensor(record.parts)
        grid_h, grid_w = parts.shape
        overlay = torch.zeros(height, width, 4)
        cell_h, cell_w = height // grid_h, width // grid_w
        for part in range(len(record.region_descriptors)):
            colour = torch.tensor(mcolors.to_rgba(PART_COLOURS[part % len(PART_COLOURS)], alpha=0.55))
            mask = (parts == part).repeat_interleave(cell_h, 0).repeat_interleave(cell_w, 1)
            overlay[mask[:height, :width]] = colour
        title = f"predicted: {plain(classes[record.predicted], 40)}"
        if record.label is not None:
            title += f"\ntrue: {plain(classes[record.label], 40)}"
        axes[0, col].imshow(image.numpy())
        axes[0, col].set_title(title, fontsize=9)
        axes[1, col].imshow(image.numpy())
        axes[1, col].imshow(overlay.numpy())
        lines = []
        for part, ids in enumerate(record.region_descriptors):
            if ids:
                lines.append((PART_COLOURS[part % len(PART_COLOURS)], f"{part}: " + "; ".join(descriptors[i] for i in ids)))
        for k, (colour, text) in enumerate(lines):
            axes[1, col].text(0, -0.06 - 0.09 * k, plain(textwrap.shorten(text, 48)), color=colour, fontsize=7,
                              transform=axes[1, col].transAxes, va="top")
        for ax in axes[:, col]:
            ax.set_axis_off()
    return fig


def venn_figure(record: "ImageConcepts", descriptors: list[str], classes: list[str], top: int = 15) -> "Figure":
    """Two circles: visual concepts D_v (left), the predicted class's top ``top`` textual concepts
    (right, as the paper's Venn plot), the shared ones in the overlap."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    textual = record.textual[:top]
    shared = [d for d in record.visual if d in set(textual)]
    only_visual = [d for d in record.visual if d not in set(shared)]
    only_textual = [d for d in textual if d not in set(shared)]
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.add_subplot()
    ax.add_patch(Circle((0.36, 0.5), 0.3, color="tab:blue", alpha=0.25))
    ax.add_patch(Circle((0.64, 0.5), 0.3, color="tab:orange", alpha=0.25))
    for x, items, label in ((0.2, only_visual, f"visual D_v ({len(record.visual)})"),
                            (0.5, shared, f"shared ({len(shared)})"),
                            (0.8, only_textual, f"textual D_ŷ (top {len(textual)})")):
        ax.text(x, 0.86, label, ha="center", fontsize=9, weight="bold")
        body = "\n".join(plain(textwrap.shorten(descriptors[d], 26)) for d in items[:14])
        ax.text(x, 0.5, body, ha="center", va="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0.1, 0.9)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_title(f"{plain(record.id, 60)}: predicted {plain(classes[record.predicted], 40)}, MI {record.mi:.2f}, AUC {record.auc:.2f}")
    return fig
