"""Stores bound to their identity and their images (issue 27, class 1): a marker, chunk or
``zarr.json`` copied from another store and an edited marker are damage; a store whose markers do
not cover every chunk is refused unless opened with ``partial=True``; resuming over images that
changed recomputes exactly those chunks (other ids or counts are refused); ``collect --force``
(``replace=True``) holds the destination's lock, so two replacements never mix."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import clip_lens.collect as collect_module
from clip_lens import HookedCLIP
from clip_lens.collect import ImageSource, Store, collect, replacing_folder, shapes_world_images, store_from_arrays
from clip_lens.errors import InputError, StoreCorruptError, StoreLockedError, StoreWarning
from clip_lens.toy.world import ShapesWorld
from tests.helpers import ok, one_line_error, store_files, write_shards

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, CHUNK = 12, 4  # three chunks: rows 0-3, 4-7, 8-11
REPAIR = "run the same `clip-lens collect` command (or collect(...) with the same arguments) again"


@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes")


def run(toy, images, out: Path, **kwargs) -> Store:
    return collect(toy, images, out, chunk_size=CHUNK, batch_size=4, progress=False, workers=0, **kwargs)


def raw_files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, exactly (identity included)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def digest(folder: Path) -> str:
    """One sha256 over every file of ``folder`` (names and bytes): inputs must not change."""
    h = hashlib.sha256()
    for name, data in raw_files(folder).items():
        h.update(name.encode() + b"\0" + data)
    return h.hexdigest()


def chunk_files(out: Path, chunk: int) -> list[Path]:
    """Every array's file of ``chunk`` and its marker, relative to ``out``."""
    store = Store.open(out, partial=True)
    return [store._chunk_file(name, chunk).relative_to(out) for name in store.arrays] + [Path("done") / f"{chunk:06d}"]


def scenes(n: int, seed: int) -> torch.Tensor:
    return shapes_world_images(n, seed=seed).load(0, n)[0]


def scene_folder(folder: Path, seeds: dict[int, int]) -> Path:
    """PNG ``i:03d.png`` of scene ``i`` of the world of seed ``seeds[i]`` (so images can be replaced under the same name)."""
    folder.mkdir(exist_ok=True)
    for i, seed in seeds.items():
        Image.fromarray(ShapesWorld(seed=seed).scene(i).image).save(folder / f"{i:03d}.png")
    return folder


def same_arrays(a: Store, b: Store) -> None:
    assert a.arrays == b.arrays
    for name in a.arrays:
        np.testing.assert_array_equal(a.read(name).numpy(), b.read(name).numpy(), err_msg=name)


# -- identity: a store's markers and metadata are its own -------------------------------------------


def test_every_store_gets_its_own_identity_recorded_in_its_metadata_and_every_marker(tmp_path):
    heads = np.ones((N, 1, 2, 8), np.float32)
    a = store_from_arrays(tmp_path / "a", {"heads": heads}, CHUNK)
    b = store_from_arrays(tmp_path / "b", {"heads": heads}, CHUNK)  # the same settings and data
    assert len(a.identity) == 32 and int(a.identity, 16) >= 0 and a.identity != b.identity
    for store in (a, b):
        markers = [json.loads(p.read_bytes()) for p in sorted((store.path / "done").iterdir())]
        assert [m["store"] for m in markers] == [store.identity] * 3
        assert all(m["checksum"] == collect_module._checksum(m) for m in markers)
    group = json.loads((a.path / "zarr.json").read_text())
    group["attributes"]["identity"] = b.identity  # edited without its checksum
    (a.path / "zarr.json").write_text(json.dumps(group))
    with pytest.raises(StoreCorruptError, match="does not match its checksum"):
        Store.open(a.path)


