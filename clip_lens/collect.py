"""Dataset-scale collection of direct contributions into a chunked, resumable store.

[`collect`][clip_lens.collect.collect] streams images through [`decompose`][clip_lens.decompose] one chunk at a time and writes
every term to a Zarr v3 group (chunks along the image axis), so memory stays at one chunk and
the store can be read memory-mapped or lazily. All terms are divided by ‖image embedding‖ as they
are written (Gandelsman et al.), so for every image they sum to the *unit* image embedding and
``term · text_embedding`` is that term's additive share of the cosine similarity.

Arrays of a store (``N`` images, ``D`` = d_embed, ``K`` = number of directions when given):

========================  ===========================================  ==========================
``embedding``             ``[N, D]`` unit image embedding               always
``embedding_norm``        ``[N]`` ‖embedding‖ before normalising        always
``embed``                 ``[N, D]`` the embedding (ln_pre) term        ViT; ConvNeXt (stem)
``attn``, ``mlp``         ``[N, L, D]`` per layer (attn: biases incl.)  ViT (ResNet: ``attn`` only)
``attn_bias``, ``bias``   ``[N, L, D]``, ``[N, D]`` constant terms       where the tower has them
``pooler_mlp``            ``[N, D]`` the MAP pooler's MLP term           SigLIP, PE-Core
``heads``                 ``[N, n_head_layers, H, D]``                  ``heads`` not None
``pos_embed``             ``[N, H, D]`` attention pool's positions      ResNet, with heads
``blocks``                ``[N, n_blocks, D]`` per block                ConvNeXt
``feature_map``           ``[N, D]`` the final feature map's term       FastViT
``tokens``                ``[N, n_token_layers, H, P, K or D]``         ``tokens`` not None
``block_positions``       ``[N, n_token_layers, P, K or D]``            ConvNeXt, ``tokens``
``positions``             ``[N, P, K or D]`` per final position         conv towers, ``tokens``
``labels``                ``[N]`` int64 (-1: none)                      always
========================  ===========================================  ==========================

Crash safety: a chunk counts as written only once a marker file ``done/<chunk>`` exists, and the
marker is created (atomically) after every array of that chunk is written. Running [`collect`][clip_lens.collect.collect]
again with the same arguments skips marked chunks and rewrites the others; readers never see an
unmarked chunk.

Integrity (store format 2): every chunk file ends in a crc32c of its bytes (Zarr's ``crc32c``
codec, checked on every decode), and the chunk's marker records each file's size and crc32c, so a
missing, truncated, bit-flipped or foreign chunk file raises
[`StoreCorruptError`][clip_lens.errors.StoreCorruptError] instead of reading as zeros or wrong rows. The group's
attributes carry a sha256 ``checksum`` of themselves and the sha256 of every array's ``zarr.json``
(``array_meta``) and of ``ids.json`` (``ids``). Resuming verifies every finished chunk
([`Store.verify`][clip_lens.collect.Store.verify]) and recomputes exactly the damaged ones. A store is created in a temporary
sibling folder renamed into place, and one writer at a time holds its ``lock`` file. Stores of
format 1 (no checksums) are read with a [`StoreWarning`][clip_lens.errors.StoreWarning], not resumed.

Identity: every store gets a random ``identity`` when it is created (in its checksummed
attributes), and every marker records it, a fingerprint of the chunk's images (``source``: see
[`ImageSource.fingerprint`][clip_lens.collect.ImageSource.fingerprint]) and a sha256 ``checksum`` of itself. So a
marker or chunk copied from another store, a ``zarr.json`` copied from one, or an edited marker is
damage, and a resumed run recomputes the chunks whose images changed. Readers refuse a store whose
markers do not cover every chunk unless it is opened with ``partial=True``. Format-2 stores written
before identities read with a StoreWarning and get one when ``collect`` resumes them.

Several processes (``torch.distributed``, e.g. ``torchrun``): the ranks split the chunks and write one
store, the one a single process writes, file for file; rank 0 holds the lock and the others write
under it (`_collect_ranks`; docs: Concepts → Scale).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import google_crc32c
import numpy as np
import torch
from jaxtyping import Float, UInt8
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens.decompose import LayerSpec, decomposition_layers
from clip_lens import checks
from clip_lens.distributed import Ranks
from clip_lens.errors import ClipLensError, InputError, StoreCorruptError, StoreLockedError, StoreWarning, StoreWriteError
from clip_lens.files import atomic_write, read_bytes
from clip_lens.precision import autocast
from clip_lens.shards import TarShards, is_shard, refuse_mixed_folder

if TYPE_CHECKING:
    import PIL.Image

    from clip_lens.hooked_clip import HookedCLIP

FORMAT = "clip_lens.store/2"
LEGACY_FORMATS = ("clip_lens.store/1",)  # no checksums: read with a warning, never resumed
MARKER = re.compile(r"[0-9]{6,}")  # done/000003
WRITE_CONFIG = {"write_empty_chunks": True}  # every chunk has a file, even all-fill ones: a missing file is damage
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ImageSource:
    """Random access to preprocessed images: ``len()``, ``load(start, stop)`` and string ``ids``.

    Sources that decode one image at a time (image files, tar shards) also give ``item(i)`` →
    ``(pixels [3, H, W], label)``, raising [`InputError`][clip_lens.InputError] for an image that cannot be decoded;
    [`load_batch`][clip_lens.collect.ImageSource.load_batch] then leaves such images out instead of failing.
    ``fingerprint(start, stop)`` → a short string that changes when those images change (None: not known).
    """

    def __init__(self, n: int, loader, ids: Optional[list[str]] = None, description: str = "", item=None,
                 meta: Optional[dict] = None, fingerprint: Optional[Callable[[int, int], str]] = None):
        self.n, self._loader, self.ids, self.description, self.item = n, loader, ids, description, item
        self.meta = meta or {}  # recorded in a store collected from it (e.g. the shard files, to show its images)
        self._fingerprint = fingerprint

    def __len__(self) -> int:
        return self.n

    def fingerprint(self, start: int, stop: int) -> Optional[str]:
        """What identifies images ``start:stop`` without decoding them, hashed: each file's path, size
        and modification time; each tar sample's shard (size, modification time), member offsets and
        sizes; a tensor's bytes; the shapes world's seed and settings. ``collect`` records it in each
        chunk's marker and recomputes a finished chunk whose fingerprint changed. None for sources
        that have none (datasets, custom sources): their chunks are not checked."""
        return None if self._fingerprint is None else self._fingerprint(start, stop)

    def load(self, start: int, stop: int) -> tuple[Float[Tensor, "batch 3 H W"], Optional[Tensor]]:
        """Images ``start:stop`` as a float batch, and their int labels (or None)."""
        return self._loader(start, stop)

    def load_batch(self, start: int, stop: int) -> "Batch":
        """Images ``start:stop`` for collection: the ones that cannot be decoded are left out of the
        pixels and named, with the reason, in ``skipped`` (sources with ``item``; others load whole)."""
        if self.item is None:
            pixels, labels = self.load(start, stop)
            labels = torch.full((len(pixels),), -1) if labels is None else labels
            return Batch(start, stop, pixels, labels, list(range(stop - start)), {})
        images, labels, kept, skipped = [], [], [], {}
        for row in range(start, stop):
            try:
                image, label = self.item(row)
            except InputError as exc:
                skipped[row] = str(exc)
                continue
            images.append(image)
            labels.append(label)
            kept.append(row - start)
        pixels = torch.stack(images) if images else torch.empty(0)
        return Batch(start, stop, pixels, torch.tensor(labels, dtype=torch.int64), kept, skipped)


@dataclass
class Batch:
    """Rows ``start:stop`` of an [`ImageSource`][clip_lens.collect.ImageSource]: the ``pixels`` and ``labels`` of the
    images that decoded, their offsets ``kept`` in the range, and ``skipped``: row → why it did not."""

    start: int
    stop: int
    pixels: Tensor
    labels: Tensor
    kept: list[int]
    skipped: dict[int, str]

    def pin_memory(self) -> "Batch":
        """The same batch with its pixels in page-locked memory (DataLoader's ``pin_memory`` calls it)."""
        return replace(self, pixels=self.pixels.pin_memory()) if len(self.kept) else self


class _Ranges(torch.utils.data.Dataset):
    """Batch ranges of a source as a map-style dataset: DataLoader workers decode whole batches."""

    def __init__(self, source: ImageSource, ranges: Sequence[tuple[int, int]]):
        self.source, self.ranges = source, ranges

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, k: int) -> Batch:
        return self.source.load_batch(*self.ranges[k])


