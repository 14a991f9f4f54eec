"""Writing a store: atomic creation, the lock, resume planning, chunks and their markers.

The commit points: a new store is built in a temporary sibling folder renamed into place
(`_create`), or in place with ``zarr.json`` written last; a chunk counts once its marker
``done/<chunk>`` is written, after every array's chunk file (`_write_chunk`). A resume removes the markers
of damaged chunks and of chunks whose images changed (`_chunks_to_compute`). The format itself and
the reader are `clip_lens.store`; the collection loop that drives this is `clip_lens.collect`.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

from clip_lens.errors import InputError, StoreLockedError, StoreWarning, StoreWriteError
from clip_lens.files import atomic_write
from clip_lens.store import FORMAT, WRITE_CONFIG, Store, _checksum, _Lock, _ranges, _read_group, _stale


def store_from_arrays(
    path: str | Path, arrays: dict[str, np.ndarray], chunk_size: int, *, done: Optional[Iterable[int]] = None, **meta: Any
) -> Store:
    """A checked store holding ``arrays`` (each ``[N, ...]``), written exactly as [`collect`][clip_lens.collect.collect]
    writes (layout, checksums, markers): for tests, benchmarks and terms computed elsewhere.

    Args:
        path: a new or empty folder.
        arrays: name → array with the same number of rows ``N``.
        chunk_size: rows per chunk.
        done: the chunks to write and mark finished (default: all).
        meta: store attributes, e.g. ``model="toy-shapes"``, ``head_layers=[0, 1]`` (defaults:
            model "custom", no head or token layers).
    """
    rows = {len(value) for value in arrays.values()}
    if len(rows) != 1 or chunk_size < 1:
        raise InputError(f"store_from_arrays needs arrays with one number of rows and a positive chunk_size, got rows {sorted(rows)}.")
    n = rows.pop()
    params = {
        "format": FORMAT, "model": "custom", "pretrained": "None", "weights": None, "n_images": n, "chunk_size": chunk_size,
        "head_layers": [], "token_layers": [], "directions": None, "source": f"{n} rows given as arrays", **meta,
    }
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InputError(f"{path} exists and is not empty; choose an empty or new folder.")
    store, lock = _open_or_create(path, params, None)
    try:
        with _writing(path):
            written = _create_arrays(store, {key: np.asarray(value[:1]) for key, value in arrays.items()})
            for c in range(store.n_chunks) if done is None else sorted(set(done)):
                start, stop = store.rows(c)
                _write_chunk(store, written, c, {key: np.asarray(value[start:stop]) for key, value in arrays.items()})
    finally:
        lock.release()
    return Store.open(path, partial=done is not None)


@contextlib.contextmanager
def _writing(out: Path):
    """Turn an OSError while writing the store (full disk, read-only folder …) into a StoreWriteError."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, (StoreWriteError, StoreLockedError)):
            raise
        error = StoreWriteError(
            f"writing the store {out} failed: {exc}. Finished chunks are kept: fix that (e.g. free disk space) and run "
            "the same collect command again to finish the store."
        )
        error.errno = exc.errno
        raise error from exc


def resumable_folder(out: str | Path) -> bool:
    """Whether [`collect`][clip_lens.collect.collect] may write to ``out``: it does not exist, is an empty folder, holds a
    store (which collect resumes or explains why not), or holds only what an interrupted creation
    left (``lock``, an empty ``done/``, ``ids.json``, temporary files). False for anything else (a
    file, a folder with other content), which collect refuses rather than touch."""
    out = Path(out)
    if not out.exists():
        return True
    if not out.is_dir():
        return False
    if (out / "zarr.json").is_file():
        return True
    return _leftovers_only(out)


def _leftovers_only(out: Path) -> bool:
    for entry in out.iterdir():
        name = entry.name
        if name == "done" and entry.is_dir() and not any(entry.iterdir()):
            continue
        if (name in ("lock", "ids.json") or (name.startswith(".") and name.endswith(".tmp"))) and entry.is_file():
            continue
        return False
    return True


