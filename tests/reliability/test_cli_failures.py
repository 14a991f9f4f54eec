"""Every `clip-lens` command that writes, driven into the failures of a real machine: an output path
under a regular file, a read-only folder, a file where a folder goes (and the reverse), an existing
output without --force, an output that is an input, a full disk at write time; and bad image files
(missing, corrupt, header-only, truncated, decompression bombs, odd modes). Each failure must end in
exit status 2 and exactly one ``error:`` line, with every input file unchanged.

Offline and small (the bundled toy-shapes model, a handful of scenes). Read-only folders: ``chmod``
where it is enforced; as root (where it is not), creating files inside the folder is refused by
patching ``tempfile.mkstemp``, the one way clip_lens creates files (the output check's probe and
:func:`clip_lens.files.atomic_write`). A full disk: ``os.fsync`` raises ``ENOSPC`` inside
``atomic_write``, after the command's work.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clip_lens.cli import app
from clip_lens.toy.world import ShapesWorld
from tests.helpers import ok

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOY = ["--model", "toy-shapes"]
HOOK = "blocks.3.hook_resid_post"
PNG = b"\x89PNG\r\n\x1a\n"


# --- the workspace: every input of every command, built once ---------------------------------------
@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def ws(runner, tmp_path_factory, one_torch_thread) -> SimpleNamespace:
    from clip_lens.sae import SAE, SAEConfig, save_sae

    root = tmp_path_factory.mktemp("cli_failures")
    inputs = root / "inputs"
    inputs.mkdir()
    w = SimpleNamespace(root=root, inputs=inputs, store=inputs / "store", sae=inputs / "sae", imgs=inputs / "imgs",
                        seg=inputs / "seg", mk=inputs / "mk", q=inputs / "q.png", classes=inputs / "classes.txt")
    ok(runner, ["collect", *TOY, "--shapes", 8, "--chunk-size", 8, "--heads", 3, "--out", w.store])
    ok(runner, ["spans", "--store", w.store, *TOY, "--m", 3, "--layers", 3, "--out", inputs / "spans.json",
                "--labels", inputs / "labels_a.json"])
    table = json.loads((inputs / "labels_a.json").read_text())
    table["model"] = "toy-shapes-b"  # compare needs two models
    (inputs / "labels_b.json").write_text(json.dumps(table))
    w.labels = [inputs / "labels_a.json", inputs / "labels_b.json"]

    world = ShapesWorld(seed=1000, n_objects=1)
    Image.fromarray(world.scene(0).image).save(w.q)
    for sub in ("imgs", "seg/images", "seg/masks", "mk/images"):
        (inputs / sub).mkdir(parents=True)
    labels = {}
    for i in range(3):
        scene = world.scene(i)
        Image.fromarray(scene.image).save(w.imgs / f"{i}.png")
        Image.fromarray(scene.image).save(w.seg / "images" / f"s{i}.png")
        Image.fromarray(scene.object_masks.any(0).astype(np.uint8) * 255).save(w.seg / "masks" / f"s{i}.png")
        Image.fromarray(scene.image).save(w.mk / "images" / f"s{i}.png")
        labels[f"s{i}.png"] = scene.value("shape")
    (w.mk / "labels.json").write_text(json.dumps(labels))
    w.classes.write_text("a red shape\na blue shape\n")
    save_sae(SAE(SAEConfig(d_in=128, d_sae=8, architecture="topk", k=2, hook_name=HOOK, model_name="toy-shapes")), w.sae)
    w.blocker = root / "blocker.txt"  # a regular file: paths "under" it cannot exist
    w.blocker.write_text("a file, not a folder")
    return w


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(runner, ws, args, *expected: str) -> str:
    """Run a command that must fail: exit 2, no traceback, exactly one ``error:`` line holding
    ``expected``, and no input file changed."""
    before = snapshot(ws.inputs)
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for text in expected:
        assert text in errors[0], errors[0]
    assert snapshot(ws.inputs) == before, "an input file changed"
    return errors[0]


# --- the commands that write, each with tiny settings -----------------------------------------------
FILE, FOLDER = "file", "folder"
COMMANDS = {  # name: (what --out is, a file name for it, args with the output path)
    "report": (FOLDER, "r", lambda w, out: ["report", "--n-images", 1, "--head-images", 0, "--out", out]),
    "collect": (FOLDER, "s", lambda w, out: ["collect", *TOY, "--shapes", 2, "--heads", "none", "--out", out]),
    "spans": (FILE, "x.json", lambda w, out: ["spans", "--store", w.store, *TOY, "--m", 3, "--layers", 3, "--out", out]),
    "compare": (FILE, "x.html", lambda w, out: ["compare", *w.labels, "--top-k", 3, "--out", out]),
    "neighbors": (FILE, "x.json", lambda w, out: ["neighbors", "-s", w.store, *TOY, "--text", "a red shape", "--head",
                                                  "L3H0", "--k", 2, "--out", out]),
    "segment": (FILE, "x.png", lambda w, out: ["segment", "--shapes", 1, "--text", "a red shape", "--head", "L1H2",
                                              "--out", out]),
    "segment-eval": (FILE, "x.json", lambda w, out: ["segment-eval", "--shapes", 4, "--out", out]),
    "mi": (FOLDER, "m", lambda w, out: ["mi", "--shapes", 4, "--methods", "pca", "--no-evaluate", "--no-corloc",
                                        "--out", out]),
    "train-toy": (FOLDER, "t", lambda w, out: ["train-toy", "--steps", 1, "--batch-size", 2, "--max-minutes", 0,
                                               "--out", out]),
    "sae train": (FOLDER, "st", lambda w, out: ["sae", "train", "--hook", HOOK, "--positions", "patches", "--shapes", 4,
                                                "--d-sae", 8, "--k", 2, "--steps", 2, "--token-batch", 16,
                                                "--batch-size", 4, "--eval-images", 4, "--out", out]),
    "sae inspect": (FOLDER, "si", lambda w, out: ["sae", "inspect", w.sae, "--shapes", 4, "--top-features", 1, "--k", 2,
                                                  "--out", out]),
}
NAMES = list(COMMANDS)


def command(name: str, ws, out: Path) -> list:
    return COMMANDS[name][2](ws, out)


@contextlib.contextmanager
def read_only(folder: Path, monkeypatch):
    """``folder`` made unwritable: chmod 555 when that is enforced (not as root); otherwise creating
    a file in it fails with EROFS, as on a read-only mount."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    try:
        try:
            fd, probe = tempfile.mkstemp(dir=folder)
        except PermissionError:
            pass  # chmod works here
        else:
            os.close(fd)
            os.unlink(probe)
            real = tempfile.mkstemp

            def mkstemp(*args, dir=None, **kwargs):
                inside = dir is not None and (Path(dir).resolve() == folder.resolve()
                                              or folder.resolve() in Path(dir).resolve().parents)
                if inside:
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
                return real(*args, dir=dir, **kwargs)

            monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        yield folder
    finally:
        folder.chmod(0o755)


