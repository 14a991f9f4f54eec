"""Mutual knowledge across the three tower families of the paper's table (ViT, ResNet, ConvNeXt), plus
FastViT: every family runs the analysis (evaluation and CorLoc included) from its spatial tokens, and one
comparison pairs them scene by scene."""

from __future__ import annotations

import math

import pytest
import torch

from clip_lens import HookedCLIP
from clip_lens_plugins.mutual_knowledge import MutualKnowledge, compare_results, shapes_world_data
from tests.unit.test_conv_towers import _model

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # 4 models x the MK pipeline: ~8 s
N_SCENES = 24


@pytest.fixture(scope="module")
def results() -> dict:
    models = {
        "toy-shapes (ViT)": HookedCLIP.from_pretrained("toy-shapes"),
        "toy-shapes-rn (ResNet)": HookedCLIP.from_pretrained("toy-shapes-rn"),
        "convnext (random)": _model("convnext"),
        "fastvit (random)": _model("fastvit"),
    }
    out = {}
    for name, model in models.items():
        data = shapes_world_data(N_SCENES, image_size=model.cfg.image_size[0])
        out[name] = MutualKnowledge(model).run(data, n_parts=3, group_size=12, progress=False,
                                               evaluate=name.startswith("toy"), corloc=name.startswith("toy"))
    return out


def test_every_family_finds_visual_concepts_in_its_spatial_tokens(results):
    for name, result in results.items():
        assert len(result.images) == N_SCENES
        for method, run in result.methods.items():
            assert math.isfinite(run.mean_mi) and math.isfinite(run.mean_auc), (name, method)
            assert sum(len(image.visual) > 0 for image in run.images) >= N_SCENES // 2, (name, method)


def test_the_trained_resnet_knows_the_shapes_and_its_corloc_beats_random_boxes(results):
    result = results["toy-shapes-rn (ResNet)"]
    assert result.accuracy > 0.9
    corloc = result.corloc
    assert "GDC keys" not in corloc  # keys are a ViT's last attention layer
    assert max(corloc["GDC tokens"], corloc["PCA tokens"]) > corloc["random boxes"]


def test_one_comparison_pairs_vit_resnet_convnext_and_fastvit_scene_by_scene(results):
    table = compare_results(results)
    assert list(table.rows) == list(results)
    assert table.interval_scenes == N_SCENES  # the same scenes, rendered at each model's size
    trained = [table.rows[name].accuracy for name in results if name.startswith("toy")]
    untrained = [table.rows[name].accuracy for name in results if "random" in name]
    assert min(trained) > 90 and max(untrained) < 60
    assert "toy-shapes-rn (ResNet)" in table.to_markdown()


def test_compare_command_takes_a_mixed_list_of_vit_and_resnet_models(tmp_path):
    from typer.testing import CliRunner

    from clip_lens.cli import app

    out = tmp_path / "compared"
    result = CliRunner().invoke(app, ["compare", "--analysis", "mutual_knowledge", "--models", "toy-shapes,toy-shapes-rn",
                                      "--shapes", "16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| toy-shapes")]
    assert [row.split("|")[1].strip() for row in rows] == ["toy-shapes", "toy-shapes-rn"]
    assert out.exists()
