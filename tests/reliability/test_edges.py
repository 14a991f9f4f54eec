"""The edges (issue 27, classes 4 and 5): usage errors in one form for every command, files that are not
regular files (a FIFO hung forever), launcher environments and rendezvous, brace patterns, tar labels, a
folder mixing images and shards, JSON nesting, seeds and scene counts.

Every refusal must be one ``error:`` line (exit status 2) on the command line, a clip_lens error in
Python, and come at once: tests that could hang run under `no_hang`, a SIGALRM that fails the test
instead of blocking the suite. Inputs are hashed before and after where a command reads them.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clip_lens.cli import app
from clip_lens.errors import ClipLensError, InputError
from tests.helpers import ok, one_line_error, tar_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOY = ["--model", "toy-shapes"]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@contextmanager
def no_hang(seconds: int = 20):
    """Fail (instead of hanging) when the block takes longer than ``seconds``: a blocked ``open`` of a
    FIFO is interrupted by the alarm's exception."""

    def alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every regular file below ``folder`` (FIFOs are listed, never opened)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "special")
            for p in sorted(folder.rglob("*")) if not p.is_dir()}


def png_bytes(seed: int = 0, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def store(runner, tmp_path_factory) -> Path:
    """A small finished store (4 shapes-world scenes), collected once for the module."""
    path = tmp_path_factory.mktemp("edges") / "store"
    ok(runner, ["collect", *TOY, "--shapes", 4, "--chunk-size", 2, "--heads", 3, "--out", path])
    return path


# --- 1. usage errors: one error line for every command and sub-command ------------------------------
@pytest.mark.parametrize("args, expected", [
    (["collect", "--out", "x"], ("Missing option '--model'", "Run `clip-lens collect --help`")),
    (["spans", *TOY], ("Missing option '--store'", "Run `clip-lens spans --help`")),
    (["sae", "train", "--hook", "blocks.0.hook_resid_post", "--d-sae", "8"],
     ("Missing option '--out'", "`clip-lens sae train --help`")),
    (["collect", "--bogus"], ("No such option: --bogus", "`clip-lens collect --help`")),
    (["neighbors", "--nope", "1"], ("No such option: --nope", "`clip-lens neighbors --help`")),
    (["sae", "inspect", "x", "--wrong"], ("No such option: --wrong", "`clip-lens sae inspect --help`")),
    (["--bogus"], ("No such option: --bogus", "Run `clip-lens --help`")),
    (["collect", *TOY, "--shapes", "x", "--out", "o"], ("Invalid value for '--shapes'", "`clip-lens collect --help`")),
    (["report", "--n-images", "many"], ("Invalid value for '--n-images'", "`clip-lens report --help`")),
    (["sae", "train", "--hook", "h", "--out", "o", "--d-sae", "1.5"],
     ("Invalid value for '--d-sae'", "`clip-lens sae train --help`")),
    (["compare", "--top-k", "0"], ("Invalid value for '--top-k'", "`clip-lens compare --help`")),
    (["hooks", "-m", "toy-shapes", "--tower"], ("Option '--tower' requires an argument", "`clip-lens hooks --help`")),
    (["hooks", "-m", "toy-shapes", "--tower", "audio"], ("--tower must be 'vision' or 'text'",)),
    (["collect", *TOY, "--shapes", "2", "--out", "o", "--precision", "fp8"], ("--precision must be fp32",)),
    (["sae", "train", "--hook", "h", "--out", "o", "--d-sae", "8", "--shapes", "2", "--architecture", "gated2"],
     ("--architecture must be one of",)),
    (["nosuchcommand"], ("No such command 'nosuchcommand'", "Run `clip-lens --help`")),
    (["sae", "nosuch"], ("No such command 'nosuch'", "Run `clip-lens sae --help`")),
])
def test_every_usage_error_is_one_error_line_naming_the_help_to_read(runner, args, expected):
    result = runner.invoke(app, args)
    line = one_line_error(runner, args, *expected)
    assert "Usage:" not in result.output and "Try '" not in result.output
    assert result.stderr.strip() == line  # nothing but the one line


def test_a_group_called_without_a_command_still_prints_its_help(runner):
    result = runner.invoke(app, ["sae"])
    assert "Commands:" in result.output and "train" in result.output and "error:" not in result.output


# --- 2. files that are not regular files ------------------------------------------------------------
@pytest.fixture()
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    return path


def test_a_fifo_among_the_images_is_skipped_and_named(runner, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        (images / f"{i}.png").write_bytes(png_bytes(i))
    os.mkfifo(images / "2.png")
    before = digest(images)
    with no_hang():
        result = runner.invoke(app, ["collect", *TOY, "--images", images, "--chunk-size", 4, "--out", tmp_path / "s"])
    assert result.exit_code == 0, result.output
    assert f"{images / '2.png'} is a FIFO (named pipe), not a regular file" in result.stderr
    assert "skipped 1 unreadable image" in result.stdout
    assert digest(images) == before


def test_a_fifo_in_a_folder_read_from_python_is_a_skipped_row(tmp_path):
    from clip_lens.collect import image_source

    (tmp_path / "a.png").write_bytes(png_bytes())
    os.mkfifo(tmp_path / "b.png")
    with no_hang():
        batch = image_source(tmp_path, to_tensor).load_batch(0, 2)
    assert batch.kept == [0] and "is a FIFO (named pipe)" in batch.skipped[1]


@pytest.mark.parametrize("make_args, expected", [
    (lambda f, s: ["neighbors", "--store", s, *TOY, "--image", f, "--out", f.parent / "n.json"], "--image"),
    (lambda f, s: ["collect", *TOY, "--pretrained", f, "--shapes", 2, "--out", f.parent / "c"], "--pretrained"),
    (lambda f, s: ["spans", "--store", s, *TOY, "--bank", f, "--out", f.parent / "sp.json"], "--bank"),
    (lambda f, s: ["neighbors", "--store", s, *TOY, "--text", "a", "--labels", f, "--out", f.parent / "n.json"], "--labels"),
    (lambda f, s: ["compare", f], "FILES"),
    (lambda f, s: ["sae", "inspect", f, "--shapes", 2, "--out", f.parent / "i"], "SAE_DIR"),
    (lambda f, s: ["collect", *TOY, "--images", f, "--out", f.parent / "c"], "--images"),
])
def test_a_fifo_given_as_a_file_option_is_refused_before_any_work(runner, store, fifo, make_args, expected):
    before = digest(store)
    with no_hang():
        one_line_error(runner, make_args(fifo, store), f"{expected} {fifo} is a FIFO (named pipe), not a regular file")
    assert digest(store) == before


def test_a_device_given_as_images_is_refused(runner, tmp_path):
    one_line_error(runner, ["collect", *TOY, "--images", "/dev/zero", "--out", tmp_path / "c"],
                   "--images /dev/zero is a character device, not a regular file")


@pytest.mark.parametrize("member", ["ids.json", "heads/zarr.json"])
def test_a_fifo_inside_a_store_is_refused_not_waited_on(store, tmp_path, member):
    import shutil

    from clip_lens.collect import Store

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    (copy / member).unlink()
    os.mkfifo(copy / member)
    with no_hang(), pytest.raises(InputError, match=rf"{member.replace('.', '[.]')} is a FIFO \(named pipe\).*restore the file"):
        Store.open(copy).ids()


@pytest.mark.parametrize("name", ["cfg.json", "sae_weights.safetensors"])
def test_a_fifo_in_an_sae_folder_is_an_error_not_a_hang(tmp_path, name):
    from clip_lens.sae import SAE, SAEConfig, load_sae, save_sae

    folder = save_sae(SAE(SAEConfig(d_in=8, d_sae=4, architecture="topk", k=2, hook_name="blocks.0.hook_resid_post",
                                    model_name="toy-shapes")), tmp_path / "sae")
    (folder / name).unlink()
    os.mkfifo(folder / name)
    with no_hang(), pytest.raises(ClipLensError, match=name.replace(".", "[.]")):
        load_sae(folder)


def test_json_text_and_images_read_from_python_refuse_fifos(fifo):
    from clip_lens.banks import load_bank
    from clip_lens.files import load_image, read_json

    with no_hang():
        with pytest.raises(InputError, match=r"labels file .*pipe\.png is a FIFO \(named pipe\)"):
            read_json(fifo, "labels file", "{}")
        with pytest.raises(InputError, match=r"text bank path .*pipe\.png' is not a file"):
            load_bank(str(fifo))
        with pytest.raises(InputError, match=r"image .*pipe\.png is a FIFO \(named pipe\), not a regular file"):
            load_image(fifo)


def test_a_fifo_named_like_a_shard_is_refused_alone_and_in_a_folder(tmp_path):
    from clip_lens.shards import TarShards

    folder = tmp_path / "shards"
    folder.mkdir()
    tar_of(folder / "a.tar", [("x.png", png_bytes())])
    os.mkfifo(folder / "b.tar")
    with no_hang():
        with pytest.raises(InputError, match=r"tar shard .*b\.tar is a FIFO \(named pipe\)"):
            TarShards(folder / "b.tar")
        with pytest.raises(InputError, match=r"tar shard .*b\.tar is a FIFO \(named pipe\)"):
            TarShards(folder)  # never left out silently


# --- 3. launcher environment and rendezvous ---------------------------------------------------------
LAUNCH = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("change, message", [
    ({"MASTER_PORT": "abc"}, "MASTER_PORT='abc' is not an integer"),
    ({"MASTER_PORT": "99999"}, "MASTER_PORT=99999 is out of range: it must lie in 1..65535"),
    ({"MASTER_PORT": "0"}, "MASTER_PORT=0 is out of range"),
    ({"WORLD_SIZE": str(2**63)}, f"WORLD_SIZE={2**63} is out of range: it must lie in 1..2147483647"),
    ({"WORLD_SIZE": "-3"}, "WORLD_SIZE=-3 is out of range"),
    ({"RANK": str(2**64)}, f"RANK={2**64} is out of range"),
    ({"RANK": "2"}, "RANK=2 is not a rank of WORLD_SIZE=2"),
    ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 is out of range: it must lie in 0..1"),
    ({"LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "1", "RANK": "1"}, "LOCAL_RANK=1 is not below LOCAL_WORLD_SIZE=1"),
    ({"MASTER_ADDR": " "}, "MASTER_ADDR is not"),
])
def test_a_bad_launch_environment_is_one_line_before_the_model_loads(runner, tmp_path, monkeypatch, change, message):
    for name, value in {**LAUNCH, **change}.items():
        monkeypatch.setenv(name, value)
    started = time.perf_counter()
    one_line_error(runner, ["collect", *TOY, "--shapes", 2, "--out", tmp_path / "s"], message)
    assert time.perf_counter() - started < 5 and not (tmp_path / "s").exists()


def test_a_bad_rendezvous_timeout_is_refused(monkeypatch):
    from clip_lens.distributed import rendezvous_timeout

    for text in ("abc", "0", "-1", "nan", "inf"):
        monkeypatch.setenv("CLIP_LENS_RENDEZVOUS_TIMEOUT", text)
        with pytest.raises(InputError, match="CLIP_LENS_RENDEZVOUS_TIMEOUT=.* must be a positive number of seconds"):
            rendezvous_timeout()
    monkeypatch.setenv("CLIP_LENS_RENDEZVOUS_TIMEOUT", "2.5")
    assert rendezvous_timeout() == 2.5
    monkeypatch.delenv("CLIP_LENS_RENDEZVOUS_TIMEOUT")
    assert rendezvous_timeout() == 60


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("rank, expected", [
    (0, "rank 0 of 2 waited 1 s at MASTER_ADDR=127.0.0.1 MASTER_PORT={port} and not every rank arrived"),
    (1, "rank 1 of 2 could not reach rank 0 at MASTER_ADDR=127.0.0.1 MASTER_PORT={port} within 1 s"),
])
@pytest.mark.slow  # moved out of the default run (seconds of real work; CI runs it)
def test_a_rank_without_its_peers_times_out_naming_the_address(monkeypatch, rank, expected):
    import torch.distributed as dist

    from clip_lens.distributed import RendezvousError, process_group

    port = free_port()
    for name, value in {**LAUNCH, "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    started = time.perf_counter()
    with no_hang(30), pytest.raises(RendezvousError) as refused:
        with process_group("cpu", timeout=1):
            pass
    assert time.perf_counter() - started < 15 and not dist.is_initialized()
    message = str(refused.value)
    assert expected.format(port=port) in message and "CLIP_LENS_RENDEZVOUS_TIMEOUT=SECONDS" in message
    assert "\n" not in message


# --- 4. brace patterns, tar labels, folders of images and shards ------------------------------------
def test_a_brace_pattern_of_a_hundred_million_names_is_refused_before_expanding(tmp_path):
    from clip_lens.shards import MAX_PATTERN_NAMES, shard_paths

    pattern = str(tmp_path / "train-{000000000..099999999}.tar")
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"expands to 100,000,000 names, more than the limit of 1,000,000"):
            shard_paths(pattern)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert MAX_PATTERN_NAMES == 1_000_000 and peak < 1_000_000  # bytes: nothing was expanded
    with pytest.raises(InputError, match=r"expands to 1,000,000,000,000,000,000,000,000,000,000 names"):
        shard_paths(str(tmp_path / "{0..999999999999999999999999999999}{0..0}.tar"))
    with pytest.raises(InputError, match="braces nested more than 32 deep"):
        shard_paths("{" * 5000 + "a,b" + "}" * 5000)


def test_brace_patterns_expand_as_before():
    from clip_lens.shards import expand_braces

    assert expand_braces("s-{08..10}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar"]
    assert expand_braces("{a,b{1..2}}-{x,y}") == ["a-x", "a-y", "b1-x", "b1-y", "b2-x", "b2-y"]
    assert expand_braces("{10..0..5}") == ["10", "5", "0"]
    assert len(expand_braces("{000000..999999}")) == 1_000_000  # the limit itself is allowed


@pytest.mark.parametrize("text", [str(2**63).encode(), str(-(2**63) - 1).encode(), b"9" * 40, b"cat", b"1e3", b""])
def test_a_label_that_is_not_a_64_bit_integer_is_refused_naming_shard_and_member(tmp_path, text):
    from clip_lens.collect import image_source
    from clip_lens.shards import TarShards

    path = tar_of(tmp_path / "l.tar", [("a.png", png_bytes(0)), ("a.cls", text), ("b.png", png_bytes(1)),
                                        ("b.cls", str(2**63 - 1).encode()), ("c.png", png_bytes(2)),
                                        ("c.label", str(-(2**63)).encode())])
    shards = TarShards(path)
    assert shards.label(1) == 2**63 - 1 and shards.label(2) == -(2**63)
    with pytest.raises(InputError, match=rf"tar shard .*l\.tar: the label member l\.tar/a\.cls holds .*, not one "
                                         r"integer between -2\*\*63 and 2\*\*63-1"):
        shards.label(0)
    batch = image_source(shards, to_tensor).load_batch(0, 3)  # collecting: the sample is skipped and named
    assert batch.kept == [1, 2] and "l.tar/a.cls" in batch.skipped[0]
    assert batch.labels.tolist() == [2**63 - 1, -(2**63)]


def test_a_folder_of_images_and_shards_is_refused_not_read_as_its_images(runner, tmp_path):
    from clip_lens.collect import image_source

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "loose.png").write_bytes(png_bytes())
    tar_of(folder / "train-000.tar", [("x.png", png_bytes(1)), ("y.png", png_bytes(2))])
    before = digest(folder)
    with pytest.raises(InputError, match=r"holds both image files \(1, e\.g\. .*loose\.png\) and tar shards \(1, e\.g\. "
                                         r".*train-000\.tar\)"):
        image_source(folder, to_tensor)
    one_line_error(runner, ["collect", *TOY, "--images", folder, "--out", tmp_path / "s"], "holds both image files")
    one_line_error(runner, ["sae", "train", "--hook", "blocks.0.hook_resid_post", "--d-sae", 8, "--images", folder,
                            "--out", tmp_path / "sae"], "holds both image files")
    assert digest(folder) == before and not (tmp_path / "s").exists()


# --- 5. JSON nesting ------------------------------------------------------------------------------
def test_json_nesting_is_counted_outside_strings():
    from clip_lens.files import json_nesting

    assert json_nesting('[1, {"a": [2]}]') == 3
    assert json_nesting('{"a\\"[{": "]]]", "b": [[[]]]}') == 4
    assert json_nesting("5") == 0 and json_nesting("[" * 100_000) == 100_000


def test_a_config_nested_100000_deep_is_refused_not_a_recursion_error(tmp_path):
    from clip_lens.sae import load_config

    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / "cfg.json").write_text('{"d_in": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(InputError, match=r"cfg\.json' nests arrays and objects 100001 levels deep, more than the limit of 64"):
        load_config(folder)


def test_the_nesting_limit_is_exact_and_covers_the_files_users_give(tmp_path):
    from clip_lens.analyses import JSONResult
    from clip_lens.files import MAX_JSON_DEPTH, read_json

    at_limit, over = tmp_path / "ok.json", tmp_path / "deep.json"
    at_limit.write_text("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    over.write_text("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    assert json_depth_of(read_json(at_limit, "file", "{}")) == MAX_JSON_DEPTH
    with pytest.raises(InputError, match=r"65 levels deep, more than the limit of 64"):
        read_json(over, "labels file", "{}")
    deep = tmp_path / "labels.json"
    deep.write_text('{"heads": ' + "[" * 50_000 + "]" * 50_000 + "}")
    with pytest.raises(InputError, match="50001 levels deep"):
        JSONResult.load(deep)


def json_depth_of(value) -> int:
    depth = 0
    while isinstance(value, list) and value:
        value, depth = value[0], depth + 1
    return depth + isinstance(value, list)


def test_a_deep_head_label_table_on_the_command_line_is_one_line(runner, store, tmp_path):
    deep = tmp_path / "labels.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    one_line_error(runner, ["neighbors", "--store", store, *TOY, "--text", "a", "--labels", deep, "--out",
                            tmp_path / "n.json"], "100000 levels deep")


# --- 6. seeds and scene counts --------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["collect", *TOY, "--shapes", 2, "--seed", -5], "Invalid value for '--seed'"),
    (["collect", *TOY, "--shapes", 2, "--seed", 2**32], "Invalid value for '--seed'"),
    (["sae", "train", "--hook", "h", "--d-sae", 8, "--shapes", 2, "--train-seed", -1], "Invalid value for '--train-seed'"),
    (["train-toy", "--seed", 2**40], "Invalid value for '--seed'"),
    (["segment", "--text", "a", "--shapes", 2, "--seed", -1], "Invalid value for '--seed'"),
])
def test_seeds_outside_0_to_2_to_the_32_are_refused(runner, tmp_path, args, message):
    one_line_error(runner, [*args, "--out", tmp_path / "o"], message)