# --- output paths, checked before the work ----------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_an_output_under_a_regular_file_is_one_line(runner, ws, name):
    out = ws.blocker / "sub" / COMMANDS[name][1]
    fails(runner, ws, command(name, ws, out), str(ws.blocker), "is a file, not a folder")


@pytest.mark.parametrize("name", NAMES)
def test_a_read_only_folder_is_one_line_before_the_work(runner, ws, name, tmp_path, monkeypatch):
    with read_only(tmp_path / "ro", monkeypatch) as folder:
        out = folder / COMMANDS[name][1]
        fails(runner, ws, command(name, ws, out), str(out), "is not writable")
        assert not out.exists()


@pytest.mark.parametrize("name", NAMES)
def test_an_output_of_the_wrong_kind_is_one_line(runner, ws, name, tmp_path):
    kind, file_name, _ = COMMANDS[name]
    out = tmp_path / file_name
    if kind == FILE:
        out.mkdir()
        fails(runner, ws, command(name, ws, out), str(out), "is a folder")
        assert list(out.iterdir()) == []
    else:
        out.write_text("precious")
        fails(runner, ws, command(name, ws, out), str(out), "is a file")
        assert out.read_text() == "precious"


@pytest.mark.parametrize("name", NAMES)
def test_an_existing_output_is_refused_without_force(runner, ws, name, tmp_path):
    kind, file_name, _ = COMMANDS[name]
    out = tmp_path / file_name
    kept = out / "notes.txt" if kind == FOLDER else out
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text("precious")
    fails(runner, ws, command(name, ws, out), str(out), "--force")
    assert kept.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted({kept.name, out.name})