def batches(source: ImageSource, ranges: Sequence[tuple[int, int]], workers: int = 0, pin_memory: bool = False) -> Iterator[Batch]:
    """The batches ``source.load_batch(start, stop)`` of ``ranges``, in order. With ``workers`` > 0 they are
    decoded ahead by that many DataLoader processes (two batches each) while the caller computes;
    ``pin_memory`` puts their pixels in page-locked memory for asynchronous copies to a GPU."""
    if workers == 0:
        for start, stop in ranges:
            batch = source.load_batch(start, stop)
            yield batch.pin_memory() if pin_memory else batch
        return
    loader = torch.utils.data.DataLoader(
        _Ranges(source, ranges), batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory,
        prefetch_factor=2,
    )
    yield from loader


def _from_paths(paths: list[Path], preprocess) -> ImageSource:
    from clip_lens.files import load_image

    if preprocess is None:
        raise InputError("this model has no preprocess transform; pass preprocessed tensors instead of image files.")

    def item(i: int) -> tuple[Tensor, int]:
        return preprocess(load_image(paths[i])), -1  # load_image: bombs refused, 16-bit scaled (not clipped), odd modes converted

    def load(start: int, stop: int):
        return torch.stack([item(i)[0] for i in range(start, stop)]), None

    return ImageSource(len(paths), load, [str(p) for p in paths], f"{len(paths)} image files", item,
                       fingerprint=_file_prints(paths))


