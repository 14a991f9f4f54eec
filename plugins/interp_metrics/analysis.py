"""The ``interp_metrics`` analysis: CCS, CCS@k, association, entanglement and CCR of a head label table.

The metric definitions are in `clip_lens_plugins.interp_metrics.metrics`.

>>> result = InterpMetrics().run("runs/ViT-B-32/labels.json", top_k=5)   # doctest: +SKIP
>>> print(result.to_markdown())                                       # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from clip_lens.results import JSONResult
from clip_lens.errors import InputError
from clip_lens_plugins.head_labels.result import HeadLabelsResult, parse_head
from clip_lens_plugins.interp_metrics import metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class MetricsResult(JSONResult):
    """Interpretability metrics of one model's head label table."""

    model: str
    labeler: str
    """The labeler that produced the table (``"prototype"`` or ``"llm:<model name>"``)."""
    top_k: int
    """K: span texts scored per head for CCS."""
    per_head: dict[str, dict[str, Any]]
    """``"L{layer}H{head}"`` → ``{"label": str | None, "ccs": int}``, in table order."""
    ccs_at_k: dict[int, float]
    """k → share of all heads with CCS == k, for k = 0..K."""
    association: float
    """Mean fraction of a labelled head's span texts that fit its label (higher is better)."""
    entanglement: float
    """1 − distinct labels / labelled heads (lower is better)."""
    ccr: float
    """Concentrated-concept ratio: labels held by more than one CCS == K head / CCS == K heads."""
    property_counts: dict[str, int]
    """Label → number of labelled heads with it."""
    layer_mean_ccs: dict[int, float]
    """Layer → mean CCS of its heads."""
    warnings: list[str] = field(default_factory=list)
    """Metrics that are 0.0 by convention (empty denominator) rather than measured."""
    intervals: dict[str, list[float]] = field(default_factory=dict)
    """``association``, ``entanglement``, ``ccr``, ``mean_ccs`` → bootstrap 95% interval over heads
    (the heads are these metrics' units; resampled with replacement, labels held fixed)."""

    @property
    def mean_ccs(self) -> float:
        """Mean CCS over all heads."""
        return sum(h["ccs"] for h in self.per_head.values()) / len(self.per_head)

    @property
    def n_labelled(self) -> int:
        """Number of heads with a label."""
        return sum(h["label"] is not None for h in self.per_head.values())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MetricsResult":
        try:
            return cls(
                model=data["model"],
                labeler=data["labeler"],
                top_k=int(data["top_k"]),
                per_head={head: dict(row) for head, row in data["per_head"].items()},
                # JSON object keys are strings; k and layers are ints
                ccs_at_k={int(k): float(v) for k, v in data["ccs_at_k"].items()},
                association=float(data["association"]),
                entanglement=float(data["entanglement"]),
                ccr=float(data["ccr"]),
                property_counts={label: int(n) for label, n in data["property_counts"].items()},
                layer_mean_ccs={int(layer): float(v) for layer, v in data["layer_mean_ccs"].items()},
                warnings=list(data.get("warnings", [])),
                intervals={name: [float(x) for x in pair] for name, pair in data.get("intervals", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"not an interp_metrics result ({exc!r}); expected the JSON written by MetricsResult.save.") from exc

    def to_markdown(self) -> str:
        """A two-column table, one metric per line, then the warnings."""
        k = self.top_k
        def value(name: str, v: float) -> str:
            low_high = self.intervals.get(name)
            return f"{v:.3f}" + (f" [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else "")

        rows = [
            ("labelled heads", f"{self.n_labelled} / {len(self.per_head)}"),
            ("association (↑)", value("association", self.association)),
            ("entanglement (↓)", value("entanglement", self.entanglement)),
            (f"CCR (CCS = {k})", value("ccr", self.ccr)),
            ("mean CCS", value("mean_ccs", self.mean_ccs)),
            *((f"CCS@{i}", f"{share:.3f}") for i, share in self.ccs_at_k.items()),
        ]
        lines = [f"**{self.model}** (labeler: {self.labeler}, K = {k})", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in rows]
        if self.warnings:
            lines += [""] + [f"- warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def plot(self) -> "Figure":
        """CCS@k bars beside a layer × head heatmap of CCS (blank cells: heads not in the table)."""
        import numpy as np

        from matplotlib.figure import Figure  # no pyplot: nothing global, works headless

        fig = Figure(figsize=(12, 4.5), layout="constrained")
        ax_bars, ax_map = fig.subplots(1, 2)
        fig.suptitle(f"Concept consistency — {self.model} (labeler: {self.labeler}, K = {self.top_k})")

        ks = list(self.ccs_at_k)
        ax_bars.bar(ks, [self.ccs_at_k[k] for k in ks], color="#3b75af")
        ax_bars.set_xticks(ks)
        ax_bars.set_xlabel("CCS")
        ax_bars.set_ylabel("share of heads")
        ax_bars.set_ylim(0, 1)
        ax_bars.set_title("CCS@k")

        positions = {head: parse_head(head) for head in self.per_head}
        layers = sorted({layer for layer, _ in positions.values()})
        n_heads = 1 + max(index for _, index in positions.values())
        grid = np.full((len(layers), n_heads), np.nan)
        for head, (layer, index) in positions.items():
            grid[layers.index(layer), index] = self.per_head[head]["ccs"]
        im = ax_map.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=self.top_k, origin="upper")
        if grid.size <= 200:  # numbers stay legible up to ~ a 4-layer ViT-H block
            for (row, col), score in np.ndenumerate(grid):
                if not np.isnan(score):
                    ax_map.text(col, row, f"{score:.0f}", ha="center", va="center", color="w" if score < self.top_k / 2 else "k")
        ax_map.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax_map.set_xticks(range(0, n_heads, max(1, n_heads // 16)))
        ax_map.set_xlabel("head")
        ax_map.set_ylabel("layer")
        ax_map.set_title("CCS per head")
        fig.colorbar(im, ax=ax_map, label="CCS")
        return fig


class InterpMetrics:
    """Analysis plugin ``interp_metrics``: scores a head label table (the output of ``head_labels``)."""

    name = "interp_metrics"
    description = "Concept consistency (CCS, CCS@k), association, entanglement and CCR of a head label table."
    parameters = {"top_k": f"K, the number of leading span texts per head scored for CCS (default {metrics.DEFAULT_TOP_K})"}
    needs = ("labels",)

    def __init__(self, model: Optional[Any] = None) -> None:
        """``model`` is accepted for the registry's uniform ``Analysis(model)``; the metrics read only labels."""

    def run(self, labels: Union[HeadLabelsResult, str, Path], top_k: int = metrics.DEFAULT_TOP_K) -> MetricsResult:
        """Score a label table.

        Args:
            labels: a `HeadLabelsResult` or the path of its saved JSON.
            top_k: K, the number of leading span texts per head scored for CCS.

        Returns:
            The metrics, with a warning for each metric that is 0.0 only by convention.

        Raises:
            InputError: an unreadable table, or a head with fewer than ``top_k`` span texts.
        """
        if isinstance(labels, (str, Path)):
            labels = HeadLabelsResult.load(labels)
        if not isinstance(labels, HeadLabelsResult):
            raise InputError(
                f"interp_metrics reads a HeadLabelsResult or the path of its JSON, got {type(labels).__name__}; "
                "run the head_labels analysis first."
            )
        ccs = metrics.concept_consistency(labels, top_k)
        return MetricsResult(
            model=labels.model,
            labeler=labels.labeler,
            top_k=top_k,
            per_head={h.head: {"label": h.label, "ccs": ccs[h.head]} for h in labels.heads},
            ccs_at_k=metrics.ccs_at_k(labels, top_k),
            association=metrics.association(labels),
            entanglement=metrics.entanglement(labels),
            ccr=metrics.concentrated_concept_ratio(labels, top_k),
            property_counts=metrics.property_counts(labels),
            layer_mean_ccs=metrics.layer_mean_ccs(ccs),
            warnings=metrics.empty_metric_warnings(labels, top_k),
            intervals=metrics.head_bootstrap(labels, top_k),
        )
