"""The store format: a collected store's layout, checksums, markers, lock, and its reader `Store`.

A store is a Zarr v3 group written by [`collect`][clip_lens.collect.collect] (the arrays are listed there),
one chunk of every array per ``chunk_size`` images. Crash safety: a chunk counts as written only once its
marker ``done/<chunk>`` exists, written (atomically) after every array of that chunk.

Integrity (store format 2): every chunk file ends in a crc32c of its bytes (Zarr's ``crc32c``
codec, checked on every decode), and the chunk's marker records each file's size and crc32c, so a
missing, truncated, bit-flipped or foreign chunk file raises
[`StoreCorruptError`][clip_lens.errors.StoreCorruptError] instead of reading as zeros or wrong rows. The group's
attributes carry a sha256 ``checksum`` of themselves and the sha256 of every array's ``zarr.json``
(``array_meta``) and of ``ids.json`` (``ids``). Resuming verifies every finished chunk
([`Store.verify`][clip_lens.collect.Store.verify]) and recomputes exactly the damaged ones. One writer at a time
holds the store's ``lock`` file (`_Lock`). Stores of format 1 (no checksums) are read with a
[`StoreWarning`][clip_lens.errors.StoreWarning], not resumed.

Identity: every store gets a random ``identity`` when it is created (in its checksummed
attributes), and every marker records it, a fingerprint of the chunk's images (``source``: see
[`ImageSource.fingerprint`][clip_lens.collect.ImageSource.fingerprint]) and a sha256 ``checksum`` of itself. So a
marker or chunk copied from another store, a ``zarr.json`` copied from one, or an edited marker is
damage. Readers refuse a store whose markers do not cover every chunk unless it is opened with
``partial=True``.

Writing a store (creation, chunks, markers, resume planning) is `clip_lens.store_write`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

import google_crc32c
import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens.errors import InputError, StoreCorruptError, StoreLockedError, StoreWarning
from clip_lens.files import read_bytes

if TYPE_CHECKING:
    from clip_lens.hooked_clip import HookedCLIP

FORMAT = "clip_lens.store/2"
LEGACY_FORMATS = ("clip_lens.store/1",)  # no checksums: read with a warning, never resumed
MARKER = re.compile(r"[0-9]{6,}")  # done/000003
WRITE_CONFIG = {"write_empty_chunks": True}  # every chunk has a file, even all-fill ones: a missing file is damage


def weights_fingerprint(model: "HookedCLIP") -> str:
    """A short hash of the weights, so that a store is never resumed or read with another model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[:4096])
        digest.update(str(tuple(tensor.shape)).encode())
    return digest.hexdigest()[:16]

