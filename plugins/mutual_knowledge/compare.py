"""Across models: does the strength of shared knowledge (AUC) follow zero-shot accuracy?

The paper reports a line fit across 7 ViTs (accuracy ≈ 11.24·AUC + 25.97) and no correlation
coefficients; from its Table 3 the Pearson correlation within ViTs is 0.90–0.92. This module puts
several models' `MutualKnowledgeResult` side by side
and reports Pearson and Spearman correlation of AUC (and MI) with accuracy and the least-squares line.

A correlation over a handful of checkpoints moves a lot with the scenes it was measured on, so each
carries a bootstrap 95% interval over scenes (`clip_lens.stats.bootstrap_correlation`): the scenes are resampled once for
all models, and each model's accuracy, MI and AUC are recomputed from its per-scene values. This
needs every result to have been measured on the same images; results on different images get no
interval, and the summary says so.

>>> table = compare_files(["runs/step250.json", "runs/final.json"])   # doctest: +SKIP
>>> print(table.to_markdown())                                        # doctest: +SKIP
"""

from __future__ import annotations

import html
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float

from clip_lens.results import JSONResult
from clip_lens.errors import InputError
from clip_lens.stats import bootstrap_correlation, pearson, spearman

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def line_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y ≈ slope·x + intercept``."""
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    centred = a - a.mean()
    var = float((centred**2).sum())
    slope = float((centred * (b - b.mean())).sum()) / var if var > 0 else math.nan
    return slope, float(b.mean()) - slope * float(a.mean())


@dataclass
class ModelRow:
    """One model's summary (accuracy in %, as the paper's Table 3)."""

    accuracy: float
    mi: float
    auc: float
    images: int


@dataclass
class MutualKnowledgeComparison(JSONResult):
    """Model → accuracy, MI and AUC, with the correlations across models."""

    rows: dict[str, ModelRow]
    variant: str
    """MI variant of every row (results with different variants are not compared)."""
    pearson_auc: float
    spearman_auc: float
    pearson_mi: float
    spearman_mi: float
    slope: float
    intercept: float
    """accuracy ≈ slope · AUC + intercept (least squares)."""
    intervals: Optional[dict[str, list[float]]] = None
    """``"pearson_auc"`` … ``"spearman_mi"`` → bootstrap 95% interval ``[low, high]`` over the
    ``interval_scenes`` scenes every model was measured on (None: the models saw different images)."""
    interval_scenes: Optional[int] = None

    @classmethod
    def from_rows(
        cls, rows: dict[str, ModelRow], variant: str, scenes: Optional[dict[str, Float[np.ndarray, "model scene"]]] = None
    ) -> "MutualKnowledgeComparison":
        """The correlations of ``rows``; with ``scenes`` (``"accuracy"`` in %, ``"mi"``, ``"auc"`` per
        model and scene, models in the order of ``rows``, all on the same scenes) also their intervals."""
        if len(rows) < 2:
            raise InputError(f"comparing models needs at least 2 results, got {len(rows)}.")
        acc = [r.accuracy for r in rows.values()]
        auc = [r.auc for r in rows.values()]
        mi = [r.mi for r in rows.values()]
        slope, intercept = line_fit(auc, acc)
        intervals = None
        if scenes is not None:
            intervals = {f"{method}_{name}": list(bootstrap_correlation(scenes[name], scenes["accuracy"], method))
                         for name in ("auc", "mi") for method in ("pearson", "spearman")}
        return cls(rows, variant, pearson(auc, acc), spearman(auc, acc), pearson(mi, acc), spearman(mi, acc), slope, intercept,
                   intervals, None if scenes is None else scenes["accuracy"].shape[1])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MutualKnowledgeComparison":
        return cls(**{**data, "rows": {k: ModelRow(**v) for k, v in data["rows"].items()}})

    @property
    def fit_text(self) -> str:
        """The line fit as text, e.g. ``"66.74·AUC − 141.52"``."""
        sign = "−" if self.intercept < 0 else "+"
        return f"{self.slope:.2f}·AUC {sign} {abs(self.intercept):.2f}"

    def _table(self) -> tuple[list[str], list[list[str]]]:
        header = ["model", "zero-shot accuracy (%)", f"MI ({self.variant})", "AUC", "images"]
        body = [[m, f"{r.accuracy:.2f}", f"{r.mi:.3f}", f"{r.auc:.3f}", str(r.images)] for m, r in self.rows.items()]
        return header, body

    def _with_interval(self, name: str) -> str:
        value = f"{getattr(self, name):.3f}"
        if self.intervals is None:
            return value
        low, high = self.intervals[name]
        return f"{value} [{low:.2f}, {high:.2f}]"

    def summary(self) -> str:
        """The correlations (with their intervals) and the line, in one sentence."""
        if self.intervals is None:
            note = "no intervals: the models were measured on different images."
        else:
            note = f"[bootstrap 95% intervals over the {self.interval_scenes} scenes every model saw]."
        return (f"Pearson(AUC, accuracy) = {self._with_interval('pearson_auc')}, "
                f"Spearman = {self._with_interval('spearman_auc')}; "
                f"Pearson(MI, accuracy) = {self._with_interval('pearson_mi')}, Spearman = {self._with_interval('spearman_mi')}; "
                f"accuracy ≈ {self.fit_text} over {len(self.rows)} models; {note}")

    def to_markdown(self) -> str:
        header, body = self._table()
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body] + ["", self.summary()])

    def to_html(self) -> str:
        header, body = self._table()

        def row(cells: list[str], tag: str) -> str:
            return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

        table = ["<table>", row(header, "th"), *(row(cells, "td") for cells in body), "</table>"]
        return "\n".join([*table, f"<p>{html.escape(self.summary())}</p>"])

    def plot(self) -> "Figure":
        """Accuracy against AUC, one point per model, with the fitted line."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5.5, 4.2), layout="constrained")
        ax = fig.add_subplot()
        auc = [r.auc for r in self.rows.values()]
        acc = [r.accuracy for r in self.rows.values()]
        ax.scatter(auc, acc, color="tab:blue")
        for name, x, y in zip(self.rows, auc, acc):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if math.isfinite(self.slope):
            xs = torch.linspace(min(auc), max(auc), 2).tolist()
            ax.plot(xs, [self.slope * x + self.intercept for x in xs], color="tab:grey", linestyle="--",
                    label=self.fit_text)
            ax.legend(fontsize=8)
        ax.set_xlabel("AUC of the MI dynamics (shared knowledge)")
        ax.set_ylabel("zero-shot accuracy (%)")
        ax.set_title(f"Pearson {self.pearson_auc:.2f}, Spearman {self.spearman_auc:.2f}")
        return fig