def test_a_trillion_scenes_are_refused_before_memory_grows(runner, tmp_path):
    from clip_lens.cli import _MAX_SCENES
    from clip_lens.collect import shapes_world_images
    from clip_lens.toy.world import MAX_SCENES

    assert _MAX_SCENES == MAX_SCENES == 1_000_000  # the CLI's copy (it does not import torch) is the library's
    tracemalloc.start()
    try:
        one_line_error(runner, ["collect", *TOY, "--shapes", 10**12, "--out", tmp_path / "s"],
                       "Invalid value for '--shapes'", "1000000")
        with pytest.raises(InputError, match=r"n must be a number of scenes between 1 and 1,000,000, got 1000000000000"):
            shapes_world_images(10**12)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000 and not (tmp_path / "s").exists()  # bytes (the 19 GB of the issue)
    for option in (["report", "--n-images"], ["mi", "--shapes"], ["sae", "inspect", "x", "--shapes"]):
        one_line_error(runner, [*option, MAX_SCENES + 1, "--out", tmp_path / "o"], "less than or equal to 1000000")


def test_the_world_refuses_negative_seeds_and_accepts_the_largest_cli_seed():
    from clip_lens.toy.world import ShapesWorld

    for seed in (-5, 1.5, True, "3"):
        with pytest.raises(InputError, match="seed must be an integer >= 0"):
            ShapesWorld(seed=seed)
    assert ShapesWorld(seed=2**32 - 1).scene(0).image.shape == (64, 64, 3)
    assert ShapesWorld(seed=np.int64(7)).seed == 7