def _hashed(parts: Iterable[bytes]) -> str:
    """The first 32 hex digits of the sha256 of ``parts`` (each length-prefixed, so no two lists collide)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()[:32]


def _file_prints(paths: list[Path]) -> Callable[[int, int], str]:
    """Fingerprints of image files: path, size and modification time of each (one ``stat``, no read)."""
    def fingerprint(start: int, stop: int) -> str:
        def entry(path: Path) -> bytes:
            try:
                stat = os.stat(path)
            except OSError as exc:  # gone or unreadable: a change, recorded as such
                return os.fsencode(path) + f"|{type(exc).__name__}".encode()
            return os.fsencode(path) + f"|{stat.st_size}|{stat.st_mtime_ns}".encode()

        return _hashed(entry(paths[i]) for i in range(start, stop))

    return fingerprint


def _shard_prints(shards: TarShards) -> Callable[[int, int], str]:
    """Fingerprints of tar samples: their ids, the offsets and sizes of their image and label members
    (TarShards' index, read from the tar headers), and the size and modification time of their shards."""
    def fingerprint(start: int, stop: int) -> str:
        touched = sorted(set(shards._shard[start:stop].tolist()))
        files = []
        for index in touched:
            stat = os.stat(shards.paths[index])
            files.append(os.fsencode(shards.paths[index]) + f"|{stat.st_size}|{stat.st_mtime_ns}".encode())
        members = [shards._image[:, start:stop].tobytes(), shards._label[:, start:stop].tobytes()]
        return _hashed([*files, *members, *(name.encode("utf-8", "surrogatepass") for name in shards.ids[start:stop])])

    return fingerprint


def _tensor_prints(images: Tensor) -> Callable[[int, int], str]:
    """Fingerprints of in-memory images: a hash of the rows' bytes, shape and dtype (one copy to the
    host per chunk for a tensor on a GPU)."""
    def fingerprint(start: int, stop: int) -> str:
        rows = images[start:stop].detach().cpu().contiguous()
        data = rows.view(torch.uint8).numpy().reshape(-1).data if rows.numel() else b""  # raw bytes, any dtype
        return _hashed([str((tuple(rows.shape), rows.dtype)).encode(), data])

    return fingerprint


def _from_shards(shards: TarShards, preprocess) -> ImageSource:
    if preprocess is None:
        raise InputError("this model has no preprocess transform, so the images of tar shards cannot be prepared for it.")

    def item(i: int) -> tuple[Tensor, int]:
        return preprocess(shards.image(i)), shards.label(i)

    def load(start: int, stop: int):
        items = [item(i) for i in range(start, stop)]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])

    return ImageSource(len(shards), load, shards.ids, shards.description, item,
                       {"shards": [str(path.resolve()) for path in shards.paths]}, _shard_prints(shards))


def _from_dataset(dataset, preprocess) -> ImageSource:
    from PIL import Image

    def item(i: int):
        entry = dataset[i]
        label = -1
        if isinstance(entry, dict):
            entry, label = entry.get("image"), entry.get("label", -1)
        elif isinstance(entry, (tuple, list)):
            entry, label = entry[0], (entry[1] if len(entry) > 1 else -1)
        if isinstance(entry, Image.Image):
            if preprocess is None:
                raise InputError("the dataset yields PIL images but the model has no preprocess transform.")
            entry = preprocess(entry.convert("RGB"))
        if not isinstance(entry, Tensor):
            raise InputError(
                f"dataset item {i} is a {type(entry).__name__}; items must be image tensors, PIL images, "
                "(image, label) pairs or dicts with an 'image' key."
            )
        scalar = isinstance(label, (int, np.integer)) or (isinstance(label, Tensor) and label.numel() == 1)
        return entry, int(label) if scalar else -1  # non-integer labels (strings, boxes …) are not stored

    def load(start: int, stop: int):
        items = [item(i) for i in range(start, stop)]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])

    return ImageSource(len(dataset), load, None, f"{type(dataset).__name__} of {len(dataset)} items")