INPUT_OUTPUTS = {  # name: (args, expected words): an output that is, or is inside, an input
    "report": (lambda w: ["report", "--images", w.imgs, "--n-images", 1, "--out", w.imgs], "is the --images folder"),
    "collect": (lambda w: ["collect", *TOY, "--images", w.imgs, "--out", w.imgs / "store"], "inside the --images folder"),
    "spans": (lambda w: ["spans", "--store", w.store, *TOY, "--out", w.store / "spans.json"], "inside the --store folder"),
    "compare": (lambda w: ["compare", *w.labels, "--top-k", 3, "--out", w.labels[0]], "is the compared result file"),
    "neighbors": (lambda w: ["neighbors", "-s", w.store, *TOY, "--image", w.q, "--head", "L3H0", "--out",
                             w.q.with_suffix(".json")], "is the --image file"),
    "segment": (lambda w: ["segment", "--images", w.seg, "--text", "a red shape", "--out", w.seg / "images" / "s0.png"],
                "inside the --images folder"),
    "segment-eval": (lambda w: ["segment-eval", "--images", w.seg, "--classes", w.classes, "--out",
                                w.seg / "table.json"], "inside the --images folder"),
    "mi": (lambda w: ["mi", "--images", w.mk, "--out", w.mk], "is the --images folder"),
    "sae train": (lambda w: ["sae", "train", "--hook", HOOK, "--images", w.imgs, "--d-sae", 8, "--out", w.imgs],
                  "is the --images folder"),
    "sae inspect": (lambda w: ["sae", "inspect", w.sae, "--shapes", 4, "--out", w.sae], "is the SAE folder"),
}


@pytest.mark.parametrize("name", list(INPUT_OUTPUTS))
def test_an_output_that_is_an_input_is_refused_even_with_force(runner, ws, name):
    args, expected = INPUT_OUTPUTS[name]
    fails(runner, ws, [*args(ws), "--force"], expected)


@pytest.mark.parametrize("name", NAMES)
def test_a_full_disk_at_write_time_is_one_line_and_keeps_the_old_file(runner, ws, name, tmp_path, monkeypatch):
    """The work runs, then the first write fails with ENOSPC: one line naming the path and the fix; a
    file output replaced with --force keeps its old content and no temporary file is left."""
    kind, file_name, _ = COMMANDS[name]
    out = tmp_path / file_name
    if kind == FILE:
        out.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    line = fails(runner, ws, [*command(name, ws, out), "--force"], out.name, "No space left on device", "disk is full")
    assert str(out) in line
    if kind == FILE:
        assert out.read_text() == "old"
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


# --- result and figure pairs, two outputs on one path ----------------------------------------------
def test_segment_out_json_writes_the_figure_and_the_maps_side_by_side(runner, ws, tmp_path):
    ok(runner, COMMANDS["segment"][2](ws, tmp_path / "seg.json"))
    assert (tmp_path / "seg.png").read_bytes().startswith(PNG)
    assert json.loads((tmp_path / "seg.json").read_text())["text"] == "a red shape"


