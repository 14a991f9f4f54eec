"""Foreground masks from maps, the segmentation metrics, and their bootstrap intervals over images.

The protocol is Gandelsman et al.'s (after Chefer et al.): a map is clipped below 0, min-max
normalised and thresholded at its mean. Pixel accuracy and IoU are pooled over the whole dataset
(Σ correct / Σ pixels, Σ intersection / Σ union per class); AP is computed per image on the
continuous map and averaged over the images that have a foreground.

Metrics (fractions in [0, 1]): ``pixel_accuracy``; ``object_iou``, the foreground class's IoU;
``mean_iou``, the mean of the background and foreground IoUs (on small objects the background IoU
is near 1 whatever the map, so mIoU is carried by the background: read it next to ``object_iou``);
``mean_ap``.

Intervals: `SegmentationScore` keeps every image's counts, so a bootstrap resample of the images
recomputes the pooled metrics exactly as the point estimate does (`image_intervals`: the resamples
and percentiles of `clip_lens.stats.bootstrap_ci`, vectorised). For a control averaged over several
random draws (maps of random head sets on the same images) a resample draws images and draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from clip_lens.errors import InputError
from clip_lens_plugins.segmentation.maps import minmax

METRIC_NAMES = ("pixel_accuracy", "object_iou", "mean_iou", "mean_ap")
RESAMPLE_BLOCK = 250


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


def average_precisions(scores: Float[Tensor, "batch *pixels"], target: Bool[Tensor, "batch *pixels"]) -> Float[Tensor, "batch"]:
    """`average_precision` of every image of a batch at once (float64; NaN without a foreground pixel).

    Each foreground pixel adds ``P / n_positive``, ``P`` the precision at the end of its group of tied
    scores, which is the same sum as `average_precision`'s over thresholds.
    """
    scores, target = scores.flatten(1), target.flatten(1)
    order = scores.argsort(1, descending=True)
    ranked, hits = scores.gather(1, order), target.gather(1, order).double()
    seen = torch.arange(1, ranked.shape[1] + 1, dtype=torch.float64)
    precision = hits.cumsum(1) / seen
    starts = torch.ones_like(ranked, dtype=torch.bool)
    starts[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    group = starts.long().cumsum(1) - 1  # tied scores share a group
    last = torch.zeros_like(group).scatter_reduce_(1, group, torch.arange(ranked.shape[1]).expand_as(group), "amax")
    at_group_end = precision.gather(1, last.gather(1, group))
    return (hits * at_group_end).sum(1) / hits.sum(1)  # 0 / 0 = NaN without a foreground


def _nanmean(values: np.ndarray, axis=None):
    """Mean over the entries that are not NaN; NaN (without a warning) where there are none."""
    values = np.asarray(values, dtype=float)
    kept = ~np.isnan(values)
    total, count = np.where(kept, values, 0.0).sum(axis), kept.sum(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def _metric_of_sums(name: str, correct, pixels, counts, precision_sum, n_precision):
    """One of `METRIC_NAMES` from sums over a set of images (any leading batch axes): correct and
    all pixels, ``counts [..., 2, 2]``, the sum of the defined APs and their number. A class with
    union 0 has no IoU (NaN) and is left out of ``mean_iou``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if name == "pixel_accuracy":
            return correct / pixels
        if name == "mean_ap":
            return precision_sum / n_precision
        iou = counts[..., 0] / counts[..., 1]  # [..., class]
        return iou[..., 1] if name == "object_iou" else _nanmean(iou, axis=-1)


def pooled_metrics(
    correct: np.ndarray, pixels: np.ndarray, counts: np.ndarray, precisions: np.ndarray
) -> dict[str, float]:
    """`METRIC_NAMES` of a set of images from their per-image ``correct [n]``, ``pixels [n]``,
    ``counts [n, 2, 2]`` (`intersection_union`) and ``precisions [n]`` (NaN: no foreground)."""
    defined = ~np.isnan(precisions)
    sums = correct.sum(), pixels.sum(), counts.sum(0), precisions[defined].sum(), defined.sum()
    return {name: float(_metric_of_sums(name, *sums)) for name in METRIC_NAMES}