def image_source(images: Any, preprocess=None) -> ImageSource:
    """An `ImageSource` from a tensor ``[N, 3, H, W]``, a folder of images, a list of paths,
    WebDataset-style tar shards (a ``.tar`` file, a folder of them, a brace pattern such as
    ``"train-{000000..000099}.tar"``, a list of ``.tar`` paths or a [`TarShards`][clip_lens.shards.TarShards]), or a
    map-style dataset (items: tensor, PIL image, ``(image, label)`` or ``{"image", "label"}``)."""
    if isinstance(images, ImageSource):
        return images
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise InputError(f"an image tensor must be [N, 3, H, W], got shape {tuple(images.shape)}.")
        return ImageSource(len(images), lambda a, b: (images[a:b], None), None, f"tensor of {len(images)} images",
                           fingerprint=_tensor_prints(images))
    if isinstance(images, TarShards):
        return _from_shards(images, preprocess)
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if "{" in str(images) and not folder.exists():  # a brace pattern of shards: train-{000000..000099}.tar
            return _from_shards(TarShards(str(images)), preprocess)
        if not folder.exists():
            raise InputError(f"no such image folder or file: {folder}.")
        if is_shard(folder):
            return _from_shards(TarShards(folder), preprocess)
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else [folder]
        if folder.is_dir():
            refuse_mixed_folder(folder, paths)  # loose images next to tar shards: neither is dropped silently
        if not paths and folder.is_dir() and any(folder.rglob("*.tar")):  # a folder of tar shards
            return _from_shards(TarShards(folder), preprocess)
        if not paths:
            raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) or .tar shards found under {folder}.")
        return _from_paths(paths, preprocess)
    if isinstance(images, Sequence) and images and all(isinstance(p, (str, Path)) for p in images):
        if all(str(p).endswith(".tar") for p in images):
            return _from_shards(TarShards(list(images)), preprocess)
        return _from_paths([Path(p) for p in images], preprocess)
    if hasattr(images, "__getitem__") and hasattr(images, "__len__"):
        if len(images) == 0:
            raise InputError("the image dataset is empty.")
        return _from_dataset(images, preprocess)
    raise InputError(f"cannot read images from a {type(images).__name__}; give a tensor, a folder, paths or a dataset.")


def shapes_world_images(n: int, seed: int = 0, image_size: int = 64, version: int = 1) -> ImageSource:
    """``n`` one-object scenes of shapes world ``version`` as an image source (labels: -1; ``ids``: scene indices)."""
    from clip_lens.toy.world import ShapesWorld, batch_images, check_scene_count

    n = check_scene_count(n)  # before the ids list: 10**12 scenes must not grow memory first
    world = ShapesWorld(seed=seed, image_size=image_size, version=version)
    return ImageSource(
        n, lambda a, b: (batch_images([world.scene(i) for i in range(a, b)]), None),
        [str(i) for i in range(n)], f"{n} shapes-world{'' if version == 1 else f' v{version}'} scenes (seed {seed})",
        fingerprint=lambda a, b: _hashed([f"shapes-world|{version}|{seed}|{image_size}|{a}|{b}".encode()]),
    )


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


def store_images(store: Store, image_size: int = 64) -> Callable[[Sequence[int]], list["PIL.Image.Image"]]:
    """Store rows → the RGB PIL images they were collected from: the scenes of a
    `shapes_world_images` store rendered again (at ``image_size``), or the files its ids name.

    Raises:
        InputError: the store records neither (collected from a tensor or a dataset); reading a
            missing or unreadable file (when called).
    """
    import re

    from clip_lens.files import load_image

    ids = store.ids()
    match = re.search(r"shapes-world scenes \(seed (\d+)\)", store.meta.get("source", ""))
    if match:
        from PIL import Image

        from clip_lens.toy.world import ShapesWorld

        world = ShapesWorld(seed=int(match.group(1)), image_size=image_size)
        return lambda rows: [Image.fromarray(world.scene(int(ids[r]) if ids else int(r)).image) for r in rows]
    if "shards" in store.meta and ids is not None:
        shards = TarShards(store.meta["shards"])
        index = {name: i for i, name in enumerate(shards.ids)}
        return lambda rows: [shards.image(index[ids[r]]) for r in rows]
    if ids is None:
        raise InputError(
            f"store {store.path} does not record its images (collected from a tensor or a dataset); "
            "collect from a folder or from shapes-world scenes to look images up by store row."
        )

    def load(rows: Sequence[int]) -> list["PIL.Image.Image"]:
        images = []
        for row in rows:
            images.append(load_image(ids[row], what=f"store image #{row}"))
        return images

    return load


def store_thumbnails(store: Store, image_size: int = 64) -> Callable[[Sequence[int]], UInt8[np.ndarray, "n s s 3"]]:
    """Store rows → ``uint8 [n, image_size, image_size, 3]`` thumbnails of [`store_images`][clip_lens.collect.store_images]
    (squashed to squares), e.g. for ``NeighborsResult.plot``."""
    images = store_images(store, image_size)
    return lambda rows: np.stack([np.asarray(image.resize((image_size, image_size))) for image in images(rows)])


