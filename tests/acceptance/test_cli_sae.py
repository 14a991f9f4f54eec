"""`clip-lens sae train`, `clip-lens sae inspect` and `clip-lens report --sae` end to end on the bundled
toy-shapes model (offline, tiny SAEs), checked against the library calls they stand for, and their
one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clip_lens import HookedCLIP
from clip_lens.cli import app
from clip_lens.collect import shapes_world_images
from clip_lens.feature_report import rank_features
from clip_lens.sae import SAE, ActivationSource, SAEConfig, evaluate_sae, load_sae, save_sae, train_sae
from clip_lens.sae.naming import name_features, top_activating
from tests.helpers import ok, one_line_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOK = "blocks.3.hook_resid_post"
PNG = b"\x89PNG\r\n\x1a\n"


def train_args(out, **changes) -> list:
    """A tiny run: 32 scenes, patch tokens (64 rows per image), 30 steps of 64 rows."""
    options = {"--hook": HOOK, "--positions": "patches", "--shapes": 32, "--seed": 5, "--d-sae": 32, "--k": 4,
               "--steps": 30, "--token-batch": 64, "--batch-size": 16, "--checkpoint-every": 10,
               "--eval-images": 64, "--out": out}
    options.update(changes)
    args = ["sae", "train", "-m", "toy-shapes"]  # this file checks against toy-shapes (default: toy-shapes-v2, issue 31)
    for option, value in options.items():
        if value is not None:
            args += [option, value]
    return args


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def toy(one_torch_thread) -> HookedCLIP:
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def trained(runner, tmp_path_factory, one_torch_thread):
    """`sae train` killed at step 15 (last checkpoint: step 10), then the same command again."""
    import clip_lens.sae.train as training

    root = tmp_path_factory.mktemp("sae")
    train = training.train_sae

    def killed_at_15(*args, **kwargs):
        def callback(step, metrics):  # called after each step (and its checkpoint)
            if step == 15:
                raise RuntimeError("killed")

        return train(*args, callback=callback, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "train_sae", killed_at_15)
        killed = runner.invoke(app, [str(a) for a in train_args(root / "sae")])
    assert isinstance(killed.exception, RuntimeError), killed.output
    assert not (root / "sae" / "cfg.json").exists() and (root / "sae" / "train.json").exists()
    resumed = ok(runner, train_args(root / "sae"))
    return root, killed, resumed


@pytest.fixture(scope="module")
def inspected(runner, trained):
    root = trained[0]
    result = ok(runner, ["sae", "inspect", root / "sae", "--shapes", 48, "--top-features", 4, "--k", 5,
                         "--out", root / "inspect"])
    return root / "inspect", result


# --- sae train -----------------------------------------------------------------------------------
class TestTrain:
    def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(self, trained, toy):
        root, killed, resumed = trained
        assert (root / "sae" / "training" / "checkpoint.pt").is_file()
        assert "resumed from step 10" in resumed.stdout
        record = json.loads((root / "sae" / "train.json").read_text())
        assert record["source"]["buffer_size"] == 2048  # default: the data set's 32 x 64 rows
        source = ActivationSource(toy, shapes_world_images(32, 5, 64), HOOK, positions="patches", batch_size=16,
                                  buffer_size=2048, token_batch=64, seed=0)
        uninterrupted = train_sae(source, 32, architecture="topk", k=4, steps=30, seed=0, progress=False).sae
        saved = load_sae(root / "sae")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(saved, name), getattr(uninterrupted, name)), name

    def test_the_saved_sae_is_the_one_training_returned(self, trained):
        root = trained[0]
        saved, returned = load_sae(root / "sae"), load_sae(root / "sae" / "training" / "sae")
        assert saved.cfg.hook_name == HOOK and saved.cfg.architecture == "topk" and saved.cfg.k == 4
        assert (saved.cfg.d_in, saved.cfg.d_sae) == (128, 32)
        assert saved.cfg.model_name == "toy-shapes"
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(saved, name), getattr(returned, name)), name

    def test_metrics_json_is_evaluate_sae_of_the_saved_sae(self, trained, toy):
        root, _, resumed = trained
        metrics = json.loads((root / "sae" / "metrics.json").read_text())
        expected = evaluate_sae(toy, load_sae(root / "sae"), n_images=64)
        assert metrics["n_rows"] == expected.n_rows == 64 * 64  # 64 held-out scenes x 64 patches
        for key in ("explained_variance", "mse", "l0", "dead_fraction"):
            assert metrics[key] == pytest.approx(getattr(expected, key), abs=1e-9), key
        assert metrics["zero_shot"] == pytest.approx(expected.zero_shot, abs=1e-12)
        assert metrics["zero_shot_clean"] == pytest.approx(expected.zero_shot_clean, abs=1e-12)
        assert 0 < metrics["explained_variance"] <= 1 and 0 < metrics["l0"] <= 4 and 0 <= metrics["dead_fraction"] < 1
        assert set(metrics["zero_shot"]) == {"colour", "shape", "size", "position", "background"}
        assert all(0 <= v <= 1 for v in [*metrics["zero_shot"].values(), *metrics["zero_shot_clean"].values()])
        assert metrics["resumed_from"] == 10 and metrics["steps"] == 30
        assert f"explained variance  {metrics['explained_variance']:.4f}" in resumed.stdout
        assert f"L0                  {metrics['l0']:.2f}" in resumed.stdout
        assert "zero-shot accuracy, SAE spliced / clean: colour" in resumed.stdout

    def test_progress_goes_to_stderr(self, trained):
        assert "train SAE on blocks.3.hook_resid_post" in trained[2].stderr
        assert "train SAE" not in trained[2].stdout

    def test_rerunning_with_other_settings_is_refused(self, runner, trained):
        root = trained[0]
        one_line_error(runner, train_args(root / "sae", **{"--steps": 40}), "--steps 30 there, 40 now", "another --out")
        one_line_error(runner, train_args(root / "sae", **{"--architecture": "batchtopk"}),
                       "--architecture 'topk' there, 'batchtopk' now")

    def test_a_run_killed_before_its_first_checkpoint_leaves_the_folder_free(self, runner, tmp_path):
        import clip_lens.sae.train as training

        train = training.train_sae

        def killed_at_5(*args, **kwargs):
            def callback(step, metrics):
                if step == 5:
                    raise RuntimeError("killed")

            return train(*args, callback=callback, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(training, "train_sae", killed_at_5)
            killed = runner.invoke(app, [str(a) for a in train_args(tmp_path / "run", **{"--steps": 12})])
        assert isinstance(killed.exception, RuntimeError)
        assert not (tmp_path / "run" / "train.json").exists()
        result = ok(runner, train_args(tmp_path / "run", **{"--steps": 6, "--d-sae": 16}))
        assert "6 steps of 64 rows." in result.stdout and "resumed" not in result.stdout
        assert load_sae(tmp_path / "run").cfg.d_sae == 16

    def test_an_out_that_is_a_file_or_holds_other_things_is_refused(self, runner, tmp_path):
        (tmp_path / "file").write_text("x")
        one_line_error(runner, train_args(tmp_path / "file"), "is a file")
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("x")
        one_line_error(runner, train_args(tmp_path / "other"), "already holds other files", "new or empty folder")
        sae_dir = tmp_path / "foreign"
        save_sae(SAE(SAEConfig(d_in=128, d_sae=8, architecture="topk", k=2, hook_name=HOOK)), sae_dir)
        one_line_error(runner, train_args(sae_dir), "SAE that `clip-lens sae train` did not write")

    @pytest.mark.parametrize("changes, expected", [
        ({"--hook": "blocks.9.hook_resid_post"}, ["No hook named 'blocks.9.hook_resid_post'", "Did you mean"]),
        ({"--hook": "text.blocks.0.hook_resid_post"}, ["text-tower hook"]),
        ({"--d-sae": 0}, ["--d-sae must be at least 1"]),
        ({"--k": 64}, ["--k must be between 1 and --d-sae (32)"]),
        ({"--steps": "many"}, ["Invalid value for '--steps'", "clip-lens sae train --help"]),
        ({"--out": None}, ["Missing option '--out'"]),
        ({"--architecture": "gated"}, ["--architecture must be one of topk, batchtopk, relu"]),
        ({"--architecture": "relu", "--k": None}, ["needs --l1"]),
        ({"--l1": 0.5}, ["drop --l1"]),
        ({"--lr": -1}, ["--lr must be a positive number"]),
        ({"--positions": "middle"}, ["--positions must be one of"]),
        ({"--images": "somewhere"}, ["exactly one image source"]),
        ({"--images": "somewhere", "--shapes": None}, ["--images somewhere is not a folder"]),
        ({"--token-batch": 64, "--buffer-size": 100}, ["at most half of --buffer-size"]),
        ({"--matryoshka": "8,x"}, ["--matryoshka must be comma-separated sizes"]),
        ({"--matryoshka": "16,8"}, ["--matryoshka sizes must increase and lie in 1..31"]),
        ({"--matryoshka": "8,32"}, ["--matryoshka sizes must increase and lie in 1..31"]),
    ])
    def test_bad_inputs_give_one_error_line(self, runner, tmp_path, changes, expected):
        one_line_error(runner, train_args(tmp_path / "run", **changes), *expected)
        assert not (tmp_path / "run" / "train.json").exists()


    def test_matryoshka_prefixes_reach_the_trainer(self, runner, tmp_path):
        out = tmp_path / "nested"
        result = runner.invoke(app, train_args(out, **{"--matryoshka": "8,16", "--steps": 5}))
        assert result.exit_code == 0, result.output
        training = load_sae(out).cfg.metadata["clip_lens_training"]
        assert training["args"]["matryoshka"] == [8, 16]
        assert json.loads((out / "train.json").read_text())["settings"]["matryoshka"] == [8, 16]


# --- sae inspect ---------------------------------------------------------------------------------
class TestInspect:
    def test_features_json_agrees_with_a_direct_top_activating_call(self, inspected, trained, toy):
        out, _ = inspected
        summary = json.loads((out / "features.json").read_text())
        features = [row["feature"] for row in summary["features"]]
        direct = top_activating(toy, load_sae(trained[0] / "sae"), shapes_world_images(48, 1000, 64), k=5,
                                features=features)
        assert summary["n_images"] == 48 and summary["k"] == 5 and summary["positions"] == "patches"
        for r, row in enumerate(summary["features"]):
            fired = [(int(i), float(v)) for i, v in zip(direct.indices[r], direct.values[r]) if i >= 0 and v > 0]
            assert row["top_indices"] == [i for i, _ in fired]
            assert row["top_values"] == pytest.approx([v for _, v in fired], rel=1e-6)
            assert row["top_ids"] == [str(i) for i, _ in fired]  # shapes-world scene indices
            assert row["frequency"] == pytest.approx(float(direct.frequency[r]))
            assert row["max_activation"] == pytest.approx(float(direct.values[r, 0]), rel=1e-6)

    def test_default_choice_is_the_documented_ranking(self, inspected, trained, toy):
        summary = json.loads((inspected[0] / "features.json").read_text())
        every = top_activating(toy, load_sae(trained[0] / "sae"), shapes_world_images(48, 1000, 64), k=1)
        chosen = [row["feature"] for row in summary["features"]]
        assert summary["selection"] == "ranked" and len(chosen) == 4
        assert chosen == rank_features(every.frequency, 4)
        frequency = every.frequency.tolist()
        assert summary["dead"] == sum(f == 0 for f in frequency) and summary["alive"] == 32 - summary["dead"]
        selective = sorted((f for f in frequency if 0 < f <= 0.5), reverse=True)
        if len(selective) >= 4:  # the most frequent of the features firing on at most half of the images
            assert [frequency[i] for i in chosen] == selective[:4]

    def test_names_are_the_nearest_bank_texts_through_the_read_out(self, inspected, trained, toy):
        summary = json.loads((inspected[0] / "features.json").read_text())
        features = [row["feature"] for row in summary["features"]]
        names = name_features(toy, load_sae(trained[0] / "sae"), "shapes-attributes", top=5, features=features)
        assert summary["bank"] == "shapes-attributes" and summary["readout"] == "exact" and summary["names_note"] is None
        for row in summary["features"]:
            expected = names.top(row["feature"])
            assert [t for t, _ in row["names"]] == [t for t, _ in expected]
            assert [s for _, s in row["names"]] == pytest.approx([s for _, s in expected], abs=1e-6)

    def test_writes_a_dashboard_per_feature_and_a_self_contained_page(self, inspected):
        out, result = inspected
        summary = json.loads((out / "features.json").read_text())
        for row in summary["features"]:
            data = (out / row["dashboard"]).read_bytes()
            assert data.startswith(PNG)
            assert Image.open(out / row["dashboard"]).size[0] > 100
            assert f"feature {row['feature']:>5}  fires on" in result.stdout
        page = (out / "features.html").read_text()
        assert page.count("data:image/png;base64,") == 4 and "<h2>Features</h2>" in page
        assert summary["features"][0]["names"][0][0] in page
        assert "src=\"http" not in page

    def test_chosen_features_without_names(self, runner, trained, tmp_path):
        ok(runner, ["sae", "inspect", trained[0] / "sae", "--shapes", 8, "--features", "3,0", "--k", 2,
                    "--bank", "none", "--out", tmp_path / "f"])
        summary = json.loads((tmp_path / "f" / "features.json").read_text())
        assert [row["feature"] for row in summary["features"]] == [3, 0]
        assert summary["selection"] == "given" and summary["bank"] is None
        assert all(row["names"] is None for row in summary["features"])
        assert sorted(p.name for p in (tmp_path / "f").glob("*.png")) == ["sae_feature_0.png", "sae_feature_3.png"]

    def test_the_images_of_a_store(self, runner, trained, toy, tmp_path):
        from clip_lens.collect import collect

        collect(toy, shapes_world_images(16, 7, 64), tmp_path / "store", heads=None, chunk_size=16, progress=False)
        one_line_error(runner, ["sae", "inspect", trained[0] / "sae", "--store", tmp_path / "store",
                                "--out", tmp_path / "store" / "features"], "inside the --store folder")
        ok(runner, ["sae", "inspect", trained[0] / "sae", "--store", tmp_path / "store", "--features", "1,2",
                    "--k", 3, "--out", tmp_path / "f"])
        summary = json.loads((tmp_path / "f" / "features.json").read_text())
        direct = top_activating(toy, load_sae(trained[0] / "sae"), shapes_world_images(16, 7, 64), k=3, features=[1, 2])
        assert summary["n_images"] == 16 and summary["images"].startswith("images of store")
        for r, row in enumerate(summary["features"]):
            fired = [int(i) for i, v in zip(direct.indices[r], direct.values[r]) if i >= 0 and v > 0]
            assert row["top_indices"] == fired

    def test_a_hook_that_cannot_be_named_still_gets_dashboards(self, runner, toy, tmp_path):
        """mlp.hook_post does not write into the residual stream: no names (a note), or an error
        when a bank is asked for explicitly."""
        cfg = SAEConfig(d_in=toy.cfg.d_mlp, d_sae=8, architecture="topk", k=2, hook_name="blocks.1.mlp.hook_post",
                        model_name="toy-shapes")
        sae = SAE(cfg)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(cfg.d_in, cfg.d_sae, generator=generator))
            sae.W_dec.copy_(torch.randn(cfg.d_sae, cfg.d_in, generator=generator))
        save_sae(sae, tmp_path / "mlp")
        result = ok(runner, ["sae", "inspect", tmp_path / "mlp", "--shapes", 8, "--top-features", 2, "--k", 2,
                             "--out", tmp_path / "f"])
        assert "Note: the features are not named" in result.stderr
        summary = json.loads((tmp_path / "f" / "features.json").read_text())
        assert "residual stream" in summary["names_note"] and summary["readout"] is None
        assert len(summary["features"]) == 2 and all(row["names"] is None for row in summary["features"])
        assert "Features are not named" in (tmp_path / "f" / "features.html").read_text()
        one_line_error(runner, ["sae", "inspect", tmp_path / "mlp", "--shapes", 8, "--bank", "shapes",
                                "--out", tmp_path / "g"], "cannot name these features", "--bank none")

    def test_bad_inputs_give_one_error_line(self, runner, trained, tmp_path):
        sae_dir = trained[0] / "sae"
        cases = [
            (["--out", sae_dir], ["is the SAE folder"]),
            (["--out", tmp_path / "x", "--features", "1,a"], ["--features must be comma-separated"]),
            (["--out", tmp_path / "x", "--features", "1", "--top-features", 2], ["not both"]),
            (["--out", tmp_path / "x", "--k", 0], ["--k must be at least 1"]),
            (["--out", tmp_path / "x", "--bank", tmp_path / "missing.txt"], ["missing.txt"]),
        ]
        for extra, expected in cases:
            one_line_error(runner, ["sae", "inspect", sae_dir, "--shapes", 8, *extra], *expected)
        one_line_error(runner, ["sae", "inspect", sae_dir, "--out", tmp_path / "x"], "exactly one image source")
        one_line_error(runner, ["sae", "inspect", tmp_path / "nothing", "--shapes", 8, "--out", tmp_path / "x"],
                       "SAE folder not found")
        folder = tmp_path / "images"
        folder.mkdir()
        one_line_error(runner, ["sae", "inspect", sae_dir, "--images", folder, "--out", folder / "dash"],
                       "inside the --images folder")
        one_line_error(runner, ["sae", "inspect", sae_dir, "--shapes", 8, "--features", "99", "--out", tmp_path / "x"],
                       "features [99] are out of range", "0..31")
        text_sae = tmp_path / "text_sae"
        save_sae(SAE(SAEConfig(d_in=128, d_sae=8, architecture="topk", k=2, hook_name="text.blocks.0.hook_resid_post",
                               model_name="toy-shapes")), text_sae)
        one_line_error(runner, ["sae", "inspect", text_sae, "--shapes", 8, "--out", tmp_path / "x"], "text-tower hook")
        other = tmp_path / "gpt2_sae"
        save_sae(SAE(SAEConfig(d_in=128, d_sae=8, architecture="topk", k=2, hook_name=HOOK, model_name="gpt2")), other)
        one_line_error(runner, ["sae", "inspect", other, "--shapes", 8, "--out", tmp_path / "x"],
                       "records the model 'gpt2'", "pass --model")
        one_line_error(runner, ["sae", "inspect", other, "--model", "ViT-B-32", "--shapes", 8, "--out", tmp_path / "x"],
                       "width")
        assert not (tmp_path / "x").exists()


# --- report --sae --------------------------------------------------------------------------------
class TestReport:
    @pytest.mark.slow  # a whole report (3.8 s); the default suite stays under 5 minutes
    def test_report_with_sae_has_a_features_section(self, runner, trained, tmp_path):
        sae_dir = trained[0] / "sae"
        ok(runner, ["report", "--model", "toy-shapes", "--out", tmp_path / "r", "--n-images", 2, "--head-images", 0, "--sae", sae_dir])
        summary = json.loads((tmp_path / "r" / "summary.json").read_text())
        features = summary["features"]
        assert features["sae_dir"] == str(sae_dir.resolve()) and features["hook_name"] == HOOK
        assert features["n_images"] == 256 and features["selection"] == "ranked"
        assert len(features["features"]) == 8
        assert all(row["names"] and row["frequency"] > 0 for row in features["features"])
        page = (tmp_path / "r" / "report.html").read_text()
        assert "<h2>Features</h2>" in page
        for row in features["features"]:
            assert f'id="feature-{row["feature"]}"' in page
            assert (tmp_path / "r" / row["dashboard"]).read_bytes().startswith(PNG)

    def test_report_without_sae_is_unchanged(self, runner, tmp_path):
        ok(runner, ["report", "--out", tmp_path / "r", "--n-images", 1, "--head-images", 0])
        assert "features" not in json.loads((tmp_path / "r" / "summary.json").read_text())
        assert "<h2>Features</h2>" not in (tmp_path / "r" / "report.html").read_text()
        assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
            "decomposition.png", "report.html", "summary.json", "tokens.png"]

    def test_report_with_a_missing_sae_fails_before_the_model(self, runner, tmp_path):
        one_line_error(runner, ["report", "--out", tmp_path / "r", "--sae", tmp_path / "none"], "SAE folder not found")
        assert not (tmp_path / "r").exists()


def test_feature_ranking_puts_selective_features_first():
    frequency = torch.tensor([0.0, 0.9, 0.2, 0.5, 0.6, 0.2, 0.05])
    assert rank_features(frequency, 10) == [3, 2, 5, 6, 4, 1]
    assert rank_features(frequency, 2) == [3, 2]
    assert rank_features(torch.zeros(4), 3) == []
