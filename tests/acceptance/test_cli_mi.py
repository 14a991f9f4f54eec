"""`clip-lens mi` and `clip-lens compare --analysis mutual_knowledge` on the bundled toy-shapes model
(offline, small numbers): shapes-world scenes, a folder dataset, and the one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clip_lens.toy.world import ShapesWorld
from clip_lens_plugins.mutual_knowledge import MutualKnowledgeResult
from tests.helpers import ok, one_line_error

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def runs(runner, tmp_path_factory):
    """Two `mi` runs: 40 scenes (seed 1000, with CorLoc) and 30 scenes (seed 1001, no CorLoc)."""
    root = tmp_path_factory.mktemp("mi")
    # -m toy-shapes: the figures below were measured on toy-shapes (v1 world, as the folder fixture); the
    # default model is toy-shapes-v2 since issue 31 (one default everywhere)
    first = ok(runner, ["mi", "-m", "toy-shapes", "--shapes", 40, "--no-evaluate", "--out", root / "a"])
    second = ok(runner, ["mi", "-m", "toy-shapes", "--shapes", 30, "--seed", 1001, "--no-evaluate", "--no-corloc",
                         "--out", root / "b"])
    return root, first, second


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """images/ (PNG) + labels.json + boxes.json of the 40 one-object held-out scenes of `mi --shapes 40`."""
    root = tmp_path_factory.mktemp("folder")
    (root / "images").mkdir()
    world = ShapesWorld(seed=1000, n_objects=1)
    labels, boxes = {}, {}
    for i in range(40):
        scene = world.scene(i)
        name = f"scene{i:03d}.png"
        Image.fromarray(scene.image).save(root / "images" / name)
        ys, xs = np.nonzero(scene.object_masks[0])
        labels[name] = scene.value("shape")
        boxes[name] = [[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]]
    (root / "labels.json").write_text(json.dumps(labels))
    (root / "boxes.json").write_text(json.dumps(boxes))
    return root


class TestMi:
    def test_writes_the_report_the_result_and_the_dynamics(self, runs):
        root, first, _ = runs
        for name in ("index.html", "MutualKnowledgeResult.json", "mi_dynamics.png", "concepts_pca.png",
                     "concepts_kmeans.png", "venn.png"):
            assert (root / "a" / name).is_file(), name
        assert (root / "a" / "mi_dynamics.png").read_bytes().startswith(PNG)
        assert not (root / "a" / "evaluation.png").exists()  # --no-evaluate
        assert f"Report written to {(root / 'a' / 'index.html').resolve()}" in first.stdout
        result = MutualKnowledgeResult.load(root / "a" / "MutualKnowledgeResult.json")
        assert len(result.images) == 40 and set(result.methods) == {"pca", "kmeans"} and result.evaluation is None
        assert result.parameters["model"] == "toy-shapes" and result.parameters["mi"] == "paper"
        assert result.accuracy > 0.85 and result.corloc["GDC auto keys"] > result.corloc["random boxes"]
        assert f"zero-shot accuracy {100 * result.accuracy:.2f} %" in first.stdout
        assert "| pca |" in first.stdout and "| GDC auto keys |" in first.stdout

    def test_options_reach_the_analysis(self, runs):
        root, _, second = runs
        result = MutualKnowledgeResult.load(root / "b" / "MutualKnowledgeResult.json")
        assert list(result.methods) == ["pca", "kmeans"] and result.corloc is None and len(result.images) == 30
        assert "seed 1001" in result.parameters["data"] and "CorLoc" not in second.stdout

    def test_bank_variant_and_keys(self, runner, tmp_path):
        out = tmp_path / "bank"
        printed = ok(runner, ["mi", "--shapes", 12, "--mi", "bank", "--features", "keys", "--methods", "kmeans",
                              "--parts", 3, "--u", 20, "--no-evaluate", "--no-corloc", "--out", out]).stdout
        result = MutualKnowledgeResult.load(out / "MutualKnowledgeResult.json")
        params = result.parameters
        assert (params["mi"], params["features"], params["n_parts"], params["u"]) == ("bank", "keys", 3, 20)
        assert all(len(r.textual) == 20 and len(r.region_descriptors) == 3 for r in result.images)
        assert "MI (bank)" in printed

    def test_a_folder_dataset_reports_accuracy_and_corloc(self, runner, runs, folder, tmp_path):
        out = tmp_path / "report"
        printed = ok(runner, ["mi", "-m", "toy-shapes", "--images", folder, "--descriptors", "shapes", "--no-evaluate",
                              "--out", out]).stdout  # the model of `runs` (compared below)
        result = MutualKnowledgeResult.load(out / "MutualKnowledgeResult.json")
        assert [r.id for r in result.images] == [f"scene{i:03d}.png" for i in range(40)]
        assert result.classes == sorted(result.classes)  # labels.json's classes, sorted
        assert "| GDC auto keys |" in printed and "CorLoc" in printed
        # the PNGs are the scenes of `mi --shapes 40` (lossless, at the model's size): the boxes and
        # foregrounds are the same, so is CorLoc (measured: GDC auto keys 0.475, random boxes 0.0)
        scenes = MutualKnowledgeResult.load(runs[0] / "a" / "MutualKnowledgeResult.json")
        assert result.corloc == scenes.corloc and result.corloc["GDC auto keys"] > 0.25
        # the class prompts differ ("circle" here, "a circle" for scenes) but the predictions agree
        assert result.accuracy == scenes.accuracy > 0.85
        names = [[scenes.classes[r.predicted], scenes.classes[r.label]] for r in scenes.images]
        assert [[result.classes[r.predicted], result.classes[r.label]] for r in result.images] == names

    def test_errors_are_one_line(self, runner, tmp_path):
        empty = tmp_path / "bank.json"
        empty.write_text('{"circle": ["a red circle"], "square": []}')
        out = tmp_path / "x"
        one_line_error(runner, ["mi", "--shapes", 4, "--descriptors", empty, "--out", out],
                       "class 'square' has an empty descriptor list")
        broken = tmp_path / "broken.json"
        broken.write_text('{"circle": ["a red circle"],')
        one_line_error(runner, ["mi", "--shapes", 4, "--descriptors", broken, "--out", out], "is not valid JSON")
        one_line_error(runner, ["mi", "--shapes", 4, "--descriptors", tmp_path / "missing.json", "--out", out],
                       "does not exist")
        one_line_error(runner, ["mi", "--shapes", 4, "--mi", "nonsense", "--out", out],
                       "mi must be one of paper, bank, got 'nonsense'")
        one_line_error(runner, ["mi", "--shapes", 4, "--methods", "pca,spectral", "--out", out], "methods must be")
        data = tmp_path / "data"  # outside --out: an output inside an input folder is refused
        data.mkdir()
        one_line_error(runner, ["mi", "--shapes", 4, "--images", data, "--out", out], "give one image source")
        one_line_error(runner, ["mi", "--images", data, "--out", out], "no images in")
        assert not out.exists()


class TestCompare:
    def test_compares_saved_results_and_prints_pearson(self, runner, runs):
        root, _, _ = runs
        table = root / "cmp" / "table.html"
        printed = ok(runner, ["compare", "--analysis", "mutual_knowledge", root / "a",
                              root / "b" / "MutualKnowledgeResult.json", "--out", table]).stdout
        assert "Pearson(AUC, accuracy) =" in printed and "Spearman" in printed
        rows = [line for line in printed.splitlines() if line.startswith("| toy-shapes")]
        assert len(rows) == 2  # the second is named by its path (same model)
        first = MutualKnowledgeResult.load(root / "a" / "MutualKnowledgeResult.json")
        assert f"| toy-shapes | {100 * first.accuracy:.2f} | {first.mean_mi:.3f} | {first.mean_auc:.3f} | 40 |" in printed
        page = table.read_text()
        assert page.count("<tr>") == 3 and "Pearson(AUC, accuracy)" in page
        assert table.with_suffix(".png").read_bytes().startswith(PNG)

    def test_errors_are_one_line(self, runner, runs, tmp_path):
        root, _, _ = runs
        one_line_error(runner, ["compare", "--models", "toy-shapes,toy-shapes"], "add --analysis mutual_knowledge")
        one_line_error(runner, ["compare", "--analysis", "mutual_knowledge", root / "a"], "at least 2 results, got 1")
        one_line_error(runner, ["compare", "--analysis", "mutual_knowledge"], "give the result files")
        other = tmp_path / "other.json"
        other.write_text('{"rows": {}}')
        one_line_error(runner, ["compare", "--analysis", "mutual_knowledge", root / "a", other],
                       "is not a mutual_knowledge result")
        one_line_error(runner, ["compare", "--analysis", "mutual_knowledge", root / "a", tmp_path / "none.json"],
                       "no MutualKnowledgeResult file at")
        one_line_error(runner, ["compare", "--analysis", "spans", root / "a", root / "b"], "--analysis must be")