def weights_fingerprint(model: "HookedCLIP") -> str:
    """A short hash of the weights, so that a store is never resumed with another model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[:4096])
        digest.update(str(tuple(tensor.shape)).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def collect(
    model: "HookedCLIP",
    images: Any,
    out: str | Path,
    *,
    heads: LayerSpec = "all",
    tokens: LayerSpec = None,
    directions: Optional[Float[Tensor, "k d_embed"]] = None,
    chunk_size: int = 256,
    batch_size: int = 64,
    precision: str = "fp32",
    workers: Optional[int] = None,
    progress: bool = True,
    verify: bool = True,
    replace: bool = False,
) -> Store:
    """Stream ``images`` through the model and store their normalised decomposition in ``out``.

    Args:
        model: a [`HookedCLIP`][clip_lens.HookedCLIP].
        images: anything [`image_source`][clip_lens.collect.image_source] takes (tensor, folder, paths, dataset, ImageSource).
        out: folder of the Zarr store; created, or resumed when it holds an unfinished (or damaged)
            run of the same model and arguments.
        heads: layers whose per-head terms are kept (``"all"``, a list, or None).
        tokens: layers whose per-head, per-token terms are kept (None: none). Large: use
            ``directions`` to keep only their projections.
        directions: ``[K, d_embed]``; when given, token terms are stored projected on them.
        chunk_size: images per store chunk (the unit of resumption); batch_size: images per forward.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the forward pass and the decomposition
            under ``torch.autocast`` ([`clip_lens.precision`][clip_lens.precision]); the store keeps fp32 arrays
            and records the precision (a resume must use the same).
        workers: DataLoader processes that decode the next batches while the model runs (None: the
            cores the model leaves free, at most 8 — on CUDA all CPUs but one, on CPU those beyond
            ``torch.get_num_threads()`` — for image files and tar shards; 0 for tensors and generated scenes).
            Images that cannot be decoded are skipped, not fatal: they are named in the chunk's marker,
            left out of every read, and listed by [`Store.skipped`][clip_lens.collect.Store.skipped].
        verify: on resume, check every finished chunk completely ([`Store.verify`][clip_lens.collect.Store.verify]: reads the
            store once) and recompute the damaged ones; False checks only sizes and recorded
            checksums (missing, truncated or foreign chunk files), not their bytes.
        replace: when ``out`` holds a finished store, collect again into
            ``replacing_folder(out)`` and swap the new store in once it is finished
            (``clip-lens collect --force``); ``out``'s lock is held throughout, so a second such run is
            refused, and the old store survives a failed run. An unfinished store is resumed as always.

    Resuming checks that the images are the ones the store was collected from: other image ids
    (or another number of images) are refused; a finished chunk whose images changed since
    ([`ImageSource.fingerprint`][clip_lens.collect.ImageSource.fingerprint]: files replaced, a shard rewritten) is
    recomputed with a [`StoreWarning`][clip_lens.errors.StoreWarning] (``Store.recomputed`` lists them); a chunk whose
    images change while it is being collected is not committed (an InputError: run again).

    In a ``torch.distributed`` job (the default process group initialised with more than one
    process, e.g. under ``torchrun``), call it on every rank with the same arguments: the ranks
    split the chunks, ``out`` must be one folder on a file system they share, and every rank
    returns the finished store, identical to a single process's (docs: Concepts → Scale).

    Returns:
        The finished [`Store`][clip_lens.collect.Store].

    Raises:
        InputError: bad arguments; ``out`` holds something else, or a store made with other settings.
        StoreCorruptError: the store's metadata is damaged (its chunks cannot be trusted).
        StoreLockedError: another ``collect`` is writing (or replacing) the store; in a job, a rank that
            does not see the store rank 0 opened (``out`` not on a shared file system).
        StoreWriteError: a write failed (full disk …), or another rank of the job failed; finished
            chunks are kept, run again.
    """
    source = image_source(images, getattr(model, "preprocess", None))
    if chunk_size < 1 or batch_size < 1:
        raise InputError(f"chunk_size and batch_size must be positive, got {chunk_size} and {batch_size}.")
    autocast(model.device, precision)  # checks the name before any work
    if workers is None:  # the cores the model leaves free: all but one on a GPU, those beyond torch's threads on a CPU
        busy = 1 if model.device.type == "cuda" else torch.get_num_threads()
        workers = min(8, max(0, (os.cpu_count() or 1) - busy)) if source.item is not None else 0
    if workers < 0:
        raise InputError(f"workers must be 0 or more, got {workers}.")
    cfg = model.cfg
    head_layers, token_layers = decomposition_layers(model, heads, tokens)
    if directions is not None and directions.shape[-1] != cfg.d_embed:
        raise InputError(f"directions must be [K, {cfg.d_embed}], got {tuple(directions.shape)}.")
    n = len(source)
    params = {
        "format": FORMAT, "model": model.model_name, "pretrained": str(model.pretrained), "weights": weights_fingerprint(model),
        "n_images": n, "chunk_size": chunk_size, "head_layers": head_layers, "token_layers": token_layers,
        "directions": None if directions is None else hashlib.sha256(directions.float().cpu().numpy().tobytes()).hexdigest()[:16],
        "source": source.description, **source.meta,
    }
    if precision != "fp32":  # fp32 stores keep the parameters they always had, so older ones still resume
        params["precision"] = precision
    out = Path(out)
    if directions is not None:
        directions = directions.to(model.device, torch.float32)

    def terms(pixels: Tensor) -> dict[str, Tensor]:
        with autocast(model.device, precision):
            return _terms(model, pixels, head_layers, token_layers, directions)

    def compute(todo: Sequence[int], store: Store, bar) -> Iterator[tuple[int, dict[str, np.ndarray], dict]]:
        # fingerprints before any image is read (workers read ahead), compared with after each chunk
        before = {c: source.fingerprint(*store.rows(c)) for c in todo}
        # the same batches in every run (chunk by chunk), so every chunk is bit-identical
        ranges = [(b, min(stop, b + batch_size)) for start, stop in map(store.rows, todo) for b in range(start, stop, batch_size)]
        stream = batches(source, ranges, workers, pin_memory=model.device.type == "cuda")
        skipped_total = 0
        for c in todo:
            start, stop = store.rows(c)
            chunk, skipped = _ChunkBuffer(stop - start, model.device), {}
            with checks.deferred():  # the NaN checks of the whole chunk wait for its one synchronisation
                for b in range(start, stop, batch_size):
                    batch = next(stream)
                    skipped.update(batch.skipped)
                    if batch.kept:
                        pixels = batch.pixels.to(model.device, model.dtype, non_blocking=True)
                        chunk.add([b - start + k for k in batch.kept], {**terms(pixels), "labels": batch.labels})
                    bar.update(batch.stop - batch.start)
                rows = chunk.finish(lambda: _template(model, terms))
            if skipped:
                skipped_total += len(skipped)
                bar.set_postfix(skipped=skipped_total)
            if source.fingerprint(start, stop) != before[c]:
                raise InputError(
                    f"the images of chunk {c} (rows {start}-{stop - 1}) changed while collect was reading them, so "
                    "it was not committed; run the same collect again once they stay unchanged: it recomputes that chunk."
                )
            yield c, rows, {"skipped": skipped, "source": before[c]}

    ranks = Ranks.current()

    def into(target: Path) -> Store:
        if ranks is not None:
            return _collect_ranks(ranks, target, params, source.ids, compute, verify, progress, source.fingerprint)
        store, lock = _open_or_create(target, params, source.ids)
        try:
            with _writing(target):
                todo, recomputed = _chunks_to_compute(store, verify, progress, source.fingerprint)
            rows = sum(stop - start for start, stop in map(store.rows, todo))
            with tqdm(total=n, initial=n - rows, desc="collect", unit="img", disable=not progress) as bar:
                _write_chunks(store, _open_arrays(store), todo, compute, bar)
        finally:
            lock.release()
        store = Store.open(target)
        store.recomputed = recomputed
        return store

    if replace and (out / "zarr.json").is_file():
        return _replace(ranks, out, into)
    return into(out)


def _write_chunks(store: Store, arrays: dict[str, Any], todo: Sequence[int], compute: Callable, bar) -> dict[str, Any]:
    """Compute and write the chunks ``todo`` in order (the store's arrays are created from the first
    chunk when it has none yet); returns the arrays."""
    for c, chunk, extra in compute(todo, store, bar):
        with _writing(store.path):
            if not arrays:
                arrays = _create_arrays(store, chunk)
            _write_chunk(store, arrays, c, chunk, extra)
    return arrays


class _ChunkBuffer:
    """One chunk's terms, gathered in host memory as its batches finish. Each batch is copied without
    waiting for the device (into page-locked memory on CUDA); `finish`
    waits once. Rows of skipped images are NaN (labels -1), as an unwritten chunk reads."""

    def __init__(self, rows: int, device: torch.device):
        self.rows, self.device = rows, device
        self.host: dict[str, Tensor] = {}
        self.offsets: list[int] = []

    def add(self, offsets: list[int], terms: dict[str, Tensor]) -> None:
        """Terms ``[len(offsets), ...]`` of the images at these row offsets of the chunk."""
        fill = len(self.offsets)
        for key, value in terms.items():
            if key not in self.host:
                self.host[key] = torch.empty((self.rows, *value.shape[1:]), dtype=value.dtype,
                                             pin_memory=self.device.type == "cuda")
            self.host[key][fill:fill + len(offsets)].copy_(value, non_blocking=True)
        self.offsets.extend(offsets)

    def finish(self, template: Callable[[], dict[str, Tensor]]) -> dict[str, np.ndarray]:
        """The chunk's arrays (``template()`` gives the terms' shapes when no image of it decoded)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the chunk's one wait for the device
        if len(self.offsets) == self.rows:
            return {key: value.numpy() for key, value in self.host.items()}
        shapes = self.host or {key: value.cpu() for key, value in template().items()}
        out = {}
        for key, value in shapes.items():
            full = np.full((self.rows, *value.shape[1:]), np.nan if value.is_floating_point() else -1, value.numpy().dtype)
            if self.offsets:
                full[self.offsets] = value[:len(self.offsets)].numpy()
            out[key] = full
        return out