def test_a_chunk_and_marker_copied_from_another_store_with_the_same_settings_are_refused(tmp_path):
    """Before: the copied rows read as this store's, every check passed."""
    ours, theirs = np.zeros((N, 2, 8), np.float32), np.ones((N, 2, 8), np.float32)
    a = store_from_arrays(tmp_path / "a", {"heads": ours}, CHUNK).path
    b = store_from_arrays(tmp_path / "b", {"heads": theirs}, CHUNK).path
    for name in chunk_files(a, 1):
        shutil.copy(b / name, a / name)
    before = digest(a)
    with pytest.raises(StoreCorruptError) as caught:
        Store.open(a)
    message = str(caught.value)
    for text in ("done/000001 belongs to another store", "copied from another store", REPAIR):
        assert text in message, message
    assert caught.value.chunk == 1 and caught.value.rows == (4, 8)
    opened = Store.open(a, partial=True)
    for read in (lambda: opened.read("heads"), lambda: opened.ids(), lambda: list(opened.iter_chunks("heads"))):
        with pytest.raises(StoreCorruptError, match="done/000001 belongs to another store"):
            read()
    assert digest(a) == before  # reading changed nothing


def test_a_copied_chunk_is_recomputed_by_rerunning_collect(toy, tmp_path):
    mine, other = scenes(N, 0), scenes(N, 7)
    out = tmp_path / "s"
    run(toy, mine, out)
    run(toy, other, tmp_path / "other")  # same settings ("tensor of 12 images"), other images
    pristine = raw_files(out)
    for name in chunk_files(out, 2):
        shutil.copy(tmp_path / "other" / name, out / name)
    with pytest.raises(StoreCorruptError, match="done/000002 belongs to another store"):
        Store.open(out).read("embedding")
    with pytest.warns(StoreWarning, match="removed done/000002, which belongs to another store.*chunk 2 will be recomputed"):
        repaired = run(toy, mine, out)
    assert repaired.recomputed == {"damaged": [2], "changed": []}
    assert raw_files(out) == pristine  # every byte: data, markers (its own identity), metadata


def test_a_zarr_json_copied_from_another_store_is_refused_and_rerunning_collect_rebuilds_the_chunks(toy, tmp_path):
    mine, other = scenes(N, 0), scenes(N, 7)
    out = tmp_path / "s"
    expected = run(toy, mine, out).read("heads")
    run(toy, other, tmp_path / "other")
    shutil.copy(tmp_path / "other" / "zarr.json", out / "zarr.json")  # valid metadata, same settings, another store
    with pytest.raises(StoreCorruptError, match=r"done/000000 belongs to another store.*\(2 more bad markers\)"):
        Store.open(out)
    with pytest.raises(StoreCorruptError, match="belongs to another store"):
        Store.open(out, partial=True).read("heads")
    with pytest.warns(StoreWarning, match="belongs to another store"):
        repaired = run(toy, mine, out)  # every chunk recomputed under the metadata now there
    assert repaired.recomputed["damaged"] == [0, 1, 2]
    np.testing.assert_array_equal(repaired.read("heads").numpy(), expected.numpy())


def test_an_edited_skipped_entry_is_caught_by_the_markers_checksum(toy, tmp_path):
    """Before: moving the skipped row from 2 to 3 silently dropped another image's terms and kept the broken one's NaNs."""
    folder = scene_folder(tmp_path / "images", dict.fromkeys(range(8), 5))
    (folder / "002.png").write_bytes(b"not an image")
    out = tmp_path / "s"
    run(toy, folder, out)
    pristine = raw_files(out)
    marker = out / "done" / "000000"
    content = json.loads(marker.read_text())
    assert list(content["skipped"]) == ["2"]
    content["skipped"] = {"3": content["skipped"]["2"]}  # another row of the chunk: valid-looking
    marker.write_text(json.dumps(content))
    for read in (lambda: Store.open(out), lambda: Store.open(out, partial=True).read("embedding")):
        with pytest.raises(StoreCorruptError, match="done/000000 does not match its checksum") as caught:
            read()
        assert caught.value.chunk == 0
    with pytest.warns(StoreWarning, match="chunk 0 will be recomputed"):
        run(toy, folder, out)
    assert raw_files(out) == pristine


# -- completeness: no reader answers from part of a store without being asked ----------------------