@dataclass
class SegmentationScore:
    """Per-image counts of one map over a dataset (`update` per batch, then `summary`)."""

    correct: list[int] = field(default_factory=list)
    """Per image: pixels whose foreground/background label is right."""
    pixels: list[int] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)
    """Per image: ``[[∩, ∪] background, [∩, ∪] foreground]`` pixel counts."""
    precisions: list[float] = field(default_factory=list)
    """Per image: AP of the continuous map (NaN without a foreground pixel)."""

    def __len__(self) -> int:
        return len(self.correct)

    def update(
        self,
        scores: Float[Tensor, "batch H W"],
        target: Bool[Tensor, "batch H W"],
        predicted: Optional[Bool[Tensor, "batch H W"]] = None,
    ) -> None:
        """Add a batch of foreground scores (in [0, 1]) against ground-truth masks.

        ``predicted`` (default: the scores thresholded at their mean) is the hard mask scored by
        pixel accuracy and IoU; ``scores`` alone rank the pixels for AP.
        """
        predicted = threshold_at_mean(scores) if predicted is None else predicted
        pixels = (-2, -1)
        self.correct.extend((predicted == target).sum(pixels).tolist())
        self.pixels.extend([target.shape[-2] * target.shape[-1]] * len(target))
        per_class = []
        for label in (False, True):
            p, t = predicted == label, target == label
            per_class.append(torch.stack([(p & t).sum(pixels), (p | t).sum(pixels)], -1))
        self.counts.extend(torch.stack(per_class, 1).double().numpy())  # [batch, class, (∩, ∪)]
        self.precisions.extend(average_precisions(scores, target).tolist())

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``correct [n]``, ``pixels [n]``, ``counts [n, 2, 2]``, ``precisions [n]`` as numpy arrays."""
        counts = np.stack(self.counts) if self.counts else np.zeros((0, 2, 2))
        return np.array(self.correct, float), np.array(self.pixels, float), counts, np.array(self.precisions, float)

    def summary(self) -> dict[str, float]:
        """`METRIC_NAMES` pooled over every image (AP: the mean over images with a foreground)."""
        return pooled_metrics(*self.arrays())


def image_intervals(
    scores: Sequence[SegmentationScore], n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, list[float]]:
    """Percentile bootstrap ``[low, high]`` per metric, over the images (and over the draws).

    One score: the images are resampled with replacement and the pooled metrics recomputed; AP
    resamples only the images with a foreground, the images it is averaged over. The resamples and
    percentiles are `clip_lens.stats.bootstrap_ci`'s (same generator, same draws, so the same
    interval as ``bootstrap_ci(images, pooled metric, n_boot, level, seed)``), computed at once as
    (times each image is picked) @ (per-image counts) instead of one Python call per resample.
    Several scores (random draws scored on the same images, reported as their mean): each resample
    also draws the draws with replacement and takes the mean over them, so the interval covers both
    sources of chance. A metric undefined on some resamples (no foreground pixel at all) gets
    ``[nan, nan]``.
    """
    if not scores or len({len(s) for s in scores}) != 1 or len(scores[0]) == 0:
        raise InputError("image_intervals needs one or more scores over the same, non-empty set of images.")
    correct, pixels, counts, precisions = (np.stack(parts) for parts in zip(*(s.arrays() for s in scores)))  # [draw, image, ...]
    n_draws, n_images = correct.shape
    has_ap = ~np.isnan(precisions)
    precisions = np.where(has_ap, precisions, 0.0)
    tail = (1 - level) / 2 * 100
    intervals = {}
    for name in METRIC_NAMES:
        units = np.flatnonzero(has_ap[0]) if name == "mean_ap" else np.arange(n_images)
        if units.size == 0:
            intervals[name] = [float("nan"), float("nan")]
            continue
        rng = np.random.default_rng(seed)  # the order of bootstrap_ci: image picks first
        image_picks = rng.integers(0, units.size, size=(n_boot, units.size))
        draw_picks = rng.integers(0, n_draws, size=(n_boot, n_draws)) if n_draws > 1 else np.zeros((n_boot, 1), int)
        replicates = []
        for block in range(0, n_boot, RESAMPLE_BLOCK):  # bounded memory: a block × images matrix of weights
            picks = units[image_picks[block : block + RESAMPLE_BLOCK]]
            weights = np.zeros((len(picks), n_images))
            np.add.at(weights, (np.arange(len(picks))[:, None], picks), 1.0)
            per_draw = _metric_of_sums(  # [resample, draw]
                name, weights @ correct.T, weights @ pixels.T, np.einsum("bn,dnck->bdck", weights, counts),
                weights @ precisions.T, weights @ has_ap.T.astype(float),
            )
            replicates.append(np.take_along_axis(per_draw, draw_picks[block : block + RESAMPLE_BLOCK], 1).mean(1))
        replicates = np.concatenate(replicates)
        low, high = np.percentile(replicates, [tail, 100 - tail])
        intervals[name] = [float(low), float(high)]
    return intervals
