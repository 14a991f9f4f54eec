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
``neurons``               ``[N, n_neuron_layers, d_mlp, K or D]``       ``neurons`` not None (ViT)
``block_positions``       ``[N, n_token_layers, P, K or D]``            ConvNeXt, ``tokens``
``positions``             ``[N, P, K or D]`` per final position         conv towers, ``tokens``
``labels``                ``[N]`` int64 (-1: none)                      always
========================  ===========================================  ==========================

The store format — chunk markers, crc32c checksums, identities, the lock, format-1 stores — is described
in `clip_lens.store`. What collection adds: running [`collect`][clip_lens.collect.collect] again with the
same arguments skips marked chunks and recomputes the others (and any chunk that fails
[`Store.verify`][clip_lens.collect.Store.verify] or whose images changed: the marker's ``source``
fingerprint); a store is created in a temporary sibling folder renamed into place; format-2 stores
written before identities read with a StoreWarning and get one when ``collect`` resumes them.

Several processes (``torch.distributed``, e.g. ``torchrun``): the ranks split the chunks and write one
store, the one a single process writes, file for file; rank 0 holds the lock and the others write
under it (`_collect_ranks`; docs: Concepts → Scale).

This module is the collection loop and the distributed join; image sources are `clip_lens.sources`,
the store format and reader `clip_lens.store`, writing a store `clip_lens.store_write`. Their public
names are re-exported here (``from clip_lens.collect import Store, shapes_world_images`` keeps working).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens import checks
from clip_lens.decompose import LayerSpec, decomposition_layers
from clip_lens.distributed import Ranks
from clip_lens.errors import ClipLensError, InputError, StoreCorruptError, StoreLockedError, StoreWarning, StoreWriteError
from clip_lens.precision import autocast
# re-exported: the public names of the store and its sources, where users imported them before the split
from clip_lens.sources import (  # noqa: F401
    IMAGE_SUFFIXES, Batch, ImageSource, batches, image_source, model_world_images, shapes_world_images, store_images, store_thumbnails,
)
from clip_lens.store import FORMAT, LEGACY_FORMATS, Store, _checksum, _Lock, weights_fingerprint  # noqa: F401
from clip_lens.store_write import (  # noqa: F401
    _chunks_to_compute, _create_arrays, _open_arrays, _open_or_create, _write_chunk, _write_group, _writing,
    resumable_folder, store_from_arrays,
)

if TYPE_CHECKING:
    from clip_lens.hooked_clip import HookedCLIP


@torch.no_grad()
def collect(
    model: "HookedCLIP",
    images: Any,
    out: str | Path,
    *,
    heads: LayerSpec = "all",
    tokens: LayerSpec = None,
    neurons: LayerSpec = None,
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
        neurons: layers whose MLP neurons' second-order effects
            ([`second_order`][clip_lens.second_order.second_order], every neuron) are kept as ``neurons``
            ``[N, n_neuron_layers, d_mlp, K or D]`` (the store's ``neuron_layers``), divided by ‖embedding‖
            like every term. Large (``d_mlp · D`` floats per image and layer, times ``chunk_size`` in
            memory): pick few layers, or pass ``directions``. Refused before any work for towers
            ``second_order`` does not handle (convolutional, a MAP pooler).
        directions: ``[K, d_embed]``; when given, token terms and neuron effects are stored projected on them.
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
    neuron_maps = None
    if neurons is not None:  # the image-independent half of second_order, built once (and the refusals, before any work)
        from clip_lens.second_order import second_order_maps

        on_device = None if directions is None else directions.to(model.device, torch.float32)
        neuron_maps = second_order_maps(model, layers=neurons, directions=on_device)
    n = len(source)
    params = {
        "format": FORMAT, "model": model.model_name, "pretrained": str(model.pretrained), "weights": weights_fingerprint(model),
        "n_images": n, "chunk_size": chunk_size, "head_layers": head_layers, "token_layers": token_layers,
        "directions": None if directions is None else hashlib.sha256(directions.float().cpu().numpy().tobytes()).hexdigest()[:16],
        "source": source.description, **source.meta,
    }
    if neuron_maps is not None:  # only when asked: stores without neurons keep the parameters they always had
        params["neuron_layers"] = list(neuron_maps.layers)
    if precision != "fp32":  # fp32 stores keep the parameters they always had, so older ones still resume
        params["precision"] = precision
    out = Path(out)
    if directions is not None:
        directions = directions.to(model.device, torch.float32)

    def terms(pixels: Tensor) -> dict[str, Tensor]:
        with autocast(model.device, precision):
            found = _terms(model, pixels, head_layers, token_layers, directions)
            if neuron_maps is not None:
                found["neurons"] = _neuron_terms(model, pixels, neuron_maps, found["embedding_norm"])
            return found

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


def _neuron_terms(model, pixels, maps, norm) -> Tensor:
    """One batch's second-order effects of every neuron of ``maps``' layers, divided by ‖embedding‖ like every term."""
    from clip_lens.second_order import second_order

    effects = second_order(model, pixels, maps=maps, batch_size=len(pixels)).effects
    return (effects / norm.to(effects)[:, None, None, None]).float()