def lock_content(kind: str) -> str:
    if kind == "live":
        return collect_module._Lock.content()
    return json.dumps({"pid": 999_999_999, "host": socket.gethostname(), "process_start": None, "started": "x"})


@pytest.mark.parametrize("lock", [None, "live", "stale"])
def test_a_deleted_marker_makes_every_reader_refuse_unless_partial(tmp_path, lock):
    heads = np.arange(N * 8, dtype=np.float32).reshape(N, 1, 1, 8)
    out = store_from_arrays(tmp_path / "s", {"heads": heads}, CHUNK, head_layers=[0]).path
    opened = Store.open(out)  # complete when opened (as the app and a neighbors index open it)
    (out / "done" / "000001").unlink()
    if lock:
        (out / "lock").write_text(lock_content(lock))
    before = digest(out)
    expected = re.escape("is incomplete (2 of 3 chunks): chunk 1 (rows 4-7) has no done/ marker")
    with pytest.raises(InputError, match=r"incomplete \(2 of 3 chunks\)") as caught:
        Store.open(out)
    message = str(caught.value)
    for text in (expected.replace("\\", ""), "run collect again with the same arguments to finish it", "partial=True"):
        assert text in message, message
    note = {None: "lock", "live": "holds its lock and may still be writing", "stale": "names a collect that is gone"}[lock]
    assert (note in message) == (lock is not None), message
    # the store opened while complete: every reader refuses, even a call that asks for partial reads (neighbors)
    for read in (lambda: opened.read("heads"), lambda: opened.read("heads", partial=True),
                 lambda: list(opened.iter_chunks("heads", partial=True)), lambda: opened.ids(),
                 lambda: opened.head_outputs(0, 0)):
        with pytest.raises(InputError, match=expected):
            read()
    partial = Store.open(out, partial=True)  # asked for: the finished chunks only
    np.testing.assert_array_equal(partial.read("heads").numpy(), heads[[0, 1, 2, 3, 8, 9, 10, 11]])
    assert partial.n_done == 8 and [start for start, _ in partial.iter_chunks("heads")] == [0, 8]
    with pytest.raises(InputError, match=expected):
        partial.read("heads", partial=False)
    assert digest(out) == before


def test_the_neighbors_search_refuses_a_store_that_lost_a_marker(tmp_path):
    from clip_lens_plugins.neighbors import HeadIndex

    heads = np.random.default_rng(0).standard_normal((N, 1, 2, 8)).astype(np.float32)
    out = store_from_arrays(tmp_path / "s", {"heads": heads}, CHUNK, head_layers=[0]).path
    index = HeadIndex.from_store(Store.open(out), heads=["L0H1"])
    assert index.search(torch.ones(1, 8), k=N)[1].shape == (1, N)
    (out / "done" / "000002").unlink()
    with pytest.raises(InputError, match=r"chunk 2 \(rows 8-11\) has no done/ marker"):
        index.search(torch.ones(1, 8), k=3)  # the index opened the store complete: it never answers from 8 of 12
    with pytest.raises(InputError, match="incomplete"):
        HeadIndex.from_store(out, heads=["L0H1"])
    partial = HeadIndex.from_store(Store.open(out, partial=True), heads=["L0H1"])
    assert partial.n_images == 8 and set(partial.search(torch.ones(1, 8), k=8)[1][0].tolist()) == set(range(8))


# -- the images a store was collected from ----------------------------------------------------------


def test_resuming_over_replaced_files_recomputes_exactly_the_changed_chunks(toy, tmp_path):
    """The issue's case: folder files replaced by others (same names, same count) between two runs."""
    folder = scene_folder(tmp_path / "images", dict.fromkeys(range(N), 1))
    out = tmp_path / "s"
    run(toy, folder, out)
    (out / "done" / "000002").unlink()  # as if killed before finishing chunk 2
    kept = (out / "done" / "000000").stat().st_ino
    scene_folder(folder, dict.fromkeys(range(4, 8), 2))  # rows 4-7 now show other scenes, under the same names
    images = digest(folder)
    with pytest.warns(StoreWarning, match=r"the images of 1 finished chunk \(1; chunk 1 is rows 4-7\) changed"):
        resumed = run(toy, folder, out)
    assert resumed.recomputed == {"damaged": [], "changed": [1]}
    assert (out / "done" / "000000").stat().st_ino == kept  # chunk 0 was not touched
    fresh = run(toy, folder, tmp_path / "fresh")
    same_arrays(resumed, fresh)  # bit for bit the new images, no mix
    assert digest(folder) == images


