"""Dataset-scale collection of direct contributions into a chunked, resumable store.

:func:`collect` streams images through :func:`~clip_lens.decompose` one chunk at a time and writes
every term to a Zarr v3 group (chunks along the image axis), so memory stays at one chunk and
the store can be read memory-mapped or lazily. All terms are divided by ‖image embedding‖ as they
are written (Gandelsman et al.), so for every image they sum to the *unit* image embedding and
``term · text_embedding`` is that term's additive share of the cosine similarity.

Arrays of a store (``N`` images, ``D`` = d_embed, ``K`` = number of directions when given):

========================  ===========================================  ==========================
``embedding``             ``[N, D]`` unit image embedding               always
``embedding_norm``        ``[N]`` ‖embedding‖ before normalising        always
``embed``                 ``[N, D]`` the embedding (ln_pre) term        always
``attn``, ``mlp``         ``[N, L, D]`` per layer (attn: biases incl.)  always
``attn_bias``, ``bias``   ``[N, L, D]``, ``[N, D]`` constant terms       always
``pooler_mlp``            ``[N, D]`` the MAP pooler's MLP term           SigLIP, PE-Core
``heads``                 ``[N, n_head_layers, H, D]``                  ``heads`` not None
``tokens``                ``[N, n_token_layers, H, P, K or D]``         ``tokens`` not None
``labels``                ``[N]`` int64 (-1: none)                      always
========================  ===========================================  ==========================

Crash safety: a chunk counts as written only once a marker file ``done/<chunk>`` exists, and the
marker is created (atomically) after every array of that chunk is written. Running :func:`collect`
again with the same arguments skips marked chunks and rewrites the others; readers never see an
unmarked chunk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float, UInt8
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens.decompose import LayerSpec, _layers
from clip_lens.errors import InputError
from clip_lens.files import atomic_write

if TYPE_CHECKING:
    import PIL.Image

    from clip_lens.hooked_clip import HookedCLIP

FORMAT = "clip_lens.store/1"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ImageSource:
    """Random access to preprocessed images: ``len()``, ``load(start, stop)`` and string ``ids``."""

    def __init__(self, n: int, loader, ids: Optional[list[str]] = None, description: str = ""):
        self.n, self._loader, self.ids, self.description = n, loader, ids, description

    def __len__(self) -> int:
        return self.n

    def load(self, start: int, stop: int) -> tuple[Float[Tensor, "batch 3 H W"], Optional[Tensor]]:
        """Images ``start:stop`` as a float batch, and their int labels (or None)."""
        return self._loader(start, stop)


def _from_paths(paths: list[Path], preprocess) -> ImageSource:
    from PIL import Image, UnidentifiedImageError

    if preprocess is None:
        raise InputError("this model has no preprocess transform; pass preprocessed tensors instead of image files.")

    def load(start: int, stop: int):
        images = []
        for path in paths[start:stop]:
            try:
                with Image.open(path) as image:
                    images.append(preprocess(image.convert("RGB")))
            except (UnidentifiedImageError, OSError) as exc:
                raise InputError(f"cannot read image {path}: {exc}. Remove or replace the file and run again (finished chunks are kept).") from exc
        return torch.stack(images), None

    return ImageSource(len(paths), load, [str(p) for p in paths], f"{len(paths)} image files")


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
    """An :class:`ImageSource` from a tensor ``[N, 3, H, W]``, a folder, a list of paths, or a
    map-style dataset (items: tensor, PIL image, ``(image, label)`` or ``{"image", "label"}``)."""
    if isinstance(images, ImageSource):
        return images
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise InputError(f"an image tensor must be [N, 3, H, W], got shape {tuple(images.shape)}.")
        return ImageSource(len(images), lambda a, b: (images[a:b], None), None, f"tensor of {len(images)} images")
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.exists():
            raise InputError(f"no such image folder or file: {folder}.")
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else [folder]
        if not paths:
            raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}.")
        return _from_paths(paths, preprocess)
    if isinstance(images, Sequence) and images and all(isinstance(p, (str, Path)) for p in images):
        return _from_paths([Path(p) for p in images], preprocess)
    if hasattr(images, "__getitem__") and hasattr(images, "__len__"):
        if len(images) == 0:
            raise InputError("the image dataset is empty.")
        return _from_dataset(images, preprocess)
    raise InputError(f"cannot read images from a {type(images).__name__}; give a tensor, a folder, paths or a dataset.")


def shapes_world_images(n: int, seed: int = 0, image_size: int = 64) -> ImageSource:
    """``n`` shapes-world scenes as an image source (labels: -1; ``ids``: scene indices)."""
    from clip_lens.toy.world import ShapesWorld, batch_images

    world = ShapesWorld(seed=seed, image_size=image_size)
    return ImageSource(
        n, lambda a, b: (batch_images([world.scene(i) for i in range(a, b)]), None),
        [str(i) for i in range(n)], f"{n} shapes-world scenes (seed {seed})",
    )


@dataclass
class Store:
    """A collected store, opened for reading. Arrays are read lazily; nothing unfinished is returned."""

    path: Path
    meta: dict

    @classmethod
    def open(cls, path: str | Path) -> "Store":
        import zarr

        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise InputError(f"{path} is not a clip_lens store (no zarr.json); create one with clip_lens.collect.")
        meta = dict(zarr.open_group(str(path), mode="r").attrs)
        if meta.get("format") != FORMAT:
            raise InputError(f"{path} is a Zarr group but not a clip_lens store (format {meta.get('format')!r}).")
        return cls(path, meta)

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

    def done_chunks(self) -> list[int]:
        return sorted(int(p.name) for p in (self.path / "done").glob("[0-9]*"))

    def done_rows(self) -> list[tuple[int, int]]:
        """``(start, stop)`` image rows of each finished chunk, in order."""
        size, n = self.chunk_size, self.n_images
        return [(c * size, min(n, (c + 1) * size)) for c in self.done_chunks()]

    @property
    def n_done(self) -> int:
        """Images in finished chunks (what a partial read or a search sees)."""
        return sum(stop - start for start, stop in self.done_rows())

    @property
    def complete(self) -> bool:
        return len(self.done_chunks()) == self.n_chunks

    def ids(self) -> Optional[list[str]]:
        file = self.path / "ids.json"
        return json.loads(file.read_text()) if file.is_file() else None

    def read(self, name: str, partial: bool = False, index: tuple = ()) -> Tensor:
        """Array ``name`` as a tensor over the finished images (all of them unless ``partial``).
        ``index`` selects within the trailing axes, read from disk (e.g. ``(layer_row, head)``)."""
        import zarr

        if name not in self.arrays:
            raise InputError(f"store {self.path} has no array '{name}'; it has {', '.join(self.arrays)}.")
        done = self.done_rows()
        if len(done) != self.n_chunks and not partial:
            raise InputError(
                f"store {self.path} is incomplete ({len(done)} of {self.n_chunks} chunks); run collect again with "
                "the same arguments to finish it, or read(..., partial=True) for the finished images."
            )
        array = zarr.open_array(str(self.path / name), mode="r")
        parts = [array[(slice(start, stop), *index)] for start, stop in done]
        if not parts:
            return torch.from_numpy(np.asarray(array[(slice(0, 0), *index)]))
        return torch.from_numpy(np.concatenate(parts))

    def head_outputs(self, layer: int, head: int) -> Float[Tensor, "n d"]:
        """One head's direct contributions ``[N, D]`` (for TextSpan)."""
        if layer not in self.head_layers:
            raise InputError(f"layer {layer} was not collected per head; the store has layers {self.head_layers}.")
        return self.read("heads", index=(self.head_layers.index(layer), head))


