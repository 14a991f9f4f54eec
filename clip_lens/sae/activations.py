"""Streaming activations of one hook point (or one decomposition term) into a shuffled buffer.

`ActivationSource` runs a model over an image set (or a text set, for ``text.`` hooks) one
forward batch at a time, keeps the rows of one hook point (one row per token and image, or per
image for pooled hooks and decomposition terms) in a memory-bounded buffer, and yields shuffled
batches of ``[tokens, d_in]`` rows: the training data of a sparse autoencoder.

The buffer holds at most ``buffer_size`` rows. It is filled, permuted, and consumed from the
front; when it is half empty it is refilled with new forward batches and permuted again (the
SAELens mixing buffer), so a row can leave in any later batch and rows of one image are spread
over many batches. Memory is ``buffer_size × d_in`` plus one forward batch, whatever the data set.

Rows per hook (``n`` positions, ``h`` heads):

=================================================  ==========================================
``blocks.{l}.hook_resid_pre/mid/post`` …           ``[n, d_model]`` per image
``blocks.{l}.attn.hook_z`` (``q``/``k``/``v``)     ``[n, h * d_head]``: heads flattened per token
``blocks.{l}.attn.hook_result``                    ``[n, h * d_model]``
``blocks.{l}.mlp.hook_post``                       ``[n, d_mlp]``
``hook_pooled``, ``hook_image_embed`` …            ``[1, d]``: one row per image
``text.…`` (inputs are texts or token ids)         tokens up to each prompt's pooled (EOT) token
``term="heads", layer=L, head=H``                  ``[1, d_embed]``: the head's direct contribution
=================================================  ==========================================

``positions`` picks rows per image: ``"all"``, ``"patches"`` (after the class/register tokens),
``"cls"`` (position 0), ``"pooled"`` (the pooled token: CLS, or each prompt's EOT) or a list of
indices. A hook in block ``l`` runs only blocks ``0..l`` (``stop_at_layer=l + 1``).

Resumption: `ActivationSource.state_dict` records where the stream is (the next forward
batch, the shuffle generator) and, for every row still in the buffer, which forward batch and
offset it came from — not the rows themselves. `load_state_dict` recomputes those forward
batches (same images, same batch boundaries, so the same values bit for bit on one machine) and
continues exactly as the uninterrupted stream would.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from clip_lens.collect import image_source, weights_fingerprint
from clip_lens.errors import IndexOutOfRangeError, InputError

if TYPE_CHECKING:
    from clip_lens.hooked_clip import HookedCLIP

Positions = Union[str, Sequence[int]]
POSITION_NAMES = ("all", "patches", "cls", "pooled")
TERMS = ("heads", "attn", "mlp")
_BLOCK = re.compile(r"^(text\.)?blocks\.(\d+)\.")
_EMBED_HOOKS = ("hook_embed", "hook_pos_embed", "ln_pre.hook_scale", "ln_pre.hook_normalized")
_NO_TOKEN_AXIS = ("attn.hook_attn_scores", "attn.hook_pattern")


class _TextSource:
    """Random access to token batches of a text set (strings tokenized per batch, or token ids)."""

    def __init__(self, model: "HookedCLIP", texts: Any):
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, Tensor):
            tokens = model.check_tokens(texts)
            self._load = lambda a, b: tokens[a:b]
            self.n = len(tokens)
        elif isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts):
            self._load = lambda a, b: model.to_tokens(list(texts[a:b]))
            self.n = len(texts)
        else:
            raise InputError(
                "a text hook (text.…) reads texts: give a list of strings or token ids [N, ctx], "
                f"got {type(texts).__name__}{' (empty)' if isinstance(texts, (list, tuple)) and not texts else ''}."
            )
        self.description = f"{self.n} texts"

    def __len__(self) -> int:
        return self.n

    def load(self, start: int, stop: int) -> Tensor:
        return self._load(start, stop)


class ActivationSource:
    """Shuffled batches of one hook point's activations (or one decomposition term) over a data set.

    Iterating yields ``Float[Tensor, "tokens d_in"]`` batches of ``token_batch`` rows (the last one
    of a finite stream may be shorter). The stream is endless unless ``epochs`` is given.

    Args:
        model: a [`HookedCLIP`][clip_lens.HookedCLIP].
        images: anything [`clip_lens.collect.image_source`][clip_lens.collect.image_source] takes (tensor ``[N, 3, H, W]``,
            folder, paths, dataset); for a ``text.`` hook, texts (strings or token ids ``[N, ctx]``).
        hook_name: the hook point (``"blocks.3.hook_resid_post"``, ``"text.blocks.1.mlp.hook_post"``);
            None with ``term``.
        positions: ``"all"``, ``"patches"``, ``"cls"``, ``"pooled"`` or a list of position indices
            (per-token hooks only; a pooled hook or a term gives one row per image).
        term: instead of a hook, a decomposition term (``"heads"``, ``"attn"`` or ``"mlp"``) of
            `HookedCLIP.decompose`: ``d_embed``-wide direct contributions, one row per image.
        layer, head: which term (``head`` only for ``"heads"``).
        normalized: divide terms by ‖image embedding‖ (as [`clip_lens.collect.collect`][clip_lens.collect.collect] stores them).
        batch_size: images (or texts) per forward pass.
        buffer_size: rows the buffer holds at most (memory: ``buffer_size × d_in`` values); it must
            hold at least two forward batches.
        token_batch: rows per yielded batch.
        shuffle: permute the buffer after each refill (False: rows in stream order).
        seed: seed of the shuffle.
        epochs: passes over the data set (None: endless).
        keep: keep the rows of the first forward batches, up to ``buffer_size`` rows in all (memory:
            one more buffer), and reuse them in later epochs instead of running the model again.
            A data set that fits in the buffer then costs one pass of forwards however long the
            training; the stream is the same bit for bit.
        device: where the buffer lives (default: the model's device).

    Raises:
        HookNameError: unknown hook name (with close matches).
        InputError: bad positions, term, sizes or inputs; NaN/inf activations (naming the hook
            and the image index) when they are computed.
    """

    def __init__(
        self,
        model: "HookedCLIP",
        images: Any,
        hook_name: Optional[str] = None,
        *,
        positions: Positions = "all",
        term: Optional[str] = None,
        layer: Optional[int] = None,
        head: Optional[int] = None,
        normalized: bool = False,
        batch_size: int = 32,
        buffer_size: int = 2**16,
        token_batch: int = 1024,
        shuffle: bool = True,
        seed: int = 0,
        epochs: Optional[int] = None,
        keep: bool = False,
        device: Union[str, torch.device, None] = None,
    ):
        for name, value in (("batch_size", batch_size), ("buffer_size", buffer_size), ("token_batch", token_batch)):
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}.")
        if token_batch > buffer_size // 2:
            raise InputError(
                f"token_batch={token_batch} must be at most half of buffer_size={buffer_size}, so that batches are "
                "drawn from a mixed buffer; raise buffer_size or lower token_batch."
            )
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise InputError(f"epochs must be a positive integer or None (endless), got {epochs!r}.")
        self.model = model
        self.term, self.layer, self.head, self.normalized = term, layer, head, normalized
        self.batch_size, self.buffer_size, self.token_batch = batch_size, buffer_size, token_batch
        self.shuffle, self.seed, self.epochs = shuffle, seed, epochs
        self.device = torch.device(device) if device is not None else model.device
        if (hook_name is None) == (term is None):
            raise InputError("give either hook_name (a hook point) or term= ('heads', 'attn', 'mlp'), not both or neither.")
        if term is not None:
            self._check_term(term, layer, head)
            if positions != "all":
                raise InputError(f"a decomposition term has one row per image; positions={positions!r} does not apply.")
            self.hook_name = None
            self.text = False
            self.stop_at_layer = None
        else:
            if not isinstance(hook_name, str):
                raise InputError(f"hook_name must be a string, got {type(hook_name).__name__}.")
            model.check_hook_name(hook_name)
            if hook_name.endswith(_NO_TOKEN_AXIS):
                raise InputError(
                    f"{hook_name} is an attention pattern [batch, head, query, key], not a per-token vector; "
                    "train SAEs on hook_z, hook_result, resid or mlp hooks."
                )
            self.hook_name = hook_name
            self.text = hook_name.startswith("text.")
            self.stop_at_layer = self._stop_layer(hook_name)
        self.positions = self._check_positions(positions)
        self.data = _TextSource(model, images) if self.text else image_source(images, getattr(model, "preprocess", None))
        if len(self.data) == 0:
            raise InputError("the data set is empty.")
        self.n_batches = -(-len(self.data) // batch_size)
        self._d_in: Optional[int] = None
        self._rows_per_item: Optional[int] = None
        self.keep = bool(keep)
        self._kept: dict[int, Tensor] = {}  # data-set batch → its rows (keep=True)
        self._kept_rows = 0
        self.reset()

    # --- description --------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The hook name, or ``"term:heads.L{l}H{h}"`` / ``"term:mlp.L{l}"`` for a term."""
        if self.hook_name is not None:
            return self.hook_name
        return f"term:heads.L{self.layer}H{self.head}" if self.term == "heads" else f"term:{self.term}.L{self.layer}"

    @property
    def d_in(self) -> int:
        """Width of a row (computed from the first forward batch)."""
        if self._d_in is None:
            self._probe()
        return self._d_in

    def describe(self) -> dict:
        """The settings that determine the stream (recorded in SAE metadata and checkpoints)."""
        return {
            "hook_name": self.hook_name, "term": self.term, "layer": self.layer, "head": self.head,
            "normalized": self.normalized, "positions": self.positions if isinstance(self.positions, str) else list(self.positions),
            "data": self.data.description, "data_fingerprint": self._data_fingerprint(), "n_items": len(self.data),
            "batch_size": self.batch_size,
            "buffer_size": self.buffer_size, "token_batch": self.token_batch, "shuffle": self.shuffle, "seed": self.seed,
            "epochs": self.epochs, "model": self.model.model_name, "weights": weights_fingerprint(self.model),
        }

    def _data_fingerprint(self) -> str:
        """A short hash of the file names (when known) and of the first and last items, so that a
        checkpoint is not resumed on other data of the same size."""
        digest = hashlib.sha256()
        ids = getattr(self.data, "ids", None)
        if ids:
            digest.update("\n".join(ids).encode())
        n = len(self.data)
        for index in sorted({0, n - 1}):
            item = self.data.load(index, index + 1)
            item = item[0] if isinstance(item, tuple) else item
            digest.update(item.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def __repr__(self) -> str:
        return (f"ActivationSource({self.name}, positions={self.positions!r}, {self.data.description}, "
                f"buffer {self.buffer_size} rows, batches of {self.token_batch})")

    # --- validation ---------------------------------------------------------------------
    def _check_term(self, term: str, layer: Optional[int], head: Optional[int]) -> None:
        cfg = self.model.cfg
        if term not in TERMS:
            raise InputError(f"term={term!r} is not one of {TERMS}.")
        if not isinstance(layer, int) or not 0 <= layer < cfg.n_layers:
            raise IndexOutOfRangeError(f"layer={layer!r} is out of range: the image tower has layers 0..{cfg.n_layers - 1}.")
        if term == "heads":
            if not isinstance(head, int) or not 0 <= head < cfg.n_heads:
                raise IndexOutOfRangeError(f"head={head!r} is out of range: layer {layer} has heads 0..{cfg.n_heads - 1}.")
        elif head is not None:
            raise InputError(f"head= only applies to term='heads', not {term!r}.")

    def _stop_layer(self, hook_name: str) -> Optional[int]:
        """The ``stop_at_layer`` that still runs ``hook_name`` (None: the whole tower is needed)."""
        match = _BLOCK.match(hook_name)
        if match:
            return int(match.group(2)) + 1
        bare = hook_name[len("text."):] if self.text else hook_name
        return 0 if bare in _EMBED_HOOKS else None

    def _check_positions(self, positions: Positions) -> Union[str, tuple[int, ...]]:
        if isinstance(positions, str):
            if positions not in POSITION_NAMES:
                raise InputError(f"positions={positions!r} is not one of {POSITION_NAMES} or a list of indices.")
            if self.text and positions in ("patches", "cls"):
                raise InputError(f"positions={positions!r} is an image-tower choice; text hooks take 'all', 'pooled' or indices.")
            if positions == "cls" and self.model.cfg.n_prefix_tokens < 1:
                raise InputError("positions='cls': this image tower has no class token; use 'patches' or 'all'.")
            if positions == "pooled" and not self.text and self.model.cfg.pool_type != "tok":
                raise InputError(
                    f"positions='pooled' needs one pooled token, but this image tower pools with "
                    f"'{self.model.cfg.pool_type}'; use 'patches' or 'all' (or hook_pooled)."
                )
            return positions
        if isinstance(positions, Tensor):
            positions = positions.tolist()
        if not isinstance(positions, (list, tuple)) or not positions or not all(isinstance(p, int) for p in positions):
            raise InputError(f"positions must be a name {POSITION_NAMES} or a non-empty list of ints, got {positions!r}.")
        return tuple(positions)

    # --- forward batches ----------------------------------------------------------------
    def _activations(self, start: int, stop: int) -> tuple[Tensor, Optional[Tensor]]:
        """The hook's activation ``[batch, …]`` (or the term ``[batch, d]``) of items ``start:stop``,
        and their token ids (text)."""
        model = self.model
        with torch.inference_mode():
            if self.text:
                tokens = model.check_tokens(self.data.load(start, stop)).to(model.device)
                kwargs = {"text": tokens, "return_type": None} if self.stop_at_layer is None else {
                    "text": tokens, "stop_at_layer": self.stop_at_layer}
                _, cache = model.run_with_cache(names_filter=self.hook_name, **kwargs)
                return cache[self.hook_name], tokens
            pixels, _ = self.data.load(start, stop)
            finite = torch.isfinite(pixels.reshape(len(pixels), -1)).all(dim=1) if pixels.is_floating_point() else None
            if finite is not None and not bool(finite.all()):
                index = start + int((~finite).nonzero()[0])
                raise InputError(f"image #{index} of the data set has NaN or inf pixels; fix or drop it.")
            pixels = pixels.to(model.device, model.dtype)
            if self.term is not None:
                heads = [self.layer] if self.term == "heads" else None
                parts = model.decompose(pixels, heads=heads)
                if self.normalized:
                    parts = parts.normalized()
                value = parts.heads[:, 0, self.head] if self.term == "heads" else getattr(parts, self.term)[:, self.layer]
                return value, None
            kwargs = {"return_type": None} if self.stop_at_layer is None else {"stop_at_layer": self.stop_at_layer}
            _, cache = model.run_with_cache(pixels, names_filter=self.hook_name, **kwargs)
            return cache[self.hook_name], None

    def _rows(self, start: int, stop: int) -> Float[Tensor, "rows d_in"]:
        """Rows of items ``start:stop`` in (item, position) order, checked for NaN/inf."""
        act, tokens = self._activations(start, stop)
        n_items = stop - start
        finite = torch.isfinite(act.reshape(n_items, -1)).all(dim=1)
        if not bool(finite.all()):
            index = start + int((~finite).nonzero()[0])
            what = "text" if self.text else "image"
            raise InputError(
                f"{self.name} has NaN or inf activations for {what} #{index} of the data set; check that "
                f"{what} (preprocessing, value range) and the model weights (e.g. fp16 overflow)."
            )
        if self.term is not None or act.ndim == 2:
            if self.positions != "all":
                raise InputError(f"{self.name} has one vector per item ({tuple(act.shape)}); use positions='all'.")
            return act.reshape(n_items, -1)
        act = act.flatten(2)  # [batch, pos, …] → [batch, pos, d_in]: hook_z's heads side by side
        n_pos = act.shape[1]
        if self.text:
            return self._text_rows(act, tokens)
        if self.positions == "all":
            index = slice(None)
        elif self.positions == "patches":
            index = slice(self.model.cfg.n_prefix_tokens, None)
        elif self.positions in ("cls", "pooled"):
            index = slice(0, 1)
        else:
            bad = [p for p in self.positions if not -n_pos <= p < n_pos]
            if bad:
                raise IndexOutOfRangeError(f"positions {bad} are out of range for {self.name}, which has {n_pos} positions.")
            index = list(self.positions)
        return act[:, index].reshape(-1, act.shape[-1])

    def _text_rows(self, act: Tensor, tokens: Tensor) -> Tensor:
        n_items, n_pos = act.shape[:2]
        try:
            pooled = self.model.text.pooled_positions(tokens)
        except NotImplementedError:  # pool_type 'none': every position is an output
            pooled = torch.full((n_items,), n_pos - 1, device=act.device)
        positions = torch.arange(n_pos, device=act.device)
        if self.positions == "all":
            mask = positions[None] <= pooled[:, None].to(act.device)
        elif self.positions == "pooled":
            mask = positions[None] == pooled[:, None].to(act.device)
        else:
            bad = [p for p in self.positions if not 0 <= p < n_pos]
            if bad:
                raise IndexOutOfRangeError(f"positions {bad} are out of range for {self.name}, which has {n_pos} positions.")
            mask = torch.zeros(n_items, n_pos, dtype=torch.bool, device=act.device)
            mask[:, list(self.positions)] = True
        return act[mask]

    def _forward_batch(self, k: int) -> Tensor:
        """Rows of forward batch ``k`` of the stream (batch ``k mod n_batches`` of the data set)."""
        b = k % self.n_batches
        if b in self._kept:
            return self._kept[b]
        start, stop = b * self.batch_size, min(len(self.data), (b + 1) * self.batch_size)
        rows = self._rows(start, stop)
        if self.keep and self._kept_rows + len(rows) <= self.buffer_size:
            self._kept[b] = rows
            self._kept_rows += len(rows)
        return rows

    def _probe(self) -> None:
        rows = self._rows(0, 1)
        self._d_in = int(rows.shape[-1])
        self._rows_per_item = int(rows.shape[0])
        ctx = None
        if self.text:
            ctx = self.model.text.cfg.n_ctx
        per_item = ctx if self.text and self.positions == "all" else max(1, self._rows_per_item)
        self.max_batch_rows = per_item * self.batch_size
        if 2 * self.max_batch_rows > self.buffer_size:
            raise InputError(
                f"buffer_size={self.buffer_size} rows cannot hold two forward batches of {self.max_batch_rows} rows "
                f"({self.batch_size} items × {per_item} rows); raise buffer_size to at least {2 * self.max_batch_rows} "
                "or lower batch_size."
            )

    # --- the buffer ---------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the start of the stream (empty buffer, generator reseeded)."""
        self._next_batch = 0
        self._generator = torch.Generator().manual_seed(self.seed)
        self._buffer: Optional[Tensor] = None  # [buffer_size, d_in], allocated on the first refill
        self._origin = torch.zeros(self.buffer_size, 2, dtype=torch.long)  # (forward batch, row) per slot
        self._order = torch.zeros(0, dtype=torch.long)  # slots of the buffered rows, in yield order
        self._free = torch.arange(self.buffer_size)
        self.peak_rows = 0
        self.rows_yielded = 0

    @property
    def buffered(self) -> int:
        """Rows in the buffer now."""
        return len(self._order)

    @property
    def finished(self) -> bool:
        return self.epochs is not None and self._next_batch >= self.epochs * self.n_batches

    def _allocate(self, rows: Tensor) -> None:
        if self._buffer is None:
            self._buffer = torch.empty(self.buffer_size, rows.shape[-1], dtype=rows.dtype, device=self.device)

    def _refill(self) -> None:
        if self._d_in is None:
            self._probe()
        added = []
        while not self.finished and self.buffered + sum(len(a) for a in added) + self.max_batch_rows <= self.buffer_size:
            rows = self._forward_batch(self._next_batch)
            self._allocate(rows)
            slots = self._free[: len(rows)]
            self._free = self._free[len(rows):]
            self._buffer[slots.to(self.device)] = rows.to(self.device, self._buffer.dtype)
            self._origin[slots, 0] = self._next_batch
            self._origin[slots, 1] = torch.arange(len(rows))
            added.append(slots)
            self._next_batch += 1
        if added:
            self._order = torch.cat([self._order, *added])
            if self.shuffle:
                self._order = self._order[torch.randperm(len(self._order), generator=self._generator)]
        self.peak_rows = max(self.peak_rows, self.buffered)

    def __iter__(self) -> Iterator[Float[Tensor, "tokens d_in"]]:
        return self

    def __next__(self) -> Float[Tensor, "tokens d_in"]:
        if self.buffered <= self.buffer_size // 2 or self.buffered < self.token_batch:
            self._refill()
        if self.buffered == 0:
            raise StopIteration
        slots, self._order = self._order[: self.token_batch], self._order[self.token_batch:]
        batch = self._buffer[slots.to(self.device)]
        self._free = torch.cat([self._free, slots])
        self.rows_yielded += len(slots)
        return batch

    # --- resumption ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the stream is: next forward batch, generator, and the origin of each buffered row."""
        return {
            "next_batch": self._next_batch, "generator": self._generator.get_state(),
            "origin": self._origin[self._order].clone(), "rows_yielded": self.rows_yielded,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict`: the buffered rows are recomputed from their forward batches."""
        self.reset()
        if self._d_in is None:
            self._probe()
        origin = state["origin"]
        n = len(origin)
        if n > self.buffer_size:
            raise InputError(f"the saved stream holds {n} buffered rows, more than buffer_size={self.buffer_size}.")
        for k in origin[:, 0].unique().tolist():
            where = (origin[:, 0] == k).nonzero().flatten()
            rows = self._forward_batch(int(k))
            self._allocate(rows)
            self._buffer[where.to(self.device)] = rows[origin[where, 1].to(rows.device)].to(self.device, self._buffer.dtype)
        self._origin[:n] = origin
        self._order = torch.arange(n)
        self._free = torch.arange(n, self.buffer_size)
        self._next_batch = int(state["next_batch"])
        self._generator.set_state(state["generator"])
        self.rows_yielded = int(state["rows_yielded"])
        self.peak_rows = n
