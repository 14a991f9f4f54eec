"""The ``mutual_knowledge`` analysis end to end on the bundled toy-shapes model (held-out scenes),
its result (records, summaries, save/load, figures, report), its input errors, and the
across-model comparison (``compare.py``).

The claims are asserted as paired per-image differences with bootstrap intervals on test worlds
(`tests/seeds.py`): on 100 scenes the MI gap to the random-class control and the insertion gaps to
random regions; on 300 scenes (slow) also the AUC gap and deletion, which 100 scenes cannot settle
(docs/concepts/mutual_knowledge.md, "Measured on fresh worlds").
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from clip_lens import HookedCLIP
from clip_lens.errors import InputError
from clip_lens.toy.world import VALUES, ShapesWorld, attribute_prompt, batch_images
from clip_lens_plugins.mutual_knowledge import (
    ConceptData, MutualKnowledge, MutualKnowledgeComparison, MutualKnowledgeResult, compare_files,
    compare_results, mi_dynamics, shapes_world_data, write_report,
)
from clip_lens.stats import bootstrap_ci, bootstrap_correlation
from clip_lens_plugins.mutual_knowledge import evaluation
from clip_lens_plugins.mutual_knowledge.analysis import ImageConcepts, MethodRun
from clip_lens_plugins.mutual_knowledge.compare import line_fit
from tests.seeds import TEST_SEEDS

N_SCENES = 100
PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def data():
    return shapes_world_data(N_SCENES, seed=TEST_SEEDS[6])


def run_with_per_image(model: HookedCLIP, data: ConceptData, **kwargs) -> tuple[MutualKnowledgeResult, dict]:
    """The analysis' result and, per evaluated row (``"concepts (pca)"``, ``"random regions"``, …), each image's
    ``deletion``, ``insertion``, ``acc_drop`` and ``acc_inc`` areas ``[n_images]``: the result keeps only their
    means, so `evaluation._curves` is wrapped to keep the curves it computes (deletion, then insertion, per row)."""
    found, original = [], evaluation._curves

    def keep(*args, **kw):
        found.append(original(*args, **kw))
        return found[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation, "_curves", keep)
        result = MutualKnowledge(model).run(data, **kwargs)
    area = lambda correct: torch.trapezoid(correct.float(), dx=1.0 / (correct.shape[1] - 1), dim=-1).numpy()
    per_image = {
        name: {"deletion": deletion.score_auc.numpy(), "insertion": insertion.score_auc.numpy(),
               "acc_drop": area(deletion.correct), "acc_inc": area(insertion.correct)}
        for name, deletion, insertion in zip(result.evaluation["table"], found[::2], found[1::2])
    }
    for name, row in result.evaluation["table"].items():  # the kept curves are the ones behind the table
        assert {k: float(v.mean()) for k, v in per_image[name].items()} == pytest.approx(row, abs=1e-6)
    return result, per_image


@pytest.fixture(scope="module")
def evaluated(toy, data) -> tuple[MutualKnowledgeResult, dict]:
    """Both part methods, evaluation and CorLoc (the default run, with the clearer 7-px blur), and per-image areas."""
    return run_with_per_image(toy, data, blur_kernel=7, progress=False)


@pytest.fixture(scope="module")
def result(evaluated) -> MutualKnowledgeResult:
    return evaluated[0]


@pytest.fixture(scope="module")
def bank_result(toy, data) -> MutualKnowledgeResult:
    return MutualKnowledge(toy).run(data, methods=("pca",), mi="bank", evaluate=False, corloc=False, progress=False)


def perturbed_toy(scale: float, seed: int = 0) -> HookedCLIP:
    """The toy model with Gaussian noise (``scale`` × each matrix's std) on its vision matrices."""
    model = HookedCLIP.from_pretrained("toy-shapes")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("visual.") and parameter.ndim >= 2:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * parameter.std())
    return model


@pytest.fixture(scope="module")
def worse_results():
    """Two deliberately worse models (vision noise 0.5 and 1.0) on 60 scenes, no evaluation.
    Measured: accuracy 0.667 and 0.333, mean AUC 3.73 and 3.99 vs the intact model's 3.91 (0.97):
    across such damaged models AUC does not follow accuracy (Pearson −0.31, Spearman −0.5)."""
    return {f"noise {scale}": MutualKnowledge(perturbed_toy(scale)).run(
        shapes_world_data(60), evaluate=False, corloc=False, progress=False) for scale in (0.5, 1.0)}


