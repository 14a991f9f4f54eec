"""Second-order effects of MLP neurons on the image embedding (Gandelsman, Efros & Steinhardt, ICLR 2025).

A neuron ``n`` of MLP layer ``l`` writes ``m_n(i, t) · w_n`` into the residual stream at every token
``t`` (``m_n`` its post-activation, ``w_n`` its row of ``W_out``). With every LayerNorm scale and
attention pattern frozen at the forward pass, its **first-order** effect is that write read out
directly (through ``ln_post``/pooling/``proj``, as [`decompose`][clip_lens.decompose.decompose] reads
``mlp[l]``) and its **second-order** effect is the part that one later attention head reads (at every
source token, through that layer's ``ln_1`` and the head's value/output maps) and writes directly to
the embedding:

    ψ_n(i) = Σ_{l'>l} Σ_h Σ_r Σ_p Σ_t  ρ[i, r, p] A^{l',h}_{p←t}(i) m_n(i, t) / σ_{l'}(i, t) · w_n C diag(γ_{l'}) W_V^h W_O^h F_r

with ``ρ[i, r, p]`` the frozen read-out weights of query position ``p`` (``1/σ_post(i)`` at the CLS
token; the mean over patches for average pooling; pooler pattern × ``1/σ`` per pooler head ``r`` for
an attentional pooler) and ``F_r`` the read-out maps of `decompose` (``C`` = centring). Everything
right of ``m_n`` is linear, so ψ factorises into a per-image contraction

    c[i, r, (l',h), n] = Σ_t ( Σ_p ρ[i, r, p] A^{l',h}_{p←t}(i) ) / σ_{l'}(i, t) · m_n(i, t)

(the pattern rows weighted by the read-out, one ``[later_head, token] @ [token, neuron]`` matmul per
image and layer) times an image-independent map ``U[r, n, (l',h), out] = w_n C diag(γ_{l'}) W_V^h W_O^h F_r``
built once ([`second_order_maps`][clip_lens.second_order.second_order_maps]): ``ψ[i, n] = Σ_{r,k} c[i, r, k, n] U[r, n, k]``.
No ``[batch, tokens, neurons, d_model]`` tensor exists at any point.

Supported towers (exact with frozen scales and patterns): open_clip's ``VisionTransformer`` with CLS or
average pooling or its attentional pooler (CoCa: the pooler's ``ln_k`` scale, pattern and per-query
``ln_post`` scale are frozen like the rest), and timm ViT/Eva towers with token/average pooling
(LayerScale, rotary embeddings, register tokens, EVA02's LayerNorm over the heads and inside SwiGLU:
each is a frozen scale or a constant on the path). Refused: convolutional towers (no neurons in this
sense), timm's MAP pooler (SigLIP, PE-Core: its MLP sits between the later heads and the embedding,
so the path is not affine), residual post-norm blocks (EVA02-E; affine, but not implemented).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from clip_lens import _callable_module
from clip_lens.config import as_int
from clip_lens.decompose import (
    LayerSpec,
    _centre,
    _check_directions,
    _head_scale,
    _head_W_O,
    _layers,
    _plan,
    _readout,
    _through_norm,
)
from clip_lens.errors import IndexOutOfRangeError, InputError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from clip_lens.components.readout import ReadoutPlan
    from clip_lens.hooked_clip import HookedCLIP

NeuronSpec = Union[None, int, list, tuple, Tensor]

_MAX_TEMPORARY = 1 << 24
"""Elements of one neuron chunk's temporary ``[neuron, batch, out]`` product (bounds the extra memory)."""


class UnsupportedTowerError(InputError, UnsupportedArchitectureError):
    """A tower whose path from the neurons to the embedding is not affine with frozen scales (or not
    implemented): both an [`InputError`][clip_lens.InputError] and an ``UnsupportedArchitectureError``."""