def test_resuming_over_a_rewritten_tar_shard_recomputes_its_chunks(toy, tmp_path):
    """The issue's case: a shard replaced by other images with the same count (and the same keys)."""
    world = lambda seed: [Image.fromarray(ShapesWorld(seed=seed).scene(i).image) for i in range(8)]  # noqa: E731
    write_shards(tmp_path / "shards", world(1), per_shard=4)
    out = tmp_path / "s"
    run(toy, tmp_path / "shards", out)  # chunk c is shard c
    write_shards(tmp_path / "new", world(3), per_shard=4)
    shutil.copy(tmp_path / "new" / "shard-000001.tar", tmp_path / "shards" / "shard-000001.tar")
    with pytest.warns(StoreWarning, match=r"the images of 1 finished chunk \(1; chunk 1 is rows 4-7\) changed"):
        resumed = run(toy, tmp_path / "shards", out)
    assert resumed.recomputed["changed"] == [1]
    same_arrays(resumed, run(toy, tmp_path / "shards", tmp_path / "fresh"))


def test_resuming_a_changed_tensor_recomputes_its_changed_chunk(toy, tmp_path):
    images = scenes(N, 0)
    out = tmp_path / "s"
    run(toy, images, out)
    images[9] = scenes(N, 4)[9]
    with pytest.warns(StoreWarning, match=r"1 finished chunk \(2; chunk 2 is rows 8-11\)"):
        resumed = run(toy, images, out)
    same_arrays(resumed, run(toy, images, tmp_path / "fresh"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(toy, images, out).recomputed == {"damaged": [], "changed": []}  # unchanged: nothing recomputed


def test_resuming_from_other_image_ids_or_another_count_is_refused_in_one_line(toy, tmp_path):
    folder = scene_folder(tmp_path / "images", dict.fromkeys(range(8), 1))
    out = tmp_path / "s"
    args = ["collect", "--model", "toy-shapes", "--images", folder, "--out", out, "--chunk-size", 4, "--workers", 0]
    runner = CliRunner()
    ok(runner, args)
    (out / "done" / "000001").unlink()  # unfinished: the next run resumes
    (folder / "003.png").rename(folder / "003b.png")  # one image renamed: the ids change, not the count
    before = digest(out), digest(folder)
    one_line_error(runner, args, "was collected from other images (1 of its 8 image ids differ; row 3 was",
                   "003.png", "003b.png", "Resume it with the images it was collected from")
    Image.fromarray(ShapesWorld(seed=1).scene(0).image).save(folder / "100.png")  # 9 images
    one_line_error(runner, args, "different settings", "n_images: stored 8, now 9")
    (folder / "100.png").unlink()
    assert (digest(out), digest(folder)) == before


def test_images_that_change_while_a_chunk_is_collected_are_not_committed(toy, tmp_path):
    images = scenes(N, 0)
    base = image = collect_module.image_source(images)

    def load(start: int, stop: int):
        if start == 4:  # another process rewrites an image of chunk 1 while it is being read
            images[6] += 0.25
        return image.load(start, stop)

    changing = ImageSource(N, load, None, base.description, fingerprint=base.fingerprint)
    out = tmp_path / "s"
    with pytest.raises(InputError, match=r"images of chunk 1 \(rows 4-7\) changed while collect was reading them"):
        run(toy, changing, out)
    assert Store.open(out, partial=True).done_chunks() == [0] and not (out / "lock").exists()
    same_arrays(run(toy, images, out), run(toy, images, tmp_path / "fresh"))


# -- stores written before identities ---------------------------------------------------------------


def strip_identity(out: Path) -> None:
    """Make ``out`` what the previous clip_lens wrote: no identity; markers of chunk, rows, arrays (and skipped)."""
    group = json.loads((out / "zarr.json").read_text())
    attributes = {k: v for k, v in group["attributes"].items() if k not in ("identity", "checksum")}
    collect_module._write_group(out, attributes)
    for marker in (out / "done").iterdir():
        content = json.loads(marker.read_text())
        marker.write_text(json.dumps({k: v for k, v in content.items() if k not in ("store", "source", "checksum")}))


def test_a_store_written_before_identities_reads_with_a_warning_and_gets_one_on_resume(toy, tmp_path):
    out = tmp_path / "s"
    expected = run(toy, shapes_world_images(N), out).read("heads")
    strip_identity(out)
    data = {name: b for name, b in raw_files(out).items() if "/c/" in name}
    with pytest.warns(StoreWarning, match="predates store identities"):
        old = Store.open(out)
    assert old.identity is None and old.complete
    np.testing.assert_array_equal(old.read("heads").numpy(), expected.numpy())
    (out / "done" / "000002").unlink()  # unfinished, as a run interrupted before the upgrade
    with pytest.warns(StoreWarning, match="predated store identities; it now has one, and its 2 finished chunks"):
        upgraded = run(toy, shapes_world_images(N), out)
    assert len(upgraded.identity) == 32
    markers = [json.loads(p.read_text()) for p in sorted((out / "done").iterdir())]
    assert [m["store"] for m in markers] == [upgraded.identity] * 3
    assert [m["source"] is None for m in markers] == [True, True, False]  # adopted chunks were never fingerprinted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(Store.open(out).read("heads").numpy(), expected.numpy())
    assert {name: b for name, b in raw_files(out).items() if "/c/" in name} == data  # the data files stayed


# -- collect --force (replace=True): the destination is locked ---------------------------------------


def slow_scenes(n: int, seed: int, delay: float) -> ImageSource:
    base = shapes_world_images(n, seed=seed)

    def load(start: int, stop: int):
        time.sleep(delay)
        return base.load(start, stop)

    return ImageSource(n, load, base.ids, base.description, fingerprint=base.fingerprint)


@pytest.fixture
def finished(toy, tmp_path) -> Path:
    """A finished store of seed 0, to be replaced."""
    out = tmp_path / "s"
    run(toy, shapes_world_images(16, seed=0), out)
    return out


def assert_one_collection(out: Path, reference: Path) -> None:
    """``out`` is entirely the collection in ``reference``: the same data and markers, its own identity throughout."""
    assert store_files(out) == store_files(reference)
    store = Store.open(out)
    assert {json.loads(p.read_text())["store"] for p in (out / "done").iterdir()} == {store.identity}
    assert not replacing_folder(out).exists() and not (out / "lock").exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


def test_two_forced_runs_a_second_apart_leave_one_collection_and_refuse_the_second(toy, finished, tmp_path):
    """The issue's race: the second run deleted the first's .NAME.replacing folder and the store mixed both seeds."""
    outcome = {}

    def replace(name: str, seed: int, delay: float) -> None:
        try:
            outcome[name] = run(copy.deepcopy(toy), slow_scenes(16, seed, delay), finished, replace=True)
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome[name] = exc

    first = threading.Thread(target=replace, args=("first", 1, 0.3))
    first.start()
    deadline = time.time() + 60
    while not list((replacing_folder(finished) / "done").glob("0*")):  # the first is mid-run
        assert time.time() < deadline and first.is_alive()
        time.sleep(0.02)
    time.sleep(0.2)
    replace("second", 2, 0.0)
    first.join()
    refused = outcome["second"]
    assert isinstance(refused, StoreLockedError), refused
    assert f"pid {os.getpid()}" in str(refused) and "collecting a replacement for it in .s.replacing" in str(refused)
    assert isinstance(outcome["first"], Store), outcome["first"]
    run(toy, shapes_world_images(16, seed=1), tmp_path / "reference")
    assert_one_collection(finished, tmp_path / "reference")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_failed_replacement_keeps_the_old_store_and_the_next_one_clears_its_folder(toy, finished, tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(collect_module, "_exchange", lambda a, b: False)
    old = raw_files(finished)
    base = shapes_world_images(16, seed=1)

    def load(start: int, stop: int):
        if start >= 8:
            raise InputError("disk gone")
        return base.load(start, stop)

    with pytest.raises(InputError, match="disk gone"):
        run(toy, ImageSource(16, load, base.ids, base.description, fingerprint=base.fingerprint), finished, replace=True)
    assert raw_files(finished) == old and replacing_folder(finished).is_dir()  # the old store, unlocked
    replaced = run(toy, shapes_world_images(16, seed=1), finished, replace=True)
    run(toy, shapes_world_images(16, seed=1), tmp_path / "reference")
    assert_one_collection(finished, tmp_path / "reference")
    assert replaced.identity != json.loads(old["zarr.json"])["attributes"]["identity"]


def test_a_replacement_whose_images_all_fail_keeps_the_old_store(toy, finished, tmp_path):
    old = raw_files(finished)
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(16):
        (folder / f"{i:03d}.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"none of the 16 images could be read \(e\.g\. .*not an image.*\); the store in .* was kept"):
        run(toy, folder, finished, replace=True)
    assert raw_files(finished) == old and not replacing_folder(finished).exists()


def test_a_replacement_over_an_unfinished_store_resumes_it(toy, finished):
    (finished / "done" / "000003").unlink()
    before = raw_files(finished)
    resumed = run(toy, shapes_world_images(16, seed=0), finished, replace=True)
    assert resumed.complete and raw_files(finished).keys() == before.keys() | {"done/000003"}
    assert not replacing_folder(finished).exists()


def test_ranks_replace_a_store_together(toy, finished, tmp_path, monkeypatch):
    from tests.unit.test_collect_distributed import run_ranks

    results = run_ranks(monkeypatch, toy, 2, lambda rank, model: run(model, shapes_world_images(16, seed=1), finished, replace=True))
    assert all(isinstance(r, Store) and r.complete for r in results), results
    run(toy, shapes_world_images(16, seed=1), tmp_path / "reference")
    assert_one_collection(finished, tmp_path / "reference")


RACER = textwrap.dedent(
    """
    import sys, time
    from clip_lens import HookedCLIP
    from clip_lens.collect import ImageSource, collect, shapes_world_images
    from clip_lens.errors import StoreLockedError

    out, seed, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    model = HookedCLIP.from_pretrained("toy-shapes")
    base = shapes_world_images(16, seed=seed)
    slow = ImageSource(16, lambda a, b: (time.sleep(delay), base.load(a, b))[1], base.ids, base.description,
                       fingerprint=base.fingerprint)
    print("ready", flush=True)
    sys.stdin.readline()  # go
    try:
        collect(model, slow, out, chunk_size=4, batch_size=4, workers=0, progress=False, replace=True)
    except StoreLockedError as exc:
        print("refused:", exc, flush=True)
        sys.exit(3)
    print("replaced", flush=True)
    """
)


@pytest.mark.slow
def test_two_forced_processes_a_second_apart_leave_one_collection(toy, finished, tmp_path):
    """The same race with two processes (the lock names the other pid)."""
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    racers = [subprocess.Popen([sys.executable, str(script), str(finished), str(seed), "0.5"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parents[2]) for seed in (1, 2)]
    for racer in racers:
        assert racer.stdout.readline().strip() == "ready"
    racers[0].stdin.write("go\n")
    racers[0].stdin.flush()
    time.sleep(1.0)  # a second apart
    racers[1].stdin.write("go\n")
    racers[1].stdin.flush()
    outputs = [racer.communicate(timeout=120)[0] for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 3], outputs
    assert f"pid {racers[0].pid}" in outputs[1]
    run(toy, shapes_world_images(16, seed=1), tmp_path / "reference")
    assert_one_collection(finished, tmp_path / "reference")
