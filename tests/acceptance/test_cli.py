"""The `clip-lens` command line end to end, on shrunk random-init models (offline, seconds)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from clip_lens.cli import app

SMALL = '{"vision_cfg": {"layers": 2}, "text_cfg": {"layers": 1}}'
REPORT_FILES = {"decomposition.png", "tokens.png", "summary.json", "report.html"}


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def report_dir(runner, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "clip_lens_report"
    args = ["report", "--model", "ViT-B-32", "--n-images", "2", "--seed", "1", "--out", str(out),
            "--config-override", SMALL]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, result


class TestReport:
    def test_report_writes_exactly_the_four_files(self, report_dir):
        out, _ = report_dir
        assert {p.name for p in out.iterdir()} == REPORT_FILES  # no temporary files left behind

    def test_report_summary_sum_check_is_exact(self, report_dir):
        out, _ = report_dir
        summary = json.loads((out / "summary.json").read_text())
        assert summary["sum_check"]["max_relative_error"] < 1e-4
        assert summary["model"] == "ViT-B-32"
        assert summary["random_weights"] is True
        assert summary["cfg"]["n_layers"] == 2
        assert len(summary["layers"]) == 2
        assert len(summary["head_norm_mean"]) == 2 and len(summary["head_norm_mean"][0]) == summary["cfg"]["n_heads"]
        assert len(summary["tokens_image0"]["norms"]) == summary["cfg"]["n_ctx"]

    @pytest.mark.parametrize("name", ["decomposition.png", "tokens.png"])
    def test_report_pngs_are_valid_images(self, report_dir, name):
        out, _ = report_dir
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            assert image.width > 0 and image.height > 0

    def test_report_html_embeds_the_figures(self, report_dir):
        out, _ = report_dir
        page = (out / "report.html").read_text()
        assert page.count("data:image/png;base64,") == 2
        assert "Sum check" in page and "random" in page

    def test_report_says_weights_are_random_and_prints_the_sum_check(self, report_dir):
        out, result = report_dir
        assert "RANDOM weights" in result.output
        assert "max relative error" in result.output
        assert str(out.resolve() / "report.html") in result.output

    def test_report_rewrites_an_existing_folder_with_force(self, runner, report_dir):
        out, _ = report_dir
        args = ["report", "-m", "ViT-B-32", "--n-images", "1", "--out", str(out), "--config-override", SMALL]
        refused = runner.invoke(app, args)
        assert refused.exit_code == 2 and "pass --force" in refused.stderr, refused.output
        result = runner.invoke(app, [*args, "--force"])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "summary.json").read_text())["n_images"] == 1
        assert {p.name for p in out.iterdir()} == REPORT_FILES


class TestErrors:
    def test_unknown_model_exits_2_with_one_line_naming_a_close_match(self, runner, tmp_path):
        result = runner.invoke(app, ["report", "--model", "ViT-B-3", "--out", str(tmp_path / "r")])
        assert result.exit_code == 2
        assert "Traceback" not in result.output
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1
        assert "ViT-B-32" in errors[0]
        assert not (tmp_path / "r").exists()

    def test_unsupported_architecture_exits_2(self, runner, tmp_path):
        result = runner.invoke(app, ["report", "--model", "swin_base_patch4_window7_224", "--out", str(tmp_path / "r")])
        assert result.exit_code == 2
        assert "Swin" in result.stderr

    def test_invalid_config_override_json_exits_2(self, runner, tmp_path):
        result = runner.invoke(app, ["report", "-m", "ViT-B-32", "--out", str(tmp_path), "--config-override", "{bad"])
        assert result.exit_code == 2
        assert "not valid JSON" in result.stderr

    def test_missing_checkpoint_exits_2(self, runner, tmp_path):
        missing = tmp_path / "nope.safetensors"
        args = ["report", "-m", "ViT-B-32", "--pretrained", str(missing), "--out", str(tmp_path / "r")]
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert "nope.safetensors" in result.stderr


class TestModelsAndHooks:
    def test_models_lists_vits_and_convolutional_towers_not_swin(self, runner):
        result = runner.invoke(app, ["models"])
        assert result.exit_code == 0
        names = result.stdout.split()
        assert "ViT-B-32" in names and "RN50" in names and "convnext_base" in names
        assert "swin_base_patch4_window7_224" not in names

    def test_hooks_lists_every_vision_hook_of_the_full_model_per_layer(self, runner):
        result = runner.invoke(app, ["hooks", "--model", "ViT-B-32"])
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert lines[0].startswith("# ViT-B-32 vision tower: 224 hooks, 12 blocks") and "shrunk" not in result.stdout
        names = [line.split()[0] for line in lines if not line.startswith("#")]
        assert names[0] == "hook_embed" and names[-1] == "hook_image_embed"  # forward order
        assert not any(name.startswith("text.") for name in names)
        per_block = [name.split(".", 2)[2] for name in names if name.startswith("blocks.0.")]
        assert len(per_block) == 18 and per_block.index("attn.hook_q") < per_block.index("attn.hook_pattern")
        for layer in range(12):  # every layer, each with the same hooks
            assert [n.split(".", 2)[2] for n in names if n.startswith(f"blocks.{layer}.")] == per_block
        headers = [line[2:] for line in lines[1:] if line.startswith("# ")]
        assert headers == ["before the blocks", *[f"blocks.{i}" for i in range(12)], "after the blocks"]
        shapes = {line.split()[0]: line.split(None, 1)[1] for line in lines if not line.startswith("#")}
        assert shapes["blocks.11.attn.hook_pattern"] == "[1, 12, 50, 50]"  # batch, head, query, key
        assert shapes["blocks.11.mlp.hook_post"] == "[1, 50, 3072]"

    @pytest.mark.parametrize("tower", ["vision", "text"])
    def test_hooks_of_toy_shapes_are_every_hook_of_the_model(self, runner, tower):
        from clip_lens import HookedCLIP

        model = HookedCLIP.from_pretrained("toy-shapes")
        result = runner.invoke(app, ["hooks", "--model", "toy-shapes", "--tower", tower])
        assert result.exit_code == 0, result.output
        names = [line.split()[0] for line in result.stdout.splitlines() if not line.startswith("#")]
        expected = [name for name in model.hook_dict if name.startswith("text.") == (tower == "text")]
        assert sorted(names) == sorted(expected)
        assert "not run" not in result.stdout  # a plain forward reaches every hook
        n_layers = (model.text.cfg if tower == "text" else model.cfg).n_layers
        prefix = "text." if tower == "text" else ""
        assert f"# {prefix}blocks.{n_layers - 1}" in result.stdout

    def test_hooks_text_tower_lists_text_hooks_only(self, runner):
        result = runner.invoke(app, ["hooks", "--model", "ViT-B-32", "--tower", "text"])
        assert result.exit_code == 0, result.output
        names = [line.split()[0] for line in result.stdout.splitlines() if not line.startswith("#")]
        assert names and all(name.startswith("text.") for name in names)
        assert "text.blocks.11.attn.hook_pattern" in names and names[-1] == "text.hook_text_embed"

    def test_hooks_unknown_tower_exits_2(self, runner):
        result = runner.invoke(app, ["hooks", "--model", "ViT-B-32", "--tower", "audio"])
        assert result.exit_code == 2


class TestAtomicWrites:
    def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(self, tmp_path, monkeypatch):
        import os

        from clip_lens.files import atomic_write

        target = tmp_path / "summary.json"
        atomic_write(target, "old")

        def crash(fd):
            raise OSError("disk full")

        monkeypatch.setattr(os, "fsync", crash)
        with pytest.raises(OSError, match="disk full"):
            atomic_write(target, "new")
        assert target.read_text() == "old"
        assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@pytest.mark.parametrize("command", [[], ["report"], ["collect"], ["sae", "train"], ["app"]])
def test_help_imports_no_heavy_package(command):
    """`clip-lens … --help` starts fast because it imports neither torch nor open_clip, matplotlib or
    zarr (start-up time itself is measured by benchmarks/bench_cli_startup.py)."""
    code = (
        "import sys\nfrom clip_lens.cli import app\n"
        f"try:\n    app({command + ['--help']!r})\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'open_clip', 'matplotlib', 'zarr', 'starlette') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout[-500:]