def store_images(store: Store, image_size: int = 64) -> Callable[[Sequence[int]], list["PIL.Image.Image"]]:
    """Store rows → the RGB PIL images they were collected from: the scenes of a
    :func:`shapes_world_images` store rendered again (at ``image_size``), or the files its ids name.

    Raises:
        InputError: the store records neither (collected from a tensor or a dataset); reading a
            missing or unreadable file (when called).
    """
    import re

    from PIL import Image

    ids = store.ids()
    match = re.search(r"shapes-world scenes \(seed (\d+)\)", store.meta.get("source", ""))
    if match:
        from clip_lens.toy.world import ShapesWorld

        world = ShapesWorld(seed=int(match.group(1)), image_size=image_size)
        return lambda rows: [Image.fromarray(world.scene(int(ids[r]) if ids else int(r)).image) for r in rows]
    if ids is None:
        raise InputError(
            f"store {store.path} does not record its images (collected from a tensor or a dataset); "
            "collect from a folder or from shapes-world scenes to look images up by store row."
        )

    def load(rows: Sequence[int]) -> list["PIL.Image.Image"]:
        images = []
        for row in rows:
            try:
                with Image.open(ids[row]) as image:
                    images.append(image.convert("RGB"))
            except OSError as exc:
                raise InputError(f"cannot read store image #{row} ({ids[row]}): {exc}.") from exc
        return images

    return load


