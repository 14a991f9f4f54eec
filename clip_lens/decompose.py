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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

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
    embed: Float[Tensor, "batch out"]
    """The embedding term: patch + class + position embeddings (after ``ln_pre`` if present)."""
    attn: Float[Tensor, "batch layer out"]
    """Each layer's attention output, out_proj bias included."""
    attn_bias: Float[Tensor, "batch layer out"]
    """The out_proj bias share of ``attn`` (not attributable to a head)."""
    mlp: Float[Tensor, "batch layer out"]
    """Each layer's MLP output."""
    bias: Float[Tensor, "batch out"]
    """Constant terms: ``ln_post`` bias through ``proj`` (and the attentional pooler's biases)."""
    heads: Optional[Float[Tensor, "batch head_layer head out"]]
    """Per-head terms for ``head_layers`` (None when ``heads=None``)."""
    tokens: Optional[Float[Tensor, "batch token_layer head token out"]]
    """Per-head, per-source-token terms for ``token_layers`` (None unless requested)."""
    head_layers: list[int] = field(default_factory=list)
    token_layers: list[int] = field(default_factory=list)
    projected: bool = False

    def total(self) -> Float[Tensor, "batch out"]:
        """Sum of all terms: reproduces ``embedding``."""
        return self.embed + self.attn.sum(1) + self.mlp.sum(1) + self.bias

    def relative_error(self) -> Float[Tensor, "batch"]:
        """‖total() − embedding‖ / ‖embedding‖ per image."""
        return (self.total() - self.embedding).norm(dim=-1) / self.embedding.norm(dim=-1)

    @property
    def head_labels(self) -> list[str]:
        """``"L{l}H{h}"`` labels aligned with :meth:`stack_heads`."""
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

        return Decomposition(
            embedding=divide(self.embedding), embedding_norm=torch.ones_like(scale), embed=divide(self.embed),
            attn=divide(self.attn), attn_bias=divide(self.attn_bias), mlp=divide(self.mlp), bias=divide(self.bias),
            heads=divide(self.heads), tokens=divide(self.tokens), head_layers=self.head_layers,
            token_layers=self.token_layers, projected=self.projected,
        )


@dataclass
class Readout:
    """How the residual stream at the pooled positions reaches the embedding (frozen LN scales).

    ``contribution(c) = Σ_r Σ_p weights[b, r, p] · c[b, p] @ maps[r]`` plus ``const``.
    """

    positions: slice
    weights: Float[Tensor, "batch channel pos"]
    maps: Float[Tensor, "channel d_model out"]
    const: Float[Tensor, "batch out"]

    def apply(self, components: list[Float[Tensor, "batch pos d_model"]]) -> Float[Tensor, "batch component out"]:
        """The contribution of each component, all at once: ``[batch, component, out]``."""
        stacked = torch.stack(components, 1)  # [batch, component, pos, d_model]
        pooled = torch.einsum("brp,blpd->blrd", self.weights, stacked)
        return torch.einsum("blrd,rdo->blo", pooled, self.maps)


def _layers(spec: LayerSpec, n_layers: int, what: str) -> list[int]:
    if spec is None:
        return []
    if isinstance(spec, str):
        if spec != "all":
            raise InputError(f"{what} must be 'all', None or a list of layer indices, got '{spec}'.")
        return list(range(n_layers))
    if isinstance(spec, int):
        spec = [spec]
    layers = []
    for layer in spec:
        if not -n_layers <= int(layer) < n_layers:
            raise IndexOutOfRangeError(f"{what}: layer {layer} is out of range for a {n_layers}-layer tower.")
        layers.append(int(layer) % n_layers)
    return sorted(set(layers))


def _pooled_positions(model: "HookedCLIP") -> tuple[slice, int]:
    """The positions whose residual the pooling reads, and how many there are."""
    cfg = model.cfg
    if cfg.pool_type == "attn":
        return slice(None), cfg.n_ctx
    if cfg.pool_type == "tok":
        return slice(0, 1), 1
    if cfg.pool_type == "avg":
        return slice(1, None), cfg.n_ctx - 1
    raise UnsupportedArchitectureError(
        f"pool_type='{cfg.pool_type}' returns one embedding per token; decompose() needs a pooled image embedding."
    )


def _projection(model: "HookedCLIP") -> Tensor:
    proj = model.visual.proj
    if proj is None:
        width = model.visual.ln_post.weight.shape[0]
        return torch.eye(width, device=model.device, dtype=model.dtype)
    return proj


def _centre(matrix: Tensor, dim: int) -> Tensor:
    return matrix - matrix.mean(dim, keepdim=True)