def test_neighbors_out_png_writes_the_result_and_the_figure_side_by_side(runner, ws, tmp_path):
    ok(runner, COMMANDS["neighbors"][2](ws, tmp_path / "nb.png"))
    assert (tmp_path / "nb.png").is_file() and (tmp_path / "nb.png").read_bytes().startswith(PNG)
    assert len(json.loads((tmp_path / "nb.json").read_text())["indices"][0]) == 2


def test_an_out_without_a_known_suffix_is_one_line(runner, ws, tmp_path):
    fails(runner, ws, COMMANDS["neighbors"][2](ws, tmp_path / "nb"), "must end in .json or .png")
    fails(runner, ws, COMMANDS["spans"][2](ws, tmp_path / "spans"), "must be a file name ending in .json")


def test_two_outputs_on_one_path_are_refused(runner, ws, tmp_path):
    out = tmp_path / "x.json"
    fails(runner, ws, [*COMMANDS["spans"][2](ws, out), "--labels", out], "are the same path")
    results = [ws.inputs / "spans.json", ws.inputs / "labels_a.json"]  # never read: the output check comes first
    fails(runner, ws, ["compare", "--analysis", "mutual_knowledge", *results, "--out", tmp_path / "t.png"],
          "are the same path")
    assert not list(tmp_path.iterdir())


def test_force_replaces_a_file_and_a_finished_store(runner, ws, tmp_path):
    from clip_lens.collect import Store

    out = tmp_path / "x.json"
    out.write_text("old")
    ok(runner, [*COMMANDS["spans"][2](ws, out), "--force"])
    assert json.loads(out.read_text())["m"] == 3
    store = tmp_path / "s"
    ok(runner, ["collect", *TOY, "--shapes", 2, "--heads", "none", "--out", store])
    result = ok(runner, ["collect", *TOY, "--shapes", 3, "--heads", "none", "--out", store, "--force"])
    assert "Replaced the finished store" in result.stdout
    assert Store.open(store).n_images == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s", "x.json"]  # no staging folder left


def test_sae_train_force_trains_afresh_over_a_run_with_other_settings(runner, ws, tmp_path):
    from clip_lens.sae import load_sae

    out = tmp_path / "sae"
    args = COMMANDS["sae train"][2](ws, out)
    ok(runner, [*args, "--checkpoint-every", 1])
    changed = [*args, "--d-sae", 16, "--checkpoint-every", 1]
    fails(runner, ws, changed, "other settings", "--force")
    assert load_sae(out).cfg.d_sae == 8
    result = ok(runner, [*changed, "--force"])
    assert "training afresh" in result.stderr and "resumed" not in result.stdout
    assert load_sae(out).cfg.d_sae == 16


# --- image files ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_images")
    png = folder / "ok.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(png)
    jpeg = folder / "ok.jpg"
    Image.new("RGB", (64, 64), (30, 30, 200)).save(jpeg, quality=95)
    files = {
        "missing": folder / "missing.png",
        "corrupt": folder / "corrupt.png",
        "header-only": folder / "header.png",
        "truncated": folder / "truncated.jpg",
        "folder": folder / "sub.png",
        "bomb": folder / "bomb.png",
    }
    files["corrupt"].write_bytes(b"this is not an image at all")
    files["header-only"].write_bytes(png.read_bytes()[:33])  # signature + IHDR, no pixels
    files["truncated"].write_bytes(jpeg.read_bytes()[:400])
    files["folder"].mkdir()
    Image.new("L", (100, 100)).save(files["bomb"])  # a bomb once MAX_IMAGE_PIXELS is lowered below
    return files


SMALL_LIMIT = 1000  # pixels: 100x100 > 2x the limit (PIL's DecompressionBombError), 40x40 between 1x and 2x


