"""Store integrity (issue 17): a damaged, missing or foreign chunk, a bad marker, damaged metadata,
an interrupted creation and a second writer are each caught with a clear error, never read as
zeros or wrong rows; rerunning the same collect repairs exactly what was damaged, bit for bit."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import clip_lens.collect as collect_module
import clip_lens.store_write as store_write
from clip_lens import HookedCLIP
from clip_lens.collect import FORMAT, ImageSource, Store, collect, shapes_world_images, store_from_arrays
from clip_lens.errors import ClipLensError, InputError, StoreCorruptError, StoreLockedError, StoreWarning, StoreWriteError
from tests.helpers import ok, one_line_error, store_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, CHUNK = 12, 4  # three chunks: rows 0-3, 4-7, 8-11


class Recording(ImageSource):
    """Shapes-world scenes that record which rows were computed."""

    def __init__(self, n: int = N):
        base = shapes_world_images(n)
        self.loads: list[tuple[int, int]] = []
        super().__init__(n, self._load, base.ids, base.description)
        self._base = base

    def _load(self, start: int, stop: int):
        self.loads.append((start, stop))
        return self._base.load(start, stop)


@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes")


def run(toy, out: Path, source=None, **kwargs) -> Store:
    return collect(toy, source or Recording(), out, chunk_size=CHUNK, batch_size=4, progress=False, **kwargs)


@pytest.fixture(scope="module")
def pristine(toy, tmp_path_factory) -> Path:
    """An undamaged store, collected once; tests damage copies of it."""
    out = tmp_path_factory.mktemp("pristine") / "s"
    run(toy, out)
    return out


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    shutil.copytree(pristine, tmp_path / "s")
    return tmp_path / "s"


def chunk_file(out: Path, name: str, chunk: int) -> Path:
    """The file of ``chunk`` of array ``name`` (``heads/c/1/0/0/0``, ``labels/c/1``)."""
    path = out / name / "c" / str(chunk)
    return next(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else path


def flip(path: Path, offset: int, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + n] = bytes(b ^ 0xFF for b in data[offset:offset + n])
    path.write_bytes(bytes(data))


def files(out: Path) -> dict[str, bytes]:
    return store_files(out)  # the store's random identity as a placeholder


def assert_same_files(out: Path, reference: Path) -> None:
    got, expected = files(out), files(reference)
    assert sorted(got) == sorted(expected)
    assert [name for name in expected if got[name] != expected[name]] == []


# -- damaged chunks are caught on read ------------------------------------------------------------


def test_a_deleted_chunk_file_raises_instead_of_reading_zeros(store):
    chunk_file(store, "heads", 1).unlink()
    opened = Store.open(store)
    assert opened.complete
    for read in (lambda: opened.read("heads"), lambda: opened.head_outputs(3, 1), lambda: opened.read("heads", partial=True)):
        with pytest.raises(StoreCorruptError) as caught:
            read()
        message = str(caught.value)
        for text in ("array 'heads'", "chunk 1", "rows 4-7", "missing", "zeros", "run the same `clip-lens collect` command"):
            assert text in message, message
        assert (caught.value.array, caught.value.chunk, caught.value.rows) == ("heads", 1, (4, 8))
    assert opened.read("embedding").shape == (N, 128)  # other arrays still read


def test_flipped_bytes_in_a_chunk_raise(store):
    target = chunk_file(store, "embedding", 2)
    flip(target, len(target.read_bytes()) // 2)
    with pytest.raises(StoreCorruptError, match=r"chunk 2 of array 'embedding' \(rows 8-11.*is damaged.*checksum"):
        Store.open(store).read("embedding")
    damaged = Store.open(store).verify()
    assert list(damaged) == [2] and "'embedding'" in damaged[2][0] and "crc32c" in damaged[2][0]


def test_a_flipped_checksum_trailer_is_caught(store):
    target = chunk_file(store, "mlp", 0)
    flip(target, len(target.read_bytes()) - 4, 4)
    with pytest.raises(StoreCorruptError, match="chunk 0 of array 'mlp'.*not the chunk that was written"):
        Store.open(store).read("mlp")


def test_a_foreign_chunk_file_raises(store, toy, tmp_path):
    shutil.copy(chunk_file(store, "heads", 0), chunk_file(store, "heads", 1))  # a chunk of the same store, other rows
    with pytest.raises(StoreCorruptError, match=r"chunk 1 of array 'heads' \(rows 4-7.*not the chunk that was written"):
        Store.open(store).read("heads")
    other = tmp_path / "other"
    run(toy, other, shapes_world_images(N, seed=5))
    shutil.copy(chunk_file(store, "embedding_norm", 0), tmp_path / "keep")
    shutil.copy(chunk_file(other, "embedding_norm", 0), chunk_file(store, "embedding_norm", 0))  # same rows, other store
    with pytest.raises(StoreCorruptError, match="chunk 0 of array 'embedding_norm'.*not the chunk that was written"):
        Store.open(store).read("embedding_norm")


def test_spans_on_a_damaged_store_is_a_one_line_error(tmp_path):
    """The red-team case: `clip-lens spans` on a store with a deleted chunk exited 0 with wrong results."""
    runner, out = CliRunner(), tmp_path / "s"
    ok(runner, ["collect", "--model", "toy-shapes", "--shapes", 8, "--chunk-size", 4, "--heads", 3, "--out", out])
    chunk_file(out, "heads", 1).unlink()
    one_line_error(runner, ["spans", "--store", out, "--model", "toy-shapes", "--layers", 3, "--m", 2, "--out", tmp_path / "x.json"],
                   "chunk 1 of array 'heads' (rows 4-7", "missing", "clip-lens collect")
    assert not (tmp_path / "x.json").exists()


def test_rerunning_collect_repairs_a_damaged_finished_store_and_refuses_an_intact_one(tmp_path):
    """What the error message promises: the same `clip-lens collect` command recomputes the damaged
    chunk of a finished store (bit for bit the undamaged store); an intact finished store needs --force."""
    runner, out, reference = CliRunner(), tmp_path / "s", tmp_path / "reference"
    args = ["collect", "--model", "toy-shapes", "--shapes", 8, "--chunk-size", 4, "--heads", 3]
    ok(runner, args + ["--out", out])
    ok(runner, args + ["--out", reference])
    flip(chunk_file(out, "heads", 1), 40)
    result = ok(runner, args + ["--out", out])
    assert "Repaired: recomputed 1 damaged chunk(s) (1); 1 of 2 chunks were intact." in result.output
    assert_same_files(out, reference)
    one_line_error(runner, args + ["--out", out], "holds a finished store", "--force")


# -- resume repairs exactly the damaged chunks -----------------------------------------------------


def test_resume_recomputes_exactly_the_damaged_chunks_bit_for_bit(store, pristine, toy):
    flip(chunk_file(store, "heads", 1), 40)
    chunk_file(store, "labels", 2).unlink()
    untouched = chunk_file(store, "heads", 0).stat()
    source = Recording()
    with pytest.warns(StoreWarning) as caught:
        repaired = run(toy, store, source)
    messages = " | ".join(str(w.message) for w in caught)
    assert "chunk 1 (rows 4-7) is damaged" in messages and "chunk 2 (rows 8-11) is damaged" in messages
    assert source.loads == [(4, 8), (8, 12)]  # only the damaged chunks were recomputed
    again = chunk_file(store, "heads", 0).stat()
    assert (again.st_ino, again.st_mtime_ns) == (untouched.st_ino, untouched.st_mtime_ns)
    assert repaired.complete and repaired.verify() == {}
    assert_same_files(store, pristine)  # every byte, metadata and markers included


def test_resume_without_full_verification_still_catches_missing_and_foreign_files(store, pristine, toy):
    chunk_file(store, "attn", 0).unlink()
    source = Recording()
    with pytest.warns(StoreWarning, match="chunk 0"):
        run(toy, store, source, verify=False)
    assert source.loads == [(0, 4)]
    assert_same_files(store, pristine)


def test_an_undamaged_store_is_not_recomputed(store, pristine, toy):
    source = Recording()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(toy, store, source)
    assert source.loads == []
    assert_same_files(store, pristine)


# -- markers ---------------------------------------------------------------------------------------


def test_stray_files_in_done_are_ignored_with_a_warning(store):
    (store / "done" / "000001.bak").write_text("")
    (store / "done" / "notes").write_text("mine")
    (store / "done" / "00001").write_text("")
    with pytest.warns(StoreWarning) as caught:
        opened = Store.open(store)
        assert opened.done_chunks() == [0, 1, 2] and opened.n_done == N and opened.complete
    assert sorted(str(w.message).split("ignoring done/")[1].split(",")[0] for w in caught) == ["000001.bak", "00001", "notes"]
    assert opened.read("embedding").shape == (N, 128)


def test_a_marker_naming_no_chunk_raises_and_collect_removes_it(store, pristine, toy):
    (store / "done" / "000999").write_text("")  # the red-team's n_done=-3800
    opened = Store.open(store)
    for use in (opened.done_chunks, lambda: opened.n_done, lambda: opened.complete, lambda: opened.read("embedding")):
        with pytest.raises(StoreCorruptError, match=r"done/000999 names chunk 999, but the store has only 3 chunks \(0-2\)"):
            use()
    source = Recording()
    with pytest.warns(StoreWarning, match="removed done/000999"):
        run(toy, store, source)
    assert source.loads == []
    assert_same_files(store, pristine)


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "is not a valid chunk marker"),
        ("garbage", "is not a valid chunk marker"),
        (json.dumps({"chunk": 1, "rows": [0, 4], "arrays": {}}), r"does not describe chunk 1 \(rows 4-7\)"),
        ("EDIT_ARRAYS", "does not list the store's arrays"),
        ("EDIT_CRC", "has no valid size and crc32c for array 'heads'"),
    ],
)
def test_a_bad_marker_raises_and_only_its_chunk_is_recomputed(store, pristine, toy, content, match):
    marker = store / "done" / "000001"
    good = json.loads(marker.read_text())
    if content == "EDIT_ARRAYS":
        content = json.dumps({**good, "arrays": {"heads": good["arrays"]["heads"]}})
    elif content == "EDIT_CRC":
        content = json.dumps({**good, "arrays": {**good["arrays"], "heads": {"bytes": 100, "crc32c": -1}}})
    marker.write_text(content)
    with pytest.raises(StoreCorruptError, match=match) as caught:
        Store.open(store).read("embedding")
    assert caught.value.chunk == 1 and "done/000001" in str(caught.value)
    source = Recording()
    with pytest.warns(StoreWarning, match="chunk 1 will be recomputed"):
        run(toy, store, source)
    assert source.loads == [(4, 8)]
    assert_same_files(store, pristine)


def test_a_marker_recording_other_checksums_is_caught_on_read(store):
    marker = store / "done" / "000002"
    good = json.loads(marker.read_text())
    good["arrays"]["embed"]["crc32c"] ^= 1
    marker.write_text(json.dumps(good))
    with pytest.raises(StoreCorruptError, match="done/000002 does not match its checksum") as caught:  # the marker's own
        Store.open(store).read("embed")
    assert caught.value.chunk == 2
    good["checksum"] = collect_module._checksum(good)  # a consistent edit: the chunk file's checksum still differs
    marker.write_text(json.dumps(good))
    with pytest.raises(StoreCorruptError, match="chunk 2 of array 'embed'.*checksum differs from the one its marker recorded"):
        Store.open(store).read("embed")


# -- metadata --------------------------------------------------------------------------------------


def edit_group(out: Path, change) -> None:
    group = json.loads((out / "zarr.json").read_text())
    change(group["attributes"])
    (out / "zarr.json").write_text(json.dumps(group))


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda s: (s / "zarr.json").write_text((s / "zarr.json").read_text()[:-30]), r"zarr\.json is not valid JSON"),
        (lambda s: (s / "zarr.json").write_bytes(b"\xff\xfe\x00"), r"zarr\.json is not valid JSON"),
        (lambda s: (s / "zarr.json").write_text("[1, 2]"), "not a Zarr group with attributes"),
        (lambda s: edit_group(s, lambda a: a.pop("chunk_size")), "does not match its checksum"),
        (lambda s: edit_group(s, lambda a: a.update(n_images=3800)), "does not match its checksum"),
        (lambda s: edit_group(s, lambda a: a.pop("checksum")), "lost its checksum"),
        (lambda s: edit_group(s, lambda a: (a.pop("arrays"), a.update(checksum=collect_module._checksum(a)))), "has no 'arrays'"),
        (lambda s: edit_group(s, lambda a: (a.update(n_images=-5), a.update(checksum=collect_module._checksum(a)))), "invalid 'n_images'"),
        (lambda s: (s / "heads" / "zarr.json").write_text((s / "heads" / "zarr.json").read_text().replace("float32", "int32")),
         r"metadata .*heads/zarr\.json of array 'heads' does not match the hash recorded"),
        (lambda s: (s / "embedding" / "zarr.json").unlink(), r"embedding/zarr\.json of array 'embedding' is missing"),
    ],
    ids=["truncated-json", "not-utf8", "not-a-group", "missing-key", "edited-value", "checksum-removed",
         "missing-key-consistent-checksum", "bad-value-consistent-checksum", "dtype-edited", "array-metadata-deleted"],
)
def test_damaged_metadata_raises_store_corrupt_error(store, toy, damage, match):
    damage(store)
    with pytest.raises(StoreCorruptError, match=match) as caught:
        Store.open(store)
    assert "restore the file from a backup" in str(caught.value)
    with pytest.raises(StoreCorruptError, match=match):  # collect refuses too: it cannot know what the chunks are
        run(toy, store)
    assert not (store / "lock").exists()


def test_damaged_image_ids_raise(store):
    ids = store / "ids.json"
    ids.write_text(ids.read_text().replace('"3"', '"4"'))
    with pytest.raises(StoreCorruptError, match=r"image ids .*ids\.json do not match their checksum"):
        Store.open(store).ids()
    ids.unlink()
    with pytest.raises(StoreCorruptError, match="are missing"):
        Store.open(store).ids()


def test_a_store_without_checksums_reads_with_a_warning_and_is_not_resumed(tmp_path, toy):
    """Stores written before format 2 (empty markers, no crc32c codec) stay readable."""
    import zarr

    out = tmp_path / "old"
    group = zarr.open_group(str(out), mode="w")
    group.attrs.update({"format": "clip_lens.store/1", "model": "toy-shapes", "n_images": 6, "chunk_size": 4,
                        "head_layers": [], "token_layers": [], "arrays": ["embedding"]})
    values = np.arange(24, dtype=np.float32).reshape(6, 4)
    group.create_array("embedding", shape=(6, 4), chunks=(4, 4), dtype="float32", fill_value=0)[:] = values
    (out / "done").mkdir()
    for c in (0, 1):
        (out / "done" / f"{c:06d}").touch()
    with pytest.warns(StoreWarning, match="has no checksums"):
        opened = Store.open(out)
    np.testing.assert_array_equal(opened.read("embedding").numpy(), values)
    with pytest.raises(InputError, match="cannot be verified"):
        opened.verify()
    with pytest.raises(InputError, match="written without checksums"):
        collect(toy, shapes_world_images(6), out, chunk_size=4, progress=False)
    assert FORMAT == "clip_lens.store/2"


def test_store_from_arrays_writes_a_checked_store(tmp_path):
    heads = np.random.default_rng(0).standard_normal((10, 2, 3, 8), dtype=np.float32)
    opened = store_from_arrays(tmp_path / "s", {"heads": heads}, chunk_size=4, done=[0, 2], head_layers=[0, 1])
    assert opened.checked and opened.done_rows() == [(0, 4), (8, 10)] and opened.verify() == {}
    np.testing.assert_array_equal(opened.read("heads", partial=True).numpy(), heads[[0, 1, 2, 3, 8, 9]])
    chunk_file(tmp_path / "s", "heads", 2).unlink()
    with pytest.raises(StoreCorruptError, match=r"chunk 2 of array 'heads' \(rows 8-9"):
        opened.read("heads", partial=True)


# -- creation is atomic ----------------------------------------------------------------------------


real_write = store_write.atomic_write


def failing_writes(monkeypatch, fail_on: int, name: str = "zarr.json"):
    """Make the ``fail_on``-th atomic write of a file called ``name`` raise ENOSPC (a full disk)."""
    writes = []
    real = store_write.atomic_write

    def write(path, data):
        if Path(path).name == name:
            writes.append(path)
            if len(writes) == fail_on:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(store_write, "atomic_write", write)


@pytest.mark.parametrize("existing_empty_folder", [False, True])
def test_a_store_whose_creation_failed_is_created_cleanly_by_rerunning(tmp_path, pristine, toy, monkeypatch, existing_empty_folder):
    out = tmp_path / "s"
    if existing_empty_folder:
        out.mkdir()
    failing_writes(monkeypatch, 1)
    with pytest.raises(StoreWriteError, match="No space left on device.*run the same collect command again") as caught:
        run(toy, out)
    assert isinstance(caught.value, ClipLensError) and isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == (["s"] if existing_empty_folder else [])  # nothing half-made
    monkeypatch.undo()
    run(toy, out)
    assert_same_files(out, pristine)


def test_a_failure_while_recording_the_arrays_is_resumable(tmp_path, pristine, toy, monkeypatch):
    out = tmp_path / "s"
    failing_writes(monkeypatch, 2)  # the second metadata write: after the arrays were created
    with pytest.raises(StoreWriteError):
        run(toy, out)
    assert Store.open(out, partial=True).arrays == [] and not (out / "lock").exists()
    monkeypatch.undo()
    run(toy, out)
    assert_same_files(out, pristine)


def test_a_full_disk_while_writing_a_marker_keeps_finished_chunks(tmp_path, pristine, toy, monkeypatch):
    out = tmp_path / "s"
    failing_writes(monkeypatch, 1, name="000001")
    with pytest.raises(StoreWriteError, match="Finished chunks are kept"):
        run(toy, out)
    assert Store.open(out, partial=True).done_chunks() == [0]
    monkeypatch.undo()
    source = Recording()
    run(toy, out, source)
    assert source.loads == [(4, 8), (8, 12)]
    assert_same_files(out, pristine)


def test_a_store_is_built_in_place_when_its_parent_is_not_writable(tmp_path, pristine, toy, monkeypatch):
    """No temporary sibling folder possible: the store is built inside the existing folder, zarr.json
    last, and what an interrupted build leaves there does not block the rerun."""
    out = tmp_path / "s"
    out.mkdir()
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name.startswith(".s.creating."):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    failing_writes(monkeypatch, 1)
    with pytest.raises(StoreWriteError, match="No space left"):
        run(toy, out)
    assert sorted(p.name for p in out.iterdir()) == ["done", "ids.json"] and collect_module.resumable_folder(out)
    monkeypatch.setattr(store_write, "atomic_write", real_write)
    run(toy, out)
    assert_same_files(out, pristine)
    assert not collect_module.resumable_folder(tmp_path / "s" / "heads" / "zarr.json")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "done").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert not collect_module.resumable_folder(tmp_path / "other")


def test_a_killed_creation_leaves_nothing_that_blocks_a_rerun(tmp_path, pristine, toy):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    leftover = tmp_path / f".s.creating.{socket.gethostname()}.{dead}"
    (leftover / "done").mkdir(parents=True)
    (leftover / "lock").write_text("{}")
    run(toy, tmp_path / "s")
    assert not leftover.exists()
    assert_same_files(tmp_path / "s", pristine)


# -- one writer at a time --------------------------------------------------------------------------


def test_a_second_writer_is_refused(store, pristine, toy):
    held = collect_module._Lock.acquire(store)  # as the first writer holds it
    try:
        with pytest.raises(StoreLockedError, match=rf"being written by another collect \(pid {os.getpid()} on host {socket.gethostname()}") as caught:
            run(toy, store)
        assert "delete" in str(caught.value) and (store / "lock").exists()
        with pytest.raises(StoreLockedError):
            collect_module._Lock.acquire(store)
    finally:
        held.release()
    assert not (store / "lock").exists()
    run(toy, store)
    assert_same_files(store, pristine)


def lock_of(pid: int, process_start) -> str:
    return json.dumps({"pid": pid, "host": socket.gethostname(), "process_start": process_start, "started": "earlier"})


def test_a_stale_lock_is_taken_over(store, pristine, toy):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    for stale in (lock_of(dead, None), lock_of(os.getpid(), -1)):  # a dead pid; a live pid reused by another process
        (store / "lock").write_text(stale)
        with pytest.warns(StoreWarning, match="removed the stale lock"):
            run(toy, store)
        assert not (store / "lock").exists()
    assert_same_files(store, pristine)


def test_a_lock_of_another_host_or_a_damaged_lock_is_not_broken(store, toy):
    (store / "lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "earlier"}))
    with pytest.raises(StoreLockedError, match="pid 1 on host elsewhere"):
        run(toy, store)
    (store / "lock").write_text("{not json")
    with pytest.raises(StoreLockedError, match="damaged lock file"):
        run(toy, store)
    assert (store / "lock").read_text() == "{not json"