@dataclass
class SecondOrder:
    """Per-neuron effects on the image embedding (``out`` = ``d_embed``, or ``n_directions`` when
    ``directions`` were given). Un-normalised, like [`Decomposition`][clip_lens.Decomposition]: divide by
    ‖embedding‖ for shares of the cosine similarity.
    """

    effects: Float[Tensor, "batch layer neuron out"]
    """Second-order effect ψ_n(i) of every selected neuron (the per-image ``1/σ_post`` included)."""
    first_order: Float[Tensor, "batch layer neuron out"]
    """The neuron's direct effect through the read-out (same frozen scales, same convention as
    ``decompose``): summed over all neurons it is ``decompose(...).mlp[:, l] − mlp_bias[:, l]``."""
    layers: list[int]
    """The MLP layers, ascending."""
    neurons: Int[Tensor, "neuron"]
    """Neuron indices (the same for every layer)."""
    per_head: Optional[Float[Tensor, "batch layer neuron later_head out"]] = None
    """With ``per_head=True``: ``effects`` split over later heads ``(l', h)`` for every
    ``l' > layers[0]`` (``head_labels``); zeros where ``l' <= l``. Sums to ``effects`` over that axis."""
    head_labels: Optional[list[str]] = None
    """``"L{l'}H{h}"`` for the ``later_head`` axis of ``per_head``."""
    directions: Optional[Tensor] = None
    """The ``[out, d_embed]`` directions everything is projected on, or None."""
    mlp_bias: Optional[Float[Tensor, "batch layer out"]] = None
    """The MLP output bias ``b_out`` of each layer through the read-out: the part of ``decompose``'s
    ``mlp[l]`` that belongs to no neuron."""
    embedding: Optional[Float[Tensor, "batch d_embed"]] = None
    """The image embeddings of the same forward pass (``encode_image``, not normalised, never projected)."""

    def total(self) -> Float[Tensor, "batch layer out"]:
        """Σ over the selected neurons of ``effects``."""
        return self.effects.sum(2)


@dataclass
class SecondOrderMaps:
    """The image-independent part of [`second_order`][clip_lens.second_order.second_order] for one model, layer and
    neuron selection and set of directions; reuse it across batches (``second_order(..., maps=maps)``).

    Memory: ``Σ_l channel · neuron · (L − 1 − l) · n_heads · out`` values for ``head_maps``.
    """

    layers: list[int]
    neurons: Int[Tensor, "neuron"]
    directions: Optional[Tensor]
    head_maps: list[Float[Tensor, "channel neuron later_head out"]]
    """Per selected layer ``l``: ``U`` for the heads of layers ``l+1 … L−1`` (layer-major)."""
    direct_maps: Float[Tensor, "channel layer neuron out"]
    """``w_n F_r``: the neuron's write through each read-out channel (first order)."""
    bias_maps: Float[Tensor, "channel layer out"]
    """``b_out F_r``: the MLP output bias through each read-out channel."""
    n_heads: int
    n_layers: int


def _refuse_unsupported(model: "HookedCLIP") -> "ReadoutPlan":
    """The read-out plan of a tower whose neuron-to-embedding path is affine, else a one-line refusal."""
    family = getattr(model.visual, "family", "vit")
    works = ("second_order works on ViT towers: open_clip's VisionTransformer (CLS, average or attentional "
             "pooling) and timm ViT/Eva towers with token or average pooling")
    if family != "vit":
        raise UnsupportedTowerError(
            f"this is a {family} image tower, which has no transformer MLP neurons; {works}. "
            "Use decompose() for its direct terms.")
    if model.cfg.pool_type not in ("tok", "avg", "attn"):
        raise UnsupportedTowerError(f"pool_type='{model.cfg.pool_type}' gives no pooled embedding; {works}.")
    plan = _plan(model)
    if plan.pooler is not None and model.mod_dict[plan.pooler].has_mlp:
        raise UnsupportedTowerError(
            "the MAP attention pooler's MLP (SigLIP, PE-Core) lies between the later heads and the embedding, "
            f"so the second-order path is not affine; {works}.")
    for i, block in enumerate(model.visual.blocks):
        if block.ln1_post is not None or block.ln2_post is not None:
            raise UnsupportedTowerError(
                f"layer {i} is a residual post-norm block (EVA02-E), not implemented for second_order; {works}.")
        if block.ln1 is None:
            raise UnsupportedTowerError(f"layer {i} has no LayerNorm before its attention; {works}.")
        if block.use_split_qkv_input or block.use_attn_in:
            raise InputError(
                f"layer {i} has use_split_qkv_input/use_attn_in switched on; switch them off "
                "(model.set_use_split_qkv_input(False), model.set_use_attn_in(False)) before second_order.")
        if getattr(block, "mlp", None) is None:
            raise InputError(f"layer {i} has no MLP; pass layers that have one.")
    return plan


def _select_layers(model: "HookedCLIP", layers: LayerSpec) -> list[int]:
    selected = _layers("all" if layers is None else layers, model.cfg.n_layers, "layers")
    if not selected:
        raise InputError("layers selects no MLP layer; pass None (all), 'all' or a list of layer indices.")
    return selected


