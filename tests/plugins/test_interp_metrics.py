"""interp_metrics on hand-made label tables whose scores are worked out by hand."""

from __future__ import annotations

import json

import pytest

import clip_lens.analyses
from clip_lens.errors import InputError
from clip_lens_plugins.head_labels.result import HeadLabel, HeadLabelsResult
from clip_lens_plugins.interp_metrics import (
    ComparisonResult,
    InterpMetrics,
    MetricsResult,
    association,
    ccs_at_k,
    compare,
    compare_files,
    concentrated_concept_ratio,
    concept_consistency,
    entanglement,
    layer_mean_ccs,
    property_counts,
)

T, F = True, False


def head(key: str, label: str | None, fits: list[bool]) -> HeadLabel:
    return HeadLabel(key, label, sum(fits) / len(fits), [f"{key} text {i}" for i in range(len(fits))], fits)


def table_a() -> HeadLabelsResult:
    """6 heads, 6 span texts each. With K = 5 (CCS = fits among the first 5; all-texts fraction):

    L10H0 colour  TTTTT|F  CCS 5  5/6
    L10H1 colour  TTTTT|T  CCS 5  6/6
    L10H2 shape   TFTFF|T  CCS 2  3/6
    L11H0 None    FFFFF|F  CCS 0  (unlabelled)
    L11H1 texture TTTTT|F  CCS 5  5/6
    L11H2 shape   FFFFF|T  CCS 0  1/6   (its only fitting text is outside the top 5)
    """
    return HeadLabelsResult("model-a", "prototype", [
        head("L10H0", "colour", [T, T, T, T, T, F]),
        head("L10H1", "colour", [T, T, T, T, T, T]),
        head("L10H2", "shape", [T, F, T, F, F, T]),
        head("L11H0", None, [F, F, F, F, F, F]),
        head("L11H1", "texture", [T, T, T, T, T, F]),
        head("L11H2", "shape", [F, F, F, F, F, T]),
    ], properties=["colour", "shape", "texture"])


def table_b() -> HeadLabelsResult:
    """4 heads, 5 texts each, every labelled head with its own property:

    L0H0 colour  TTTTT  CCS 5  5/5
    L0H1 shape   TTTTT  CCS 5  5/5
    L1H0 texture TTTTF  CCS 4  4/5
    L1H1 None    FFFFF  CCS 0
    """
    return HeadLabelsResult("model-b", "prototype", [
        head("L0H0", "colour", [T] * 5),
        head("L0H1", "shape", [T] * 5),
        head("L1H0", "texture", [T, T, T, T, F]),
        head("L1H1", None, [F] * 5),
    ])


class TestMetricFunctions:
    def test_ccs_counts_fitting_texts_among_the_top_k(self):
        assert concept_consistency(table_a()) == {"L10H0": 5, "L10H1": 5, "L10H2": 2, "L11H0": 0, "L11H1": 5, "L11H2": 0}

    def test_ccs_at_k_is_a_share_of_all_heads(self):
        # CCS 5,5,2,0,5,0 over 6 heads: two 0s, one 2, three 5s
        assert ccs_at_k(table_a()) == pytest.approx({0: 2 / 6, 1: 0.0, 2: 1 / 6, 3: 0.0, 4: 0.0, 5: 3 / 6})

    def test_association_uses_all_texts_of_labelled_heads(self):
        # mean(5/6, 6/6, 3/6, 5/6, 1/6) = 20/30
        assert association(table_a()) == pytest.approx(2 / 3)

    def test_entanglement(self):
        # 3 distinct labels over 5 labelled heads
        assert entanglement(table_a()) == pytest.approx(1 - 3 / 5)
        assert entanglement(table_b()) == 0.0

    def test_ccr(self):
        # high-CCS heads: L10H0 colour, L10H1 colour, L11H1 texture; only colour is shared → 1/3
        assert concentrated_concept_ratio(table_a()) == pytest.approx(1 / 3)
        # high-CCS heads: colour, shape (one each) → 0/2
        assert concentrated_concept_ratio(table_b()) == 0.0

    def test_property_counts_and_layer_means(self):
        assert property_counts(table_a()) == {"colour": 2, "shape": 2, "texture": 1}
        # layer 10: (5+5+2)/3, layer 11: (0+5+0)/3
        assert layer_mean_ccs(concept_consistency(table_a())) == pytest.approx({10: 4.0, 11: 5 / 3})

    def test_top_k_one(self):
        # first texts: T,T,T,F(unlabelled),T,F → CCS 1,1,1,0,1,0
        assert ccs_at_k(table_a(), top_k=1) == pytest.approx({0: 2 / 6, 1: 4 / 6})
        # high-CCS heads: colour, colour, shape, texture; only colour is shared → 1/4
        assert concentrated_concept_ratio(table_a(), top_k=1) == pytest.approx(1 / 4)

    def test_accepts_a_plain_list_of_heads(self):
        assert concept_consistency(table_b().heads) == {"L0H0": 5, "L0H1": 5, "L1H0": 4, "L1H1": 0}

    def test_fewer_texts_than_top_k_names_heads_and_need(self):
        with pytest.raises(InputError, match=r"needs at least 7 span texts.*L10H0 \(6\)"):
            concept_consistency(table_a(), top_k=7)

    @pytest.mark.parametrize("top_k", [0, -1, 2.5, True])
    def test_top_k_must_be_a_positive_integer(self, top_k):
        with pytest.raises(InputError, match="positive integer"):
            concept_consistency(table_a(), top_k=top_k)

    def test_repeated_head_is_an_error(self):
        with pytest.raises(InputError, match="more than once: L0H0"):
            concept_consistency(table_b().heads + [head("L0H0", "shape", [T] * 5)])

    def test_empty_table_is_an_error(self):
        with pytest.raises(InputError, match="no heads"):
            association([])


