"""Across models: does the strength of shared knowledge (AUC) follow zero-shot accuracy?

The paper reports a line fit across 7 ViTs (accuracy ≈ 11.24·AUC + 25.97) and no correlation
coefficients; from its Table 3 the Pearson correlation within ViTs is 0.90–0.92. This module puts
several models' `MutualKnowledgeResult` side by side
and reports Pearson and Spearman correlation of AUC (and MI) with accuracy and the least-squares line.

>>> table = compare_files(["runs/step250.json", "runs/final.json"])   # doctest: +SKIP
>>> print(table.to_markdown())                                        # doctest: +SKIP
"""

from __future__ import annotations

import html
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import torch

from clip_lens.analyses import JSONResult
from clip_lens.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant."""
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else math.nan


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and values[order[stop + 1]] == values[order[start]]:
            stop += 1
        for k in range(start, stop + 1):
            out[order[k]] = (start + stop) / 2 + 1
        start = stop + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson of the average ranks)."""
    return pearson(ranks(x), ranks(y))


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

    @classmethod
    def from_rows(cls, rows: dict[str, ModelRow], variant: str) -> "MutualKnowledgeComparison":
        if len(rows) < 2:
            raise InputError(f"comparing models needs at least 2 results, got {len(rows)}.")
        acc = [r.accuracy for r in rows.values()]
        auc = [r.auc for r in rows.values()]
        mi = [r.mi for r in rows.values()]
        slope, intercept = line_fit(auc, acc)
        return cls(rows, variant, pearson(auc, acc), spearman(auc, acc), pearson(mi, acc), spearman(mi, acc), slope, intercept)

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

    def summary(self) -> str:
        """The correlations and the line, in one sentence."""
        return (f"Pearson(AUC, accuracy) = {self.pearson_auc:.3f}, Spearman = {self.spearman_auc:.3f}; "
                f"Pearson(MI, accuracy) = {self.pearson_mi:.3f}, Spearman = {self.spearman_mi:.3f}; "
                f"accuracy ≈ {self.fit_text} over {len(self.rows)} models.")

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
    return MutualKnowledgeComparison.from_rows(rows, variants.pop())


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