def _select_neurons(model: "HookedCLIP", neurons: NeuronSpec) -> Int[Tensor, "neuron"]:
    d_mlp = model.cfg.d_mlp
    if neurons is None:
        return torch.arange(d_mlp)
    usage = f"neurons must be None (all {d_mlp}) or a 1-d list/tensor of indices in [0, {d_mlp})"
    if isinstance(neurons, Tensor):
        if neurons.ndim > 1 or neurons.is_floating_point() or neurons.dtype == torch.bool:
            raise InputError(f"{usage}; got a tensor of shape {tuple(neurons.shape)} and dtype {neurons.dtype}.")
        entries = [int(n) for n in neurons.reshape(-1).tolist()]
    elif isinstance(neurons, (list, tuple, range)):
        entries = [as_int(n, f"neurons[{i}]") for i, n in enumerate(neurons)]
    else:
        entries = [as_int(neurons, "neurons")]
    if not entries:
        raise InputError(f"{usage}; got an empty selection.")
    bad = [n for n in entries if not 0 <= n < d_mlp]
    if bad:
        raise IndexOutOfRangeError(f"neuron {bad[0]} is out of range: the MLPs have {d_mlp} neurons (0 … {d_mlp - 1}).")
    return torch.tensor(entries, dtype=torch.long)


def _readout_maps(model: "HookedCLIP", plan: "ReadoutPlan") -> Float[Tensor, "channel d_model out"]:
    """The read-out maps ``F_r``: they do not depend on the frozen scales, so any store gives them."""
    cfg = model.cfg
    ones = model.visual.device_weight.new_ones
    store: dict = {"embed": ones(1, 1, cfg.d_model)}
    n_queries = cfg.attn_pooler_queries or 1
    for norm in (plan.token_norm, plan.query_norm, plan.pooled_norm):
        if norm is not None:
            store[norm] = ones(1, cfg.n_ctx if norm == plan.token_norm else n_queries, 1)
    if plan.pooler is not None:
        store["pool_pattern"] = ones(1, cfg.attn_pooler_heads, n_queries, cfg.n_ctx)
    return _readout(model, plan, store).maps


def _projected(plan: "ReadoutPlan", directions: Optional[Tensor]) -> "ReadoutPlan":
    """The read-out plan projected on ``directions`` (the read-out is linear in its output axis)."""
    if directions is None:
        return plan
    bias = None if plan.bias is None else plan.bias @ directions.T
    return replace(plan, weight=plan.weight @ directions.T, bias=bias)


def _write_vectors(block, neurons: Tensor) -> Float[Tensor, "neuron d_model"]:
    """``w_n``: what each neuron writes into the residual per unit of ``hook_post`` (LayerScale and a
    SwiGLU LayerNorm's weight and centring folded in; divide by its frozen scale)."""
    return block.mlp.W_out[neurons.to(block.mlp.W_out.device)]


def second_order_maps(
    model: "HookedCLIP",
    *,
    layers: LayerSpec = None,
    neurons: NeuronSpec = None,
    directions: Optional[Float[Tensor, "n_directions d_embed"]] = None,
) -> SecondOrderMaps:
    """The image-independent maps ``U`` of [`second_order`][clip_lens.second_order.second_order], built once.

    Cost: per selected layer and later head ``neuron · d_model · d_head + neuron · d_head · out``
    multiply-adds (the head's ``W_V`` first, then ``W_O`` and the read-out).
    """
    plan = _refuse_unsupported(model)
    selected = _select_layers(model, layers)
    index = _select_neurons(model, neurons)
    directions = _check_directions(model, plan.weight.shape[1], directions)
    blocks = model.visual.blocks
    with torch.no_grad(), torch.autocast(model.device.type, enabled=False):
        maps = _readout_maps(model, _projected(plan, directions))  # projected before the maps are built  # [channel, d_model, out]
        # per later layer: C diag(γ_1) W_V^h [head, d_model, d_head] and W_O^h F_r [channel, head, d_head, out]
        first_later = selected[0] + 1
        values = {lp: _through_norm(blocks[lp].ln1, blocks[lp].attn.W_V, 1) for lp in range(first_later, len(blocks))}
        outputs = {lp: torch.einsum("hkm,rmo->rhko", _head_W_O(blocks[lp]), maps) for lp in values}
        head_maps, direct, bias_maps = [], [], []
        for layer in selected:
            w = _write_vectors(blocks[layer], index)  # [neuron, d_model]
            direct.append(torch.einsum("nm,rmo->rno", w, maps))
            bias_maps.append(torch.einsum("m,rmo->ro", blocks[layer].mlp.b_out, maps))
            later = range(layer + 1, len(blocks))
            n_heads = model.cfg.n_heads
            U = w.new_empty(maps.shape[0], len(index), len(later) * n_heads, maps.shape[-1])
            for j, lp in enumerate(later):
                read = torch.einsum("nm,hmk->hnk", w, values[lp])  # [head, neuron, d_head]
                for r in range(maps.shape[0]):
                    U[r, :, j * n_heads:(j + 1) * n_heads] = torch.bmm(read, outputs[lp][r]).transpose(0, 1)
            head_maps.append(U)
    return SecondOrderMaps(
        layers=selected, neurons=index, directions=directions, head_maps=head_maps,
        direct_maps=torch.stack(direct, 1), bias_maps=torch.stack(bias_maps, 1),
        n_heads=model.cfg.n_heads, n_layers=len(blocks),
    )


