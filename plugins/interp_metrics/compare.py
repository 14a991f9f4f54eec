"""Side-by-side interpretability metrics of several models (e.g. "are larger models more interpretable?").

>>> table = compare_files(["runs/B-32/labels.json", "runs/L-14/metrics.json"])   # doctest: +SKIP
>>> print(table.to_markdown())                                                   # doctest: +SKIP
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

from clip_lens.results import JSONResult
from clip_lens.errors import InputError
from clip_lens_plugins.head_labels.result import HeadLabelsResult
from clip_lens_plugins.interp_metrics.analysis import InterpMetrics, MetricsResult
from clip_lens_plugins.interp_metrics.metrics import DEFAULT_TOP_K

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class ComparisonRow:
    """One model's headline metrics."""

    labeler: str
    association: float
    entanglement: float
    ccr: float
    ccs_at_top_k: float
    """CCS@K: share of heads whose CCS is the maximum K."""
    mean_ccs: float
    labelled_heads: int
    heads: int


@dataclass
class ComparisonResult(JSONResult):
    """Model → headline metrics, all computed with the same K."""

    top_k: int
    rows: dict[str, ComparisonRow]
    """Model name → its row, in the order given."""

    def to_dict(self) -> dict:
        return asdict(self)

    def _table(self) -> tuple[list[str], list[list[str]]]:
        header = ["model", "labeler", "association (↑)", "entanglement (↓)", "CCR", f"CCS@{self.top_k}", "mean CCS", "labelled heads"]
        body = [
            [model, row.labeler, f"{row.association:.3f}", f"{row.entanglement:.3f}", f"{row.ccr:.3f}",
             f"{row.ccs_at_top_k:.3f}", f"{row.mean_ccs:.3f}", f"{row.labelled_heads} / {row.heads}"]
            for model, row in self.rows.items()
        ]
        return header, body

    def to_markdown(self) -> str:
        """One row per model."""
        header, body = self._table()
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])

    def to_html(self) -> str:
        """The same table as a plain HTML ``<table>``."""
        header, body = self._table()

        def row(cells: list[str], tag: str) -> str:
            return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

        return "\n".join(["<table>", row(header, "th"), *(row(cells, "td") for cells in body), "</table>"])

    def plot(self) -> "Figure":
        """Grouped bars of the metrics on a 0..1 scale (association, entanglement, CCR, CCS@K), one bar per model."""
        from matplotlib.figure import Figure

        shown = {"association (↑)": "association", "entanglement (↓)": "entanglement", "CCR": "ccr",
                   f"CCS@{self.top_k}": "ccs_at_top_k"}
        width = 0.8 / len(self.rows)
        fig = Figure(figsize=(2 + 2 * len(shown), 4.5), layout="constrained")
        ax = fig.subplots()
        for i, (model, row) in enumerate(self.rows.items()):
            offsets = [m + (i - (len(self.rows) - 1) / 2) * width for m in range(len(shown))]
            ax.bar(offsets, [getattr(row, attr) for attr in shown.values()], width, label=model)
        ax.set_xticks(range(len(shown)), list(shown))
        ax.set_ylim(0, 1)
        ax.set_ylabel("score")
        ax.set_title(f"Interpretability metrics by model (K = {self.top_k})")
        ax.legend(fontsize="small")
        return fig


def compare(results: dict[str, MetricsResult]) -> ComparisonResult:
    """Tabulate several models' metrics.

    Args:
        results: model name → its `MetricsResult`; all must use the same ``top_k``.

    Raises:
        InputError: no results, or results computed with different ``top_k``.
    """
    if not results:
        raise InputError("nothing to compare; give at least one model's MetricsResult.")
    top_ks = {result.top_k for result in results.values()}
    if len(top_ks) > 1:
        used = ", ".join(f"{model}: {result.top_k}" for model, result in results.items())
        raise InputError(f"CCS is only comparable at the same K, but the results use different top_k ({used}); "
                         "recompute them with one top_k.")
    rows = {
        model: ComparisonRow(
            labeler=result.labeler,
            association=result.association,
            entanglement=result.entanglement,
            ccr=result.ccr,
            ccs_at_top_k=result.ccs_at_k[result.top_k],
            mean_ccs=result.mean_ccs,
            labelled_heads=result.n_labelled,
            heads=len(result.per_head),
        )
        for model, result in results.items()
    }
    return ComparisonResult(top_k=top_ks.pop(), rows=rows)


def _read_metrics(path: Path, top_k: int) -> MetricsResult:
    """A saved MetricsResult, or the metrics of a saved HeadLabelsResult."""
    if not path.is_file():
        raise InputError(f"no file at {path}; give saved interp_metrics results or head label tables (JSON).")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); give saved interp_metrics results or head label tables.") from exc
    if isinstance(data, dict) and "per_head" in data:
        return MetricsResult.from_dict(data)
    if isinstance(data, dict) and "heads" in data:
        return InterpMetrics().run(HeadLabelsResult.from_dict(data), top_k=top_k)
    raise InputError(f"{path} is neither an interp_metrics result (key 'per_head') nor a head label table (key 'heads'); "
                     "save one with MetricsResult.save or HeadLabelsResult.save.")


def compare_files(paths: Sequence[Union[str, Path]], top_k: int = DEFAULT_TOP_K) -> ComparisonResult:
    """Tabulate models from saved files, each named by its ``model`` field.

    Args:
        paths: JSON files, each a saved `MetricsResult` or a saved `HeadLabelsResult`
            (whose metrics are computed here).
        top_k: K for the head label tables; saved results keep their own and must match it.

    Raises:
        InputError: a missing file, a file that is neither kind, or two files for the same model.
    """
    results: dict[str, MetricsResult] = {}
    sources: dict[str, Path] = {}
    for path in map(Path, paths):
        result = _read_metrics(path, top_k)
        if result.model in results:
            raise InputError(
                f"{sources[result.model]} and {path} are both for model '{result.model}'; rename the 'model' field "
                f"in one of them (e.g. '{result.model}-{result.labeler}') so that each row has its own name."
            )
        results[result.model] = result
        sources[result.model] = path
    return compare(results)