# --- what the analysis finds --------------------------------------------------------------
@pytest.mark.slow  # the 100-scene analysis fixture (10 s); the default suite stays under 5 minutes
class TestSharedKnowledge:
    @pytest.mark.parametrize("method", ["pca", "kmeans"])
    def test_predicted_class_concepts_share_more_than_a_random_class(self, result, method):
        """The MI gap to the random-class control, paired over images: 100 scenes settle it on every world measured
        (test world: PCA 0.58 [0.15, 1.02]); the AUC gap needs 300 (`TestClaimsOnMoreScenes`)."""
        run = result.methods[method]
        assert bootstrap_ci(mi_gaps(run))[0] > 0, (method, bootstrap_ci(mi_gaps(run)))
        assert run.mean_curve[0] == pytest.approx(run.mean_mi)
        assert run.control_curve[0] == pytest.approx(run.control_mi)

    @pytest.mark.parametrize("method", ["pca", "kmeans"])
    def test_concept_regions_beat_random_regions_on_insertion(self, evaluated, method):
        """Insertion and AccInc, paired over the 100 images (PCA: 0.12 [0.05, 0.19] and 0.13 [0.06, 0.21]; 20–30 points
        on 300 scenes); deletion needs 300 scenes (`TestClaimsOnMoreScenes`)."""
        result, per_image = evaluated
        concepts, random = per_image[f"concepts ({method})"], per_image["random regions"]
        for metric in ("insertion", "acc_inc"):
            assert bootstrap_ci(concepts[metric] - random[metric])[0] > 0, (method, metric)
        assert set(result.evaluation["table"]) == {"concepts (pca)", "concepts (kmeans)", "random regions", "feature maps"}
        assert result.evaluation["blur_kernel"] == 7

    def test_gdc_auto_keys_localise_far_better_than_random_boxes(self, result):
        corloc = result.corloc
        assert set(corloc) == {"GDC tokens", "GDC auto tokens", "PCA tokens", "GDC keys", "GDC auto keys",
                               "PCA keys", "random boxes"}
        assert corloc["GDC auto keys"] > corloc["random boxes"] + 0.25  # measured 0.44 vs 0.00
        assert corloc["GDC auto keys"] > corloc["GDC keys"] + 0.2  # the paper's second vector: 0.05
        assert all(0.0 <= v <= 1.0 for v in corloc.values())

    def test_accuracy_matches_an_independent_zero_shot_classifier(self, toy, result):
        scenes = [ShapesWorld(seed=TEST_SEEDS[6], n_objects=1).scene(i) for i in range(N_SCENES)]
        labels = torch.tensor([VALUES["shape"].index(s.value("shape")) for s in scenes])
        with torch.no_grad():
            classes = toy.encode_text(toy.to_tokens([attribute_prompt("shape", v) for v in VALUES["shape"]]), normalize=True)
            predicted = (toy.encode_image(batch_images(scenes), normalize=True) @ classes.T).argmax(-1)
        assert result.accuracy == pytest.approx(float((predicted == labels).float().mean()), abs=1e-6)
        assert result.accuracy > 0.9  # measured 0.97
        assert result.classes == list(VALUES["shape"])
        for method in result.methods.values():
            assert [i.predicted for i in method.images] == predicted.tolist()
            assert [i.label for i in method.images] == labels.tolist()

    @pytest.mark.parametrize("method", ["pca", "kmeans"])
    def test_every_image_record_is_consistent(self, result, method):
        n_bank, n_parts = len(result.descriptors), result.parameters["n_parts"]
        records = result.methods[method].images
        assert len(records) == N_SCENES and [r.id for r in records] == [str(i) for i in range(N_SCENES)]
        assert sum(bool(r.shared) for r in records) > N_SCENES // 2  # measured 88 (PCA), 85 (K-means) of 100
        for r in records:
            assert r.mi == r.curve[0] and r.auc == pytest.approx(sum(r.curve) / len(r.curve), abs=1e-12)
            assert r.control_auc == pytest.approx(sum(r.control_curve) / len(r.control_curve), abs=1e-12)
            assert len(r.curve) == len(r.control_curve) == len(r.visual) + 1
            assert set(r.shared) <= set(r.visual) and len(set(r.visual)) == len(r.visual)
            assert len(r.textual) == len(set(r.textual)) == result.parameters["u"]
            assert all(0 <= d < n_bank for d in r.visual + r.textual)
            # D_v is the deduplicated union of the regions' descriptors (≤ 3 per region)
            assert set(r.visual) == {d for ids in r.region_descriptors for d in ids}
            assert len(r.region_descriptors) == n_parts and all(len(ids) <= 3 for ids in r.region_descriptors)
            parts = np.array(r.parts)
            assert parts.shape == (8, 8) and parts.min() >= -1 and parts.max() < n_parts
            for part, ids in enumerate(r.region_descriptors):  # a region without patches has no descriptors
                assert ids == [] or (parts == part).any()
            if r.shared:
                assert r.mi == pytest.approx(math.log(len(r.visual) * len(r.textual) * len(r.shared)), abs=1e-9)
            else:
                assert r.mi == 0.0
            assert r.curve[-1] == 0.0 and all(a >= b for a, b in zip(r.curve, r.curve[1:]))

    def test_method_summaries_average_the_records(self, result):
        for run in result.methods.values():
            assert run.mean_mi == pytest.approx(np.mean([i.mi for i in run.images]), abs=1e-12)
            assert run.mean_auc == pytest.approx(np.mean([i.auc for i in run.images]), abs=1e-12)
            assert run.control_mi == pytest.approx(np.mean([i.control_curve[0] for i in run.images]), abs=1e-12)
            longest = max(len(i.curve) for i in run.images)
            assert len(run.mean_curve) == longest
            padded = [i.curve + [0.0] * (longest - len(i.curve)) for i in run.images]
            assert run.mean_curve == pytest.approx(np.mean(padded, axis=0).tolist(), abs=1e-12)
        assert result.mean_auc == pytest.approx((result.methods["pca"].mean_auc + result.methods["kmeans"].mean_auc) / 2)
        assert result.seconds > 0 and result.images_per_second == pytest.approx(N_SCENES / result.seconds)

    def test_bank_mi_is_the_indicator_mi_and_zero_exactly_at_chance_overlap(self, bank_result, result):
        n_bank = len(bank_result.descriptors)
        assert n_bank == 138 and bank_result.parameters["mi"] == "bank"
        records = bank_result.methods["pca"].images
        # the same concepts as the paper-MI run: only the measure differs
        assert [r.visual for r in records] == [r.visual for r in result.methods["pca"].images]
        for r in records:
            lv, lt, m = len(r.visual), len(r.textual), len(r.shared)
            table = np.array([m, lv - m, lt - m, n_bank - lv - lt + m], dtype=float) / n_bank
            px = np.array([lv, lv, n_bank - lv, n_bank - lv]) / n_bank
            py = np.array([lt, n_bank - lt, lt, n_bank - lt]) / n_bank
            by_hand = sum(p * math.log(p / (a * b)) for p, a, b in zip(table, px, py) if p > 0)
            sign = np.sign(m * n_bank - lv * lt)
            assert r.mi == pytest.approx(sign * by_hand, abs=1e-9)
            assert (r.mi > 0) == (sign > 0) and (r.mi < 0) == (sign < 0)
        # L_v = 69 of N = 138 with L_T = 50: chance overlap is 69 · 50 / 138 = 25
        textual = list(range(50))
        curve = lambda m: mi_dynamics(list(range(50 - m, 50 - m + 69)), textual, variant="bank", n_bank=n_bank)
        assert curve(25)[0] == pytest.approx(0.0, abs=1e-12)
        assert curve(24)[0] < -1e-4 and curve(26)[0] > 1e-4
        run = bank_result.methods["pca"]
        assert run.mean_mi > run.control_mi + 0.004  # measured 0.0077 vs -0.0009

    def test_saved_result_loads_back_equal(self, result, tmp_path):
        path = result.save(tmp_path)
        assert path.name == "MutualKnowledgeResult.json"
        loaded = MutualKnowledgeResult.load(path)
        assert loaded.to_dict() == result.to_dict()
        assert loaded.images[3].shared == result.images[3].shared
        assert loaded.to_markdown() == result.to_markdown()

    def test_markdown_reports_both_methods_evaluation_and_corloc(self, result):
        text = result.to_markdown()
        assert f"zero-shot accuracy {100 * result.accuracy:.2f} %" in text  # the result's own, not a printed figure
        for name, run in result.methods.items():
            assert f"| {name} | {run.mean_mi:.3f} | {run.mean_auc:.3f} | {run.control_mi:.3f} | {run.control_auc:.3f} |" in text
        assert f"| GDC auto keys | {result.corloc['GDC auto keys']:.3f} |" in text and "| random boxes |" in text
        assert "| concepts (pca) |" in text and "| feature maps |" in text

    def test_plots_are_figures(self, result, data):
        fig = result.plot()
        assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 4  # 2 methods × (curve, control)
        concepts = result.plot_concepts(data.load(range(4)))
        assert isinstance(concepts, Figure) and len(concepts.axes) == 8  # 2 rows × 4 images
        venn = result.plot_venn()
        assert isinstance(venn, Figure) and result.images[0].id in venn.axes[0].get_title()
        assert isinstance(result.plot_venn(5, method="kmeans"), Figure)

    def test_write_report_writes_the_page_and_pngs(self, result, data, tmp_path):
        page = write_report(result, data.load(range(4)), tmp_path / "report")
        assert page == tmp_path / "report" / "index.html"
        names = {"mi_dynamics", "concepts_pca", "concepts_kmeans", "venn", "evaluation"}
        for name in names:
            assert (tmp_path / "report" / f"{name}.png").read_bytes().startswith(PNG)
        text = page.read_text()
        assert text.count("data:image/png;base64,") == len(names) and "<td>GDC auto keys</td>" in text and "|---" not in text
        assert MutualKnowledgeResult.load(tmp_path / "report" / "MutualKnowledgeResult.json").to_dict() == result.to_dict()


