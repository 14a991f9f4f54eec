"""Activation and attribution patching on either CLIP tower, the TransformerLens way.

Activation patching runs the *corrupted* input with one activation replaced by its value on the
*clean* input and records a metric of the output; attribution patching estimates all of those
numbers at once from one backward pass (``(clean − corrupted) · ∂metric/∂activation``).

What can be patched (``activation``) and over which axes (``by``):

==========================================  ==========================  ===================================
activation                                  ``by``                      result axes
==========================================  ==========================  ===================================
``resid_pre/resid_mid/resid_post``,         ``"pos"`` (default),        ``[layer, pos]``, ``[layer]``
``attn_out``, ``mlp_out``                   ``"layer"``
``z``, ``result``, ``q``, ``k``, ``v``      ``"head"`` (default),       ``[layer, head]``,
                                            ``"head_pos"``              ``[layer, head, pos]``
``pattern``                                 ``"head"``, ``"head_pos"``  as above (pos = query position)
==========================================  ==========================  ===================================

Image positions are the class/register tokens followed by the patches in row-major order, so
``result.grid(layer)`` is a heat map over the image (``[grid_h, grid_w]``).

Speed: a patch at layer ``l`` starts from the corrupted run's cached residual stream entering
block ``l`` (``start_at_layer``), and many patches share one forward (the batch holds one copy of
the corrupted input per patch); a full ``resid_pre`` sweep costs about half of ``L·N`` separate
forwards (``benchmarks/bench_patching.py``).

A metric maps the L2-normalised embeddings of one run, ``[batch, d_embed]`` (the first element
of open_clip's forward output for images, the second for texts), to a scalar tensor;
[`logit_diff_metric`][clip_lens.patching.logit_diff_metric] and [`cosine_metric`][clip_lens.patching.cosine_metric] build the usual ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from clip_lens.results import JSONResult
from clip_lens.config import as_int
from clip_lens.errors import IndexOutOfRangeError, InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from clip_lens.hooked_clip import HookedCLIP

Metric = Callable[[Float[Tensor, "batch d_embed"]], Float[Tensor, ""]]

RESIDUAL = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
PER_HEAD = ("z", "result", "q", "k", "v", "pattern")
ACTIVATIONS = RESIDUAL + PER_HEAD
HOOKS = {
    "resid_pre": "blocks.{l}.hook_resid_pre", "resid_mid": "blocks.{l}.hook_resid_mid",
    "resid_post": "blocks.{l}.hook_resid_post", "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out", **{a: f"blocks.{{l}}.attn.hook_{a}" for a in PER_HEAD},
}
BY = {a: ("pos", "layer") for a in RESIDUAL} | {a: ("head", "head_pos") for a in PER_HEAD}
AXES = {"pos": ("layer", "pos"), "layer": ("layer",), "head": ("layer", "head"), "head_pos": ("layer", "head", "pos")}


# --- metrics -----------------------------------------------------------------------------------
def _targets(model: "HookedCLIP", texts: Any = None, images: Optional[Tensor] = None) -> Tensor:
    if (texts is None) == (images is None):
        raise InputError("give texts=... (for image patching) or images=... (for text patching), one of them.")
    with torch.no_grad():
        if texts is not None:
            return model.encode_text([texts] if isinstance(texts, str) else texts, normalize=True)
        return model.encode_image(images, normalize=True)


def _per_row(targets: Tensor, features: Tensor) -> Tensor:
    """Targets ``[1 or batch, E]`` lined up with the run's ``[batch, E]`` features."""
    if targets.shape[0] not in (1, features.shape[0]):
        raise InputError(
            f"the metric has {targets.shape[0]} targets but the run has {features.shape[0]} inputs; "
            "give one target for all or one per input."
        )
    return targets


def logit_diff_metric(model: "HookedCLIP", correct: Any, incorrect: Any) -> Metric:
    """Mean zero-shot logit difference ``logit(x, correct) − logit(x, incorrect)`` over the batch.

    ``correct``/``incorrect``: one text each (shared by the batch) or one per input. The logit is
    ``logit_scale · cos`` (a ``logit_bias`` cancels in the difference).
    """
    direction = _targets(model, correct) - _targets(model, incorrect)
    scale = model.logit_scale.exp().detach()

    def metric(features: Float[Tensor, "batch d_embed"]) -> Float[Tensor, ""]:
        return scale * (features * _per_row(direction, features)).sum(-1).mean()

    return metric


