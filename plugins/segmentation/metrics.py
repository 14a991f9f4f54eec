"""Foreground masks from maps, and the segmentation metrics (pixel accuracy, 2-class IoU, AP).

The protocol is Gandelsman et al.'s (after Chefer et al.): a map is clipped below 0, min-max
normalised and thresholded at its mean. Pixel accuracy and IoU are accumulated over the whole
dataset (correct / all pixels, Σ intersection / Σ union per class); AP is computed per image on
the continuous map and averaged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from clip_lens_plugins.segmentation.maps import minmax


def foreground_scores(maps: Float[Tensor, "batch H W"]) -> Float[Tensor, "batch H W"]:
    """Maps clipped below 0 and min-max normalised per image (scores in [0, 1])."""
    return minmax(maps.clamp_min(0))


def threshold_at_mean(scores: Float[Tensor, "batch H W"]) -> Bool[Tensor, "batch H W"]:
    """Foreground = score ≥ the image's mean score (a constant map is all foreground)."""
    return scores >= scores.mean((-2, -1), keepdim=True)


def pixel_accuracy(predicted: Bool[Tensor, "*pixels"], target: Bool[Tensor, "*pixels"]) -> float:
    """Share of pixels whose foreground/background label is right."""
    return float((predicted == target).float().mean())


def intersection_union(predicted: Bool[Tensor, "*pixels"], target: Bool[Tensor, "*pixels"]) -> Float[Tensor, "2 2"]:
    """Pixel counts ``[[∩, ∪] background, [∩, ∪] foreground]``."""
    counts = []
    for label in (False, True):
        p, t = predicted == label, target == label
        counts.append([(p & t).sum(), (p | t).sum()])
    return torch.tensor(counts, dtype=torch.float64)


def mean_iou(predicted: Bool[Tensor, "*pixels"], target: Bool[Tensor, "*pixels"]) -> float:
    """Mean over background and foreground of intersection / union (a class absent from both
    masks, union 0, is left out)."""
    return _mean_iou(intersection_union(predicted, target))


def _mean_iou(counts: Float[Tensor, "2 2"]) -> float:
    return float((counts[:, 0] / counts[:, 1]).nanmean())


def average_precision(scores: Float[Tensor, "*pixels"], target: Bool[Tensor, "*pixels"]) -> float:
    """AP of ``scores`` ranking the ``target`` pixels: Σ_n (R_n − R_{n−1}) P_n over distinct score
    thresholds (tied scores enter together, so a constant map scores the foreground share).
    NaN when there is no foreground pixel."""
    scores, target = scores.flatten(), target.flatten()
    n_positive = target.sum()
    if n_positive == 0:
        return float("nan")
    order = scores.argsort(descending=True)
    ranked, hits = scores[order], target[order].double().cumsum(0)
    seen = torch.arange(1, len(ranked) + 1, dtype=torch.float64)
    group_end = torch.ones_like(ranked, dtype=torch.bool)
    group_end[:-1] = ranked[1:] != ranked[:-1]  # a threshold sits after the last of each tied group
    hits, seen = hits[group_end], seen[group_end]
    recall_gain = torch.diff(hits, prepend=hits.new_zeros(1)) / n_positive
    return float((recall_gain * hits / seen).sum())


@dataclass
class SegmentationScore:
    """Running totals of one method over a dataset (update per batch, then `summary`)."""

    correct: int = 0
    pixels: int = 0
    counts: Float[Tensor, "2 2"] = field(default_factory=lambda: torch.zeros(2, 2, dtype=torch.float64))
    precisions: list[float] = field(default_factory=list)

    def update(self, scores: Float[Tensor, "batch H W"], target: Bool[Tensor, "batch H W"]) -> None:
        """Add a batch of foreground scores (in [0, 1]) against ground-truth masks."""
        predicted = threshold_at_mean(scores)
        self.correct += int((predicted == target).sum())
        self.pixels += target.numel()
        self.counts += intersection_union(predicted, target)
        self.precisions.extend(average_precision(s, t) for s, t in zip(scores, target))

    def summary(self) -> dict[str, float]:
        """``pixel_accuracy`` and ``mean_iou`` over all pixels, ``mean_ap`` over images with foreground."""
        precisions = torch.tensor(self.precisions, dtype=torch.float64)
        return {
            "pixel_accuracy": self.correct / self.pixels,
            "mean_iou": _mean_iou(self.counts),
            "mean_ap": float(precisions.nanmean()),
        }