def test_a_single_valid_region_gets_its_most_similar_descriptors():
    """35 of 100 held-out scenes (PCA; 45 with K-means) have one valid concept region: their D_v should
    follow the region's similarity to the descriptors (no other region competes for them)."""
    from clip_lens_plugins.mutual_knowledge.descriptors import visual_concepts

    generator = torch.Generator().manual_seed(0)
    descriptors = torch.nn.functional.normalize(torch.randn(40, 16, generator=generator), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(1, 16, generator=generator), dim=-1)
    region = descriptors[7].expand(1, 5, 16).clone()  # the region *is* descriptor 7
    valid = torch.tensor([[True, False, False, False, False]])
    _, ids = visual_concepts(region, valid, image, descriptors, margin=10.0, return_regions=True)
    assert ids[0][0] == (region[0, 0] @ descriptors.T).topk(3).indices.tolist()  # the plan row is uniform: ties go to similarity


def mi_gaps(run: MethodRun) -> list[float]:
    """Per image: MI with the predicted class's textual concepts minus MI with a random other class's."""
    return [i.mi - i.control_curve[0] for i in run.images]


N_CLAIM_SCENES = 300


@pytest.fixture(scope="module", params=TEST_SEEDS[6:8])
def evaluated_300(request, toy) -> tuple[MutualKnowledgeResult, dict]:
    return run_with_per_image(toy, shapes_world_data(N_CLAIM_SCENES, seed=request.param), blur_kernel=7, corloc=False,
                              progress=False)


