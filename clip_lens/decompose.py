"""Exact direct-contribution decomposition of the image embedding.

With the LayerNorm scales of the read-out frozen at their values in the forward pass (as in
Gandelsman et al., ICLR 2024), the image embedding is a *linear* function of the residual
stream at the positions the tower pools, so it splits exactly into

    embedding = embed + Σ_l attn[l] + Σ_l mlp[l] + bias
    attn[l]   = Σ_h heads[l, h] + attn_bias[l]
    heads[l, h] = Σ_t tokens[l, h, t]          (source token t, through the attention pattern)

Each residual component ``c`` (a vector per position) reaches the embedding through the
*read-out*: ``Σ_r Σ_p w[b, r, p] · c[b, p] @ F_r``. For CLS/average pooling there is one
read-out channel: ``w = pool_weight / σ_post`` and ``F = centre(γ_post ⊙ proj)``; centring is
linear, so each component is centred on its own, which sums exactly to centring the total.
An attentional pooler (CoCa) adds one channel per pooler head: the pooler's pattern and its
``ln_k`` scale are frozen too, and ``F_r`` runs through that head's value/output weights.

Work is contracted early: per-head terms only need ``z`` at the pooled positions; per-token
terms need the pattern rows of those positions and ``v``, and with ``directions`` every map is
projected once (``F @ directions.T``) so token-level memory is ``[batch, layer, head, token,
n_directions]``.

Two conventions split the same embedding (``convention=``): ``"default"`` centres each component
on its own and keeps the out_proj bias (``attn_bias``) and ``β_post`` (``bias``) as terms of their
own; ``"reference"`` reproduces Gandelsman et al.'s split (CLS-pooled ViTs only): the ``ln_post``
mean ``μ`` and bias ``β`` are spread over the components in fixed shares and the out_proj bias over
a layer's token-head terms. It is computed as the default terms plus an exact correction
([`reference_difference`][clip_lens.decompose.reference_difference]), from one extra read-out column that carries each component's mean.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from clip_lens import _callable_module
from clip_lens.checks import require_finite
from clip_lens.components.readout import ReadoutPlan
from clip_lens.config import _kind, as_int
from clip_lens.errors import IndexOutOfRangeError, InputError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from clip_lens.hooked_clip import HookedCLIP

LayerSpec = Union[str, Sequence[int], None]


@dataclass
class Decomposition:
    """Direct contributions to the image embedding (``out`` = ``d_embed``, or ``n_directions``
    when ``directions`` were given, in which case every field is projected on them).

    ``total()`` equals ``embedding`` to float rounding (≤1e-4 relative in fp32).
    """

    embedding: Float[Tensor, "batch out"]
    """The image embedding of the same forward pass (un-normalised; projected with directions)."""
    embedding_norm: Float[Tensor, "batch"]
    """‖embedding‖ before any projection: divide by it for shares of the cosine similarity."""
    embed: Optional[Float[Tensor, "batch out"]]
    """The embedding term: patch + class + position embeddings (after ``ln_pre`` if present); a
    ConvNeXt's stem output. None where no such term exists (ResNet, FastViT)."""
    attn: Optional[Float[Tensor, "batch layer out"]]
    """Each layer's attention output, out_proj bias included (a ResNet: its attention pool, one layer)."""
    attn_bias: Optional[Float[Tensor, "batch layer out"]]
    """The out_proj bias share of ``attn`` (not attributable to a head). 0 in the reference
    convention, where ``b_O / (n_tokens · n_heads)`` rides in every token-head term."""
    mlp: Optional[Float[Tensor, "batch layer out"]]
    """Each layer's MLP output (None for convolutional towers)."""
    bias: Optional[Float[Tensor, "batch out"]]
    """Constant terms: ``ln_post`` bias through ``proj`` (and the attentional pooler's biases).
    0 in the reference convention (spread over the other terms). None where there is none."""
    heads: Optional[Float[Tensor, "batch head_layer head out"]]
    """Per-head terms for ``head_layers`` (None when ``heads=None``)."""
    tokens: Optional[Float[Tensor, "batch token_layer head token out"]]
    """Per-head, per-source-token terms for ``token_layers`` (None unless requested)."""
    head_layers: list[int] = field(default_factory=list)
    token_layers: list[int] = field(default_factory=list)
    projected: bool = False
    pooler_mlp: Optional[Float[Tensor, "batch out"]] = None
    """The MLP inside a MAP attention pooler (SigLIP, PE-Core), as one term; None without one."""
    convention: str = "default"
    """How LayerNorm centring and biases are split: ``"default"`` or ``"reference"`` (see
    [`decompose`][clip_lens.decompose.decompose]); ``"difference"`` for [`reference_difference`][clip_lens.decompose.reference_difference] (reference − default:
    ``embedding`` is 0 there, ``embedding_norm`` the forward pass's norm)."""
    family: str = "vit"
    """The image tower's family: ``"vit"``, ``"resnet"``, ``"convnext"`` or ``"fastvit"``. Which
    fields exist depends on it (see ``docs/concepts/decomposition.md``); absent terms are None, never zeros."""
    blocks: Optional[Float[Tensor, "batch block out"]] = None
    """ConvNeXt: each block's direct contribution (stage-major order, ``block_labels``), carried
    through the later downsamples with their LayerNorm scales frozen."""
    block_labels: list[str] = field(default_factory=list)
    """``"S{stage}B{block}"`` labels of ``blocks``' axis."""
    block_positions: Optional[Float[Tensor, "batch block position out"]] = None
    """ConvNeXt (``tokens=`` requested): ``blocks`` split over the final feature map's positions
    (row-major ``grid_size``): each of a block's own positions lies inside exactly one final cell."""
    feature_map: Optional[Float[Tensor, "batch out"]] = None
    """FastViT: the final feature map (after ``final_conv``'s non-linearity) through pooling and the
    head: every non-constant part of the embedding; split per position in ``positions``."""
    positions: Optional[Float[Tensor, "batch position out"]] = None
    """A breakdown of every non-constant term over the final feature map's positions (row-major
    ``grid_size``): sums to ``total() − bias`` (ResNet: the features' share, ``Σ_h tokens``, which leaves
    out ``attn_bias``, ``pos_embed`` and the value bias). Not a term of ``total()``."""
    pos_embed: Optional[Float[Tensor, "batch head out"]] = None
    """ResNet: the attention pool's positional-embedding share of each head (part of ``heads``)."""

    def total(self) -> Float[Tensor, "batch out"]:
        """Sum of all top-level terms (those present): reproduces ``embedding``."""
        total = torch.zeros_like(self.embedding)
        for name in ("embed", "bias", "pooler_mlp", "feature_map"):
            term = getattr(self, name)
            if term is not None:
                total = total + term
        for name in ("attn", "mlp", "blocks"):
            term = getattr(self, name)
            if term is not None:
                total = total + term.sum(1)
        return total

    def relative_error(self) -> Float[Tensor, "batch"]:
        """‖total() − embedding‖ / ‖embedding‖ per image."""
        return (self.total() - self.embedding).norm(dim=-1) / self.embedding.norm(dim=-1)

    @property
    def head_labels(self) -> list[str]:
        """``"L{l}H{h}"`` labels aligned with [`stack_heads`][clip_lens.Decomposition.stack_heads]."""
        n_heads = 0 if self.heads is None else self.heads.shape[2]
        return [f"L{l}H{h}" for l in self.head_layers for h in range(n_heads)]

    def stack_heads(self) -> Float[Tensor, "batch component out"]:
        """Per-head terms flattened to ``[batch, head_layer * head, out]`` (see ``head_labels``)."""
        if self.heads is None:
            raise InputError("this decomposition has no per-head terms; call decompose(..., heads='all').")
        return self.heads.flatten(1, 2)

    def normalized(self) -> "Decomposition":
        """Every term divided by ‖embedding‖, so that terms sum to the unit image embedding."""
        scale = self.embedding_norm

        def divide(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t / scale.view(-1, *([1] * (t.ndim - 1)))

        return _map_terms(self, divide, embedding=divide(self.embedding), embedding_norm=torch.ones_like(scale))


@dataclass
class Readout:
    """How the residual stream at the pooled positions reaches the embedding (frozen LN scales).

    ``contribution(c) = Σ_r Σ_p weights[b, r, p] · c[b, p] @ maps[r]`` plus ``const``.
    """

    positions: slice
    weights: Float[Tensor, "batch channel pos"]
    maps: Float[Tensor, "channel d_model out"]
    const: Float[Tensor, "batch out"]
    pooler_mlp: Optional[Float[Tensor, "batch out"]] = None
    factors: Optional[tuple[Tensor, Tensor]] = None
    """A pooler's maps kept factorised, ``(A [channel, d_model, d_head], B [channel, d_head, out])`` with
    ``maps = A @ B``: each pooler head's map has rank d_head, so contracting through it is cheaper."""

    def apply(self, components: list[Float[Tensor, "batch pos d_model"]]) -> Float[Tensor, "batch component out"]:
        """The contribution of each component, all at once: ``[batch, component, out]``."""
        stacked = torch.stack(components, 1)  # [batch, component, pos, d_model]
        pooled = torch.einsum("brp,blpd->blrd", self.weights, stacked)
        return torch.einsum("blrd,rdo->blo", pooled, self.maps)


def _layers(spec: LayerSpec, n_layers: int, what: str) -> list[int]:
    """The sorted layer indices ``spec`` selects: ``"all"``, None (none), one index or a collection of
    indices (Python/numpy integers, a 1-d integer tensor or array); negative ones count from the end.

    Floats (even ``2.0``), bools and None entries raise [`InputError`][clip_lens.decompose.InputError] naming ``what``: a float
    index is a bug upstream, and truncating ``1.7`` to layer 1 would silently analyse another layer.
    """
    usage = f"{what} must be 'all', None or a list of layer indices (or one index)"
    if spec is None:
        return []
    if isinstance(spec, str):
        if spec != "all":
            raise InputError(f"{usage}, got '{spec}'.")
        return list(range(n_layers))
    if isinstance(spec, (bytes, Mapping)):
        raise InputError(f"{usage}, got {type(spec).__name__}.")
    ndim = getattr(spec, "ndim", None)  # torch tensors, numpy arrays and numpy scalars
    if ndim is not None and ndim > 1:
        raise InputError(f"{usage}; got an array of shape {tuple(spec.shape)} (pass a 1-d one).")
    if ndim == 1:
        dtype = spec.dtype
        if isinstance(spec, Tensor):
            integral = not (spec.is_floating_point() or spec.is_complex() or dtype == torch.bool)
        else:
            integral = getattr(dtype, "kind", "") in ("i", "u")
        if not integral:
            raise InputError(f"{usage} (integers); got a 1-d array of dtype {dtype}.")
        if isinstance(spec, Tensor) and spec.is_meta:
            raise InputError(f"{what} is a tensor on the meta device (no values); pass a list of ints.")
        spec = spec.tolist()
    if ndim == 0 or not isinstance(spec, Iterable):
        try:
            entries = [as_int(spec, what)]
        except InputError:
            if isinstance(spec, Tensor) and spec.is_meta:
                raise
            hint = f" (int({spec!r}) if you mean layer {int(spec)})" if isinstance(spec, float) and spec.is_integer() else ""
            raise InputError(f"{usage}{hint}, got {_kind(spec)}.") from None
    else:
        entries = [as_int(layer, f"{what}[{i}]") for i, layer in enumerate(spec)]
    layers = []
    for layer in entries:
        if not -n_layers <= layer < n_layers:
            raise IndexOutOfRangeError(f"{what}: layer {layer} is out of range for a {n_layers}-layer tower.")
        layers.append(layer % n_layers)
    return sorted(set(layers))


def decomposition_layers(model: "HookedCLIP", heads: LayerSpec, tokens: LayerSpec) -> tuple[list[int], list[int]]:
    """``(head_layers, token_layers)``: the layers whose per-head and per-token terms
    ``decompose(model, images, heads=heads, tokens=tokens)`` returns.

    A ViT's layers are its blocks (token layers always get heads too). A convolutional tower says
    how many of each it has (``visual.decomposition_layer_counts``): a ResNet one of each (its
    attention pool), a ConvNeXt no heads and one token layer per block, a FastViT no heads and one
    token layer (its final feature map).
    """
    counts = getattr(model.visual, "decomposition_layer_counts", None)
    n_head_layers, n_token_layers = (model.cfg.n_layers,) * 2 if counts is None else counts
    token_layers = _layers(tokens, n_token_layers, "tokens")
    head_layers = _layers(heads, n_head_layers, "heads")
    if n_head_layers == n_token_layers:  # per-token terms refine per-head ones
        head_layers = sorted(set(head_layers) | set(token_layers))
    return head_layers, token_layers


def _plan(model: "HookedCLIP") -> ReadoutPlan:
    if model.cfg.pool_type not in ("tok", "avg", "attn"):
        raise UnsupportedArchitectureError(
            f"pool_type='{model.cfg.pool_type}' returns one embedding per token; decompose() needs a pooled image embedding."
        )
    with torch.autocast(model.device.type, enabled=False):  # the frozen read-out is built in the weights' precision
        return model.visual.readout_plan()


def _centre(matrix: Tensor, dim: int) -> Tensor:
    return matrix - matrix.mean(dim, keepdim=True)


def _through_norm(ln, maps: Tensor, dim: int) -> Tensor:
    """``C diag(γ) maps`` along ``dim`` (the input axis of ``maps``): a LayerNorm with frozen scale
    followed by ``maps``; the caller divides by the scale."""
    shape = [1] * maps.ndim
    shape[dim] = -1
    return _centre(ln.weight.view(shape) * maps, dim)


def _norm_bias(ln, maps: Tensor) -> Tensor:
    """The LayerNorm's bias carried through ``maps [..., m, out]`` (0 without a bias)."""
    if ln.bias is None:
        return maps.new_zeros(maps.shape[-1])
    return torch.einsum("m,...mo->...o", ln.bias, maps)


def _readout(model: "HookedCLIP", plan: ReadoutPlan, store: dict) -> Readout:
    """Read-out weights and maps from the captured LayerNorm scales (and pooler pattern).

    Works backwards from the affine map: the pooled LayerNorm, the pooling (or the pooler's
    per-query LayerNorm, query pooling and per-head value/output maps), the per-token LayerNorm.
    Frozen scales become weights ``[batch, channel, pos]``; weights/centring become ``maps``.
    """
    modules = model.mod_dict
    tail = plan.weight  # [d, out]: what the pooled vector goes through
    batch = store["embed"].shape[0]
    const = tail.new_zeros(batch, tail.shape[1]) + (0 if plan.bias is None else plan.bias)
    per_image = tail.new_ones(batch)  # 1 / pooled scale
    if plan.pooled_norm is not None:
        ln = modules[plan.pooled_norm]
        const = const + _norm_bias(ln, tail)
        tail = _through_norm(ln, tail, 0)
        per_image = store[plan.pooled_norm].reshape(batch).reciprocal()
    pool_weights = plan.pool_weights.to(tail)
    pooler_mlp = None
    factors = None

    if plan.pooler is None:
        weights = (per_image[:, None] * pool_weights[None, :])[:, None, :]  # [batch, 1, pos]
        maps = tail[None]
    else:
        pooler = modules[plan.pooler]
        query_weights = per_image[:, None] * pool_weights[None, :]  # [batch, query]
        if plan.query_norm is not None:
            ln = modules[plan.query_norm]
            const = const + query_weights.sum(1, keepdim=True) * _norm_bias(ln, tail)
            tail = _through_norm(ln, tail, 0)
            query_weights = query_weights / store[plan.query_norm][..., 0]
        attn = pooler.attn
        pooler_const = torch.einsum("hk,hko->o", attn.b_V, attn.W_O) + attn.b_O
        const = const + query_weights.sum(1, keepdim=True) * (pooler_const @ tail)
        if pooler.has_mlp:
            pooler_mlp = torch.einsum("bq,bqd,do->bo", query_weights, store["pooler_mlp"], tail)
        factors = [attn.W_V, attn.W_O @ tail]
        maps = torch.einsum("hmk,hko->hmo", *factors)  # [head, m, out], rank d_head each
        weights = torch.einsum("bq,bhqt->bht", query_weights, store["pool_pattern"])
    if plan.token_norm is not None:
        ln = modules[plan.token_norm]
        # every channel's weights sum over positions to its pooled weight (pattern rows sum to 1)
        const = const + torch.einsum("br,ro->bo", weights.sum(-1), _norm_bias(ln, maps))
        maps = _through_norm(ln, maps, 1)
        if factors is not None:
            factors[0] = _through_norm(ln, factors[0], 1)
        weights = weights / store[plan.token_norm][:, plan.positions, 0][:, None, :]
    return Readout(plan.positions, weights, maps, const, pooler_mlp, None if factors is None else tuple(factors))


def _check_directions(model: "HookedCLIP", d_embed: int, directions: Optional[Tensor]) -> Optional[Tensor]:
    """``directions`` validated ``[n_directions, d_embed]``, finite, on the model's device and dtype."""
    if directions is None:
        return None
    if not isinstance(directions, Tensor) or directions.ndim != 2 or directions.shape[1] != d_embed:
        shape = tuple(directions.shape) if isinstance(directions, Tensor) else type(directions).__name__
        raise InputError(f"directions must be a tensor [n_directions, {d_embed}], got {shape}.")
    if directions.shape[0] == 0:
        raise InputError("directions is empty: pass at least one direction.")
    directions = model.to_model_device(directions, "directions")
    require_finite(directions, "directions contain NaN or inf values.")
    return directions.to(dtype=model.dtype)


CONVENTIONS = ("default", "reference")

_TERMS = ("embed", "attn", "attn_bias", "mlp", "bias", "heads", "tokens", "pooler_mlp", "blocks", "block_positions",
          "feature_map", "positions", "pos_embed")
"""The additive fields of a [`Decomposition`][clip_lens.Decomposition]."""


def _check_convention(model: "HookedCLIP", plan: ReadoutPlan, convention: str) -> None:
    if not isinstance(convention, str) or convention not in CONVENTIONS:
        raise InputError(f"convention must be 'default' or 'reference', got {convention!r}.")
    if convention == "default":
        return
    problems = []
    if model.cfg.pool_type != "tok" or plan.positions != slice(0, 1):
        problems.append(f"pool_type='{model.cfg.pool_type}'")
    if plan.pooler is not None:
        problems.append("an attentional pooler")
    if plan.pooled_norm is not None or plan.query_norm is not None:
        problems.append("a LayerNorm after pooling")
    if plan.token_norm is None:
        problems.append("no LayerNorm before pooling")
    if problems:
        raise UnsupportedArchitectureError(
            "convention='reference' is defined for CLS-pooled ViTs (pool_type='tok', LayerNorm before pooling, "
            f"no attentional pooler) as in Gandelsman et al.; this tower has {', '.join(problems)}. "
            "Use convention='default'."
        )


def _with_mean_channel(readout: Readout) -> Readout:
    """The read-out with one more output column, ``1/d_model``: every term then also carries
    ``mean(c) / σ`` of its component ``c`` (the mean over ``d_model`` at the CLS position)."""
    maps = readout.maps
    mean = maps.new_full((*maps.shape[:-1], 1), 1.0 / maps.shape[1])
    const = torch.cat([readout.const, readout.const.new_zeros(readout.const.shape[0], 1)], -1)
    return replace(readout, maps=torch.cat([maps, mean], -1), const=const)


def _map_terms(parts: Decomposition, function, *others: Decomposition, **changes) -> Decomposition:
    """``function`` applied to every additive field (``None`` stays ``None``)."""
    def apply(name: str):
        values = [getattr(d, name) for d in (parts, *others)]
        return None if values[0] is None else function(*values)

    return replace(parts, **{name: apply(name) for name in _TERMS}, **changes)


def _reference_shift(
    parts: Decomposition, means: Decomposition, u: Float[Tensor, "out"], const: Float[Tensor, "batch out"]
) -> Decomposition:
    """``reference − default`` for every term, from the default terms and their components' means.

    For a component ``c`` with share ``1/K`` of ``μ`` and of the constant read-out ``β_post @ W (+ b)``:

        reference(c) − default(c) = (mean(c) − μ/K) · (γ @ W) / σ + (β @ W + b) / K

    with ``u = γ @ W`` and ``means`` holding ``mean(c)/σ`` per term (so ``μ/σ`` is their sum over
    embed + attn + mlp). Shares: ``1/(2L+1)`` for embed, each ``mlp[l]`` and each ``attn[l]``;
    ``1/((2L+1)·H)`` per head and ``1/((2L+1)·N·H)`` per token-head term. On top, ``attn_bias`` and
    ``bias`` go to 0: the out_proj bias, uncentred, moves into the heads (``1/H`` each) and tokens
    (``1/(N·H)`` each); ``attn[l]`` already contains it.
    """
    share = 1.0 / (2 * parts.attn.shape[1] + 1)
    mu = means.embed + means.attn.sum(1) + means.mlp.sum(1)  # [batch, 1]: μ / σ
    k = const - mu * u  # [batch, out]: (β @ W + b − μ γ @ W / σ), spread with the shares

    def layer_term(mean: Tensor) -> Tensor:  # [batch, layer, 1] -> [batch, layer, out]
        return mean * u + share * k[:, None]

    b_O = parts.attn_bias + means.attn_bias * u  # [batch, layer, out]: the uncentred out_proj bias read-out
    heads = tokens = None
    if parts.heads is not None:
        index = parts.head_layers
        heads = means.heads * u + (b_O[:, index, None] + share * k[:, None, None]) / parts.heads.shape[2]
    if parts.tokens is not None:
        index = parts.token_layers
        scale = 1.0 / (parts.tokens.shape[2] * parts.tokens.shape[3])  # 1 / (H · N)
        tokens = means.tokens * u + (b_O[:, index, None, None] + share * k[:, None, None, None]) * scale
    return replace(
        parts,
        embedding=torch.zeros_like(parts.embedding),
        embed=means.embed * u + share * k,
        attn=layer_term(means.attn),
        attn_bias=-parts.attn_bias,
        mlp=layer_term(means.mlp),
        bias=-parts.bias,
        heads=heads,
        tokens=tokens,
        convention="difference",
    )


def decompose(
    model: "HookedCLIP",
    images: Float[Tensor, "batch 3 H W"],
    *,
    heads: LayerSpec = "all",
    tokens: LayerSpec = None,
    directions: Optional[Float[Tensor, "n_directions d_embed"]] = None,
    convention: str = "default",
) -> Decomposition:
    """Decompose image embeddings into the direct contributions of every component.

    Args:
        model: a [`HookedCLIP`][clip_lens.HookedCLIP].
        images: preprocessed pixels ``[batch, 3, H, W]``.
        heads: layers with per-head terms: ``"all"`` (default), a layer index, a list/tuple/1-d
            integer tensor of layer indices (Python or numpy integers; negative ones count from the
            end), or None. Floats, bools and None entries raise [`InputError`][clip_lens.decompose.InputError].
        tokens: layers with per-head, per-source-token terms (same forms as ``heads``).
            Token layers always get per-head terms as well.
        directions: optional ``[n_directions, d_embed]`` matrix (e.g. text embeddings); every
            term is projected on it as it is computed.
        convention: ``"default"``: each component centred on its own, out_proj bias in
            ``attn_bias``, ``β_post`` in ``bias``. ``"reference"``: Gandelsman et al.'s split (CLS-pooled
            ViTs only, else [`UnsupportedArchitectureError`][clip_lens.decompose.UnsupportedArchitectureError]): each component ``c`` maps to
            ``P^T[γ⊙(c − μ/K)/σ + β/K]`` with ``K = 2L+1`` for embed and each MLP and
            ``K = (2L+1)·N·H`` per token-head term, which carries ``b_O/(N·H)``; ``bias`` and
            ``attn_bias`` are then 0. Both sum to the embedding; their difference is
            [`reference_difference`][clip_lens.decompose.reference_difference]. The reference's pieces are these divided by ``embedding_norm``
            ([`Decomposition.normalized`][clip_lens.Decomposition.normalized]).

    Returns:
        A [`Decomposition`][clip_lens.Decomposition] whose ``total()`` equals the un-normalised image embedding.
    """
    if _is_convolutional(model):
        return _decompose_convolutional(model, images, heads, tokens, directions, convention)
    parts, shift = _decompose(model, images, heads, tokens, directions, convention)
    if shift is None:
        return parts
    return _map_terms(parts, torch.add, shift, convention="reference")


def reference_difference(
    model: "HookedCLIP",
    images: Float[Tensor, "batch 3 H W"],
    *,
    heads: LayerSpec = "all",
    tokens: LayerSpec = None,
    directions: Optional[Float[Tensor, "n_directions d_embed"]] = None,
) -> Decomposition:
    """``decompose(..., convention="reference") − decompose(...)``, term by term, computed directly.

    Per component ``c`` (at the CLS position, ``K`` as in [`decompose`][clip_lens.decompose.decompose]):
    ``(mean(c) − μ/K) · (γ @ P) / σ + (β @ P) / K``; per token-head term also ``b_O P' / (N·H)``
    with ``P' = diag(γ) P / σ`` (the uncentred out_proj bias), per head ``b_O P' / H``; ``attn_bias``
    and ``bias`` are minus the default ones. ``total()`` of the result is 0 (to rounding), ``embedding``
    is 0 and ``convention`` is ``"difference"``.
    """
    if _is_convolutional(model):
        _check_conv_convention(model, "reference")
    return _decompose(model, images, heads, tokens, directions, "reference")[1]


def _is_convolutional(model: "HookedCLIP") -> bool:
    """A convolutional image tower (ResNet, ConvNeXt, FastViT) decomposes itself (``tower.decompose``)."""
    return getattr(model.visual, "family", "vit") != "vit"


def _check_conv_convention(model: "HookedCLIP", convention: str) -> None:
    if not isinstance(convention, str) or convention not in CONVENTIONS:
        raise InputError(f"convention must be 'default' or 'reference', got {convention!r}.")
    if convention != "default":
        raise UnsupportedArchitectureError(
            f"convention='reference' is defined for CLS-pooled ViTs (Gandelsman et al.); this is a "
            f"{model.visual.family} image tower. Use convention='default'."
        )


def _decompose_convolutional(model, images, heads, tokens, directions, convention) -> Decomposition:
    """The tower's own exact decomposition (see its ``decompose``), after the shared input checks."""
    _check_conv_convention(model, convention)
    images = model.check_images(images)
    directions = _check_directions(model, model.cfg.d_embed, directions)
    with torch.no_grad():
        parts = model.visual.decompose(model, images, heads=heads, tokens=tokens, directions=directions)
    require_finite(parts.embedding, "the forward pass produced NaN/inf activations; check the weights and inputs.")
    return parts


def _decompose(model, images, heads, tokens, directions, convention) -> tuple[Decomposition, Optional[Decomposition]]:
    """The default terms and, for ``convention="reference"``, the shift to the reference split."""
    cfg = model.cfg
    plan = _plan(model)
    _check_convention(model, plan, convention)
    reference = convention == "reference"
    positions = plan.positions
    token_layers = _layers(tokens, cfg.n_layers, "tokens")
    head_layers = sorted(set(_layers(heads, cfg.n_layers, "heads")) | set(token_layers))
    directions = _check_directions(model, plan.weight.shape[1], directions)
    images = model.check_images(images)

    store: dict = {}

    def save(key, index=None):
        def hook(activation: Tensor, hook) -> None:
            # clone the slice: a view would keep the whole activation alive until we return
            store[key] = activation if index is None else activation[index].clone()

        return hook

    at_positions = (slice(None), positions)
    fwd_hooks = [("blocks.0.hook_resid_pre", save("embed", at_positions))]
    for norm in (plan.token_norm, plan.query_norm, plan.pooled_norm):
        if norm is not None:
            fwd_hooks.append((f"{norm}.hook_scale", save(norm)))
    if plan.pooler is not None:
        fwd_hooks.append((f"{plan.pooler}.attn.hook_pattern", save("pool_pattern")))
        if model.mod_dict[plan.pooler].has_mlp:
            fwd_hooks.append((f"{plan.pooler}.hook_mlp_out", save("pooler_mlp")))
    for layer in range(cfg.n_layers):
        fwd_hooks.append((f"blocks.{layer}.hook_mlp_out", save(("mlp", layer), at_positions)))
        if layer in head_layers:
            fwd_hooks.append((f"blocks.{layer}.attn.hook_z", save(("z", layer), at_positions)))
            # LayerNorm scales between the heads and the residual (EVA02 inner LN, post-norm blocks)
            if model.blocks[layer].attn.ln_inner is not None:
                fwd_hooks.append((f"blocks.{layer}.attn.ln_inner.hook_scale", save(("ln_inner", layer), at_positions)))
            if model.blocks[layer].ln1_post is not None:
                fwd_hooks.append((f"blocks.{layer}.ln1_post.hook_scale", save(("ln1_post", layer), at_positions)))
        else:
            fwd_hooks.append((f"blocks.{layer}.hook_attn_out", save(("attn", layer), at_positions)))
        if layer in token_layers:
            query_rows = (slice(None), slice(None), positions)
            fwd_hooks.append((f"blocks.{layer}.attn.hook_pattern", save(("pattern", layer), query_rows)))
            fwd_hooks.append((f"blocks.{layer}.attn.hook_v", save(("v", layer))))

    with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
        embedding = model.visual(images)
    require_finite(embedding, "the forward pass produced NaN/inf activations; check the weights and inputs.")

    # The read-out runs in the weights' precision even under autocast: the forward's activations are
    # what they are, but fp16 would flush small per-token terms to subnormals (12 % error on EVA02-B-16).
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        store = {key: value.to(model.dtype) if value.is_floating_point() else value for key, value in store.items()}
        embedding = embedding.to(model.dtype)
        if directions is not None:  # the read-out is linear in its output axis: project before building it
            bias = None if plan.bias is None else plan.bias @ directions.T
            plan = replace(plan, weight=plan.weight @ directions.T, bias=bias)
        readout = _readout(model, plan, store)
        if reference:
            readout = _with_mean_channel(readout)
        embedding_norm = embedding.norm(dim=-1)
        if directions is not None:
            embedding = embedding @ directions.T
        parts = _contributions(
            model, readout, store, head_layers, token_layers, embedding, embedding_norm, directions is not None
        )
        if not reference:
            return parts, None
        means = _map_terms(parts, lambda t: t[..., -1:])
        parts = _map_terms(parts, lambda t: t[..., :-1])
        u = model.mod_dict[plan.token_norm].weight @ plan.weight  # γ @ W (projected with the directions)
        return parts, _reference_shift(parts, means, u, parts.bias)


def _head_scale(store: dict, layer: int) -> Optional[Tensor]:
    """``[batch, pos]`` product of the frozen LayerNorm scales between the heads and the residual
    (EVA02's LayerNorm over the heads, a post-norm block's ``ln1_post``), or None."""
    scales = [store[(key, layer)][..., 0] for key in ("ln_inner", "ln1_post") if (key, layer) in store]
    if not scales:
        return None
    return scales[0] if len(scales) == 1 else scales[0] * scales[1]


def _head_W_O(block) -> Float[Tensor, "head d_head d_model"]:
    """``W_O`` up to the residual stream: a post-norm block's ``ln1_post`` weight and centring folded in."""
    W_O = block.attn.W_O
    return W_O if block.ln1_post is None else _centre(W_O, -1) * block.ln1_post.weight


def _attn_bias(block, store: dict, layer: int) -> Float[Tensor, "... d_model"]:
    """The attention output's constant: ``b_O``, or per position after a post-norm ``(b_O C γ)/σ + β``."""
    b_O = block.attn.b_O
    if block.ln1_post is None:
        return b_O
    ln = block.ln1_post
    shifted = _centre(b_O, 0) * ln.weight / store[("ln1_post", layer)]  # [batch, pos, d_model]
    return shifted if ln.bias is None else shifted + ln.bias


def _contributions(model, readout: Readout, store: dict, head_layers, token_layers, embedding, embedding_norm, projected):
    """Contract the captured activations with the read-out, all layers at once where possible."""
    blocks = model.visual.blocks
    n_layers = len(blocks)
    weights, maps = readout.weights, readout.maps
    pooled_weight = weights.sum(-1)  # [batch, channel]
    biases = [_attn_bias(blocks[layer], store, layer) if layer in head_layers else blocks[layer].attn.b_O
              for layer in range(n_layers)]
    if all(b.ndim == 1 for b in biases):
        attn_bias = torch.einsum("br,lm,rmo->blo", pooled_weight, torch.stack(biases), maps)
    else:  # post-norm blocks: the bias differs per position
        batch, n_pos = weights.shape[0], weights.shape[-1]
        attn_bias = readout.apply([b.expand(batch, n_pos, -1) for b in biases])
    mlp = readout.apply([store[("mlp", layer)] for layer in range(n_layers)])

    attn = torch.empty_like(mlp)
    heads = None
    if head_layers:
        W_O = torch.stack([_head_W_O(blocks[layer]) for layer in head_layers])  # [layer, head, d_head, d_model]
        z = torch.stack([store[("z", layer)] for layer in head_layers], 1)  # [batch, layer, pos, head, d_head]
        scales = [_head_scale(store, layer) for layer in head_layers]
        if any(scale is not None for scale in scales):
            ones = z.new_ones(z.shape[0], z.shape[2])
            z = z / torch.stack([ones if s is None else s for s in scales], 1)[..., None, None]
        z = torch.einsum("brp,blphk->blrhk", weights, z)
        written = torch.einsum("blrhk,lhkm->blrhm", z, W_O)
        if readout.factors is None:
            heads = torch.einsum("blrhm,rmo->blho", written, maps)
        else:
            A, B = readout.factors
            heads = torch.einsum("blrhj,rjo->blho", torch.einsum("blrhm,rmj->blrhj", written, A), B)
        attn[:, head_layers] = heads.sum(2) + attn_bias[:, head_layers]
    other_layers = [layer for layer in range(n_layers) if layer not in head_layers]
    if other_layers:
        attn[:, other_layers] = readout.apply([store[("attn", layer)] for layer in other_layers])

    tokens = None
    if token_layers:
        first_v = store[("v", token_layers[0])]
        batch, n_tokens = first_v.shape[:2]
        tokens = first_v.new_empty(batch, len(token_layers), model.cfg.n_heads, n_tokens, maps.shape[-1])
        for i, layer in enumerate(token_layers):
            pattern = store[("pattern", layer)]
            scale = _head_scale(store, layer)
            if scale is not None:  # the LayerNorm scales after the heads belong to the query position
                pattern = pattern / scale[:, None, :, None]
            pattern = torch.einsum("brp,bhpt->bthr", weights, pattern)  # [batch, token, head, channel]
            if readout.factors is None:
                head_maps = torch.einsum("hkm,rmo->hrko", _head_W_O(blocks[layer]), maps).flatten(1, 2)  # [h, r*k, out]
                weighted = (pattern[..., :, None] * store[("v", layer)][..., None, :]).flatten(3)  # [b, t, h, r*k]
                tokens[:, i] = torch.einsum("bthj,hjo->bhto", weighted, head_maps)
            else:
                A, B = readout.factors
                C = torch.einsum("hkm,rmj->hkrj", _head_W_O(blocks[layer]), A).flatten(2)  # [h, k, r*j]
                u = torch.einsum("bthk,hkq->bthq", store[("v", layer)], C).unflatten(3, A.shape[::2])  # [b,t,h,r,j]
                weighted = (u * pattern[..., None]).flatten(3)  # [b, t, h, r*j]
                tokens[:, i] = torch.einsum("bthq,qo->bhto", weighted, B.flatten(0, 1))
    return Decomposition(
        embedding=embedding,
        embedding_norm=embedding_norm,
        embed=readout.apply([store["embed"]])[:, 0],
        attn=attn,
        attn_bias=attn_bias,
        mlp=mlp,
        bias=readout.const,
        pooler_mlp=readout.pooler_mlp,
        heads=heads,
        tokens=tokens,
        head_layers=list(head_layers),
        token_layers=list(token_layers),
        projected=projected,
    )


_callable_module(__name__, decompose)  # `from clip_lens import decompose` is the function even after this module was imported