def store_thumbnails(store: Store, image_size: int = 64) -> Callable[[Sequence[int]], UInt8[np.ndarray, "n s s 3"]]:
    """Store rows → ``uint8 [n, image_size, image_size, 3]`` thumbnails of :func:`store_images`
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
    progress: bool = True,
) -> Store:
    """Stream ``images`` through the model and store their normalised decomposition in ``out``.

    Args:
        model: a :class:`~clip_lens.HookedCLIP`.
        images: anything :func:`image_source` takes (tensor, folder, paths, dataset, ImageSource).
        out: folder of the Zarr store; created, or resumed when it holds an unfinished run of the
            same model and arguments.
        heads: layers whose per-head terms are kept (``"all"``, a list, or None).
        tokens: layers whose per-head, per-token terms are kept (None: none). Large: use
            ``directions`` to keep only their projections.
        directions: ``[K, d_embed]``; when given, token terms are stored projected on them.
        chunk_size: images per store chunk (the unit of resumption); batch_size: images per forward.

    Returns:
        The finished :class:`Store`.
    """
    import zarr

    source = image_source(images, getattr(model, "preprocess", None))
    if chunk_size < 1 or batch_size < 1:
        raise InputError(f"chunk_size and batch_size must be positive, got {chunk_size} and {batch_size}.")
    cfg = model.cfg
    head_layers = _layers(heads, cfg.n_layers, "heads")
    token_layers = _layers(tokens, cfg.n_layers, "tokens")
    head_layers = sorted(set(head_layers) | set(token_layers))
    if directions is not None and directions.shape[-1] != cfg.d_embed:
        raise InputError(f"directions must be [K, {cfg.d_embed}], got {tuple(directions.shape)}.")
    n, d = len(source), cfg.d_embed
    params = {
        "format": FORMAT, "model": model.model_name, "pretrained": str(model.pretrained), "weights": weights_fingerprint(model),
        "n_images": n, "chunk_size": chunk_size, "head_layers": head_layers, "token_layers": token_layers,
        "directions": None if directions is None else hashlib.sha256(directions.float().cpu().numpy().tobytes()).hexdigest()[:16],
        "source": source.description,
    }
    out = Path(out)
    group = _open_or_create(out, params)
    if source.ids is not None and not (out / "ids.json").is_file():
        atomic_write(out / "ids.json", json.dumps(source.ids))
    done = set(Store(out, dict(group.attrs)).done_chunks())
    n_chunks = -(-n // chunk_size)
    arrays: dict[str, Any] = {}
    bar = tqdm(total=n, initial=min(n, len(done) * chunk_size), desc="collect", unit="img", disable=not progress)
    for c in range(n_chunks):
        if c in done:
            continue
        start, stop = c * chunk_size, min(n, (c + 1) * chunk_size)
        parts: dict[str, list] = {}
        for b in range(start, stop, batch_size):
            pixels, labels = source.load(b, min(stop, b + batch_size))
            terms = _terms(model, pixels.to(model.device, model.dtype), head_layers, token_layers, directions)
            terms["labels"] = labels if labels is not None else torch.full((len(pixels),), -1)
            for key, value in terms.items():
                parts.setdefault(key, []).append(value.cpu().numpy())
            bar.update(len(pixels))
        chunk = {key: np.concatenate(value) for key, value in parts.items()}
        if not arrays:
            arrays = _arrays(group, chunk, n, chunk_size)
        for key, value in chunk.items():
            arrays[key][start:stop] = value
        atomic_write(out / "done" / f"{c:06d}", "")  # the commit point of this chunk
    bar.close()
    return Store.open(out)


def _terms(model, pixels, head_layers, token_layers, directions) -> dict[str, Tensor]:
    """One batch's normalised terms, keyed by store array name."""
    parts = model.decompose(pixels, heads=head_layers or None, tokens=token_layers or None)
    norm = parts.embedding_norm
    unit = parts.normalized()
    terms = {
        "embedding": unit.embedding, "embedding_norm": norm, "embed": unit.embed, "attn": unit.attn,
        "attn_bias": unit.attn_bias, "mlp": unit.mlp, "bias": unit.bias,
    }
    if unit.pooler_mlp is not None:
        terms["pooler_mlp"] = unit.pooler_mlp
    if head_layers:
        terms["heads"] = unit.heads
    if token_layers:
        terms["tokens"] = unit.tokens if directions is None else unit.tokens @ directions.to(unit.tokens).T
    return {key: value.float() for key, value in terms.items()}


def _open_or_create(out: Path, params: dict):
    """The store's Zarr group: a new one, or an unfinished one made with the same parameters."""
    import zarr

    if (out / "zarr.json").is_file():
        group = zarr.open_group(str(out), mode="r+")
        old = {k: group.attrs.get(k) for k in params}
        changed = [k for k in params if old[k] != params[k]]
        if changed:
            detail = "; ".join(f"{k}: stored {old[k]!r}, now {params[k]!r}" for k in changed)
            raise InputError(
                f"{out} holds a store made with different settings ({detail}). Use a new folder, or delete this "
                "one to start over."
            )
        return group
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not a clip_lens store; choose an empty or new folder.")
    group = zarr.open_group(str(out), mode="w")
    group.attrs.update({**params, "arrays": []})
    (out / "done").mkdir(exist_ok=True)
    return group


def _arrays(group, chunk: dict[str, np.ndarray], n: int, chunk_size: int) -> dict[str, Any]:
    """Open the store's arrays, creating them (shapes from the first chunk) when new."""
    names = list(group.attrs.get("arrays", []))
    if not names:
        for key, value in chunk.items():
            group.create_array(
                key, shape=(n, *value.shape[1:]), chunks=(chunk_size, *value.shape[1:]), dtype=value.dtype,
                fill_value=0, overwrite=True,  # left by a run killed before its first chunk
            )
        group.attrs["arrays"] = names = list(chunk)
    return {key: group[key] for key in names}
