"""Issue 31 ("a new user's first hour"), the CLI items: a store is never queried with other weights
(random weights included), `neighbors` takes one kind of query, one default model and bank, `segment`
maps a plain folder of photos, the offline-weights error names `--pretrained`, and `clip-lens models`
answers without importing torch, with the same output as open_clip's own functions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clip_lens import HookedCLIP, analyses
from clip_lens.cli import DEFAULT_MODEL, app

STEP250 = Path(__file__).resolve().parents[2] / "clip_lens" / "toy" / "weights" / "toy-shapes-step250.safetensors"


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def ok(runner: CliRunner, args: list) -> object:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def one_line_error(runner: CliRunner, args: list, *parts: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert lines[-1].startswith("error: ") and not any(line.startswith("Traceback") for line in lines), result.output
    for part in parts:
        assert part in lines[-1], (part, lines[-1])
    return lines[-1]


@pytest.fixture(scope="module")
def toy_store(runner, tmp_path_factory) -> Path:
    """24 scenes through the bundled toy-shapes (its bundled weights)."""
    store = tmp_path_factory.mktemp("first_hour") / "store"
    ok(runner, ["collect", "-m", "toy-shapes", "--shapes", 24, "--seed", 3101, "--chunk-size", 24, "--out", store])
    return store


# --- item 2: a store is only read with the weights it was collected with -------------------------------------


def test_a_store_is_refused_with_other_weights_of_the_same_model(runner, toy_store, tmp_path):
    out = tmp_path / "n.json"
    args = ["-s", toy_store, "-m", "toy-shapes", "--pretrained", STEP250, "--text", "a red shape", "--head", "L3H0"]
    line = one_line_error(runner, ["neighbors", *args, "--out", out], "collected with other weights of toy-shapes",
                          "pass --model toy-shapes without --pretrained")
    assert not out.exists() and not out.with_suffix(".png").exists()
    assert "--pretrained" in line
    # spans and sae inspect pair a store with a model the same way, and refuse the same way
    one_line_error(runner, ["spans", "-s", toy_store, "-m", "toy-shapes", "--pretrained", STEP250, "--out", tmp_path / "s.json"],
                   "collected with other weights of toy-shapes")
    # the model name is checked first, naming the store's
    one_line_error(runner, ["neighbors", "-s", toy_store, "-m", "toy-shapes-v2", "--text", "a red shape", "--out", out],
                   "collected with model 'toy-shapes'", "pass --model toy-shapes")


def test_sae_inspect_and_app_refuse_a_store_of_other_weights(runner, toy_store, tmp_path):
    from clip_lens.sae import SAE, SAEConfig, save_sae

    sae_dir = tmp_path / "sae"
    cfg = SAEConfig(d_in=128, d_sae=8, hook_name="blocks.3.hook_resid_post", architecture="standard",
                    model_name="toy-shapes")
    save_sae(SAE(cfg), sae_dir)
    one_line_error(runner, ["sae", "inspect", sae_dir, "--store", toy_store, "-m", "toy-shapes", "--pretrained", STEP250,
                            "--bank", "none", "--out", tmp_path / "f"], "collected with other weights of toy-shapes")
    one_line_error(runner, ["app", "--store", toy_store, "-m", "toy-shapes", "--pretrained", STEP250, "--port", 0],
                   "collected with other weights of toy-shapes")


def test_a_store_of_random_weights_is_refused_with_the_fix(runner, tmp_path):
    """The issue's case: `collect --model X` without --pretrained, queried by another process. Random
    weights differ in every process (here: two builds), so the store can never be queried again."""
    store = tmp_path / "random"
    collected = ok(runner, ["collect", "-m", "ViT-S-32-alt", "--shapes", 2, "--heads", "11", "--out", store])
    assert "RANDOM weights" in collected.output
    result = runner.invoke(app, ["neighbors", "-s", str(store), "-m", "ViT-S-32-alt", "--text", "a red shape",
                                 "--head", "L11H0", "--out", str(tmp_path / "n.json")])
    assert result.exit_code == 2, result.output
    assert "Note: no --pretrained given, so ViT-S-32-alt has RANDOM weights." in result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("error: ") and "RANDOM weights" in error and "collect it again with --pretrained" in error


def test_neighbor_scores_keep_three_significant_digits(runner, toy_store, tmp_path):
    out = tmp_path / "n.json"
    printed = ok(runner, ["neighbors", "-s", toy_store, "-m", "toy-shapes", "--text", "a red shape", "--head", "L3H0",
                          "--k", 4, "--out", out]).stdout
    line = next(line for line in printed.splitlines() if line.startswith("a red shape: "))
    shown = [float(value) for value in re.findall(r"\(([^)]+)\)", line)]
    saved = json.loads(out.read_text())
    scores = np.asarray(saved["scores"], dtype=float).reshape(-1)
    assert len(shown) == len(scores) == 4
    for value, score in zip(shown, scores):  # each within half a unit of its third significant digit
        assert abs(value - score) <= 0.5 * 10 ** (np.floor(np.log10(abs(score))) - 2) + 1e-12, (value, score)


# --- item 3: one kind of query per run ----------------------------------------------------------------------


def test_neighbors_refuses_text_and_image_together(runner, toy_store, tmp_path):
    picture = tmp_path / "q.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(picture)
    out = tmp_path / "n.json"
    one_line_error(runner, ["neighbors", "-s", toy_store, "-m", "toy-shapes", "--text", "a red shape", "--image", picture,
                            "--out", out], "give --text or --image, not both")
    one_line_error(runner, ["neighbors", "-s", toy_store, "-m", "toy-shapes", "--out", out], "give a query")
    assert not out.exists() and not out.with_suffix(".png").exists()


# --- item 6: one default model and one default bank -----------------------------------------------------------


def _commands(group, path=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_command_defaults_to_the_same_model():
    import typer

    click_app = typer.main.get_command(app)
    defaults = {}
    for path, command in _commands(click_app):
        for param in command.params:
            if param.name == "model" and param.default is not None and not param.required:
                defaults[" ".join(path)] = param.default
    assert set(defaults) >= {"report", "app", "segment", "segment-eval", "mi", "sae train"}, defaults
    assert set(defaults.values()) == {DEFAULT_MODEL} == {"toy-shapes-v2"}, defaults


def test_spans_defaults_to_the_reports_bank(runner, toy_store, tmp_path):
    """`spans` labels heads with the bank the report's head analyses use (shapes-attributes), so a head's
    label is the same in both; measured on the store's own model."""
    out = tmp_path / "spans.json"
    ok(runner, ["spans", "-s", toy_store, "-m", "toy-shapes", "--m", 3, "--layers", "3", "--out", out])
    assert json.loads(out.read_text())["bank"] == "shapes-attributes"
    for command in (["spans"], ["report"], ["sae", "inspect"]):  # and every help says so
        text = "".join(CliRunner().invoke(app, [*command, "--help"]).output.split())  # (help wraps at hyphens)
        assert "shapes-attributesfortheshapes-worldmodels" in text, command


