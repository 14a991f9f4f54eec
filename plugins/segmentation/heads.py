"""Which attention heads a map sums over: ``"all"``, ``"L3H0"``, a list of such keys, or layers."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from clip_lens.errors import InputError

HeadSpec = Union[str, int, Sequence[str], Sequence[int]]
LayerSpec = Union[str, int, Sequence[int]]

_HEAD_KEY = re.compile(r"L(\d+)H(\d+)")


@dataclass(frozen=True)
class HeadSelection:
    """A set of heads of an ``n_layers × n_heads`` tower."""

    mask: Bool[Tensor, "layer head"]

    @property
    def size(self) -> int:
        """Number of selected heads."""
        return int(self.mask.sum())

    @property
    def layers(self) -> list[int]:
        """Layers with at least one selected head (the layers to decompose per token)."""
        return [int(layer) for layer in self.mask.any(1).nonzero().flatten()]

    @property
    def labels(self) -> list[str]:
        """``"L{l}H{h}"`` keys of the selected heads, layer-major."""
        return [f"L{int(l)}H{int(h)}" for l, h in self.mask.nonzero()]

    @property
    def weights(self) -> Bool[Tensor, "layer head"]:
        """How many times each head's map enters the sum: once for every selected head."""
        return self.mask


@dataclass(frozen=True)
class HeadCounts:
    """A multiset of heads (a head may enter a map's sum more than once): the random all-layer controls."""

    counts: Int[Tensor, "layer head"]

    @property
    def size(self) -> int:
        """Number of heads, with multiplicity."""
        return int(self.counts.sum())

    @property
    def layers(self) -> list[int]:
        """Layers with at least one head drawn."""
        return [int(layer) for layer in (self.counts > 0).any(1).nonzero().flatten()]

    @property
    def labels(self) -> list[str]:
        """``"L{l}H{h}"`` keys, a head repeated as often as it was drawn, layer-major."""
        return [f"L{int(l)}H{int(h)}" for l, h in self.counts.nonzero() for _ in range(int(self.counts[l, h]))]

    @property
    def weights(self) -> Int[Tensor, "layer head"]:
        """How many times each head's map enters the sum."""
        return self.counts


def _layer_index(layer: int, n_layers: int, spec) -> int:
    if not -n_layers <= layer < n_layers:
        raise InputError(f"layer {layer} in {spec!r} is out of range: the model has layers 0..{n_layers - 1}.")
    return layer % n_layers


def parse_layers(spec: LayerSpec, n_layers: int) -> list[int]:
    """``"all"``, a layer index or a list of them (negative counts from the end) → sorted layers."""
    if isinstance(spec, str):
        if spec != "all":
            raise InputError(f"layers must be 'all', a layer index or a list of layer indices, got '{spec}'.")
        return list(range(n_layers))
    indices = [spec] if isinstance(spec, int) else list(spec)
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise InputError(f"layers must be 'all', a layer index or a non-empty list of layer indices, got {spec!r}.")
    return sorted({_layer_index(i, n_layers, spec) for i in indices})


def parse_heads(spec: HeadSpec, n_layers: int, n_heads: int) -> HeadSelection:
    """Heads from ``"all"``, ``"L3H0"``, ``["L3H0", "L2H1"]`` or layer indices (all their heads).

    Raises:
        InputError: a malformed key or a layer/head outside the model, naming the valid range.
    """
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    layer_list = isinstance(spec, (list, tuple)) and spec and all(isinstance(k, int) for k in spec)
    if spec == "all" or isinstance(spec, int) or layer_list:
        mask[parse_layers(spec, n_layers)] = True
        return HeadSelection(mask)
    keys = [spec] if isinstance(spec, str) else spec
    if not isinstance(keys, (list, tuple)) or not keys or not all(isinstance(k, str) for k in keys):
        raise InputError(
            f"heads must be 'all', a key 'L{{layer}}H{{head}}', a list of keys or a list of layer indices, got {spec!r}."
        )
    for key in keys:
        match = _HEAD_KEY.fullmatch(key)
        if match is None:
            raise InputError(f"'{key}' is not a head key; write heads as 'L{{layer}}H{{head}}', e.g. 'L{n_layers - 1}H0'.")
        layer, head = int(match[1]), int(match[2])
        if layer >= n_layers or head >= n_heads:
            raise InputError(
                f"head {key} does not exist: the model has layers 0..{n_layers - 1} and heads 0..{n_heads - 1}."
            )
        mask[layer, head] = True
    return HeadSelection(mask)


def random_head_sets(n_layers: int, n_heads: int, size: int, n_draws: int, seed: int = 0) -> list[HeadSelection]:
    """``n_draws`` distinct sets of ``size`` heads, each uniform over all ``n_layers × n_heads`` heads.

    Fewer sets when fewer exist (``comb(n_layers * n_heads, size)``). The same arguments give the
    same sets (a seeded CPU generator); a set may coincide with any particular selection.

    Raises:
        InputError: ``size`` outside 1..n_layers·n_heads or a negative ``n_draws``.
    """
    total = n_layers * n_heads
    if not 1 <= size <= total:
        raise InputError(f"a random head set needs 1..{total} heads, got {size}.")
    if n_draws < 0:
        raise InputError(f"n_draws must be at least 0, got {n_draws}.")
    generator = torch.Generator().manual_seed(seed)
    drawn: list[tuple[int, ...]] = []
    while len(drawn) < min(n_draws, math.comb(total, size)):
        pick = tuple(sorted(torch.randperm(total, generator=generator)[:size].tolist()))
        if pick not in drawn:
            drawn.append(pick)
    selections = []
    for pick in drawn:
        mask = torch.zeros(total, dtype=torch.bool)
        mask[list(pick)] = True
        selections.append(HeadSelection(mask.view(n_layers, n_heads)))
    return selections


def random_per_layer_sets(selection: HeadSelection, n_draws: int, seed: int = 0) -> list[HeadCounts]:
    """``n_draws`` random controls of ``selection`` that keep its number of heads in every layer: in each
    layer, as many heads as ``selection`` takes there, drawn uniformly *with replacement* from that
    layer's heads (with every head of a layer taken, that is the only way a draw can differ from it).

    Each head's expected count is its layer's share, so for a selection of whole layers the expected
    map is the selection's own: the control asks how much a score owes to these particular heads,
    each once, rather than to any mix of the same layers. Seeded CPU generator: same arguments,
    same draws.

    Raises:
        InputError: a negative ``n_draws``.
    """
    if n_draws < 0:
        raise InputError(f"n_draws must be at least 0, got {n_draws}.")
    n_layers, n_heads = selection.mask.shape
    generator = torch.Generator().manual_seed(seed)
    per_layer = selection.mask.sum(1)
    draws = []
    for _ in range(n_draws):
        counts = torch.zeros(n_layers, n_heads, dtype=torch.long)
        for layer in range(n_layers):
            picks = torch.randint(n_heads, (int(per_layer[layer]),), generator=generator)
            counts[layer] = torch.bincount(picks, minlength=n_heads)
        draws.append(HeadCounts(counts))
    return draws
