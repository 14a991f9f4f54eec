"""`clip-lens collect → spans (--labels) → compare` and `clip-lens analyses` end to end on the bundled
toy-shapes model (offline, small numbers), and their one-line errors."""

from __future__ import annotations

import json
import re
from importlib.metadata import EntryPoint

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import clip_lens.analyses
from tests.helpers import ok, one_line_error

TOY = ["--model", "toy-shapes"]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def pipeline(runner, tmp_path_factory):
    """collect 64 scenes → spans (layer 3, m=5) with labels; returns the folder and the CLI results."""
    root = tmp_path_factory.mktemp("pipeline")
    collected = ok(runner, ["collect", *TOY, "--shapes", 64, "--seed", 3, "--out", root / "store",
                            "--chunk-size", 32, "--batch-size", 32])
    spans = ok(runner, ["spans", "--store", root / "store", *TOY, "--m", 5, "--layers", 3,
                        "--out", root / "spans.json", "--labels", root / "labels.json"])
    return root, collected, spans


class TestCollect:
    def test_prints_the_store_and_its_size(self, pipeline):
        root, collected, _ = pipeline
        assert f"Store {(root / 'store').resolve()}: 64 images in 2 chunks" in collected.stdout
        assert "per-head layers [0, 1, 2, 3]" in collected.stdout
        assert "Resumed" not in collected.stdout
        assert "collect" in collected.stderr  # the library's progress bar

    def test_store_is_complete_and_records_the_scenes(self, pipeline):
        from clip_lens.collect import Store

        store = Store.open(pipeline[0] / "store")
        assert store.complete and store.n_images == 64 and store.chunk_size == 32
        assert store.meta["source"] == "64 shapes-world scenes (seed 3)"
        assert store.read("heads").shape == (64, 4, 4, 128)

    def test_rerunning_finishes_an_interrupted_store(self, runner, tmp_path):
        from clip_lens.collect import Store

        args = ["collect", *TOY, "--shapes", 12, "--out", tmp_path / "s", "--chunk-size", 4, "--heads", "2,3"]
        ok(runner, args)
        before = Store.open(tmp_path / "s").read("heads")
        (tmp_path / "s" / "done" / "000001").unlink()  # as if killed before chunk 1 was committed
        one_line_error(runner, ["spans", "--store", tmp_path / "s", *TOY], "incomplete (2 of 3 chunks)", "clip-lens collect")
        resumed = ok(runner, args)
        assert "Resumed: 2 of 3 chunks were already done." in resumed.stdout
        assert "12 images in 3 chunks (per-head layers [2, 3])" in resumed.stdout
        store = Store.open(tmp_path / "s")
        assert store.complete
        assert np.array_equal(store.read("heads").numpy(), before.numpy())

    def test_image_folder(self, runner, tmp_path):
        folder = tmp_path / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        result = ok(runner, ["collect", *TOY, "--images", folder, "--out", tmp_path / "s", "--chunk-size", 2,
                             "--heads", "none"])
        assert "3 images in 2 chunks (no per-head terms)" in result.stdout


class TestSpans:
    def test_saves_every_head_of_the_chosen_layers(self, pipeline):
        data = json.loads((pipeline[0] / "spans.json").read_text())
        # the default bank of the shapes-world models is the report's, shapes-attributes (issue 31: one default bank)
        assert data["model"] == "toy-shapes" and data["bank"] == "shapes-attributes" and data["m"] == 5 and data["n_images"] == 64
        assert [h["head"] for h in data["heads"]] == ["L3H0", "L3H1", "L3H2", "L3H3"]
        assert all(len(h["texts"]) == 5 and len(h["cumulative"]) == 5 for h in data["heads"])

    def test_prints_three_texts_per_head_with_cumulative_variance(self, pipeline):
        root, _, result = pipeline
        data = json.loads((root / "spans.json").read_text())
        lines = result.stdout.splitlines()
        for head in data["heads"]:
            start = next(i for i, line in enumerate(lines) if line.startswith(head["head"] + " "))
            shown = lines[start + 1 : start + 4]
            assert [re.match(r"^\s+[\d.]+%  (.*)$", line).group(1) for line in shown] == head["texts"][:3]
            assert [line.split()[0] for line in shown] == [f"{c:.1%}" for c in head["cumulative"][:3]]
            assert not re.match(r"^\s+[\d.]+%", lines[start + 4])  # only three
        assert str((root / "spans.json").resolve()) in result.stdout

    def test_labels_table_is_saved_and_printed(self, pipeline):
        root, _, result = pipeline
        table = json.loads((root / "labels.json").read_text())
        assert table["model"] == "toy-shapes" and table["labeler"] == "prototype"
        assert [h["head"] for h in table["heads"]] == ["L3H0", "L3H1", "L3H2", "L3H3"]
        for head in table["heads"]:
            assert f"{head['head']}  label: {head['label'] or 'none'} (confidence {head['confidence']:.2f})" in result.stdout
        assert str((root / "labels.json").resolve()) in result.stdout