@pytest.mark.parametrize("kind, expected", [
    ("missing", "does not exist"), ("corrupt", "is not an image file"), ("header-only", "is not an image file"),
    ("truncated", "truncated or corrupt"), ("folder", "is a folder"), ("bomb", "decompression bomb"),
])
def test_a_bad_query_image_is_one_line_naming_it(runner, ws, bad_images, kind, expected, monkeypatch, tmp_path):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SMALL_LIMIT)
    path = bad_images[kind]
    fails(runner, ws, ["neighbors", "-s", ws.store, *TOY, "--image", path, "--head", "L3H0", "--out", tmp_path / "n.json"],
          f"--image file {path}", expected)
    assert not list(tmp_path.iterdir())


def test_an_image_just_over_the_pixel_limit_is_refused(runner, ws, bad_images, monkeypatch, tmp_path):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SMALL_LIMIT)  # 40x40 = 1600 pixels: PIL only warns, clip_lens refuses
    path = bad_images["corrupt"].with_name("ok.png")
    fails(runner, ws, ["neighbors", "-s", ws.store, *TOY, "--image", path, "--head", "L3H0", "--out", tmp_path / "n.json"],
          str(path), "40x40 = 1600 pixels", "MAX_IMAGE_PIXELS = 1000")


def odd_mode_images(folder: Path) -> list[Path]:
    """1-bit, 16-bit greyscale, CMYK and palette+alpha images of a shapes-world scene."""
    scene = ShapesWorld(seed=1000, n_objects=1).scene(1)
    grey = np.asarray(Image.fromarray(scene.image).convert("L"))
    paths = [folder / "one_bit.png", folder / "sixteen.png", folder / "cmyk.jpg", folder / "rgba.png"]
    Image.fromarray(grey).convert("1").save(paths[0])
    Image.fromarray(grey.astype(np.uint16) * 257).save(paths[1])
    Image.fromarray(scene.image).convert("CMYK").save(paths[2])
    Image.fromarray(scene.image).convert("RGBA").save(paths[3])
    return paths


def test_query_images_in_odd_modes_are_read(runner, ws, tmp_path):
    from clip_lens.files import load_image

    paths = odd_mode_images(tmp_path)
    sixteen = np.asarray(load_image(paths[1]))
    assert sixteen.dtype == np.uint8 and 0 < sixteen.mean() < 255  # scaled, not clipped to white
    args = ["neighbors", "-s", ws.store, *TOY, *[a for p in paths for a in ("--image", p)], "--head", "L3H0", "--k", 2,
            "--out", tmp_path / "n.json"]
    ok(runner, args)
    assert len(json.loads((tmp_path / "n.json").read_text())["indices"]) == 4


def test_collect_skips_unreadable_images_and_counts_them(runner, ws, bad_images, tmp_path, monkeypatch):
    from clip_lens.collect import Store

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # the 100x100 "bomb"; the 40x40 images pass
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (50 * i, 90, 20)).save(folder / f"good{i}.png")
    for kind in ("corrupt", "header-only", "truncated", "bomb"):
        path = bad_images[kind]
        (folder / path.name).write_bytes(path.read_bytes())
    before = snapshot(folder)
    result = ok(runner, ["collect", *TOY, "--images", folder, "--heads", "none", "--out", tmp_path / "s"])
    assert "skipped 4 unreadable images of 6" in result.stderr
    assert all(name in result.stderr for name in ("bomb.png", "corrupt.png", "header.png", "truncated.jpg"))
    assert "2 images in 1 chunks" in result.stdout and "skipped 4 unreadable images" in result.stdout
    store = Store.open(tmp_path / "s")
    assert store.n_images == 6 and store.n_done == 2 and len(store.read("embedding")) == 2
    assert [Path(name).name for name, _ in store.skipped().values()] == ["bomb.png", "corrupt.png", "header.png", "truncated.jpg"]
    assert [Path(i).name for i in store.ids()] == ["good0.png", "good1.png"]
    assert snapshot(folder) == before
    for name in ("good0.png", "good1.png"):
        (folder / name).unlink()
    fails(runner, ws, ["collect", *TOY, "--images", folder, "--out", tmp_path / "t"], "none of the 4 images", "corrupt.png")