@pytest.mark.slow
class TestClaimsOnMoreScenes:
    """The documented claims on 300 scenes of each of two test worlds (~1 min per world), paired over images.
    Measured (docs/concepts/mutual_knowledge.md): AUC gaps 0.44–0.67, lowest lower bound 0.21; deletion below
    random regions by 0.03–0.05 (upper bounds −0.031 to −0.008); against feature-map channels the concepts win
    insertion (+0.06 to +0.11) but not deletion (−0.00 to +0.035 in favour of the channels)."""

    @pytest.mark.parametrize("method", ["pca", "kmeans"])
    def test_predicted_class_concepts_share_more_than_a_random_class_by_mi_and_auc(self, evaluated_300, method):
        run = evaluated_300[0].methods[method]
        assert bootstrap_ci(mi_gaps(run))[0] > 0
        assert bootstrap_ci([i.auc - i.control_auc for i in run.images])[0] > 0

    @pytest.mark.parametrize("method", ["pca", "kmeans"])
    def test_concept_regions_beat_random_regions_on_all_four_metrics(self, evaluated_300, method):
        per_image = evaluated_300[1]
        gap = {k: v - per_image["random regions"][k] for k, v in per_image[f"concepts ({method})"].items()}
        assert bootstrap_ci(gap["deletion"])[1] < 0 and bootstrap_ci(gap["acc_drop"])[1] < 0
        assert bootstrap_ci(gap["insertion"])[0] > 0 and bootstrap_ci(gap["acc_inc"])[0] > 0

    @pytest.mark.parametrize("method", ["pca", "kmeans"])
    def test_feature_map_channels_delete_as_well_as_concepts_but_insert_worse(self, evaluated_300, method):
        per_image = evaluated_300[1]
        gap = {k: v - per_image["feature maps"][k] for k, v in per_image[f"concepts ({method})"].items()}
        assert bootstrap_ci(gap["deletion"])[1] > 0  # not established that concepts delete better (docs say so)
        assert bootstrap_ci(gap["insertion"])[0] > 0