def _readout(model: "HookedCLIP", store: dict) -> Readout:
    """Read-out weights and maps from the captured LayerNorm scales (and pooler pattern)."""
    visual = model.visual
    ln_post = visual.ln_post
    proj = _projection(model)
    post_map = ln_post.weight[:, None] * proj  # [d_pool, E]
    post_bias = ln_post.bias @ proj
    positions, n_pos = _pooled_positions(model)
    scale = store["ln_post"]
    batch = scale.shape[0]

    if visual.attn_pool is None:
        if visual.final_ln_after_pool:  # LN of the pooled vector: one scale per image
            weights = scale.reshape(batch, 1, 1).reciprocal().expand(batch, 1, n_pos) / n_pos
        else:  # LN of every token, then pooling: each position has its own scale
            weights = scale[:, positions, 0].reciprocal()[:, None, :] / n_pos
        return Readout(positions, weights, _centre(post_map, 0)[None], post_bias.expand(batch, -1))

    # Attentional pooler: pooled = pool_q ln_post(out_proj(Σ_t pattern[q,t] · v(ln_k(x_t)))).
    pool, attn = visual.attn_pool, visual.attn_pool.attn
    n_queries = pool.query.shape[0]
    query_weight = torch.zeros(n_queries, device=scale.device, dtype=scale.dtype)
    if visual.pool_type == "avg":
        query_weight[1:] = 1.0 / (n_queries - 1)
    elif visual.pool_type == "tok":
        query_weight[0] = 1.0
    else:
        raise UnsupportedArchitectureError("an attentional pooler with pool_type='none' has no single image embedding.")
    query_scale = query_weight[None, :] / scale[..., 0]  # [batch, n_queries]
    weights = torch.einsum("bq,bhqt->bht", query_scale, store["pool_pattern"]) / store["ln_k"][:, None, :, 0]
    value_out = torch.einsum("hmk,hko->hmo", pool.ln_k.weight[None, :, None] * attn.W_V, attn.W_O)
    maps = _centre(_centre(value_out, 1), 2) @ post_map  # ln_k centring (inputs), ln_post centring (outputs)
    const_pre = torch.einsum("m,hmk,hko->o", pool.ln_k.bias, attn.W_V, attn.W_O)
    const_pre = const_pre + torch.einsum("hk,hko->o", attn.b_V, attn.W_O) + attn.b_O
    const = query_scale.sum(1, keepdim=True) * (_centre(const_pre, 0) @ post_map) + post_bias
    return Readout(positions, weights, maps, const)


def _check_directions(model: "HookedCLIP", directions: Optional[Tensor]) -> Optional[Tensor]:
    if directions is None:
        return None
    d_embed = model.cfg.d_embed or model.visual.ln_post.weight.shape[0]
    if not isinstance(directions, Tensor) or directions.ndim != 2 or directions.shape[1] != d_embed:
        shape = tuple(directions.shape) if isinstance(directions, Tensor) else type(directions).__name__
        raise InputError(f"directions must be a tensor [n_directions, {d_embed}], got {shape}.")
    if directions.shape[0] == 0:
        raise InputError("directions is empty: pass at least one direction.")
    if not torch.isfinite(directions).all():
        raise InputError("directions contain NaN or inf values.")
    return directions.to(device=model.device, dtype=model.dtype)