def _template(model: "HookedCLIP", terms: Callable[[Tensor], dict[str, Tensor]]) -> dict[str, Tensor]:
    """One black image's terms (and a label): the shapes of a chunk none of whose images decoded."""
    size = model.cfg.image_size or (224, 224)
    return {**terms(torch.zeros(1, 3, *size, device=model.device, dtype=model.dtype)), "labels": torch.full((1,), -1)}


def _collect_ranks(ranks: Ranks, out: Path, params: dict, ids: Optional[list[str]], compute: Callable, verify: bool,
                   progress: bool, fingerprint: Callable[[int, int], Optional[str]]) -> Store:
    """[`collect`][clip_lens.collect.collect] by the ``ranks.size`` processes of a ``torch.distributed`` job.

    Rank 0 opens or creates the store exactly as a single process does (taking its ``lock``, which
    records the job's size), finds the chunks to compute (verifying the finished ones) and, when the
    store has no arrays yet, writes its first chunk, which creates them. It then sends the lock's
    content and the chunk list to the others (a barrier). The other ranks never take the lock: they
    check that the store's ``lock`` holds exactly that content (so all ranks write the same store,
    on a file system they share, while rank 0 holds the lock) and that the store was made with their
    own settings. Chunk list ``todo`` is split as ``todo[rank::size]`` (on a new store: chunk ``c``
    by rank ``c % size``); each rank writes only its chunks' files and their ``done/`` markers, so
    no two processes write the same file. When all have finished (a barrier that also gathers each
    rank's error), rank 0 checks that every chunk has its marker and releases the lock. The result
    is the store a single process writes, file for file.
    """
    lock = plan = None
    if ranks.rank == 0:
        try:
            store, lock = _open_or_create(out, params, ids, {"ranks": ranks.size})
            with _writing(out):
                todo, recomputed = _chunks_to_compute(store, verify, progress, fingerprint)
            mine = todo[::ranks.size]
            bar = tqdm(total=sum(b - a for a, b in map(store.rows, mine)), desc=f"collect (rank 0 of {ranks.size})",
                       unit="img", disable=not progress)
            arrays = _open_arrays(store)
            if not arrays and mine:  # the arrays' shapes come from a chunk: create them before the others write
                arrays = _write_chunks(store, arrays, mine[:1], compute, bar)
                mine = mine[1:]
        except Exception as exc:
            if lock is not None:
                lock.release()
            ranks.broadcast({"error": (type(exc), str(exc))})
            raise
        ranks.broadcast({"lock": lock._content, "todo": todo, "params": params, "recomputed": recomputed})
    else:
        plan = ranks.broadcast()
        if "error" in plan:
            kind, message = plan["error"]
            raise (kind if issubclass(kind, ClipLensError) else StoreWriteError)(f"rank 0 of {ranks.size}: {message}")
        bar = tqdm(disable=True)  # one progress bar per job: rank 0's
    failure: Optional[Exception] = None
    try:
        try:
            if plan is not None:
                store, arrays, mine = _join(ranks, out, params, plan)
            with bar:
                _write_chunks(store, arrays, mine, compute, bar)
        except Exception as exc:  # reported to every rank below, so that none waits for it
            failure = exc
        errors = ranks.gather(failure and f"{type(failure).__name__}: {failure}")
        failed = [(r, error) for r, error in enumerate(errors) if error and r != ranks.rank]
        problem = None
        if ranks.rank == 0 and not failed and failure is None:
            try:
                missing = sorted(set(range(store.n_chunks)) - set(store.done_chunks()))
                problem = f"chunks {missing} have no done/ marker" if missing else None
            except StoreCorruptError as exc:
                problem = str(exc)
        problem = ranks.broadcast(problem)
    finally:
        if lock is not None:
            lock.release()
    if failure is not None:
        raise failure
    if failed:
        raise StoreWriteError(
            "; ".join(f"rank {r} of {ranks.size} failed: {error}" for r, error in failed)
            + ". Finished chunks are kept: fix that and run the same collect command again (with any number of processes)."
        )
    if problem:
        raise StoreWriteError(
            f"store {out}: after every rank finished, {problem} (another process changed the store meanwhile?). "
            "Run the same collect command again to finish it."
        )
    result = Store.open(out)
    result.recomputed = recomputed if plan is None else plan["recomputed"]
    ranks.gather(None)  # every rank has opened the finished store before any returns (and, e.g., moves it)
    return result