def compare_results(results: dict[str, "object"]) -> MutualKnowledgeComparison:
    """Model name → `MutualKnowledgeResult` (all with the same MI variant)."""
    variants = {r.parameters["mi"] for r in results.values()}
    if len(variants) > 1:
        raise InputError(f"the results use different MI variants ({', '.join(sorted(variants))}); "
                         "run every model with the same --mi.")
    unlabelled = [name for name, r in results.items() if r.accuracy is None]
    if unlabelled:
        raise InputError(f"{', '.join(unlabelled)} has no zero-shot accuracy (its images had no labels); comparing "
                         "models needs labelled images (shapes-world scenes or a folder with labels.json).")
    rows = {name: ModelRow(100 * r.accuracy, r.mean_mi, r.mean_auc, len(r.images)) for name, r in results.items()}
    return MutualKnowledgeComparison.from_rows(rows, variants.pop(), _scene_values(list(results.values())))


def _scene_values(results: list) -> Optional[dict[str, Float[np.ndarray, "model scene"]]]:
    """Per model and scene: accuracy (100 · correct), MI and AUC averaged over the part methods, as
    the rows average them; None unless every result was measured on the same images (same data
    description, same image ids in the same order): only then are scenes paired across models."""
    first = results[0]
    ids = [i.id for i in first.images]
    if any(r.parameters.get("data") != first.parameters.get("data") or [i.id for i in r.images] != ids for r in results):
        return None
    values = {
        "accuracy": [[100.0 * (i.predicted == i.label) for i in r.images] for r in results],
        "mi": [np.mean([[i.mi for i in m.images] for m in r.methods.values()], axis=0) for r in results],
        "auc": [np.mean([[i.auc for i in m.images] for m in r.methods.values()], axis=0) for r in results],
    }
    return {name: np.asarray(rows, dtype=float) for name, rows in values.items()}


def compare_files(files: Sequence[Union[str, Path]]) -> MutualKnowledgeComparison:
    """Saved results (``clip-lens mi --out``) side by side; rows are named by each result's model."""
    from clip_lens_plugins.mutual_knowledge.analysis import MutualKnowledgeResult

    results: dict[str, object] = {}
    for file in files:
        path = Path(file)
        if path.is_dir():
            path = path / f"{MutualKnowledgeResult.__name__}.json"
        try:
            result = MutualKnowledgeResult.load(path)
        except (KeyError, TypeError, AttributeError) as exc:  # valid JSON of something else
            raise InputError(f"{path} is not a mutual_knowledge result ({type(exc).__name__}: {exc}); give the "
                             "MutualKnowledgeResult.json (or its folder) written by clip-lens mi --out.") from None
        name = result.parameters.get("model") or path.stem
        if name in results:
            name = f"{name} ({path})"
        results[name] = result
    return compare_results(results)