def _open_or_create(out: Path, params: dict, ids: Optional[list[str]], job: Optional[dict] = None) -> tuple[Store, "_Lock"]:
    """The store to write, locked: an unfinished one made with the same parameters, or a new one.

    Creation is atomic: the store is built in a temporary sibling folder (lock, ``done/``,
    ``ids.json``, ``zarr.json``) that is renamed to ``out`` at the end, so an interrupted creation
    leaves no half-made store behind (a killed one leaves the temporary folder, removed by the next
    run). When the parent folder is not writable but ``out`` is an existing folder, the store is
    built inside it with ``zarr.json`` (the commit point) written last; what an interrupted
    creation leaves there is cleaned up by the next run (`resumable_folder`). ``job``: recorded in
    the lock (``{"ranks": N}`` for rank 0 of a distributed collect).
    """
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file, not a store folder; choose an empty or new folder.")
    if not (out / "zarr.json").is_file():
        if not resumable_folder(out):
            raise InputError(f"{out} exists and is not a clip_lens store; choose an empty or new folder.")
        if not (out.exists() and any(out.iterdir())):
            content = _Lock.content(job)
            with _writing(out):
                created = _create(out, params, ids, content)
            if created:
                lock = _Lock(out / "lock", content)
                try:
                    return Store.open(out, partial=True), lock
                except BaseException:
                    lock.release()
                    raise
            if created is False and not (out / "zarr.json").is_file():  # another process filled the folder first
                raise InputError(f"{out} exists and is not a clip_lens store; choose an empty or new folder.")
    with _writing(out):
        lock = _Lock.acquire(out, job)
    try:
        if not (out / "zarr.json").is_file():  # build in place (leftovers of an interrupted creation, or no sibling)
            if not _leftovers_only(out):
                raise InputError(f"{out} exists and is not a clip_lens store; choose an empty or new folder.")
            with _writing(out):
                _build(out, params, ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StoreWarning)  # refused below (no checksums) or given an identity (resume)
            store = Store.open(out, partial=True)
        if not store.checked:
            raise InputError(
                f"{out} was written without checksums (store format {store.meta.get('format')!r}, by an older clip_lens "
                "or by hand); this clip_lens reads it (with a warning) but does not resume it: collect into a new folder."
            )
        old = {k: store.meta.get(k) for k in params}
        changed = [k for k in params if old[k] != params[k]]
        if changed:
            detail = "; ".join(f"{k}: stored {old[k]!r}, now {params[k]!r}" for k in changed)
            raise InputError(
                f"{out} holds a store made with different settings ({detail}). Use a new folder, or delete this "
                "one to start over."
            )
        _check_same_images(store, ids)
        return store, lock
    except BaseException:
        lock.release()
        raise


def _check_same_images(store: Store, ids: Optional[list[str]]) -> None:
    """Refuse to resume ``store`` from images with other ids than it was collected from: its rows
    would mix two sets of images, and its ``ids.json`` would name the wrong ones."""
    now = None if ids is None else hashlib.sha256(json.dumps(ids).encode()).hexdigest()  # as _build records them
    if store.meta.get("ids") == now:
        return
    old = store._all_ids()
    if old is None or ids is None:
        detail = "the store records no image ids" if old is None else "these images have no ids"
    else:
        differ = [row for row, (a, b) in enumerate(zip(old, ids)) if a != b]
        detail = f"{len(differ)} of its {len(old)} image ids differ; row {differ[0]} was {old[differ[0]]!r}, now {ids[differ[0]]!r}"
    raise InputError(
        f"{store.path} was collected from other images ({detail}): resuming would mix two sets of images. Resume it "
        "with the images it was collected from (the same paths), or collect into a new folder (or delete this one to "
        "start over)."
    )