def _join(ranks: Ranks, out: Path, params: dict, plan: dict) -> tuple[Store, dict[str, Any], list[int]]:
    """A rank other than 0: the store rank 0 opened (checked by its lock's content), its arrays and this rank's chunks."""
    try:
        held = (out / "lock").read_text()
    except FileNotFoundError:
        held = None
    if held != plan["lock"]:
        raise StoreLockedError(
            f"store {out} is not the store rank 0 of this job of {ranks.size} processes opened (its lock "
            f"{'is missing' if held is None else 'is of another process'}): --out must name one folder on a file "
            "system that every rank (every node) shares."
        )
    if params != plan["params"]:
        detail = "; ".join(f"{k}: {plan['params'].get(k)!r} on rank 0, {v!r} here" for k, v in params.items() if plan["params"].get(k) != v)
        raise InputError(f"rank {ranks.rank} was started with other settings than rank 0 ({detail}); give every rank the same command.")
    store = Store.open(out, partial=True)
    return store, _open_arrays(store), plan["todo"][ranks.rank::ranks.size]


def replacing_folder(out: str | Path) -> Path:
    """Where ``collect(..., replace=True)`` (``clip-lens collect --force``) builds the store that
    replaces the finished one in ``out``: the sibling folder ``.NAME.replacing``."""
    out = Path(out)
    return out.parent / f".{out.name}.replacing"