# --- input errors --------------------------------------------------------------------------
class TestBadInput:
    def test_a_group_with_fewer_foreground_patches_than_parts_gets_one_part_per_patch(self, toy):
        """One image per group (group_size=1): 5 parts of a 1–4 patch foreground used to raise."""
        small = shapes_world_data(8)
        result = MutualKnowledge(toy).run(small, methods=("pca",), group_size=1, evaluate=False, corloc=False, progress=False)
        for record in result.images:
            parts = np.array(record.parts)
            foreground = int((parts >= 0).sum())
            assert foreground >= 1 and 0 <= parts[parts >= 0].min() and parts.max() < min(5, foreground)
            assert len(record.region_descriptors) == 5
        assert min(int((np.array(r.parts) >= 0).sum()) for r in result.images) < 5  # the case is exercised

    @pytest.mark.parametrize("kwargs, message", [
        ({"n_parts": 0}, "n_parts must be at least 1"),
        ({"u": 0}, "u must be at least 1"),
        ({"group_size": 0}, "group_size must be at least 1"),
        ({"methods": ("pca", "spectral")}, "methods must be a non-empty subset of pca, kmeans, got pca, spectral"),
        ({"methods": ()}, "methods must be a non-empty subset"),
        ({"features": "values"}, "features must be one of tokens, keys, got 'values'"),
        ({"mi": "nonsense"}, "mi must be one of paper, bank, got 'nonsense'"),
        ({"gdc_vector": "first"}, "vector must be a singular vector index"),
        ({"prompts": ("ellipse", "box")}, "kinds must be a non-empty subset of ellipse, grey, blur"),
    ])
    def test_bad_parameters_raise(self, toy, kwargs, message):
        with pytest.raises(InputError, match=message):
            MutualKnowledge(toy).run(shapes_world_data(12), evaluate=False, corloc=False, progress=False, **kwargs)

    def test_descriptor_file_with_an_empty_class_list(self, toy, tmp_path):
        path = tmp_path / "bank.json"
        path.write_text('{"circle": ["a red circle"], "square": []}')
        with pytest.raises(InputError, match="class 'square' has an empty descriptor list"):
            MutualKnowledge(toy).run(shapes_world_data(4), descriptors=str(path), progress=False)

    def test_classes_missing_from_the_bank(self, toy, data):
        images = data.load(range(4))
        hexagons = ConceptData.from_tensors(images, ["circle", "hexagon"], class_templates=("a {}",))
        with pytest.raises(InputError, match="no descriptors for 1 of the requested classes: 'hexagon'"):
            MutualKnowledge(toy).run(hexagons, progress=False)

    def test_images_of_the_wrong_size(self, toy):
        small = ConceptData.from_tensors(torch.zeros(2, 3, 32, 32), list(VALUES["shape"]), class_templates=("a {}",))
        with pytest.raises(InputError, match="images are 32x32 but toy-shapes takes 64x64; resize with model.preprocess"):
            MutualKnowledge(toy).run(small, progress=False)

    def test_data_and_model_must_be_given(self, toy):
        with pytest.raises(InputError, match="data must be a ConceptData"):
            MutualKnowledge(toy).run(torch.zeros(2, 3, 64, 64), progress=False)
        with pytest.raises(InputError, match="needs a model"):
            MutualKnowledge(None)
        with pytest.raises(InputError, match=r"images must be a tensor \[n, 3, H, W\]"):
            ConceptData.from_tensors(torch.zeros(2, 64, 64, 3), ["circle"])