def _capture(model: "HookedCLIP", plan: "ReadoutPlan", maps: SecondOrderMaps, images: Tensor) -> tuple[Tensor, dict]:
    """One forward pass: the image embeddings, and in a dict the frozen quantities at the pooled positions
    and each selected layer's post-activations of the selected neurons."""
    store: dict = {}
    positions = plan.positions
    neurons = maps.neurons.to(model.device)

    def save(key, index=None):
        def hook(activation: Tensor, hook) -> None:
            store[key] = activation if index is None else activation[index].clone()

        return hook

    hooks = [("blocks.0.hook_resid_pre", save("embed", (slice(None), slice(0, 1))))]
    for norm in (plan.token_norm, plan.query_norm, plan.pooled_norm):
        if norm is not None:
            hooks.append((f"{norm}.hook_scale", save(norm)))
    if plan.pooler is not None:
        hooks.append((f"{plan.pooler}.attn.hook_pattern", save("pool_pattern")))
    blocks = model.visual.blocks
    for layer in maps.layers:
        hooks.append((f"blocks.{layer}.mlp.hook_post", save(("post", layer), (..., neurons))))
        if blocks[layer].mlp.ln_inner is not None:  # SwiGLU's LayerNorm: a frozen per-token scale
            hooks.append((f"blocks.{layer}.mlp.ln_inner.hook_scale", save(("mlp_scale", layer))))
    for layer in range(maps.layers[0] + 1, maps.n_layers):
        hooks.append((f"blocks.{layer}.ln1.hook_scale", save(("ln1", layer))))
        hooks.append((f"blocks.{layer}.attn.hook_pattern", save(("pattern", layer), (slice(None), slice(None), positions))))
        if blocks[layer].attn.ln_inner is not None:
            hooks.append((f"blocks.{layer}.attn.ln_inner.hook_scale", save(("ln_inner", layer), (slice(None), positions))))
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        embedding = model.visual(images)
    return embedding, store