def _replace(ranks: Optional[Ranks], out: Path, into: Callable[[Path], Store]) -> Store:
    """``collect(..., replace=True)`` on ``out``, which holds a store: collect afresh into
    `replacing_folder` (``into``) and swap the result in, all while holding ``out``'s own lock, so a
    concurrent replacement (or any collect on ``out``) is refused with StoreLockedError instead of
    deleting this one's folder or mixing two collections. An unfinished store in ``out`` is resumed
    instead. In a job, rank 0 takes the lock, clears the folder and swaps; every rank collects."""
    staging, lead = replacing_folder(out), ranks is None or ranks.rank == 0
    lock: Optional[_Lock] = None
    if lead:
        try:
            with _writing(out):
                lock = _Lock.acquire(out, {"replacing": staging.name, **({"ranks": ranks.size} if ranks else {})})
                fresh = _finished(out)
                if fresh:
                    _clear(staging)
                else:  # resumed: the collect takes the lock itself
                    lock.release()
                    lock = None
        except Exception as exc:
            if lock is not None:
                lock.release()
            if ranks is not None:
                ranks.broadcast({"error": (type(exc), str(exc))})
            raise
        if ranks is not None:
            ranks.broadcast({"fresh": fresh})
    else:
        plan = ranks.broadcast()
        if "error" in plan:
            kind, message = plan["error"]
            raise (kind if issubclass(kind, ClipLensError) else StoreWriteError)(f"rank 0 of {ranks.size}: {message}")
        fresh = plan["fresh"]
    if not fresh:
        return into(out)
    failure: Optional[tuple[type, str]] = None
    try:
        new = into(staging)  # raises on every rank alike
        if lead and new.n_images and not new.n_done:  # a store of no image never replaces one
            reason = next(iter(new.skipped().values()))[1]
            shutil.rmtree(staging, ignore_errors=True)
            failure = (InputError, f"none of the {new.n_images} images could be read (e.g. {reason}); the store in {out} "
                                   "was kept.")
        elif lead:
            try:
                _swap_in(staging, out)
            except OSError as exc:
                failure = (StoreWriteError, f"collecting the replacement of {out} finished in {staging}, but swapping "
                                            f"it in failed: {exc}. Move {staging} to {out} by hand, or run the same command again.")
    finally:
        if lock is not None:
            lock.release()  # a no-op once swapped: the lock left with the old store
    if ranks is not None:
        failure = ranks.broadcast(failure) if lead else ranks.broadcast()
    if failure:
        kind, message = failure
        raise kind(message)
    return Store.open(out)


def _finished(out: Path) -> bool:
    """Whether ``out`` holds a finished store (StoreCorruptError when its metadata is damaged)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreWarning)
        store = Store.open(out, partial=True)
    return len(store._scan()[0]) == store.n_chunks


def _clear(staging: Path) -> None:
    """Remove what an interrupted replacement left in ``staging``; a collect still writing there
    (a live ``lock``) is refused with StoreLockedError, never deleted."""
    if staging.is_symlink() or staging.is_file():
        staging.unlink()
    elif staging.is_dir():
        _Lock.acquire(staging)  # refuses a live writer, takes a stale lock over
        shutil.rmtree(staging)


def _swap_in(staging: Path, out: Path) -> None:
    """Put the finished store in ``staging`` in ``out``'s place and delete the old one. Atomic where
    the system can exchange two folders (Linux), so readers see the old store or the new, never none."""
    if _exchange(staging, out):
        old = staging
    else:
        old = out.parent / f".{out.name}.replaced"
        if old.exists():
            shutil.rmtree(old)
        os.rename(out, old)
        os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        warnings.warn(f"store {out} was replaced, but the old store could not be removed from {old}; delete it.",
                      StoreWarning, stacklevel=4)


def _exchange(a: Path, b: Path) -> bool:
    """Exchange paths ``a`` and ``b`` in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``);
    False where the C library, kernel or file system does not offer it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


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


STORED_TERMS = ("embed", "attn", "attn_bias", "mlp", "bias", "pooler_mlp", "heads", "pos_embed", "blocks", "feature_map")
"""The [`Decomposition`][clip_lens.Decomposition] fields a store keeps, each where the tower has it."""
SPATIAL_TERMS = ("tokens", "block_positions", "positions")
"""Per-position fields: stored projected on ``directions`` when they are given."""


def _terms(model, pixels, head_layers, token_layers, directions) -> dict[str, Tensor]:
    """One batch's normalised terms, keyed by store array name (only the terms the tower has)."""
    parts = model.decompose(pixels, heads=head_layers or None, tokens=token_layers or None)
    norm = parts.embedding_norm
    unit = parts.normalized()
    terms = {"embedding": unit.embedding, "embedding_norm": norm}
    for name in STORED_TERMS:
        if getattr(unit, name) is not None and (name != "heads" or head_layers):
            terms[name] = getattr(unit, name)
    for name in SPATIAL_TERMS:
        value = getattr(unit, name)
        if value is not None and token_layers:
            terms[name] = value if directions is None else value @ directions.to(value).T
    return {key: value.float() for key, value in terms.items()}


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