class TestInterpMetrics:
    def test_run_collects_every_metric(self):
        result = InterpMetrics().run(table_a())
        assert (result.model, result.labeler, result.top_k) == ("model-a", "prototype", 5)
        assert result.per_head["L10H2"] == {"label": "shape", "ccs": 2}
        assert result.per_head["L11H0"] == {"label": None, "ccs": 0}
        assert result.ccs_at_k == pytest.approx({0: 2 / 6, 1: 0.0, 2: 1 / 6, 3: 0.0, 4: 0.0, 5: 3 / 6})
        assert result.association == pytest.approx(2 / 3)
        assert result.entanglement == pytest.approx(0.4)
        assert result.ccr == pytest.approx(1 / 3)
        assert result.property_counts == {"colour": 2, "shape": 2, "texture": 1}
        assert result.layer_mean_ccs == pytest.approx({10: 4.0, 11: 5 / 3})
        assert result.mean_ccs == pytest.approx(17 / 6)
        assert result.n_labelled == 5
        assert result.warnings == []

    def test_top_k_parameter(self):
        result = InterpMetrics().run(table_a(), top_k=1)
        assert result.ccs_at_k == pytest.approx({0: 2 / 6, 1: 4 / 6})
        assert result.ccr == pytest.approx(1 / 4)
        assert result.association == pytest.approx(2 / 3)  # all texts, whatever K

    def test_no_labelled_heads_gives_zeros_and_warnings(self):
        labels = HeadLabelsResult("m", "prototype", [head("L0H0", None, [F] * 5), head("L0H1", None, [F] * 5)])
        result = InterpMetrics().run(labels)
        assert (result.association, result.entanglement, result.ccr) == (0.0, 0.0, 0.0)
        assert result.ccs_at_k == {0: 1.0, 1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.0}
        assert len(result.warnings) == 2
        assert "no labelled heads" in result.warnings[0]
        assert "no high-CCS heads" in result.warnings[1]

    def test_fewer_texts_than_top_k(self):
        labels = HeadLabelsResult("m", "prototype", [head("L0H0", "colour", [T, T, T])])
        with pytest.raises(InputError, match="needs at least 5"):
            InterpMetrics().run(labels)

    def test_run_reads_a_saved_label_table(self, tmp_path):
        path = table_a().save(tmp_path / "labels.json")
        assert InterpMetrics().run(path) == InterpMetrics().run(table_a())

    def test_run_rejects_other_inputs(self):
        with pytest.raises(InputError, match="run the head_labels analysis first"):
            InterpMetrics().run(table_a().heads)

    def test_registry_and_protocol(self):
        assert clip_lens.analyses.get("interp_metrics") is InterpMetrics
        assert isinstance(InterpMetrics(), clip_lens.analyses.Analysis)
        assert InterpMetrics.needs == ("labels",)


class TestMetricsResult:
    def test_save_load_round_trip(self, tmp_path):
        result = InterpMetrics().run(table_a())
        assert MetricsResult.load(result.save(tmp_path / "metrics.json")) == result
        assert result.save(tmp_path).name == "MetricsResult.json"  # a folder gets the class name

    def test_load_errors(self, tmp_path):
        with pytest.raises(InputError, match="no MetricsResult file"):
            MetricsResult.load(tmp_path / "missing.json")
        (tmp_path / "other.json").write_text('{"model": "m"}')
        with pytest.raises(InputError, match="not an interp_metrics result"):
            MetricsResult.load(tmp_path / "other.json")

    def test_markdown_has_one_line_per_metric(self):
        markdown = InterpMetrics().run(table_a()).to_markdown()
        for line in ["| labelled heads | 5 / 6 |", "| association (↑) | 0.667 [", "| entanglement (↓) | 0.400 [",
                     "| CCR (CCS = 5) | 0.333 [", "| mean CCS | 2.833 [", "| CCS@0 | 0.333 |", "| CCS@5 | 0.500 |"]:
            assert any(row.startswith(line) for row in markdown.splitlines()), line  # value, then its interval over heads
        assert "warning" not in markdown

    def test_markdown_lists_warnings(self):
        labels = HeadLabelsResult("m", "prototype", [head("L0H0", None, [F] * 5)])
        assert "- warning: no labelled heads" in InterpMetrics().run(labels).to_markdown()

    def test_plot_returns_a_figure(self):
        from matplotlib.figure import Figure

        fig = InterpMetrics().run(table_a()).plot()
        assert isinstance(fig, Figure)
        bars, heatmap = fig.axes[:2]
        assert [p.get_height() for p in bars.patches] == pytest.approx([2 / 6, 0, 1 / 6, 0, 0, 3 / 6])
        # layers 10, 11 × heads 0..2
        assert heatmap.images[0].get_array().tolist() == [[5, 5, 2], [0, 5, 0]]


