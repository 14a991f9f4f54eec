"""Analysis plugin ``interp_metrics``: how interpretable a model's attention heads are, from their labels.

Reads the head label table of the ``head_labels`` analysis and scores it with concept consistency
(CCS, CCS@k; Madasu et al. 2025, arXiv 2503.11103), association and entanglement (CLIP-InterpreT,
Madasu et al. 2024, arXiv 2409.06579) and the concentrated-concept ratio (CCR). Definitions: `metrics`.

| module | what |
|---|---|
| ``metrics.py`` | pure metric functions on a label table |
| ``analysis.py`` | ``InterpMetrics`` (the registered analysis) and its ``MetricsResult`` |
| ``compare.py`` | ``compare`` / ``compare_files``: one row per model, ``ComparisonResult`` |
"""

from clip_lens_plugins.interp_metrics.analysis import InterpMetrics, MetricsResult
from clip_lens_plugins.interp_metrics.compare import ComparisonResult, ComparisonRow, compare, compare_files
from clip_lens_plugins.interp_metrics.metrics import (
    association,
    ccs_at_k,
    concentrated_concept_ratio,
    concept_consistency,
    empty_metric_warnings,
    entanglement,
    layer_mean_ccs,
    property_counts,
)

__all__ = [
    "ComparisonResult",
    "ComparisonRow",
    "InterpMetrics",
    "MetricsResult",
    "association",
    "ccs_at_k",
    "compare",
    "compare_files",
    "concentrated_concept_ratio",
    "concept_consistency",
    "empty_metric_warnings",
    "entanglement",
    "layer_mean_ccs",
    "property_counts",
]
