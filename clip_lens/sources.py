"""Image sources: random access to preprocessed images for [`collect`][clip_lens.collect.collect].

An [`ImageSource`][clip_lens.collect.ImageSource] gives ``len()``, ``load(start, stop)`` → ``[batch, 3, H, W]``
pixels (and int labels), string ``ids`` and a ``fingerprint`` of a row range; [`image_source`][clip_lens.collect.image_source]
builds one from a tensor, image files, tar shards or a dataset, `shapes_world_images` from generated
scenes, and [`store_images`][clip_lens.collect.store_images] looks a collected store's rows up again.
[`batches`][clip_lens.collect.batches] decodes batch ranges ahead in DataLoader workers; images that cannot be
decoded are left out and named ([`Batch.skipped`][clip_lens.collect.Batch]).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float, UInt8
from torch import Tensor

from clip_lens.errors import InputError
from clip_lens.shards import TarShards, is_shard, refuse_mixed_folder

if TYPE_CHECKING:
    import PIL.Image

    from clip_lens.store import Store

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


def shapes_world_images(
    n: int, seed: int = 0, image_size: int = 64, version: int = 1, camouflage: bool = False
) -> ImageSource:
    """``n`` one-object scenes of shapes world ``version`` (``camouflage``: `ShapesWorld`'s camouflage
    scenes, version 2) as an image source (labels: -1; ``ids``: scene indices)."""
    from clip_lens.toy.world import ShapesWorld, batch_images, check_scene_count

    n = check_scene_count(n)  # before the ids list: 10**12 scenes must not grow memory first
    world = ShapesWorld(seed=seed, image_size=image_size, version=version, camouflage=camouflage)
    name = f"shapes-world{'' if version == 1 else f' v{version}'}{' camouflage' if camouflage else ''}"
    key = f"shapes-world|{version}|{seed}|{image_size}" + ("|camouflage" if camouflage else "")  # older keys unchanged
    return ImageSource(
        n, lambda a, b: (batch_images([world.scene(i) for i in range(a, b)]), None),
        [str(i) for i in range(n)], f"{n} {name} scenes (seed {seed})",
        fingerprint=lambda a, b: _hashed([f"{key}|{a}|{b}".encode()]),
    )


def model_world_images(model: "HookedCLIP", n: int, seed: int = 0) -> ImageSource:
    """``n`` scenes of the world ``model`` was trained on (`clip_lens.loading.bundled_world`: version and
    camouflage of a bundled model; version 1 for any other), at the model's image size."""
    from clip_lens.loading import bundled_world

    if model.cfg.image_size is None:
        raise InputError(f"{model.model_name} has no fixed image size, so shapes-world scenes cannot be rendered for it; "
                         "use images of your own.")
    version, camouflage = bundled_world(model)
    return shapes_world_images(n, seed, model.cfg.image_size[0], version or 1, camouflage)


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
    match = re.search(r"shapes-world(?: v(\d+))?( camouflage)? scenes \(seed (\d+)\)", store.meta.get("source", ""))
    if match:
        from PIL import Image

        from clip_lens.toy.world import ShapesWorld

        world = ShapesWorld(seed=int(match.group(3)), image_size=image_size, version=int(match.group(1) or 1),
                            camouflage=bool(match.group(2)))
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