def cosine_metric(model: "HookedCLIP", texts: Any = None, *, images: Optional[Tensor] = None) -> Metric:
    """Mean cosine between the run's embeddings and ``texts`` (image patching) or ``images`` (text patching)."""
    targets = _targets(model, texts, images)

    def metric(features: Float[Tensor, "batch d_embed"]) -> Float[Tensor, ""]:
        return (features * _per_row(targets, features)).sum(-1).mean()

    return metric


# --- result ------------------------------------------------------------------------------------
@dataclass
class PatchingResult(JSONResult):
    """The metric for every patch (activation patching) or its linear estimate (attribution).

    ``values`` has the axes ``axes`` (``layer`` indexes ``layers``); ``normalized()`` maps the
    corrupted run to 0 and the clean run to 1 (the fraction of the effect a patch restores).
    """

    values: Tensor
    axes: tuple[str, ...]
    activation: str
    method: str
    """``"activation"`` or ``"attribution"``."""
    tower: str
    clean_metric: float
    corrupted_metric: float
    layers: list[int]
    position_labels: list[str] = field(default_factory=list)
    grid_size: Optional[tuple[int, int]] = None
    n_prefix_tokens: int = 0

    def normalized(self) -> Tensor:
        """``(values − corrupted) / (clean − corrupted)``: 0 = no effect, 1 = the clean metric restored."""
        gap = self.clean_metric - self.corrupted_metric
        if abs(gap) < 1e-12:
            raise InputError("the clean and corrupted runs give the same metric, so there is nothing to restore.")
        return (self.values - self.corrupted_metric) / gap

    def effects(self) -> Tensor:
        """``values − corrupted``: how much each patch moves the metric."""
        return self.values - self.corrupted_metric

    def grid(self, layer: int, head: Optional[int] = None, normalized: bool = True) -> Float[Tensor, "grid_h grid_w"]:
        """One layer's (and head's, for ``head_pos``) patch positions as a map over the image."""
        if self.tower != "image" or "pos" not in self.axes:
            raise InputError(f"grid() needs image positions; this result has axes {self.axes} on the {self.tower} tower.")
        row = self._row(layer, head, normalized)
        gh, gw = self.grid_size
        return row[self.n_prefix_tokens:].reshape(gh, gw)

    def top_positions(self, layer: int, k: int, head: Optional[int] = None) -> list[int]:
        """The ``k`` positions whose patch moves the metric most (by absolute effect)."""
        row = self._row(layer, head, normalized=False) - self.corrupted_metric
        return row.abs().topk(k).indices.tolist()

    def _row(self, layer: int, head: Optional[int], normalized: bool) -> Tensor:
        if layer not in self.layers:
            raise IndexOutOfRangeError(f"layer {layer} was not patched; patched layers: {self.layers}.")
        values = self.normalized() if normalized else self.values
        row = values[self.layers.index(layer)]
        if self.axes == ("layer", "head", "pos"):
            if head is None:
                raise InputError("this result is per head and position: pass head=....")
            row = row[head]
        return row

    def to_dict(self) -> dict:
        return {
            "values": self.values.tolist(), "axes": list(self.axes), "activation": self.activation,
            "method": self.method, "tower": self.tower, "clean_metric": self.clean_metric,
            "corrupted_metric": self.corrupted_metric, "layers": self.layers,
            "position_labels": self.position_labels, "grid_size": self.grid_size, "n_prefix_tokens": self.n_prefix_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PatchingResult":
        data = dict(data)
        data["values"] = torch.tensor(data["values"])
        data["axes"] = tuple(data["axes"])
        data["grid_size"] = None if data.get("grid_size") is None else tuple(data["grid_size"])
        return cls(**data)

    def plot(self, normalized: bool = True, head: Optional[int] = None) -> "Figure":
        """Heat maps: one image grid per layer (image positions), a layer × head map, or a
        layer × position map with token labels (text)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        values = self.normalized() if normalized else self.effects()
        label = "fraction of effect restored" if normalized else "change of the metric"
        title = f"{self.method} patching of {self.activation}"
        lim = float(values.abs().max()) or 1.0
        style = {"cmap": "RdBu_r", "vmin": -lim, "vmax": lim}
        if self.tower == "image" and "pos" in self.axes and (self.axes == ("layer", "pos") or head is not None):
            cols = min(len(self.layers), 6)
            rows = math.ceil(len(self.layers) / cols)
            fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows + 0.4), squeeze=False)
            for ax in axes.flat:
                ax.axis("off")
            for ax, layer in zip(axes.flat, self.layers):
                image = ax.imshow(self.grid(layer, head, normalized).numpy(), **style)
                prefix = self._row(layer, head, normalized)[: self.n_prefix_tokens]
                note = "".join(f"\n{n} {float(v):+.2f}" for n, v in zip(self.position_labels, prefix))
                ax.set_title(f"layer {layer}{note}", fontsize=8)
            fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label=label)
            fig.suptitle(title + ("" if head is None else f", head {head}"))
            return fig
        if self.axes == ("layer", "head", "pos"):
            values = values.abs().amax(-1)
            label = "largest |effect| over positions"
        fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * values.shape[-1] + 2), max(3.0, 0.3 * len(self.layers) + 1.5)))
        if values.ndim == 1:
            values = values[:, None]
        image = ax.imshow(values.numpy(), aspect="auto", **style)
        ax.set_yticks(range(len(self.layers)), [str(layer) for layer in self.layers])
        ax.set_ylabel("layer")
        if self.axes[-1] == "pos" and self.axes != ("layer", "head", "pos"):
            ax.set_xticks(range(len(self.position_labels)), self.position_labels, rotation=90, fontsize=7)
        else:
            ax.set_xlabel("head" if "head" in self.axes else "")
        fig.colorbar(image, ax=ax, label=label)
        ax.set_title(title)
        fig.tight_layout()
        return fig


# --- shared set-up -----------------------------------------------------------------------------
@dataclass
class _Setup:
    tower: str
    clean: Tensor
    corrupted: Tensor
    hook: str
    axes: tuple[str, ...]
    layers: list[int]
    n_heads: int
    n_positions: int
    position_labels: list[str]


def _prepare(model: "HookedCLIP", clean: Any, corrupted: Any, activation: str, by: Optional[str],
             layers: Optional[Sequence[int]]) -> _Setup:
    if activation not in ACTIVATIONS:
        raise InputError(f"activation={activation!r} cannot be patched; choose from {', '.join(ACTIVATIONS)}.")
    by = by or BY[activation][0]
    if by not in BY[activation]:
        raise InputError(f"by={by!r} does not apply to {activation}; use one of {BY[activation]}.")
    image = isinstance(clean, Tensor) and clean.is_floating_point()
    if image:
        clean, corrupted = model.check_images(clean), model.check_images(corrupted)
    else:
        clean, corrupted = model.check_tokens(clean), model.check_tokens(corrupted)
    if clean.shape != corrupted.shape:
        raise InputError(
            f"clean and corrupted inputs must have the same shape (one corrupted input per clean one); "
            f"got {tuple(clean.shape)} and {tuple(corrupted.shape)}."
        )
    tower = model.visual if image else model.text
    if not hasattr(tower, "blocks"):
        raise InputError("this text tower is run as a whole (Hugging Face) and has no blocks to patch.")
    cfg = tower.cfg
    if layers is None:
        layers = list(range(cfg.n_layers))
    layers = _indices(layers, "layers")
    for layer in layers:
        if not 0 <= layer < cfg.n_layers:
            raise IndexOutOfRangeError(f"layer {layer} is outside the {cfg.tower} tower's 0..{cfg.n_layers - 1}.")
    n_positions = cfg.n_ctx if image else clean.shape[1] + (1 if getattr(tower, "cls_emb", None) is not None else 0)
    labels = model.to_str_tokens(clean) if image else [f"{i}" for i in range(n_positions)]  # text: positions differ per row
    return _Setup("image" if image else "text", clean, corrupted, HOOKS[activation], AXES[by], layers,
                  cfg.n_heads, n_positions, labels)


def _run_metric(metric: Metric, features: Tensor) -> Tensor:
    value = metric(features)
    if not isinstance(value, Tensor) or value.ndim != 0:
        got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise InputError(
            f"the metric must return one number per run (a scalar tensor), got {got}; "
            "reduce over the batch, e.g. with .mean()."
        )
    return value.reshape(())


def _features(model: "HookedCLIP", setup: _Setup, x: Tensor, **kwargs: Any) -> Tensor:
    if setup.tower == "image":
        return F.normalize(model.visual(x, **kwargs), dim=-1)
    tokens = kwargs.pop("tokens", setup.corrupted)
    return F.normalize(model.text(tokens, residual=x if "start_at_layer" in kwargs else None, **kwargs), dim=-1)


def _cache(model: "HookedCLIP", setup: _Setup, inputs: Tensor, names: list[str]) -> dict[str, Tensor]:
    prefix = "" if setup.tower == "image" else "text."
    store: dict[str, Tensor] = {}

    def save(tensor: Tensor, hook: Any) -> None:
        store[hook.name[len(prefix):]] = tensor.detach()

    with model.hooks(fwd_hooks=[(prefix + name, save) for name in names]):
        features = _features(model, setup, inputs, **({} if setup.tower == "image" else {"tokens": inputs}))
    return store, features


def _patch_masks(setup: _Setup, index: Tensor, act_shape: torch.Size) -> Tensor:
    """Boolean masks ``[runs, *act_shape[1:]]`` (broadcastable) saying which entries come from the clean run.

    ``index``: ``[runs, k]`` (pos), (head), (head, pos) per run. Activation layouts:
    residual ``[b, n, m]``; per head ``[b, n, h, d]``; pattern ``[b, h, q, k]``.
    """
    runs, ndim = index.shape[0], len(act_shape)
    axes = setup.axes[1:]
    shape = [runs] + [1] * (ndim - 1)
    if not axes:  # the whole layer
        return torch.ones(shape, dtype=torch.bool, device=index.device)
    pattern = setup.hook.endswith("hook_pattern")
    dims = {"pos": 1 if not pattern else 2, "head": 2 if not pattern else 1}
    mask = torch.ones(shape, dtype=torch.bool, device=index.device)
    for column, axis in enumerate(axes):
        dim = dims[axis]
        size = act_shape[dim]
        view = [runs] + [1] * (ndim - 1)
        view[dim] = size
        hit = torch.arange(size, device=index.device)[None, :] == index[:, column : column + 1]
        mask = mask & hit.view(view)
    return mask


def _indices(values: Any, what: str) -> list[int]:
    """A list of integer indices (Python/numpy integers, 0-d integer tensors; a 1-d integer tensor
    or array); a float such as ``1.5`` or a bool raises [`InputError`][clip_lens.InputError] instead of
    being truncated to another index."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise InputError(f"{what} must be a list of integers, got {type(values).__name__}.")
    if isinstance(values, Tensor) and values.ndim != 1:
        raise InputError(f"{what} must be a list or a 1-d tensor of integers, got shape {tuple(values.shape)}.")
    return [as_int(value, f"{what}[{i}]") for i, value in enumerate(values)]


def _positive_int(value: Any, what: str) -> int:
    number = as_int(value, what)
    if number < 1:
        raise InputError(f"{what} must be a positive integer (inputs per forward), got {number}.")
    return number


def _grid_indices(setup: _Setup, positions: Optional[Sequence[int]], heads: Optional[Sequence[int]]) -> Tensor:
    """Every (pos), (head) or (head, pos) combination to patch within a layer, ``[cells, k]``."""
    pos = list(range(setup.n_positions)) if positions is None else _indices(positions, "positions")
    hds = list(range(setup.n_heads)) if heads is None else _indices(heads, "heads")
    for p in pos:
        if not 0 <= p < setup.n_positions:
            raise IndexOutOfRangeError(f"position {p} is outside 0..{setup.n_positions - 1}.")
    for h in hds:
        if not 0 <= h < setup.n_heads:
            raise IndexOutOfRangeError(f"head {h} is outside 0..{setup.n_heads - 1}.")
    axes = setup.axes[1:]
    if not axes:
        return torch.zeros(1, 0, dtype=torch.long)
    lists = {"pos": pos, "head": hds}
    grids = torch.meshgrid(*[torch.tensor(lists[a]) for a in axes], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def _empty(setup: _Setup) -> Tensor:
    """NaN-filled ``values`` (cells outside a restricted sweep stay NaN)."""
    sizes = {"layer": len(setup.layers), "pos": setup.n_positions, "head": setup.n_heads}
    return torch.full([sizes[a] for a in setup.axes], float("nan"))


def _result(setup: _Setup, model: "HookedCLIP", values: Tensor, activation: str, method: str,
            clean_metric: float, corrupted_metric: float) -> PatchingResult:
    cfg = model.cfg if setup.tower == "image" else model.text.cfg
    return PatchingResult(
        values, setup.axes, activation, method, setup.tower, clean_metric, corrupted_metric, setup.layers,
        setup.position_labels, tuple(cfg.grid_size) if setup.tower == "image" else None,
        cfg.n_prefix_tokens if setup.tower == "image" else 0,
    )


# --- activation patching -----------------------------------------------------------------------
def activation_patch(
    model: "HookedCLIP",
    clean: Any,
    corrupted: Any,
    metric: Metric,
    activation: str = "resid_pre",
    *,
    by: Optional[str] = None,
    layers: Optional[Sequence[int]] = None,
    positions: Optional[Sequence[int]] = None,
    heads: Optional[Sequence[int]] = None,
    batch_size: int = 64,
    progress: bool = True,
) -> PatchingResult:
    """Patch each clean activation into the corrupted run and record ``metric`` of the output.

    Args:
        model: the hooked model.
        clean: images ``[batch, 3, H, W]`` or texts (token ids or strings).
        corrupted: the same shape as ``clean``; row ``i`` is the counterfactual of clean row ``i``.
        metric: normalised embeddings of one run ``[batch, d_embed]`` → scalar tensor.
        activation: what to patch (module docstring table).
        by: over which axes (module docstring table; the first choice by default).
        layers: restrict the sweep to these layers.
        positions: restrict it to these positions (cells left out stay NaN).
        heads: restrict it to these heads (cells left out stay NaN).
        batch_size: inputs per forward (patches per forward = batch_size // batch).
        progress: show a progress bar over the forwards.

    Returns:
        [`PatchingResult`][clip_lens.PatchingResult] with the metric of every patched run.
    """
    batch_size = _positive_int(batch_size, "batch_size")
    setup = _prepare(model, clean, corrupted, activation, by, layers)
    batch = setup.clean.shape[0]
    names = [setup.hook.format(l=layer) for layer in setup.layers]
    starts = [f"blocks.{layer}.hook_resid_pre" for layer in setup.layers]
    with torch.no_grad():
        clean_acts, clean_features = _cache(model, setup, setup.clean, names)
        corrupted_acts, corrupted_features = _cache(model, setup, setup.corrupted, sorted(set(starts + names)))
        clean_metric = float(_run_metric(metric, clean_features))
        corrupted_metric = float(_run_metric(metric, corrupted_features))
        cells = _grid_indices(setup, positions, heads)
        values = _empty(setup)
        per_forward = max(1, batch_size // batch)
        jobs = []
        for i, name in enumerate(names):
            # a patch that copies identical values is the corrupted run itself: no forward needed
            differs = _reduce_to_cells(setup, (clean_acts[name] != corrupted_acts[name]).float())
            needed = differs.reshape(-1)[_flat_cells(setup, cells)] > 0 if cells.shape[1] else differs.reshape(1) > 0
            for cell in cells[~needed].tolist():
                values[(i, *cell)] = corrupted_metric
            todo = cells[needed]
            jobs += [(i, todo[c : c + per_forward]) for c in range(0, len(todo), per_forward)]
        bar = _progress(len(jobs), progress, f"patching {activation}")
        for i, index in jobs:
            features = _patched_forward(model, setup, setup.layers[i], index, clean_acts[names[i]], corrupted_acts[starts[i]])
            for run, cell in enumerate(index.tolist()):
                values[(i, *cell)] = float(_run_metric(metric, features[run * batch : (run + 1) * batch]))
            bar.update(1)
        bar.close()
    return _result(setup, model, values, activation, "activation", clean_metric, corrupted_metric)


def _patched_forward(model: "HookedCLIP", setup: _Setup, layer: int, index: Tensor, clean_act: Tensor,
                     start: Tensor) -> Tensor:
    """Features of ``len(index)`` patched runs in one forward, starting at ``layer`` from the
    corrupted residual stream."""
    runs, batch = max(1, index.shape[0]), start.shape[0]
    x = start.repeat(runs, *([1] * (start.ndim - 1)))

    def patch(act: Tensor, hook: Any) -> Tensor:
        shaped = act.view(runs, batch, *act.shape[1:])
        mask = _patch_masks(setup, index.to(act.device), act.shape).unsqueeze(1)
        return torch.where(mask, clean_act.unsqueeze(0), shaped).view_as(act)

    prefix = "" if setup.tower == "image" else "text."
    kwargs: dict[str, Any] = {"start_at_layer": layer}
    if setup.tower == "text":
        kwargs["tokens"] = setup.corrupted.repeat(runs, 1)
    with model.hooks(fwd_hooks=[(prefix + setup.hook.format(l=layer), patch)]):
        return _features(model, setup, x, **kwargs)


def _progress(total: int, enabled: bool, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=description, unit="forward")


# --- attribution patching ----------------------------------------------------------------------
def attribution_patch(
    model: "HookedCLIP",
    clean: Any,
    corrupted: Any,
    metric: Metric,
    activation: str = "resid_pre",
    *,
    by: Optional[str] = None,
    layers: Optional[Sequence[int]] = None,
) -> PatchingResult:
    """Linear estimate of [`activation_patch`][clip_lens.activation_patch] for every cell from one forward + backward.

    ``values = corrupted_metric + Σ (clean − corrupted) · ∂metric/∂activation`` at the corrupted
    run, summed over the entries a patch replaces (Nanda's attribution patching). Same arguments
    and result as [`activation_patch`][clip_lens.activation_patch].
    """
    setup = _prepare(model, clean, corrupted, activation, by, layers)
    names = [setup.hook.format(l=layer) for layer in setup.layers]
    with torch.no_grad():
        clean_acts, clean_features = _cache(model, setup, setup.clean, names)
    prefix = "" if setup.tower == "image" else "text."
    acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}

    def save(tensor: Tensor, hook: Any) -> None:
        acts[hook.name[len(prefix):]] = tensor.detach()

    def save_grad(grad: Tensor, hook: Any) -> None:
        grads[hook.name[len(prefix):]] = grad.detach()

    with model.hooks(fwd_hooks=[(prefix + n, save) for n in names], bwd_hooks=[(prefix + n, save_grad) for n in names]):
        with torch.enable_grad():
            features = _features(model, setup, setup.corrupted, **({} if setup.tower == "image" else {"tokens": setup.corrupted}))
            value = _run_metric(metric, features)
            value.backward()
    corrupted_metric = float(value.detach())
    clean_metric = float(_run_metric(metric, clean_features))
    rows = [_reduce_to_cells(setup, (clean_acts[n] - acts[n]) * grads[n]) for n in names]
    values = torch.stack(rows).float() + corrupted_metric
    return _result(setup, model, values, activation, "attribution", clean_metric, corrupted_metric)


def _flat_cells(setup: _Setup, cells: Tensor) -> Tensor:
    """Row-major indices of ``cells`` (``[cells, k]`` over ``setup.axes[1:]``) in one layer's values."""
    sizes = {"pos": setup.n_positions, "head": setup.n_heads}
    flat = torch.zeros(cells.shape[0], dtype=torch.long)
    for column, axis in enumerate(setup.axes[1:]):
        flat = flat * sizes[axis] + cells[:, column]
    return flat


def _reduce_to_cells(setup: _Setup, product: Tensor) -> Tensor:
    """Sum an activation-shaped tensor over everything but the patched axes (one layer's cells)."""
    pattern = setup.hook.endswith("hook_pattern")
    axes = setup.axes[1:]
    if not axes:
        return product.sum()
    if pattern:  # [b, h, q, k]
        keep = {"head": 1, "pos": 2}
    else:  # [b, n, m] or [b, n, h, d]
        keep = {"pos": 1, "head": 2}
    dims = [keep[a] for a in axes]
    drop = [d for d in range(product.ndim) if d not in dims]
    out = product.sum(dim=drop)
    if dims != sorted(dims):  # the sum keeps dims in increasing order; return them in `axes` order
        out = out.transpose(0, 1)
    return out