class TestCompare:
    def test_two_label_tables_side_by_side(self, runner, pipeline, tmp_path):
        table = json.loads((pipeline[0] / "labels.json").read_text())
        paths = []
        for name in ("toy-a", "toy-b"):
            paths.append(tmp_path / f"{name}.json")
            paths[-1].write_text(json.dumps({**table, "model": name}))
        result = ok(runner, ["compare", *paths, "--out", tmp_path / "table.html", "--top-k", 5])
        rows = [line for line in result.stdout.splitlines() if line.startswith("| toy-")]
        assert [row.split("|")[1].strip() for row in rows] == ["toy-a", "toy-b"]
        assert "| CCS@5 |" in result.stdout
        assert rows[0].split("|")[2:] == rows[1].split("|")[2:]  # same table, same metrics
        page = (tmp_path / "table.html").read_text()
        assert page.startswith("<!doctype html>") and page.count("<tr>") == 3 and "toy-b" in page

    def test_top_k_above_the_span_length_is_a_one_line_error(self, runner, pipeline):
        one_line_error(runner, ["compare", pipeline[0] / "labels.json", "--top-k", 9], "top_k")

    def test_missing_file(self, runner, pipeline, tmp_path):
        one_line_error(runner, ["compare", pipeline[0] / "labels.json", tmp_path / "nope.json"], "nope.json")


class TestAnalyses:
    def test_lists_the_builtins_with_their_distribution(self, runner):
        result = ok(runner, ["analyses"])
        for name in ("ablation", "head_labels", "interp_metrics", "textspan"):
            line = next(line for line in result.stdout.splitlines() if line.startswith(name + " "))
            assert line.endswith("[clip-lens]") and clip_lens.analyses.get(name).description in line

    def test_a_broken_plugin_is_listed_with_its_error(self, runner, monkeypatch):
        found = clip_lens.analyses._entry_points()
        broken = EntryPoint("zz_broken", "clip_lens_no_such_module:Thing", clip_lens.analyses.GROUP)
        monkeypatch.setattr(clip_lens.analyses, "_entry_points", lambda: {**found, "zz_broken": broken})
        result = ok(runner, ["analyses"])
        line = result.stdout.splitlines()[-1]
        assert line.startswith("zz_broken") and "BROKEN" in line and "clip_lens_no_such_module" in line
        assert "textspan " in result.stdout


class TestErrors:
    def test_collect_into_a_folder_of_another_kind(self, runner, tmp_path):
        (tmp_path / "notes.txt").write_text("not a store")
        one_line_error(runner, ["collect", *TOY, "--shapes", 8, "--out", tmp_path], "is not a clip_lens store")
        assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]

    def test_spans_on_a_folder_of_another_kind(self, runner, tmp_path):
        one_line_error(runner, ["spans", "--store", tmp_path, *TOY], "is not a clip_lens store")

    def test_collect_into_a_finished_store_needs_force(self, runner, pipeline):
        one_line_error(runner, ["collect", *TOY, "--shapes", 64, "--seed", 3, "--out", pipeline[0] / "store",
                                "--chunk-size", 16], "holds a finished store (64 images)", "--force")

    def test_collect_with_other_settings_into_an_unfinished_store(self, runner, tmp_path):
        ok(runner, ["collect", *TOY, "--shapes", 8, "--out", tmp_path / "s", "--chunk-size", 4, "--heads", "none"])
        (tmp_path / "s" / "done" / "000001").unlink()  # as if killed before chunk 1 was committed
        one_line_error(runner, ["collect", *TOY, "--shapes", 8, "--out", tmp_path / "s", "--chunk-size", 2,
                                "--heads", "none"], "different settings", "chunk_size")

    def test_unknown_bank(self, runner, pipeline):
        one_line_error(runner, ["spans", "--store", pipeline[0] / "store", *TOY, "--bank", "shapez"],
                       "no bank named 'shapez'", "shapes")

    def test_spans_with_another_model(self, runner, pipeline):
        one_line_error(runner, ["spans", "--store", pipeline[0] / "store", "--model", "ViT-B-32"],
                       "collected with model 'toy-shapes'")

    @pytest.mark.parametrize("sources", [[], ["--shapes", "4", "--images", "."]])
    def test_collect_needs_exactly_one_image_source(self, runner, tmp_path, sources):
        one_line_error(runner, ["collect", *TOY, *sources, "--out", tmp_path / "s"], "--images FOLDER or --shapes N")

    def test_bad_layer_list(self, runner, tmp_path):
        one_line_error(runner, ["collect", *TOY, "--shapes", 4, "--heads", "2;3", "--out", tmp_path / "s"],
                       "--heads must be 'all', 'none' or comma-separated")
