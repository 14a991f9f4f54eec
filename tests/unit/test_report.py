"""The report's polish (issue 19): the legend clear of the bars, one property vocabulary in every table,
and the keep-last table saying why its last row is not the unablated model."""

import json
import re

import pytest

from clip_lens import HookedCLIP
from clip_lens.head_report import KEEP_LAST_NOTE, _keep_last_table, analyse_heads, render_sections
from clip_lens.report import plot_decomposition, report_images, summarize
from clip_lens.toy.world import ATTRIBUTES


@pytest.fixture(scope="module")
def toy(one_torch_thread):
    return HookedCLIP.from_pretrained("toy-shapes")


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("tall", [None, 0, 1, -1])
def test_decomposition_legend_covers_no_bar(toy, tall):
    images, _, description = report_images(toy, 4)
    summary = summarize(toy, toy.decompose(images, heads="all"), n_images=4, seed=0, images=description)
    if tall is not None:  # the worst case: one layer's bars far taller than the rest
        summary["layers"][tall]["attn_norm_mean"] = summary["layers"][tall]["mlp_norm_mean"] = 10.0
    fig = plot_decomposition(summary)
    fig.canvas.draw()
    ax = fig.axes[1]
    legend = ax.get_legend().get_window_extent()
    bars = [patch.get_window_extent() for patch in ax.patches]
    assert len(bars) == 2 * toy.cfg.n_layers
    assert not [i for i, bar in enumerate(bars) if overlaps(legend, bar)]
    line = ax.lines[0].get_window_extent()  # the embedding-term line is not hidden either
    assert not overlaps(legend, line) or line.y0 < legend.y0


def test_keep_last_table_explains_its_last_row():
    ablation = {"original": {"colour": 0.9, "shape": 0.8},
                "keep_last": {str(k): {"colour": 0.1 * k, "shape": 0.1 * k} for k in range(5)}}
    page = _keep_last_table(ablation)
    assert "<caption>" in page and "embedding term and every MLP" in page and "none ablated" in page
    assert "4 (every attention layer; MLPs and embedding term still ablated)" in page
    assert KEEP_LAST_NOTE.format(n=4).split(",")[0] in page


@pytest.mark.slow  # long; the default suite stays under 5 minutes
def test_one_property_vocabulary_in_every_table(toy, tmp_path):
    summary, _ = analyse_heads(toy, tmp_path, n_images=250, progress=False)
    names = set(ATTRIBUTES)
    assert summary["labels"]["properties"] == list(ATTRIBUTES)
    assert {h["label"] for h in summary["labels"]["heads"]} - {None} <= names
    assert set(summary["zero_shot"]) == set(summary["span_replacement"]) == set(summary["ablation"]["original"]) == names
    assert all(row["property"] == row["attribute"] for row in summary["ground_truth"])
    assert {row["property"] for row in summary["ground_truth"]} <= names
    assert set(summary["metrics"].get("property_counts", {})) <= names
    text = json.dumps(summary) + render_sections(summary, {})
    assert not re.search(r"\b(location|texture)\b", text)