@dataclass
class Store:
    """A collected store, opened for reading. Arrays are read lazily; nothing unfinished is returned.

    Every read of a finished chunk is checked (docs: Concepts → Reliability → Stores): a chunk file that is
    missing, truncated, damaged or not the one its ``done/`` marker recorded, or a marker that is not
    this store's, raises [`StoreCorruptError`][clip_lens.errors.StoreCorruptError] naming the array, the chunk and its
    rows; it is never read as zeros or as another chunk's rows. [`verify`][clip_lens.collect.Store.verify] checks every
    finished chunk at once. A store opened without ``partial=True`` answers only while every chunk is
    finished.

    ``recomputed``: on the store [`collect`][clip_lens.collect.collect] returns, the chunks it recomputed when resuming,
    ``{"damaged": [...], "changed": [...]}`` (changed: their images changed since they were collected).
    """

    path: Path
    meta: dict
    partial: bool = False
    recomputed: dict = field(default_factory=lambda: {"damaged": [], "changed": []}, compare=False)
    _array_ndim: dict = field(default_factory=dict, repr=False, compare=False)
    _marker_cache: dict = field(default_factory=dict, repr=False, compare=False)
    _file_cache: dict = field(default_factory=dict, repr=False, compare=False)
    _stray: set = field(default_factory=set, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | Path, partial: bool = False) -> "Store":
        """Open the store at ``path``, checking its metadata (the group's ``zarr.json`` against its
        checksum, each array's ``zarr.json`` against the hash recorded there) and, unless ``partial``,
        that every chunk is finished (its ``done/`` marker exists and is this store's).

        Args:
            partial: open an unfinished store too; its reads, [`ids`][clip_lens.collect.Store.ids] and searches
                then cover the finished chunks only. Without it, every read refuses the store as soon as
                a chunk's marker is missing (e.g. deleted after it was opened).

        Raises:
            InputError: ``path`` is not a clip_lens store; without ``partial``, a chunk is not finished
                (the message names the chunks and says to rerun the same collect).
            StoreCorruptError: its metadata is damaged or was edited; without ``partial``, a bad marker
                where a chunk is missing (e.g. one copied from another store).
        """
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise InputError(f"{path} is not a clip_lens store (no zarr.json); create one with clip_lens.collect.")
        meta = _read_group(path)
        if "checksum" in meta and meta["checksum"] != _checksum(meta):
            raise StoreCorruptError(
                f"store {path}: its metadata {path / 'zarr.json'} does not match its checksum (edited or damaged). "
                + _METADATA_FIX
            )
        found = meta.get("format")
        if found not in (FORMAT, *LEGACY_FORMATS):
            if isinstance(found, str) and found.startswith("clip_lens.store/"):
                raise InputError(f"{path} is a clip_lens store of format {found!r}, newer than this clip_lens reads; upgrade clip_lens.")
            raise InputError(f"{path} is a Zarr group but not a clip_lens store (format {found!r}).")
        _check_keys(path, meta)
        store = cls(path, meta, partial)
        store._check_arrays()
        if not store.checked:
            warnings.warn(
                f"store {path} has no checksums (written by clip_lens before store format 2, or by hand): a missing "
                "or damaged chunk cannot be detected when it is read. Collect it again into a new folder for a checked store.",
                StoreWarning, stacklevel=2,
            )
        elif store.identity is None:
            warnings.warn(
                f"store {path} predates store identities (written by an earlier clip_lens): a chunk or marker copied "
                "from another store, or images changed since, cannot be detected. Running the same collect on it "
                "again gives it an identity (after verifying its chunks).",
                StoreWarning, stacklevel=2,
            )
        if not partial:
            markers, problems = store._scan()
            if len(markers) != store.n_chunks:
                if problems:
                    store._done()  # raises: a bad marker where a chunk is missing is the error to report
                raise store._incomplete(markers)
        return store

    @property
    def identity(self) -> Optional[str]:
        """The store's identity (a random hex string given at creation, recorded in every marker);
        None for stores written before identities."""
        return self.meta.get("identity")

    @property
    def checked(self) -> bool:
        """Whether the store records checksums (format 2); stores without them read with a warning."""
        return "checksum" in self.meta

    @property
    def n_images(self) -> int:
        return int(self.meta["n_images"])

    @property
    def chunk_size(self) -> int:
        return int(self.meta["chunk_size"])

    @property
    def n_chunks(self) -> int:
        return -(-self.n_images // self.chunk_size)

    @property
    def head_layers(self) -> list[int]:
        return list(self.meta["head_layers"])

    @property
    def token_layers(self) -> list[int]:
        return list(self.meta["token_layers"])

    @property
    def arrays(self) -> list[str]:
        return list(self.meta["arrays"])

    def rows(self, chunk: int) -> tuple[int, int]:
        """``(start, stop)`` image rows of chunk ``chunk``."""
        return chunk * self.chunk_size, min(self.n_images, (chunk + 1) * self.chunk_size)

    def done_chunks(self) -> list[int]:
        """The finished chunks, in order.

        Raises:
            StoreCorruptError: a ``done/`` marker that names no chunk of this store or does not
                describe its chunk. (Files in ``done/`` that are not named like markers, such as
                ``000001.bak``, are ignored with a [`StoreWarning`][clip_lens.errors.StoreWarning].)
        """
        return sorted(self._done())

    def done_rows(self) -> list[tuple[int, int]]:
        """``(start, stop)`` source rows of each finished chunk, in order."""
        return [self.rows(c) for c in self.done_chunks()]

    @property
    def n_done(self) -> int:
        """Images in finished chunks, skipped ones excepted (what a partial read or a search sees)."""
        markers = self._done()  # one scan of done/ for the rows and their skipped images
        return sum(stop - start for start, stop in map(self.rows, markers)) - sum(len(m.get("skipped", {})) for m in markers.values())

    def skipped(self) -> dict[int, tuple[Optional[str], str]]:
        """Images of the finished chunks that could not be decoded when they were collected: source
        row → ``(id or None, reason)``. They are left out of every read, of [`ids`][clip_lens.collect.Store.ids] and of
        ``n_done``, so the rows that reads return are numbered without them."""
        rows = self._skipped_rows()
        ids = self._all_ids() if rows else None
        return {row: (None if ids is None else ids[row], reason) for row, reason in rows.items()}

    def _skipped_rows(self) -> dict[int, str]:
        """Source row → reason, from the finished chunks' markers, in row order."""
        return dict(sorted((int(row), reason) for marker in self._done().values() for row, reason in marker.get("skipped", {}).items()))

    @property
    def complete(self) -> bool:
        return len(self.done_chunks()) == self.n_chunks

    def ids(self, partial: Optional[bool] = None) -> Optional[list[str]]:
        """The image ids (file paths, scene indices) of the rows, or None when the source had none
        (without the [`skipped`][clip_lens.collect.Store.skipped] images, as reads are). ``partial``: as in
        [`read`][clip_lens.collect.Store.read]."""
        self._finished(partial)
        ids = self._all_ids()
        skipped = self._skipped_rows() if ids is not None else {}
        return ids if not skipped else [i for row, i in enumerate(ids) if row not in skipped]

    def _all_ids(self) -> Optional[list[str]]:
        """The ids of every source row, skipped ones included."""
        file = self.path / "ids.json"
        recorded = self.meta.get("ids")
        if self.checked and recorded is None:
            return None
        try:
            data = read_bytes(file, f"store {self.path}: its image ids", _METADATA_FIX)  # a FIFO: refused, not waited on
        except FileNotFoundError:
            if self.checked:
                raise StoreCorruptError(f"store {self.path}: its image ids {file} are missing. {_METADATA_FIX}") from None
            return None
        if self.checked and hashlib.sha256(data).hexdigest() != recorded:
            raise StoreCorruptError(f"store {self.path}: its image ids {file} do not match their checksum (edited or damaged). {_METADATA_FIX}")
        try:
            ids = json.loads(data)
        except ValueError as exc:
            raise StoreCorruptError(f"store {self.path}: its image ids {file} are not valid JSON ({exc}). {_METADATA_FIX}") from exc
        if not (isinstance(ids, list) and len(ids) == self.n_images and all(isinstance(i, str) for i in ids)):
            raise StoreCorruptError(f"store {self.path}: {file} is not a list of {self.n_images} image ids. {_METADATA_FIX}")
        return ids

    def read(self, name: str, partial: Optional[bool] = None, index: tuple = ()) -> Tensor:
        """Array ``name`` as a tensor over the finished images (all of them unless ``partial``).
        ``index`` selects within the trailing axes, read from disk (e.g. ``(layer_row, head)``).
        ``partial`` defaults to what the store was opened with; it cannot widen it: a store opened
        without ``partial=True`` is refused as soon as a chunk is missing, whatever the call says.

        Raises:
            InputError: an unknown array; an incomplete store without ``partial`` (naming the missing chunks).
            StoreCorruptError: a finished chunk that is missing, damaged or not its own (the message
                names the array, chunk and rows; rerunning the same ``collect`` repairs it).
        """
        parts = [part for _, part in self.iter_chunks(name, partial=partial, index=index)]
        if not parts:
            return torch.from_numpy(np.asarray(self._zarr(name)[(slice(0, 0), *index)]))
        return torch.from_numpy(np.concatenate(parts))

    def iter_chunks(self, name: str, partial: Optional[bool] = None, index: tuple = ()) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, rows)`` of array ``name`` for each finished chunk, one chunk in memory at a
        time, each checked as [`read`][clip_lens.collect.Store.read] checks it (same arguments and errors). Rows are
        numbered as [`ids`][clip_lens.collect.Store.ids] numbers them: without the skipped images."""
        if name not in self.arrays:
            raise InputError(f"store {self.path} has no array '{name}'; it has {', '.join(self.arrays)}.")
        return self._chunks(name, self._finished(partial), index)

    def _finished(self, partial: Optional[bool]) -> dict[int, dict]:
        """The finished chunks' markers, refusing an incomplete store unless it was opened with
        ``partial=True`` and ``partial`` is not False."""
        markers = self._done()
        if len(markers) != self.n_chunks and not (self.partial and partial is not False):
            raise self._incomplete(markers)
        return markers

    def _incomplete(self, markers: dict[int, dict]) -> InputError:
        """The error for a store whose chunks are not all finished: which are missing, and the repair."""
        missing = [c for c in range(self.n_chunks) if c not in markers]
        if len(missing) == 1:
            start, stop = self.rows(missing[0])
            which = f"chunk {missing[0]} (rows {start}-{stop - 1}) has"
        else:
            which = f"chunks {_ranges(missing)} have"
        return InputError(
            f"store {self.path} is incomplete ({len(markers)} of {self.n_chunks} chunks): {which} no done/ marker "
            f"(not collected yet, or the marker was deleted){self._lock_note()}; run collect again with the same "
            "arguments to finish it, or read(..., partial=True) for the finished images."
        )

    def _lock_note(self) -> str:
        """What the store's ``lock`` file says about a writer ('' without one)."""
        lock = self.path / "lock"
        try:
            holder = json.loads(lock.read_bytes())
            who = f"pid {int(holder['pid'])} on host {holder['host']}"
        except FileNotFoundError:
            return ""
        except (OSError, ValueError, KeyError, TypeError):
            return f"; it has a damaged lock file {lock}"
        if _stale(holder):
            return f"; its lock file names a collect that is gone ({who})"
        return f"; a collect ({who}) holds its lock and may still be writing it"

    def _chunks(self, name: str, markers: dict[int, dict], index: tuple) -> Iterator[tuple[int, np.ndarray]]:
        array = self._zarr(name)
        dropped = 0  # skipped images in the chunks before: rows are numbered without them
        for c in sorted(markers):
            start, stop = self.rows(c)
            skipped = sorted(int(row) - start for row in markers[c].get("skipped", {}))
            if self.checked:
                problem = self._check_file(name, c, markers[c]["arrays"][name], full=False)
                if problem:
                    raise self._chunk_error(name, c, problem)
            try:
                part = np.asarray(array[(slice(start, stop), *index)] if index else array[start:stop])
            except (IndexError, TypeError):
                raise  # a bad `index`: the caller's error, not the store's
            except Exception as exc:  # a decoding error: the crc32c codec found the bytes changed, zstd could not inflate …
                if not self.checked:
                    raise StoreCorruptError(
                        f"store {self.path}: chunk {c} of array '{name}' (rows {start}-{stop - 1}) cannot be read ({exc}); "
                        "this store has no checksums, so collect it again into a new folder.",
                        name, c, (start, stop),
                    ) from exc
                raise self._chunk_error(name, c, f"is damaged: {exc}") from exc
            yield start - dropped, np.delete(part, skipped, axis=0) if skipped else part
            dropped += len(skipped)

    def head_outputs(self, layer: int, head: int) -> Float[Tensor, "n d"]:
        """One head's direct contributions ``[N, D]`` (for TextSpan)."""
        if layer not in self.head_layers:
            raise InputError(f"layer {layer} was not collected per head; the store has layers {self.head_layers}.")
        return self.read("heads", index=(self.head_layers.index(layer), head))

    def check_model(self, model: "HookedCLIP", pretrained: Optional[str] = None) -> None:
        """Refuse to read this store with a model other than the one it was collected with: another model
        name, or other weights (the ``weights`` fingerprint, `weights_fingerprint`). The one check every
        reader uses (TextSpan, neighbours, the app, the CLI). A store without a fingerprint (written from
        arrays) has nothing to compare. ``pretrained`` is what the caller loaded (None: random weights),
        so the fix can say what to pass."""
        meta, where = self.meta, f"store {self.path}"
        collected_with = meta.get("model")
        if collected_with not in (None, "custom") and collected_with != model.model_name:
            raise InputError(f"{where} was collected with model '{collected_with}', not '{model.model_name}'; "
                             f"pass --model {collected_with}.")
        recorded = meta.get("weights")
        if recorded is None:
            return
        here = weights_fingerprint(model)
        if here == recorded:
            return
        stored_tag = meta.get("pretrained")
        if stored_tag in (None, "None"):
            fix = ("it was collected with RANDOM weights (no --pretrained), which differ in every process, so no "
                   "other command can reproduce them: collect it again with --pretrained (a tag or a local "
                   "checkpoint) and pass the same --pretrained here")
        elif str(stored_tag).startswith("bundled:"):
            fix = f"pass --model {collected_with} without --pretrained (the store was collected with its bundled weights)"
        else:
            fix = (f"pass the same --model/--pretrained as `clip-lens collect` did: --model {collected_with} "
                   f"--pretrained {stored_tag}")
            if pretrained is None:
                fix += " (without --pretrained this model has RANDOM weights)"
        raise InputError(f"{where} was collected with other weights of {collected_with} (weights fingerprint "
                         f"{recorded}, this model's {here}); {fix}.")

    def verify(self, chunks: Optional[Iterable[int]] = None, progress: bool = False) -> dict[int, list[str]]:
        """Check every file of the finished ``chunks`` (default: all) completely: it exists, has the
        size and crc32c recorded in the chunk's marker, and its bytes match that checksum. Reads the
        whole store once (about as fast as the disk reads; the crc32c itself runs at several GB/s).

        Returns:
            ``{chunk: [what is wrong, per damaged array]}`` for the damaged chunks only (empty: all good).

        Raises:
            InputError: a store without checksums (format 1), which cannot be verified.
            StoreCorruptError: a bad ``done/`` marker (see [`done_chunks`][clip_lens.collect.Store.done_chunks]).
        """
        if not self.checked:
            raise InputError(f"store {self.path} has no checksums (store format 1), so it cannot be verified.")
        markers = self._done()
        chosen = sorted(markers) if chunks is None else [c for c in chunks if c in markers]
        damaged: dict[int, list[str]] = {}
        for c in tqdm(chosen, desc="verify", unit="chunk", disable=not progress or not chosen):  # no bar for nothing
            for name in self.arrays:
                problem = self._check_file(name, c, markers[c]["arrays"][name], full=True)
                if problem:
                    damaged.setdefault(c, []).append(f"array '{name}' ({self._chunk_file(name, c).relative_to(self.path)}) {problem}")
        return damaged

    # -- internals -------------------------------------------------------------------------------

    def _zarr(self, name: str):
        import zarr

        return zarr.open_array(str(self.path / name), mode="r")

    def _check_arrays(self) -> None:
        """Each listed array's metadata: its hash as recorded (checked stores), readable JSON (all)."""
        recorded = self.meta.get("array_meta", {})
        crc_codecs = False
        for name in self.arrays:
            file = self.path / name / "zarr.json"
            try:
                data = read_bytes(file, f"store {self.path}: the metadata of array '{name}'", _METADATA_FIX)
            except FileNotFoundError:
                raise StoreCorruptError(f"store {self.path}: the metadata {file} of array '{name}' is missing. {_METADATA_FIX}") from None
            if self.checked and hashlib.sha256(data).hexdigest() != recorded.get(name):
                raise StoreCorruptError(
                    f"store {self.path}: the metadata {file} of array '{name}' does not match the hash recorded when it "
                    f"was written (edited or damaged: its data type, shape or codecs may differ). {_METADATA_FIX}"
                )
            try:
                spec = json.loads(data)
                shape = spec["shape"]
                crc_codecs |= any(codec.get("name") == "crc32c" for codec in spec.get("codecs", []))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise StoreCorruptError(f"store {self.path}: the metadata {file} of array '{name}' is not valid ({exc!r}). {_METADATA_FIX}") from exc
            if not isinstance(shape, list) or not shape or shape[0] != self.n_images:
                raise StoreCorruptError(f"store {self.path}: array '{name}' has shape {shape}, not {self.n_images} rows. {_METADATA_FIX}")
            self._array_ndim[name] = len(shape)
        if not self.checked and crc_codecs:
            raise StoreCorruptError(
                f"store {self.path}: its metadata {self.path / 'zarr.json'} lost its checksum (its arrays were written "
                f"with checksums). {_METADATA_FIX}"
            )

    def _chunk_file(self, name: str, chunk: int) -> Path:
        if name not in self._array_ndim:  # a Store made without open()
            self._check_arrays()
        return _chunk_file(self.path, name, chunk, self._array_ndim[name])

    def _check_file(self, name: str, chunk: int, recorded: dict, full: bool) -> Optional[str]:
        """What is wrong with the file of ``chunk`` of array ``name`` (None: nothing). ``full``: read it
        all and check its crc32c; else only its size and stored crc32c against the marker (cached
        while the file is unchanged)."""
        path = self._chunk_file(name, chunk)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return "is missing (its file was deleted; it would read as zeros)"
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns, recorded["bytes"], recorded["crc32c"])
        if not full and self._file_cache.get((name, chunk)) == key:
            return None
        if stat.st_size != recorded["bytes"]:
            return f"is not the chunk that was written: it has {stat.st_size} bytes, not {recorded['bytes']} (truncated, or a file from another chunk or store)"
        with open(path, "rb") as handle:
            if full:
                data = handle.read()
                stored = int.from_bytes(data[-4:], "little")
                computed = google_crc32c.value(np.frombuffer(data, np.uint8)[:-4])  # no copy
            else:
                handle.seek(-4, os.SEEK_END)
                stored, computed = int.from_bytes(handle.read(4), "little"), None
        if stored != recorded["crc32c"]:
            return "is not the chunk that was written: its checksum differs from the one its marker recorded (a file from another chunk or store, or damaged)"
        if full and computed != stored:
            return "is damaged: its bytes do not match their crc32c checksum"
        self._file_cache[(name, chunk)] = key
        return None

    def _chunk_error(self, name: str, chunk: int, problem: str) -> StoreCorruptError:
        start, stop = self.rows(chunk)
        file = self._chunk_file(name, chunk).relative_to(self.path)
        return StoreCorruptError(
            f"store {self.path}: chunk {chunk} of array '{name}' (rows {start}-{stop - 1}, file {file}) {problem}. "
            + _CHUNK_FIX,
            name, chunk, (start, stop),
        )

    def _done(self) -> dict[int, dict]:
        """The finished chunks' markers; a bad marker raises StoreCorruptError."""
        markers, problems = self._scan()
        if problems:
            path, chunk, problem = problems[0]
            more = f" ({len(problems) - 1} more bad markers)" if len(problems) > 1 else ""
            raise StoreCorruptError(
                f"store {self.path}: {path.relative_to(self.path) if path != self.path else 'it'} {problem}{more}. " + _CHUNK_FIX,
                chunk=chunk, rows=None if chunk is None else self.rows(chunk),
            )
        return markers

    def _scan(self) -> tuple[dict[int, dict], list[tuple[Path, Optional[int], str]]]:
        """``(valid markers by chunk, [(marker file, its chunk or None, what is wrong)])``. Files that
        are not named like markers are stray: ignored (temporary files of atomic writes silently)."""
        folder = self.path / "done"
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return {}, [(folder, None, "has no done/ folder (the markers of its finished chunks)")]
        markers, problems = {}, []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            if not (MARKER.fullmatch(name) and f"{int(name):06d}" == name and entry.is_file()):
                if name not in self._stray:
                    self._stray.add(name)
                    warnings.warn(
                        f"store {self.path}: ignoring done/{name}, which is not a chunk marker (markers are named like 000003).",
                        StoreWarning, stacklevel=3,
                    )
                continue
            chunk = int(name)
            if chunk >= self.n_chunks:
                problems.append((Path(entry.path), None, f"names chunk {chunk}, but the store has only {self.n_chunks} chunks (0-{self.n_chunks - 1})"))
                continue
            marker, problem = self._marker(entry, chunk)
            if problem:
                problems.append((Path(entry.path), chunk, problem))
            else:
                markers[chunk] = marker
        return markers, problems

    def _marker(self, entry: os.DirEntry, chunk: int) -> tuple[Optional[dict], Optional[str]]:
        stat = entry.stat()
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = self._marker_cache.get(chunk)
        if cached is not None and cached[0] == key:
            return cached[1]
        result = self._parse_marker(Path(entry.path), chunk)
        self._marker_cache[chunk] = (key, result)
        return result

    def _parse_marker(self, path: Path, chunk: int) -> tuple[Optional[dict], Optional[str]]:
        """The marker of ``chunk`` at ``path`` if it is valid and this store's, else ``(None, what is wrong)``.
        The layout is checked first (its rows, arrays, sizes), then its store identity and checksum."""
        if not self.checked:
            return {}, None  # format 1: empty marker files
        try:
            marker = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            return None, f"is not a valid chunk marker ({exc})"
        start, stop = self.rows(chunk)
        if not isinstance(marker, dict) or marker.get("chunk") != chunk or marker.get("rows") != [start, stop]:
            return None, f"does not describe chunk {chunk} (rows {start}-{stop - 1})"
        recorded = marker.get("arrays")
        if not self.arrays or not isinstance(recorded, dict) or sorted(recorded) != sorted(self.arrays):
            return None, f"does not list the store's arrays ({', '.join(self.arrays) or 'none yet'})"
        for name, info in recorded.items():
            if not (isinstance(info, dict) and _whole(info.get("bytes")) and info["bytes"] > 4
                    and _whole(info.get("crc32c")) and 0 <= info["crc32c"] < 2**32):
                return None, f"has no valid size and crc32c for array '{name}'"
        skipped = marker.get("skipped", {})
        if not (isinstance(skipped, dict) and all(
                key.isdigit() and start <= int(key) < stop and isinstance(reason, str) for key, reason in skipped.items())):
            return None, f"has a 'skipped' entry that is not a map of rows {start}-{stop - 1} to reasons"
        if not isinstance(marker.get("source"), (str, type(None))):
            return None, "has a 'source' entry that is not a fingerprint of its images"
        identity = self.identity
        if identity is not None and marker.get("store") != identity:
            if "store" not in marker:
                return None, "records no store identity, so it was not written for this store (copied from an older store, or by hand)"
            return None, (f"belongs to another store: it records store {marker['store']!r}, this store is {identity!r} "
                          "(the marker, or the whole chunk, was copied from another store; or zarr.json was)")
        if (identity is not None or "checksum" in marker) and marker.get("checksum") != _checksum(marker):
            return None, "does not match its checksum (edited or damaged: its rows, files or skipped images may differ)"
        return marker, None