def _create(out: Path, params: dict, ids: Optional[list[str]], lock: str) -> Optional[bool]:
    """Build a new store in a temporary sibling folder and rename it to ``out`` (the commit point of
    creation). False when ``out`` was filled by someone else meanwhile; None when the parent folder
    is not writable but ``out`` exists (build in place instead)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{out.name}.creating."
        for leftover in out.parent.glob(glob.escape(prefix) + "*"):  # of a creation that was killed
            host, _, pid = leftover.name[len(prefix):].rpartition(".")
            if leftover.is_dir() and pid.isdigit() and _stale({"host": host, "pid": int(pid)}):
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = out.parent / f"{prefix}{socket.gethostname()}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and out.is_dir():
            return None
        raise
    try:
        (tmp / "lock").write_text(lock)
        _build(tmp, params, ids)
        try:
            os.rename(tmp, out)  # replaces an empty folder `out`, fails on a filled one
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def _build(folder: Path, params: dict, ids: Optional[list[str]]) -> None:
    """A new store's ``done/``, ``ids.json`` and, last, its ``zarr.json`` in ``folder``."""
    (folder / "done").mkdir(exist_ok=True)
    attributes = {**params, "arrays": [], "array_meta": {}, "ids": None, "identity": uuid.uuid4().hex}
    if ids is not None:
        data = json.dumps(ids).encode()
        atomic_write(folder / "ids.json", data)
        attributes["ids"] = hashlib.sha256(data).hexdigest()
    _write_group(folder, attributes)


def _write_group(folder: Path, attributes: dict) -> None:
    """Write the store's group metadata (Zarr v3 ``zarr.json``) with its checksum, atomically."""
    attributes = {**attributes, "checksum": _checksum(attributes)}
    atomic_write(folder / "zarr.json", json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}, indent=1))


def _chunks_to_compute(store: Store, verify: bool, progress: bool,
                       fingerprint: Callable[[int, int], Optional[str]]) -> tuple[list[int], dict[str, list[int]]]:
    """Chunks to (re)compute: unfinished ones, those with a bad marker, those whose files are
    damaged and those whose images changed since (their ``fingerprint`` differs from the one their
    marker records); the markers of all but the unfinished are removed, with a StoreWarning. A store
    written before identities gets one (`_adopt`). Also returns ``{"damaged": [...], "changed": [...]}``."""
    (store.path / "done").mkdir(exist_ok=True)
    markers, problems = store._scan()
    bad = []
    for path, chunk, problem in problems:
        again = f"; chunk {chunk} will be recomputed" if chunk is not None else ""
        warnings.warn(f"store {store.path}: removed {path.relative_to(store.path)}, which {problem}{again}.", StoreWarning, stacklevel=4)
        path.unlink(missing_ok=True)
        bad += [] if chunk is None else [chunk]
    if verify:
        damaged = store.verify(sorted(markers), progress=progress)
    else:
        damaged = {}
        for c in sorted(markers):
            for name in store.arrays:
                problem = store._check_file(name, c, markers[c]["arrays"][name], full=False)
                if problem:
                    damaged.setdefault(c, []).append(f"array '{name}' {problem}")
    for c, found in damaged.items():
        start, stop = store.rows(c)
        warnings.warn(
            f"store {store.path}: chunk {c} (rows {start}-{stop - 1}) is damaged ({'; '.join(found)}); recomputing it.",
            StoreWarning, stacklevel=4,
        )
        (store.path / "done" / f"{c:06d}").unlink(missing_ok=True)
        del markers[c]
    changed = _changed_chunks(store, markers, fingerprint)
    for c in changed:
        (store.path / "done" / f"{c:06d}").unlink(missing_ok=True)
        del markers[c]
    if store.identity is None:
        _adopt(store, markers)
    todo = [c for c in range(store.n_chunks) if c not in markers]
    return todo, {"damaged": sorted({*bad, *damaged}), "changed": changed}


def _changed_chunks(store: Store, markers: dict[int, dict], fingerprint: Callable[[int, int], Optional[str]]) -> list[int]:
    """The finished chunks whose images changed since they were collected (one StoreWarning names
    them). Chunks without a recorded fingerprint, or from a source that has none, are not compared."""
    changed = []
    for c in sorted(markers):
        recorded = markers[c].get("source")
        if recorded is not None:
            now = fingerprint(*store.rows(c))
            if now is not None and now != recorded:
                changed.append(c)
    if changed:
        start, stop = store.rows(changed[0])
        warnings.warn(
            f"store {store.path}: the images of {len(changed)} finished chunk{'s' if len(changed) > 1 else ''} "
            f"({_ranges(changed)}; chunk {changed[0]} is rows {start}-{stop - 1}) changed since they were collected "
            "(files replaced or modified, a shard rewritten); recomputing them from the images as they are now.",
            StoreWarning, stacklevel=5,
        )
    return changed