def test_collect_reads_tar_shards_skips_a_bad_member_and_runs_in_bf16(runner, ws, bad_images, tmp_path):
    from clip_lens.collect import Store
    from tests.helpers import write_shards

    world = ShapesWorld(seed=1000, n_objects=1)
    images = [Image.fromarray(world.scene(i).image) for i in range(5)]
    images[2] = bad_images["truncated"].read_bytes()
    write_shards(tmp_path / "shards", images, per_shard=2, labels=[7, 8, 9, 10, 11])
    pattern = tmp_path / "shards" / "shard-{000000..000002}.tar"
    result = ok(runner, ["collect", *TOY, "--images", pattern, "--heads", "3", "--precision", "bf16", "--workers", 1,
                         "--chunk-size", 2, "--out", tmp_path / "s"])
    assert "skipped 1 unreadable image of 5: shard-000001.tar/000002" in result.stderr
    assert "4 images in 3 chunks" in result.stdout
    store = Store.open(tmp_path / "s")
    assert store.meta["precision"] == "bf16" and store.read("labels").tolist() == [7, 8, 10, 11]
    fails(runner, ws, ["collect", *TOY, "--images", tmp_path / "shards", "--precision", "fp8", "--out", tmp_path / "t"],
          "--precision must be fp32, bf16 or fp16")
    fails(runner, ws, ["collect", *TOY, "--images", tmp_path / "shards" / "shard-{000000..000009}.tar", "--out", tmp_path / "t"],
          "shard-000003.tar")


@pytest.mark.parametrize("kind", ["corrupt", "truncated"])
def test_segment_eval_names_a_bad_mask(runner, ws, bad_images, kind, tmp_path):
    folder = tmp_path / "seg"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
        for p in (ws.seg / sub).iterdir():
            (folder / sub / p.name).write_bytes(p.read_bytes())
    (folder / "masks" / "s1.png").write_bytes(bad_images[kind].read_bytes())
    fails(runner, ws, ["segment-eval", "--images", folder, "--classes", ws.classes], f"mask {folder / 'masks' / 's1.png'}")


def test_segment_eval_reads_one_bit_and_sixteen_bit_masks(runner, ws, tmp_path):
    folder = tmp_path / "seg"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    for i in range(2):
        (folder / "images" / f"s{i}.png").write_bytes((ws.seg / "images" / f"s{i}.png").read_bytes())
    mask = np.asarray(Image.open(ws.seg / "masks" / "s0.png")) > 0
    Image.fromarray(mask).convert("1").save(folder / "masks" / "s0.png")
    mask = np.asarray(Image.open(ws.seg / "masks" / "s1.png")) > 0
    Image.fromarray(mask.astype(np.uint16) * 40000).save(folder / "masks" / "s1.png")
    ok(runner, ["segment-eval", "--images", folder, "--classes", ws.classes, "--out", tmp_path / "t.json"])
    assert json.loads((tmp_path / "t.json").read_text())["table"]


def test_mi_names_a_bad_image_before_the_work(runner, ws, bad_images, tmp_path):
    folder = tmp_path / "mk"
    (folder / "images").mkdir(parents=True)
    for p in (ws.mk / "images").iterdir():
        (folder / "images" / p.name).write_bytes(p.read_bytes())
    (folder / "labels.json").write_text((ws.mk / "labels.json").read_text())
    (folder / "images" / "s2.png").write_bytes(bad_images["header-only"].read_bytes())
    fails(runner, ws, ["mi", "--images", folder, "--out", tmp_path / "m"], str(folder / "images" / "s2.png"))
    assert not (tmp_path / "m").exists()


# --- models ---------------------------------------------------------------------------------------
def test_hooks_of_a_swin_say_the_architecture_is_unsupported(runner, ws):
    line = fails(runner, ws, ["hooks", "-m", "swin_base_patch4_window7_224"], "Swin", "does not reproduce")
    assert "config_overrides" not in line