_CHUNK_FIX = (
    "To repair it, run the same `clip-lens collect` command (or collect(...) with the same arguments) again: it checks "
    "every finished chunk and recomputes exactly the damaged ones."
)
_METADATA_FIX = (
    "The store's data cannot be trusted without it: restore the file from a backup, or move the folder aside and "
    "collect again into a new one."
)


def _ranges(numbers: list[int], most: int = 8) -> str:
    """``[1, 3, 4, 5, 9]`` → ``"1, 3-5, 9"`` (at most ``most`` ranges, then how many more numbers)."""
    spans: list[list[int]] = []
    for number in numbers:
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans[:most])
    rest = sum(b - a + 1 for a, b in spans[most:])
    return text + (f" and {rest} more" if rest else "")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checksum(attributes: dict) -> str:
    """sha256 of the canonical JSON of the store's attributes without their ``checksum``."""
    body = {k: v for k, v in attributes.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_group(path: Path) -> dict:
    """The attributes of the store's group metadata ``zarr.json`` (StoreCorruptError when unreadable)."""
    file = path / "zarr.json"
    try:
        group = json.loads(file.read_bytes())
    except (OSError, ValueError) as exc:
        raise StoreCorruptError(f"store {path}: its metadata {file} is not valid JSON ({exc}). {_METADATA_FIX}") from exc
    attributes = group.get("attributes") if isinstance(group, dict) else None
    if not isinstance(group, dict) or group.get("node_type") != "group" or not isinstance(attributes, dict):
        raise StoreCorruptError(f"store {path}: its metadata {file} is not a Zarr group with attributes. {_METADATA_FIX}")
    return attributes


def _check_keys(path: Path, meta: dict) -> None:
    """The attributes every reader relies on, with their types (StoreCorruptError otherwise)."""
    def layers(value):
        return isinstance(value, list) and all(_whole(v) and v >= 0 for v in value)

    expected = {
        "n_images": lambda v: _whole(v) and v >= 0, "chunk_size": lambda v: _whole(v) and v >= 1,
        "head_layers": layers, "token_layers": layers,
        "arrays": lambda v: isinstance(v, list) and all(isinstance(a, str) and a and "/" not in a and not a.startswith(".") for a in v),
    }
    if "checksum" in meta:
        expected["array_meta"] = lambda v: isinstance(v, dict) and sorted(v) == sorted(meta.get("arrays") or [])
        expected["ids"] = lambda v: v is None or isinstance(v, str)
    for key, valid in expected.items():
        if key not in meta:
            raise StoreCorruptError(f"store {path}: its metadata {path / 'zarr.json'} has no '{key}'. {_METADATA_FIX}")
        if not valid(meta[key]):
            raise StoreCorruptError(f"store {path}: its metadata {path / 'zarr.json'} has an invalid '{key}': {meta[key]!r}. {_METADATA_FIX}")


def _chunk_file(path: Path, name: str, chunk: int, ndim: int) -> Path:
    """The file of chunk ``chunk`` of array ``name`` (Zarr v3 default key encoding, chunks along rows only)."""
    return path.joinpath(name, "c", str(chunk), *["0"] * (ndim - 1))


class _Lock:
    """The store's writer lock: a file ``lock`` holding the writer's pid, host, process start time
    and start date (and, for rank 0 of a distributed collect, the job's number of ``ranks``; for a
    replacement, the folder it collects in: ``replacing``), created atomically (a hard link of a
    complete temporary file). A lock whose process is gone (same host, pid dead or reused) is stale
    and taken over."""

    def __init__(self, path: Path, content: str):
        self.path, self._content = path, content

    @staticmethod
    def content(job: Optional[dict] = None) -> str:
        pid = os.getpid()
        return json.dumps({
            "pid": pid, "host": socket.gethostname(), "process_start": _process_start(pid),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), **(job or {}),
        })

    @classmethod
    def acquire(cls, folder: Path, job: Optional[dict] = None) -> "_Lock":
        path, content = folder / "lock", cls.content(job)
        for _ in range(3):
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".lock.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(content)
                os.link(tmp, path)
                return cls(path, content)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            try:
                held = path.read_text()
            except FileNotFoundError:
                continue  # released meanwhile
            try:
                holder = json.loads(held)
                holder_text = f"pid {int(holder['pid'])} on host {holder['host']}, since {holder.get('started', '?')}"
                if "ranks" in holder:
                    holder_text += f", rank 0 of a job of {int(holder['ranks'])} processes"
                if "replacing" in holder:
                    holder_text += f", collecting a replacement for it in {holder['replacing']}"
            except (ValueError, KeyError, TypeError):
                raise StoreLockedError(
                    f"store {folder} has a damaged lock file {path}; if no collect is writing this store, delete that "
                    "file and run again."
                ) from None
            if not _stale(holder):
                raise StoreLockedError(
                    f"store {folder} is being written by another collect ({holder_text}); two writers would corrupt it. "
                    f"Wait for that one to finish (or stop it); if that process is gone, delete {path} and run again."
                )
            taken = folder / f".lock.stale.{os.getpid()}.tmp"
            try:
                os.rename(path, taken)  # atomic: only one process takes the stale lock away
            except FileNotFoundError:
                continue
            if taken.read_text() != held:  # a live lock replaced the stale one meanwhile: put it back
                try:
                    os.link(taken, path)
                except FileExistsError:
                    pass
                os.unlink(taken)
                continue
            os.unlink(taken)
            warnings.warn(f"store {folder}: removed the stale lock of a collect that is gone ({holder_text}).", StoreWarning, stacklevel=5)
        raise StoreLockedError(f"store {folder}: could not take its lock {path}; another collect keeps taking it.")

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        try:
            if self.path.read_text() == self._content:
                self.path.unlink()
        except FileNotFoundError:
            pass


def _process_start(pid: int) -> Optional[int]:
    """The start time of process ``pid`` (clock ticks since boot; Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _stale(holder: dict) -> bool:
    """Whether the lock ``holder`` (pid, host, process_start) is of a process that is gone. Only
    decidable on the same host; a lock of another host is never stale."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not _whole(pid) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    started = holder.get("process_start")
    return started is not None and _process_start(pid) not in (None, started)