# --- item 7: segment maps a plain folder of photos ------------------------------------------------------------


def test_segment_maps_a_plain_folder_of_photos(runner, tmp_path):
    photos = tmp_path / "photos"
    (photos / "trip").mkdir(parents=True)
    rng = np.random.default_rng(31)
    files = [photos / "b.jpg", photos / "a.png", photos / "trip" / "c.png"]
    for path in files:
        Image.fromarray(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "seg.png"
    printed = ok(runner, ["segment", "-m", "toy-shapes-v2", "--images", photos, "--text", "a red shape", "--head", "L3H0",
                          "--out", out]).stdout
    assert "Heatmaps of 3 images" in printed and out.read_bytes().startswith(b"\x89PNG")
    saved = json.loads(out.with_suffix(".json").read_text())
    # recomputed from the files, preprocessed here, in the folder's sorted recursive order
    model = HookedCLIP.from_pretrained("toy-shapes-v2")
    order = sorted(files)
    pixels = torch.stack([model.preprocess(Image.open(path).convert("RGB")) for path in order])
    expected = analyses.get("segmentation")(model).run(pixels, "a red shape", head="L3H0")
    grid = np.asarray(saved["grid"], dtype=float)
    assert grid.shape[0] == 3
    np.testing.assert_allclose(grid, expected.grid.numpy().reshape(grid.shape), rtol=1e-4, atol=1e-6)
    assert not np.allclose(grid[0], grid[1])  # three different photos, not one repeated


# --- item 10: messages and `clip-lens models` -----------------------------------------------------------------


def test_offline_weights_error_names_the_cli_option(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    line = one_line_error(runner, ["collect", "-m", "ViT-B-32", "-p", "laion2b_s34b_b79k", "--shapes", 1,
                                   "--out", tmp_path / "st"], "not in the local cache", "--pretrained PATH")
    assert "pretrained=" not in line and "from_pretrained" not in line


def test_models_reads_the_files_with_the_output_of_open_clip():
    """The file reader (no torch) against open_clip's own functions (the slow path)."""
    from clip_lens import catalog
    from clip_lens.loading import list_models, model_coverage

    def read(include_unsupported=False):
        return [*catalog._bundled_names(), *[name for name, config in catalog.open_clip_configs().items()
                                             if include_unsupported or catalog.fast_unsupported_feature(config) is None]]

    assert read() == list_models()
    assert read(True) == list_models(include_unsupported=True)
    tags = catalog.pretrained_tags()
    fast = [(name, catalog.fast_unsupported_feature(config), len(tags.get(name, [])))
            for name, config in catalog.open_clip_configs().items()]
    assert fast == [(row.name, row.reason, row.n_tags) for row in model_coverage()]
    # the recorded timm verdicts are what timm's structural check says (recomputed here)
    for timm_name, verdict in catalog.TIMM_CHECKED.get(catalog._distribution_version("timm"), {}).items():
        assert catalog.timm_tower_problem(timm_name) == verdict, timm_name
    assert "safetensors.torch" not in sys.modules or sys.modules["safetensors.torch"] is not None


def test_models_command_imports_no_torch_and_prints_the_list(tmp_path):
    from clip_lens.loading import list_models, model_coverage

    script = ("import sys, time\nfrom typer.testing import CliRunner\nfrom clip_lens.cli import app\n"
              "t = time.perf_counter()\nfor args in (['models'], ['models', '--all']):\n"
              "    r = CliRunner().invoke(app, args)\n    assert r.exit_code == 0, r.output\n"
              "    sys.stdout.write(r.output + '\\x00')\n"
              "sys.stdout.write(repr((time.perf_counter() - t, 'torch' in sys.modules, 'open_clip' in sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    plain, full, stats = done.stdout.split("\x00")
    seconds, torch_imported, open_clip_imported = eval(stats)  # noqa: S307 - our own repr
    assert not torch_imported and not open_clip_imported
    assert seconds < 5  # measured 0.1 s (12 s when open_clip was imported)
    assert plain.splitlines() == list_models()
    rows = model_coverage()
    width = max(len(row.name) for row in rows)
    expected = [f"{row.name:<{width}}  {row.n_tags:>2} tags  {row.reason or 'supported'}" for row in rows]
    assert full.splitlines()[:-1] == expected