def _batch(model: "HookedCLIP", plan: "ReadoutPlan", maps: SecondOrderMaps, images: Tensor, per_head: bool):
    """``(effects, first_order, per_head, mlp_bias, embedding)`` of one batch of images."""
    embedding, store = _capture(model, plan, maps, images)
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        store = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in store.items()}
        weights = _readout(model, plan, store).weights  # [batch, channel, pos]
        n_layers, n_heads = maps.n_layers, maps.n_heads
        # the pattern rows at the pooled positions, weighted by the read-out, over each token's 1/σ of ln_1
        rows = {}
        for lp in range(maps.layers[0] + 1, n_layers):
            w = weights
            scale = _head_scale(store, lp)  # EVA02's LayerNorm over the heads, at the query position
            if scale is not None:
                w = w / scale[:, None, :]
            rows[lp] = torch.einsum("brp,bhpt->brht", w, store[("pattern", lp)]) / store[("ln1", lp)][:, None, None, :, 0]
        batch, n_out = images.shape[0], maps.direct_maps.shape[-1]
        n_neurons = len(maps.neurons)
        effects = weights.new_zeros(batch, len(maps.layers), n_neurons, n_out)
        first = weights.new_empty(batch, len(maps.layers), n_neurons, n_out)
        heads = None
        if per_head:
            heads = weights.new_zeros(batch, len(maps.layers), n_neurons, (n_layers - 1 - maps.layers[0]) * n_heads, n_out)
        chunk = max(1, _MAX_TEMPORARY // max(1, batch * n_out))
        for i, layer in enumerate(maps.layers):
            post = store[("post", layer)]  # [batch, token, neuron]
            if ("mlp_scale", layer) in store:
                post = post / store[("mlp_scale", layer)]
            pooled = torch.einsum("brp,bpn->brn", weights, post[:, plan.positions])
            first[:, i] = torch.einsum("brn,rno->bno", pooled, maps.direct_maps[:, i])
            if layer == n_layers - 1:
                continue
            later = torch.cat([rows[lp] for lp in range(layer + 1, n_layers)], 2)  # [batch, channel, later_head, token]
            c = torch.einsum("brkt,btn->rnbk", later, post)  # [channel, neuron, batch, later_head]
            U = maps.head_maps[i]  # [channel, neuron, later_head, out]
            if per_head:  # the split is kept, so the effects are its sum (no second product)
                offset = (layer - maps.layers[0]) * n_heads
                heads[:, i, :, offset:] = torch.einsum("rnbk,rnko->bnko", c, U)
                effects[:, i] = heads[:, i, :, offset:].sum(2)
                continue
            for start in range(0, n_neurons, chunk):
                part = slice(start, start + chunk)
                for r in range(U.shape[0]):
                    effects[:, i, part] += torch.bmm(c[r, part], U[r, part]).transpose(0, 1)
        mlp_bias = torch.einsum("br,rlo->blo", weights.sum(-1), maps.bias_maps)
    return effects, first, heads, mlp_bias, embedding


def second_order(
    model: "HookedCLIP",
    images: Float[Tensor, "batch 3 H W"],
    *,
    layers: LayerSpec = None,
    neurons: NeuronSpec = None,
    directions: Optional[Float[Tensor, "n_directions d_embed"]] = None,
    per_head: bool = False,
    batch_size: int = 32,
    progress: bool = False,
    maps: Optional[SecondOrderMaps] = None,
) -> SecondOrder:
    """Second-order (and first-order) effects of MLP neurons on the image embedding.

    Exact with every LayerNorm scale and attention pattern frozen at the forward pass (see the module
    docstring and ``docs/concepts/second_order.md``); the default convention of
    [`decompose`][clip_lens.decompose.decompose] (each term centred on its own, biases as their own terms).

    Args:
        model: a [`HookedCLIP`][clip_lens.HookedCLIP] with a ViT image tower.
        images: preprocessed pixels ``[batch, 3, H, W]``.
        layers: MLP layers: None (all), ``"all"``, one index or a list/1-d tensor of indices
            (negative ones count from the end), as ``decompose``'s ``heads``.
        neurons: neuron indices, the same for every layer (None: all ``d_mlp``).
        directions: optional ``[n_directions, d_embed]``; every effect is projected on them (``out``
            = ``n_directions``), which is also what keeps the maps small.
        per_head: also return the split over later heads (``[batch, layer, neuron, later_head, out]``:
            keep the selection small).
        batch_size: images per forward pass.
        progress: show a progress bar over batches.
        maps: [`second_order_maps`][clip_lens.second_order.second_order_maps] built earlier for this model (then
            ``layers``/``neurons``/``directions`` come from it and must be left None).

    Returns:
        A [`SecondOrder`][clip_lens.second_order.SecondOrder] on the model's device, in its dtype.
    """
    if maps is None:
        maps = second_order_maps(model, layers=layers, neurons=neurons, directions=directions)  # checks the tower
        plan = _plan(model)
    else:
        if not isinstance(maps, SecondOrderMaps):
            raise InputError(f"maps must come from second_order_maps(model, ...), got {type(maps).__name__}.")
        if layers is not None or neurons is not None or directions is not None:
            raise InputError("pass layers/neurons/directions to second_order_maps() or to second_order(), not with maps=.")
        plan = _refuse_unsupported(model)
        if maps.n_layers != model.cfg.n_layers or maps.direct_maps.device != model.device:
            raise InputError("maps were built for another model (or device); rebuild them with second_order_maps(model, ...).")
    plan = _projected(plan, maps.directions)
    batch_size = as_int(batch_size, "batch_size")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}.")
    images = model.check_images(images)
    starts = range(0, images.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="second_order", unit="batch")
    parts = [_batch(model, plan, maps, images[s:s + batch_size], bool(per_head)) for s in starts]
    effects, first, heads, bias, embedding = (None if p[0] is None else torch.cat(p) for p in zip(*parts))
    labels = None
    if per_head:
        labels = [f"L{lp}H{h}" for lp in range(maps.layers[0] + 1, maps.n_layers) for h in range(maps.n_heads)]
    return SecondOrder(
        effects=effects, first_order=first, layers=list(maps.layers), neurons=maps.neurons.clone(), per_head=heads,
        head_labels=labels, directions=maps.directions, mlp_bias=bias, embedding=embedding,
    )


_callable_module(__name__, second_order)  # `from clip_lens import second_order` is the function even after this module was imported