def _adopt(store: Store, markers: dict[int, dict]) -> None:
    """Give a store written before identities one: its finished markers (verified just before) are
    rewritten with it and their checksum, then the identity is recorded in its metadata (a run
    killed in between leaves a store without identity whose markers are adopted again). Their
    images were not fingerprinted then, so a change of them cannot be detected (``source``: None)."""
    identity = uuid.uuid4().hex
    for c, marker in sorted(markers.items()):
        body = _marker(c, marker["rows"], marker["arrays"], identity, None, marker.get("skipped"))
        atomic_write(store.path / "done" / f"{c:06d}", json.dumps(body))
    _write_group(store.path, {**store.meta, "identity": identity})
    store.meta = _read_group(store.path)
    if markers:
        warnings.warn(
            f"store {store.path} predated store identities; it now has one, and its {len(markers)} finished chunks "
            "(verified against their checksums) were kept, but whether their images changed since they were "
            "collected cannot be checked: they were not fingerprinted then.",
            StoreWarning, stacklevel=5,
        )


def _open_arrays(store: Store) -> dict[str, Any]:
    """The store's arrays opened for writing (empty before the first chunk created them)."""
    import zarr

    return {name: zarr.open_array(str(store.path / name), mode="r+").with_config(WRITE_CONFIG) for name in store.arrays}


def _create_arrays(store: Store, chunk: dict[str, np.ndarray]) -> dict[str, Any]:
    """Create the store's arrays (shapes from the first chunk, every chunk crc32c-checksummed) and
    record them, with the hashes of their metadata, in the store's checksummed metadata."""
    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec

    n, size = store.n_images, store.chunk_size
    for key, value in chunk.items():
        zarr.create_array(
            store=str(store.path / key), shape=(n, *value.shape[1:]), chunks=(size, *value.shape[1:]), dtype=value.dtype,
            fill_value=float("nan") if value.dtype.kind == "f" else -1,  # a chunk that is not there reads as NaN, never as 0
            compressors=[ZstdCodec(level=0, checksum=False), Crc32cCodec()],
            chunk_key_encoding={"name": "default", "separator": "/"},
            overwrite=True,  # left by a run killed before it recorded its arrays
        )
    names = list(chunk)
    store.meta = {
        **{k: v for k, v in store.meta.items() if k != "checksum"}, "arrays": names,
        "array_meta": {key: hashlib.sha256((store.path / key / "zarr.json").read_bytes()).hexdigest() for key in names},
    }
    _write_group(store.path, store.meta)
    store.meta = _read_group(store.path)
    store._check_arrays()
    return _open_arrays(store)


def _write_chunk(store: Store, arrays: dict[str, Any], c: int, chunk: dict[str, np.ndarray],
                 extra: Optional[dict] = None) -> None:
    """Write chunk ``c`` of every array, then its marker ``done/<c>`` (the commit point) recording
    each chunk file's size and crc32c, the store's identity, and from ``extra`` the fingerprint of
    the chunk's images (``source``) and the rows of images that could not be decoded (``skipped``)."""
    start, stop = store.rows(c)
    if sorted(chunk) != sorted(arrays):
        raise InputError(f"chunk {c} has terms {sorted(chunk)}, but the store's arrays are {sorted(arrays)}.")
    for key, value in chunk.items():
        arrays[key][start:stop] = value
    recorded = {}
    for key in arrays:
        with open(store._chunk_file(key, c), "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(-4, os.SEEK_END)
            recorded[key] = {"bytes": size, "crc32c": int.from_bytes(handle.read(4), "little")}
    extra = extra or {}
    skipped = {str(row): reason for row, reason in sorted((extra.get("skipped") or {}).items())}
    marker = _marker(c, [start, stop], recorded, store.meta["identity"], extra.get("source"), skipped)
    atomic_write(store.path / "done" / f"{c:06d}", json.dumps(marker))


def _marker(c: int, rows: list[int], arrays: dict, identity: str, source: Optional[str], skipped: Optional[dict]) -> dict:
    """A chunk marker's content, ending in the sha256 ``checksum`` of the rest (`_checksum`)."""
    marker = {"chunk": c, "rows": rows, "arrays": arrays, "store": identity, "source": source}
    if skipped:  # only then: the key is absent when every image decoded
        marker["skipped"] = skipped
    return {**marker, "checksum": _checksum(marker)}
