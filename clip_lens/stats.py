"""Small statistics shared by the analyses and their ground-truth checks.

Every rate or correlation a claim rests on carries a percentile bootstrap 95% interval over the
units that were sampled (scenes, query images): `bootstrap_ci` for a statistic of one sample,
`bootstrap_correlation` for a correlation whose points share those units.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import numpy as np

from clip_lens.errors import InputError

CORRELATIONS = ("pearson", "spearman")

ArrayLike = Union[Sequence[float], Sequence[Sequence[float]], np.ndarray]


def bootstrap_ci(
    values: Union[Sequence[float], np.ndarray],
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (resampled with replacement)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one value.")
    rng = np.random.default_rng(seed)
    samples = values[rng.integers(0, values.size, size=(n_boot, values.size))]
    stats = np.apply_along_axis(statistic, 1, samples)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def ranks(values: ArrayLike) -> np.ndarray:
    """1-based ranks along the last axis, ties sharing their average rank (as Spearman's rho needs).

    ``[..., n]`` → ``[..., n]`` floats; e.g. ``ranks([3, 1, 3, 2])`` is ``[3.5, 1, 3.5, 2]``.
    """
    values = np.asarray(values, dtype=float)
    n = values.shape[-1]
    order = np.argsort(values, axis=-1, kind="stable")
    ordered = np.take_along_axis(values, order, -1)
    position = np.broadcast_to(np.arange(n), values.shape)
    starts = np.ones(values.shape, bool)
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    ends = np.ones(values.shape, bool)
    ends[..., :-1] = starts[..., 1:]
    # every sorted position learns where its block of equal values begins and ends
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=-1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, position, n - 1), -1), axis=-1), -1)
    out = np.empty(values.shape)
    np.put_along_axis(out, order, (first + last) / 2 + 1, -1)
    return out


def pearson(x: ArrayLike, y: ArrayLike) -> Union[float, np.ndarray]:
    """Pearson correlation along the last axis (``[..., n]`` → ``[...]``); NaN where either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    a, b = x - x.mean(-1, keepdims=True), y - y.mean(-1, keepdims=True)
    spread_a, spread_b = np.sqrt((a**2).sum(-1)), np.sqrt((b**2).sum(-1))
    # relative test: the mean of equal values can differ from them by rounding, leaving tiny non-zero deviations
    constant = (spread_a <= 1e-12 * np.sqrt((x**2).sum(-1))) | (spread_b <= 1e-12 * np.sqrt((y**2).sum(-1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(constant, np.nan, (a * b).sum(-1) / (spread_a * spread_b))
    return float(r) if r.ndim == 0 else r


def spearman(x: ArrayLike, y: ArrayLike) -> Union[float, np.ndarray]:
    """Spearman's rank correlation along the last axis: Pearson of the average ranks."""
    return pearson(ranks(x), ranks(y))


def correlation(x: ArrayLike, y: ArrayLike, method: str = "pearson") -> Union[float, np.ndarray]:
    """``pearson`` or ``spearman`` along the last axis."""
    if method not in CORRELATIONS:
        raise InputError(f"method must be one of {', '.join(CORRELATIONS)}, got '{method}'.")
    return pearson(x, y) if method == "pearson" else spearman(x, y)


def bootstrap_correlation(
    x: ArrayLike,
    y: ArrayLike,
    method: str = "pearson",
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a correlation, resampling units that belong together.

    Two layouts:

    - ``x``, ``y`` of shape ``[n]``: ``n`` paired units (e.g. scenes, each with an ``x`` and a ``y``);
      pairs are resampled, and the correlation is over the resampled pairs.
    - ``x``, ``y`` of shape ``[groups, n]``: every group (e.g. a checkpoint) measured on the same ``n``
      units; one resample of the units is shared by every group and both sides, each group's point is
      its mean over the resampled units, and the correlation is over the ``groups`` points. This is the
      interval of "MI-AUC follows accuracy across checkpoints" over the scenes they were measured on.

    Resamples whose correlation is undefined (a constant side) are left out; when all are, the
    interval is ``(nan, nan)``.

    Raises:
        InputError: ``x`` and ``y`` of different shapes, not 1-d or 2-d, fewer than two points or
            units, or an unknown ``method``.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if method not in CORRELATIONS:
        raise InputError(f"method must be one of {', '.join(CORRELATIONS)}, got '{method}'.")
    if x.shape != y.shape or x.ndim not in (1, 2):
        raise InputError(f"x and y must both be [n] or both be [groups, n], got shapes {x.shape} and {y.shape}.")
    if x.shape[-1] < 2 or (x.ndim == 2 and x.shape[0] < 2):
        raise InputError(f"a correlation needs at least two points and two units to resample, got shape {x.shape}.")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, x.shape[-1], size=(n_boot, x.shape[-1]))
    if x.ndim == 1:
        xs, ys = x[picks], y[picks]  # [n_boot, n]
    else:
        xs, ys = x[:, picks].mean(-1).T, y[:, picks].mean(-1).T  # [n_boot, groups]
    draws = correlation(xs, ys, method)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)