def decompose(
    model: "HookedCLIP",
    images: Float[Tensor, "batch 3 H W"],
    *,
    heads: LayerSpec = "all",
    tokens: LayerSpec = None,
    directions: Optional[Float[Tensor, "n_directions d_embed"]] = None,
) -> Decomposition:
    """Decompose image embeddings into the direct contributions of every component.

    Args:
        model: a :class:`~clip_lens.HookedCLIP`.
        images: preprocessed pixels ``[batch, 3, H, W]``.
        heads: layers with per-head terms: ``"all"`` (default), a list of layer indices, or None.
        tokens: layers with per-head, per-source-token terms (``"all"``, a list, or None).
            Token layers always get per-head terms as well.
        directions: optional ``[n_directions, d_embed]`` matrix (e.g. text embeddings); every
            term is projected on it as it is computed.

    Returns:
        A :class:`Decomposition` whose ``total()`` equals the un-normalised image embedding.
    """
    cfg = model.cfg
    positions, _ = _pooled_positions(model)
    token_layers = _layers(tokens, cfg.n_layers, "tokens")
    head_layers = sorted(set(_layers(heads, cfg.n_layers, "heads")) | set(token_layers))
    directions = _check_directions(model, directions)
    images = model.check_images(images)

    store: dict = {}

    def save(key, index=None):
        def hook(activation: Tensor, hook) -> None:
            # clone the slice: a view would keep the whole activation alive until we return
            store[key] = activation if index is None else activation[index].clone()

        return hook

    at_positions = (slice(None), positions)
    fwd_hooks = [("blocks.0.hook_resid_pre", save("embed", at_positions)), ("ln_post.hook_scale", save("ln_post"))]
    for layer in range(cfg.n_layers):
        fwd_hooks.append((f"blocks.{layer}.hook_mlp_out", save(("mlp", layer), at_positions)))
        if layer in head_layers:
            fwd_hooks.append((f"blocks.{layer}.attn.hook_z", save(("z", layer), at_positions)))
        else:
            fwd_hooks.append((f"blocks.{layer}.hook_attn_out", save(("attn", layer), at_positions)))
        if layer in token_layers:
            query_rows = (slice(None), slice(None), positions)
            fwd_hooks.append((f"blocks.{layer}.attn.hook_pattern", save(("pattern", layer), query_rows)))
            fwd_hooks.append((f"blocks.{layer}.attn.hook_v", save(("v", layer))))
    if model.visual.attn_pool is not None:
        fwd_hooks.append(("attn_pool.ln_k.hook_scale", save("ln_k")))
        fwd_hooks.append(("attn_pool.attn.hook_pattern", save("pool_pattern")))

    with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
        embedding = model.visual(images)
    if not torch.isfinite(embedding).all():
        raise InputError("the forward pass produced NaN/inf activations; check the weights and inputs.")

    with torch.no_grad():
        readout = _readout(model, store)
        if directions is not None:
            readout.maps = readout.maps @ directions.T
            readout.const = readout.const @ directions.T
        embedding_norm = embedding.norm(dim=-1)
        if directions is not None:
            embedding = embedding @ directions.T
        return _contributions(
            model, readout, store, head_layers, token_layers, embedding, embedding_norm, directions is not None
        )


def _contributions(model, readout: Readout, store: dict, head_layers, token_layers, embedding, embedding_norm, projected):
    """Contract the captured activations with the read-out, all layers at once where possible."""
    blocks = model.visual.blocks
    n_layers = len(blocks)
    weights, maps = readout.weights, readout.maps
    pooled_weight = weights.sum(-1)  # [batch, channel]
    b_O = torch.stack([block.attn.b_O for block in blocks])  # [layer, d_model]
    attn_bias = torch.einsum("br,lm,rmo->blo", pooled_weight, b_O, maps)
    mlp = readout.apply([store[("mlp", layer)] for layer in range(n_layers)])

    attn = torch.empty_like(mlp)
    heads = None
    if head_layers:
        W_O = torch.stack([blocks[layer].attn.W_O for layer in head_layers])  # [layer, head, d_head, d_model]
        z = torch.stack([store[("z", layer)] for layer in head_layers], 1)  # [batch, layer, pos, head, d_head]
        z = torch.einsum("brp,blphk->blrhk", weights, z)
        written = torch.einsum("blrhk,lhkm->blrhm", z, W_O)
        heads = torch.einsum("blrhm,rmo->blho", written, maps)
        attn[:, head_layers] = heads.sum(2) + attn_bias[:, head_layers]
    other_layers = [layer for layer in range(n_layers) if layer not in head_layers]
    if other_layers:
        attn[:, other_layers] = readout.apply([store[("attn", layer)] for layer in other_layers])

    tokens = None
    if token_layers:
        first_v = store[("v", token_layers[0])]
        batch, n_tokens = first_v.shape[:2]
        tokens = first_v.new_zeros(batch, len(token_layers), model.cfg.n_heads, n_tokens, maps.shape[-1])
        for i, layer in enumerate(token_layers):
            pattern = torch.einsum("brp,bhpt->brht", weights, store[("pattern", layer)])
            head_maps = torch.einsum("hkm,rmo->rhko", blocks[layer].attn.W_O, maps)  # W_O^h folded with read-out
            for r in range(head_maps.shape[0]):
                values = torch.einsum("bthk,hko->bhto", store[("v", layer)], head_maps[r])
                tokens[:, i].addcmul_(pattern[:, r, :, :, None], values)
    return Decomposition(
        embedding=embedding,
        embedding_norm=embedding_norm,
        embed=readout.apply([store["embed"]])[:, 0],
        attn=attn,
        attn_bias=attn_bias,
        mlp=mlp,
        bias=readout.const,
        heads=heads,
        tokens=tokens,
        head_layers=list(head_layers),
        token_layers=list(token_layers),
        projected=projected,
    )