class TestCompare:
    def test_rows_per_model(self):
        table = compare({"A": InterpMetrics().run(table_a()), "B": InterpMetrics().run(table_b())})
        assert table.top_k == 5
        assert list(table.rows) == ["A", "B"]
        b = table.rows["B"]
        # B: association mean(1, 1, 4/5); CCS 5,5,4,0 → CCS@5 = 2/4, mean 14/4
        assert b.association == pytest.approx(2.8 / 3)
        assert (b.entanglement, b.ccr, b.ccs_at_top_k) == (0.0, 0.0, 0.5)
        assert b.mean_ccs == pytest.approx(3.5)
        assert (b.labelled_heads, b.heads) == (3, 4)
        assert table.rows["A"].ccs_at_top_k == pytest.approx(0.5)

    def test_markdown_and_html(self):
        table = compare({"A": InterpMetrics().run(table_a()), "B": InterpMetrics().run(table_b())})
        lines = table.to_markdown().splitlines()
        assert lines[0] == "| model | labeler | association (↑) | entanglement (↓) | CCR | CCS@5 | mean CCS | labelled heads |"
        assert lines[2] == "| A | prototype | 0.667 | 0.400 | 0.333 | 0.500 | 2.833 | 5 / 6 |"
        assert lines[3] == "| B | prototype | 0.933 | 0.000 | 0.000 | 0.500 | 3.500 | 3 / 4 |"
        html = table.to_html()
        assert html.startswith("<table>") and html.endswith("</table>")
        assert "<tr><td>B</td><td>prototype</td><td>0.933</td>" in html

    def test_save_and_plot(self, tmp_path):
        from matplotlib.figure import Figure

        table = compare({"A": InterpMetrics().run(table_a()), "B": InterpMetrics().run(table_b())})
        saved = json.loads(table.save(tmp_path / "compare.json").read_text())
        assert saved["top_k"] == 5
        assert saved["rows"]["B"]["labelled_heads"] == 3
        fig = table.plot()
        assert isinstance(fig, Figure)
        assert len(fig.axes[0].patches) == 2 * 4  # 2 models × 4 metrics

    def test_different_top_k_is_an_error(self):
        with pytest.raises(InputError, match=r"different top_k \(A: 5, B: 1\)"):
            compare({"A": InterpMetrics().run(table_a()), "B": InterpMetrics().run(table_b(), top_k=1)})

    def test_files_of_either_kind(self, tmp_path):
        labels_path = table_a().save(tmp_path / "a_labels.json")
        metrics_path = InterpMetrics().run(table_b()).save(tmp_path / "b_metrics.json")
        table = compare_files([labels_path, str(metrics_path)])
        assert isinstance(table, ComparisonResult)
        expected = compare({"model-a": InterpMetrics().run(table_a()), "model-b": InterpMetrics().run(table_b())})
        assert table == expected

    def test_file_errors(self, tmp_path):
        with pytest.raises(InputError, match="no file at"):
            compare_files([tmp_path / "missing.json"])
        (tmp_path / "other.json").write_text('{"foo": 1}')
        with pytest.raises(InputError, match="neither an interp_metrics result"):
            compare_files([tmp_path / "other.json"])
        (tmp_path / "broken.json").write_text("{")
        with pytest.raises(InputError, match="not valid JSON"):
            compare_files([tmp_path / "broken.json"])

    def test_duplicate_models_suggest_renaming(self, tmp_path):
        first = table_a().save(tmp_path / "a.json")
        second = InterpMetrics().run(table_a()).save(tmp_path / "a_metrics.json")
        with pytest.raises(InputError, match="both for model 'model-a'; rename the 'model' field"):
            compare_files([first, second])


def test_head_bootstrap_intervals_contain_the_metrics_and_collapse_for_identical_heads():
    from clip_lens_plugins.head_labels import HeadLabel
    from clip_lens_plugins.interp_metrics.metrics import association, entanglement, head_bootstrap

    same = [HeadLabel(f"L0H{i}", "colour", 0.6, ["a"] * 5, [True, True, True, False, False]) for i in range(8)]
    intervals = head_bootstrap(same)
    assert intervals["association"] == [pytest.approx(0.6), pytest.approx(0.6)]  # every resample is the same table
    assert intervals["mean_ccs"] == [pytest.approx(3.0), pytest.approx(3.0)]
    mixed = same[:4] + [HeadLabel(f"L1H{i}", ["shape", None][i % 2], 0.2, ["a"] * 5, [True, False, False, False, False])
                        for i in range(4)]
    intervals = head_bootstrap(mixed)
    for name, value in (("association", association(mixed)), ("entanglement", entanglement(mixed))):
        low, high = intervals[name]
        assert low <= value <= high and high > low, name