# --- across models ---------------------------------------------------------------------------
@pytest.mark.slow  # needs the same 100-scene analysis
class TestCorrelation:
    def test_line_fit_by_hand(self):
        # centred: x (-1.5, -0.5, 0.5, 1.5), y (-3, -1, 0, 4); Σxy = 11, Σx² = 5 (Pearson/Spearman: tests/unit/test_stats.py)
        assert line_fit([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx((2.2, -0.5), abs=1e-12)  # slope 11 / 5, 5 − 2.2 · 2.5
        assert math.isnan(line_fit([2, 2], [1, 3])[0])

    @pytest.mark.slow  # two more models' results (3.4 s); the default suite stays under 5 minutes
    def test_compare_results_of_three_models(self, result, worse_results, tmp_path):
        runs = {"toy-shapes": result, **worse_results}
        table = compare_results(runs)
        assert isinstance(table, MutualKnowledgeComparison) and table.variant == "paper"
        assert list(table.rows) == ["toy-shapes", "noise 0.5", "noise 1.0"]
        for name, run in runs.items():
            row = table.rows[name]
            assert row.accuracy == pytest.approx(100 * run.accuracy) and row.images == len(run.images)
            assert row.mi == pytest.approx(run.mean_mi) and row.auc == pytest.approx(run.mean_auc)
        accuracy = [r.accuracy for r in table.rows.values()]
        assert accuracy[0] > accuracy[1] + 15 > accuracy[2] + 30  # measured 97.0, 66.7, 33.3
        auc, mi = [r.auc for r in table.rows.values()], [r.mi for r in table.rows.values()]
        assert table.pearson_auc == pytest.approx(float(np.corrcoef(auc, accuracy)[0, 1]), abs=1e-9)
        assert table.pearson_mi == pytest.approx(float(np.corrcoef(mi, accuracy)[0, 1]), abs=1e-9)
        slope, intercept = np.polyfit(auc, accuracy, 1)
        assert (table.slope, table.intercept) == pytest.approx((slope, intercept), rel=1e-6)
        sign = "−" if intercept < 0 else "+"
        assert table.fit_text == f"{slope:.2f}·AUC {sign} {abs(intercept):.2f}" and "+ -" not in table.summary()
        rank = lambda v: np.argsort(np.argsort(v))  # no ties: the classic 1 − 6 Σd² / (n (n² − 1))
        d = rank(auc) - rank(accuracy)
        assert table.spearman_auc == pytest.approx(1 - 6 * float((d**2).sum()) / 24, abs=1e-12)
        markdown = table.to_markdown()
        assert "| noise 1.0 | 33.33 |" in markdown and "Pearson(AUC, accuracy) =" in markdown
        # 100 scenes for the intact model, 60 for the noised ones: no scene is paired across all three
        assert table.intervals is None and "no intervals: the models were measured on different images" in markdown
        page = table.to_html()
        assert page.startswith("<table>") and page.count("<tr>") == 4 and "Spearman" in page
        fig = table.plot()
        assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 1  # the fitted line
        saved = table.save(tmp_path / "comparison.json")
        assert MutualKnowledgeComparison.load(saved).to_dict() == table.to_dict()

    @pytest.mark.slow  # needs the two more models' results (3.4 s)
    def test_compare_files_names_rows_by_model(self, result, worse_results, tmp_path):
        result.save(tmp_path / "a")
        worse_results["noise 0.5"].save(tmp_path / "b" / "run.json")
        table = compare_files([tmp_path / "a", tmp_path / "b" / "run.json"])
        assert list(table.rows) == ["toy-shapes", f"toy-shapes ({tmp_path / 'b' / 'run.json'})"]
        (tmp_path / "other.json").write_text('{"rows": {}}')
        with pytest.raises(InputError, match="is not a mutual_knowledge result"):
            compare_files([tmp_path / "a", tmp_path / "other.json"])

    def test_mixed_mi_variants_are_refused(self, result, bank_result):
        with pytest.raises(InputError, match=r"different MI variants \(bank, paper\)"):
            compare_results({"paper": result, "bank": bank_result})

    def test_fewer_than_two_results_are_refused(self, result):
        with pytest.raises(InputError, match="at least 2 results, got 1"):
            compare_results({"toy-shapes": result})

    def test_results_without_labels_are_refused(self, toy, result, data):
        unlabelled = ConceptData.from_tensors(data.load(range(6)), list(VALUES["shape"]), class_templates=("a {}",))
        run = MutualKnowledge(toy).run(unlabelled, evaluate=False, corloc=False, progress=False)
        assert run.accuracy is None
        with pytest.raises(InputError, match="unlabelled has no zero-shot accuracy"):
            compare_results({"toy-shapes": result, "unlabelled": run})


def synthetic_result(model: str, auc: np.ndarray, mi: np.ndarray, correct: np.ndarray, data: str = "scenes") -> MutualKnowledgeResult:
    """A result with the given per-method, per-scene AUC and MI (``[method, scene]``) and per-scene correctness."""
    def image(s: int, m: int) -> ImageConcepts:
        return ImageConcepts(str(s), 0 if correct[s] else 1, 0, [[-1]], [], [], [], float(mi[m, s]), [float(mi[m, s]), 0.0],
                             float(auc[m, s]), [0.0, 0.0], 0.0)

    methods = {name: MethodRun.from_images([image(s, m) for s in range(auc.shape[1])]) for m, name in enumerate(("pca", "kmeans"))}
    return MutualKnowledgeResult({"model": model, "mi": "paper", "data": data}, ["circle", "square"], [],
                                 float(np.mean(correct)), methods)


@pytest.fixture(scope="module")
def checkpoints():
    """Four checkpoints on the same 40 scenes, two part methods: results, AUC and MI [model, method, scene], correct [model, scene]."""
    rng = np.random.default_rng(0)
    level = np.array([0.0, 0.3, 0.5, 1.0])  # four checkpoints, 40 scenes, two part methods
    auc = 2.5 + level[:, None, None] + 0.8 * rng.standard_normal((4, 2, 40))
    mi = 4.0 + 0.5 * level[:, None, None] + 0.8 * rng.standard_normal((4, 2, 40))
    correct = rng.random((4, 40)) < (0.3 + 0.6 * level)[:, None]
    return {f"step{c}": synthetic_result(f"step{c}", auc[c], mi[c], correct[c]) for c in range(4)}, auc, mi, correct


class TestCorrelationIntervals:
    """Checkpoints measured on the same scenes: the correlations carry a bootstrap interval over scenes."""

    def test_intervals_resample_the_scenes_every_checkpoint_saw(self, checkpoints):
        results, auc, mi, correct = checkpoints
        table = compare_results(results)
        assert table.interval_scenes == 40
        # the per-scene values assembled here: each scene's AUC and MI averaged over the two part methods
        accuracy = 100.0 * correct
        for name, values in (("auc", auc.mean(1)), ("mi", mi.mean(1))):
            np.testing.assert_allclose([getattr(r, name) for r in table.rows.values()], values.mean(1), atol=1e-9)
            for method in ("pearson", "spearman"):
                assert table.intervals[f"{method}_{name}"] == pytest.approx(bootstrap_correlation(values, accuracy, method), abs=1e-12)
        np.testing.assert_allclose([r.accuracy for r in table.rows.values()], accuracy.mean(1), atol=1e-9)
        low, high = table.intervals["pearson_auc"]
        assert -1 <= low < table.pearson_auc < high <= 1
        assert f"Pearson(AUC, accuracy) = {table.pearson_auc:.3f} [{low:.2f}, {high:.2f}]" in table.summary()
        assert "over the 40 scenes every model saw" in table.summary()

    def test_values_that_do_not_vary_by_scene_give_a_point_interval(self):
        # every scene gives each checkpoint the same AUC, MI and correctness: resampling scenes cannot move anything
        level, right = np.array([2.0, 3.0, 2.5, 4.0]), np.array([True, False, True, True])
        def run(c, correct):
            return synthetic_result(f"m{c}", np.full((2, 30), level[c]), np.full((2, 30), level[c]), correct)
        table = compare_results({f"m{c}": run(c, np.full(30, right[c])) for c in range(4)})
        assert table.pearson_auc == pytest.approx(np.corrcoef(level, 100.0 * right)[0, 1], abs=1e-12)
        assert table.intervals["pearson_auc"] == pytest.approx([table.pearson_auc] * 2, abs=1e-12)
        # the same accuracies, but spread over scenes (the first 30·p scenes right): the interval widens
        spread = compare_results({f"m{c}": run(c, np.arange(30) < 30 * (0.25 * c + 0.2)) for c in range(4)})
        low, high = spread.intervals["pearson_auc"]
        assert low < spread.pearson_auc < high

    def test_results_on_different_images_get_no_interval(self, checkpoints):
        results, auc, mi, correct = checkpoints
        other = synthetic_result("other", auc[0], mi[0], correct[0], data="other scenes")
        table = compare_results({**results, "other": other})
        assert table.intervals is None and table.interval_scenes is None
        assert "no intervals" in table.summary()

