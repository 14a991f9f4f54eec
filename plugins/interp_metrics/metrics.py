"""Interpretability metrics of a head label table: pure functions, no model needed.

Every function reads a `HeadLabelsResult` (or a plain
list of `HeadLabel`). A head is *labelled* when its
``label`` is not None; ``fits[i]`` says whether its span text ``texts[i]`` fits that label.

Definitions (K = ``top_k``, 5 by default; see ``docs/concepts/interpretability_metrics.md``):

* **CCS(h)**, concept consistency (Madasu et al. 2025): how many of the head's first K span texts
  fit its label, 0..K. An unlabelled head has CCS 0. Every head needs at least K texts.
* **CCS@k**: the share of all heads (labelled or not) with CCS == k, for k = 0..K.
* **association** (consistency within heads, higher is better): the mean, over labelled heads, of
  the fraction of *all* their span texts that fit their label. 0.0 with no labelled heads.
* **entanglement** (properties shared across heads, lower is better):
  1 − (number of distinct labels / number of labelled heads). 0 when every labelled head has its own
  property; 0.0 with no labelled heads.
* **CCR**, concentrated-concept ratio: (number of labels held by more than one high-CCS head) /
  (number of high-CCS heads), where high-CCS means CCS == K. 0.0 with no high-CCS heads.

Metrics whose denominator is empty are 0.0 rather than NaN; `empty_metric_warnings` says which.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace
from typing import Sequence, Union

import numpy as np

from clip_lens.errors import InputError
from clip_lens_plugins.head_labels.result import HeadLabel, HeadLabelsResult, parse_head

Labels = Union[HeadLabelsResult, Sequence[HeadLabel]]

DEFAULT_TOP_K = 5


def head_list(labels: Labels) -> list[HeadLabel]:
    """The heads of a label table, checked: at least one, each head key once."""
    heads = list(labels.heads if isinstance(labels, HeadLabelsResult) else labels)
    if not heads:
        raise InputError("the label table has no heads; label the TextSpan output of at least one head first.")
    repeated = sorted(key for key, n in Counter(h.head for h in heads).items() if n > 1)
    if repeated:
        raise InputError(f"heads listed more than once: {', '.join(repeated)}; keep one label per head.")
    return heads


def _labelled(labels: Labels) -> list[HeadLabel]:
    return [h for h in head_list(labels) if h.label is not None]


def _check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InputError(f"top_k must be a positive integer (the number of span texts scored per head), got {top_k!r}.")


def concept_consistency(labels: Labels, top_k: int = DEFAULT_TOP_K) -> dict[str, int]:
    """CCS of every head: how many of its first ``top_k`` span texts fit its label.

    Args:
        labels: the head label table.
        top_k: K, the number of leading span texts scored per head.

    Returns:
        ``"L{layer}H{head}"`` → CCS in 0..K, in table order (0 for unlabelled heads).

    Raises:
        InputError: a head has fewer than ``top_k`` span texts.
    """
    _check_top_k(top_k)
    heads = head_list(labels)
    short = [f"{h.head} ({len(h.texts)})" for h in heads if len(h.texts) < top_k]
    if short:
        raise InputError(
            f"CCS with top_k={top_k} needs at least {top_k} span texts per head; these heads have fewer: "
            f"{', '.join(short)}. Rerun TextSpan with at least {top_k} texts per head, or lower top_k."
        )
    return {h.head: 0 if h.label is None else sum(h.fits[:top_k]) for h in heads}


def ccs_at_k(labels: Labels, top_k: int = DEFAULT_TOP_K) -> dict[int, float]:
    """CCS@k: the share of all heads (labelled or not) whose CCS is k, for k = 0..``top_k``."""
    ccs = concept_consistency(labels, top_k)
    counts = Counter(ccs.values())
    return {k: counts[k] / len(ccs) for k in range(top_k + 1)}


def association(labels: Labels) -> float:
    """Mean, over labelled heads, of the fraction of all their span texts that fit their label.

    Higher is better (each head is consistent). 0.0 when no head is labelled.
    """
    labelled = _labelled(labels)
    empty = [h.head for h in labelled if not h.texts]
    if empty:
        raise InputError(f"labelled heads without span texts: {', '.join(empty)}; a label needs the texts it was read from.")
    if not labelled:
        return 0.0
    return sum(sum(h.fits) / len(h.texts) for h in labelled) / len(labelled)


def entanglement(labels: Labels) -> float:
    """1 − (distinct labels / labelled heads): how much heads share properties.

    Lower is better: 0 when every labelled head has its own property. 0.0 when no head is labelled.
    """
    labelled = _labelled(labels)
    if not labelled:
        return 0.0
    return 1.0 - len({h.label for h in labelled}) / len(labelled)


def concentrated_concept_ratio(labels: Labels, top_k: int = DEFAULT_TOP_K) -> float:
    """CCR: labels held by more than one high-CCS head (CCS == K), divided by the number of high-CCS heads.

    0.0 when no head reaches CCS == K.
    """
    ccs = concept_consistency(labels, top_k)
    high = Counter(h.label for h in head_list(labels) if h.label is not None and ccs[h.head] == top_k)
    n_high = sum(high.values())
    if n_high == 0:
        return 0.0
    return sum(1 for n in high.values() if n > 1) / n_high


def property_counts(labels: Labels) -> dict[str, int]:
    """Label → number of labelled heads with it, most common first (ties by name)."""
    counts = Counter(h.label for h in _labelled(labels))
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def layer_mean_ccs(ccs: dict[str, int]) -> dict[int, float]:
    """Layer → mean CCS of its heads in ``ccs`` (the output of `concept_consistency`), by layer."""
    by_layer: dict[int, list[int]] = defaultdict(list)
    for head, score in ccs.items():
        by_layer[parse_head(head)[0]].append(score)
    return {layer: sum(scores) / len(scores) for layer, scores in sorted(by_layer.items())}


def empty_metric_warnings(labels: Labels, top_k: int = DEFAULT_TOP_K) -> list[str]:
    """Why a metric is 0.0 by convention rather than measured (empty denominators); [] when none is."""
    found = []
    if not _labelled(labels):
        found.append("no labelled heads: association and entanglement are 0.0 by convention, not measured.")
    if top_k not in concept_consistency(labels, top_k).values():
        found.append(f"no high-CCS heads (CCS == {top_k}): CCR is 0.0 by convention, not measured.")
    return found


def head_bootstrap(labels: Labels, top_k: int = DEFAULT_TOP_K, n_boot: int = 1000, seed: int = 0) -> dict[str, list[float]]:
    """Bootstrap 95% intervals over heads of ``association``, ``entanglement``, ``ccr`` and
    ``mean_ccs``: the heads are resampled with replacement (a head drawn twice counts twice: it gets a
    fresh key), the labels held fixed. With 16 heads these intervals are wide, and they should be."""
    heads = head_list(labels)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {"association": [], "entanglement": [], "ccr": [], "mean_ccs": []}
    for _ in range(n_boot):
        drawn = [replace(heads[i], head=f"L0H{j}") for j, i in enumerate(rng.integers(0, len(heads), len(heads)))]
        samples["association"].append(association(drawn))
        samples["entanglement"].append(entanglement(drawn))
        samples["ccr"].append(concentrated_concept_ratio(drawn, top_k))
        ccs = concept_consistency(drawn, top_k)
        samples["mean_ccs"].append(sum(ccs.values()) / len(ccs))
    return {name: [float(x) for x in np.percentile(values, [2.5, 97.5])] for name, values in samples.items()}
