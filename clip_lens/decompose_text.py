"""Exact direct-contribution decomposition of the text embedding.

The text tower reads its embedding out of the residual stream at one position per prompt: the
EOT token (``argmax``), the first ``eos_id`` (``eos``), the first or last position, or CoCa's
appended CLS token. With the ``ln_final`` scale of that position frozen at its value in the
forward pass, the embedding is linear in the residual stream there, so it splits exactly into

    embedding = embed + Σ_l attn[l] + Σ_l mlp[l] + bias
    attn[l]   = Σ_h heads[l, h] + attn_bias[l]
    heads[l, h] = Σ_t tokens[l, h, t]          (source token t, through the attention pattern)

with every residual component ``c`` (at the pooled position ``p`` of each prompt) read out as
``(c_p − mean(c_p)) / σ_p · γ @ P``, ``σ_p`` the frozen ``ln_final`` scale, ``P`` the text
projection; ``bias = β @ P`` (+ the projection's own bias). Per-token ``ln_final`` followed by
pooling (CLIP) and pooling followed by ``ln_final`` (CoCa) are the same map: a LayerNorm of the one
pooled vector. The read-out is the image decomposition's ([`clip_lens.decompose`][clip_lens.decompose]), described by
a [`ReadoutPlan`][clip_lens.components.readout.ReadoutPlan] over one residual position per prompt.

Prompts of different lengths pool at different positions: every hook keeps only each prompt's own
pooled position (``hook_v`` stays whole for per-token terms), so memory does not grow with the
context beyond ``[batch, token_layer, head, token, out]``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from clip_lens import _callable_module
from clip_lens.components.readout import ReadoutPlan
from clip_lens.decompose import Decomposition, LayerSpec, _check_directions, _layers, _readout
from clip_lens.errors import InputError, UnsupportedArchitectureError
from clip_lens.text import TextTower
from clip_lens.towers.hf_text import HFTextTower

if TYPE_CHECKING:
    from clip_lens.hooked_clip import HookedCLIP

PREFIX = "text."  # the text tower's hook and module names in HookedCLIP
NORM = PREFIX + "ln_final"


def _tower(model: "HookedCLIP") -> TextTower:
    tower = model.text
    if isinstance(tower, HFTextTower):
        raise UnsupportedArchitectureError(
            f"decompose_text needs the text tower's residual stream, but {model.model_name or 'this model'} "
            "has a Hugging Face text tower, which HookedCLIP runs as a black box (only text.hook_pooled and "
            "text.hook_text_embed are hooked); only open_clip's own TextTransformer can be decomposed."
        )
    if not isinstance(tower, TextTower):
        raise UnsupportedArchitectureError(f"decompose_text does not support text tower {type(tower).__name__}.")
    return tower


def _plan(tower: TextTower) -> ReadoutPlan:
    """The text read-out as a [`ReadoutPlan`][clip_lens.components.readout.ReadoutPlan] over the *gathered* residual stream, one position
    per prompt (its pooled position): position 0 with pool weight 1, ``ln_final`` per token (CLIP)
    or after pooling (CoCa; the same maths on a single position), then the projection as
    ``pooled @ weight + bias`` (the identity without a projection)."""
    proj = tower.text_projection
    ln_weight = tower.ln_final.weight
    if proj is None:  # terms live in d_model
        weight, bias = torch.eye(tower.cfg.d_model, device=ln_weight.device, dtype=ln_weight.dtype), None
    elif isinstance(proj, nn.Linear):
        weight, bias = proj.weight.T, proj.bias
    else:
        weight, bias = proj, None
    after_pool = tower.cls_emb is not None
    return ReadoutPlan(
        positions=slice(0, 1),
        pool_weights=weight.new_ones(1),
        weight=weight,
        bias=bias,
        token_norm=None if after_pool else NORM,
        pooled_norm=NORM if after_pool else None,
    )


def _at(activation: Tensor, positions: Int[Tensor, "batch"], dim: int) -> Tensor:
    """``activation`` at each prompt's own position along ``dim``, keeping that axis (size 1)."""
    shape = list(activation.shape)
    shape[dim] = 1
    index = positions.view(-1, *([1] * (activation.ndim - 1))).expand(shape)
    return activation.gather(dim, index)  # a copy: the full activation is not kept alive


def decompose_text(
    model: "HookedCLIP",
    tokens: Union[Int[Tensor, "batch ctx"], list[str], Any],
    *,
    heads: LayerSpec = "all",
    token_layers: LayerSpec = None,
    directions: Optional[Float[Tensor, "n_directions d_embed"]] = None,
) -> Decomposition:
    """Decompose text embeddings into the direct contributions of every text-tower component.

    Each prompt is decomposed at its own pooled position (``model.text.pooled_positions``).

    Args:
        model: a [`HookedCLIP`][clip_lens.HookedCLIP] with an open_clip text tower.
        tokens: token ids ``[batch, ctx]`` or a list of strings (tokenized with the model's tokenizer).
        heads: text layers with per-head terms: ``"all"`` (default), a list of layer indices, or None.
        token_layers: text layers with per-head, per-source-token terms (``"all"``, a list, or None).
            Token layers always get per-head terms as well.
        directions: optional ``[n_directions, d_embed]`` matrix (e.g. image embeddings); every term
            is projected on it as it is computed. ``d_embed`` is ``d_model`` without a projection.

    Returns:
        A [`Decomposition`][clip_lens.Decomposition] (``out`` = ``d_embed`` or ``n_directions``):
        ``embedding [batch, out]`` (the un-normalised text embedding), ``embedding_norm [batch]``,
        ``embed [batch, out]`` (token + position embedding), ``attn``/``attn_bias``/``mlp``
        ``[batch, layer, out]``, ``bias [batch, out]``, ``heads [batch, head_layer, head, out]``,
        ``tokens [batch, token_layer, head, token, out]`` (0 where the pooled position cannot
        attend: later positions under the causal mask, padding under a pad mask); ``token``
        counts residual positions, CoCa's appended CLS included. ``total()`` equals ``embedding``
        (≤1e-4 relative in fp32).

    Raises:
        UnsupportedArchitectureError: a Hugging Face text tower, or ``pool_type='none'``.
        IndexOutOfRangeError: a layer index outside the text tower.
        InputError: malformed tokens, directions or layer specs; NaN/inf activations.
    """
    tower = _tower(model)
    cfg = tower.cfg
    plan = _plan(tower)
    token_layers = _layers(token_layers, cfg.n_layers, "token_layers")
    head_layers = sorted(set(_layers(heads, cfg.n_layers, "heads")) | set(token_layers))
    directions = _check_directions(model, plan.weight.shape[1], directions)
    tokens = model.check_tokens(tokens)
    positions = tower.pooled_positions(tokens)  # [batch] residual index; raises for pool_type 'none'

    store: dict = {}

    def save(key, dim: Optional[int] = 1):
        def hook(activation: Tensor, hook) -> None:
            store[key] = activation if dim is None else _at(activation, positions, dim)

        return hook

    # CoCa's ln_final sees the pooled vector only: its scale is already [batch, 1]
    fwd_hooks = [
        (PREFIX + "blocks.0.hook_resid_pre", save("embed")),
        (NORM + ".hook_scale", save(NORM, None if tower.cls_emb is not None else 1)),
    ]
    for layer in range(cfg.n_layers):
        name = f"{PREFIX}blocks.{layer}"
        fwd_hooks.append((f"{name}.hook_mlp_out", save(("mlp", layer))))
        if layer in head_layers:
            fwd_hooks.append((f"{name}.attn.hook_z", save(("z", layer))))
        else:
            fwd_hooks.append((f"{name}.hook_attn_out", save(("attn", layer))))
        if layer in token_layers:
            fwd_hooks.append((f"{name}.attn.hook_pattern", save(("pattern", layer), 2)))  # the pooled query row
            fwd_hooks.append((f"{name}.attn.hook_v", save(("v", layer), None)))

    with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
        embedding = tower(tokens)
    if not torch.isfinite(embedding).all():
        raise InputError("the forward pass produced NaN/inf activations; check the weights and inputs.")

    with torch.no_grad():
        if directions is not None:  # the read-out is linear in its output axis: project before building it
            bias = None if plan.bias is None else plan.bias @ directions.T
            plan = replace(plan, weight=plan.weight @ directions.T, bias=bias)
        readout = _readout(model, plan, store)
        embedding_norm = embedding.norm(dim=-1)
        if directions is not None:
            embedding = embedding @ directions.T
        return _contributions(tower, readout, store, head_layers, token_layers, embedding, embedding_norm,
                              directions is not None)


def _contributions(tower: TextTower, readout, store: dict, head_layers: list[int], token_layers: list[int],
                   embedding: Tensor, embedding_norm: Tensor, projected: bool) -> Decomposition:
    """Contract the activations captured at the pooled positions with the read-out."""
    blocks = tower.blocks
    n_layers = len(blocks)
    scale: Float[Tensor, "batch"] = readout.weights[:, 0, 0]  # 1 / σ of each prompt's pooled position
    maps: Float[Tensor, "d_model out"] = readout.maps[0]  # centre(γ ⊙ P) (projected on directions)

    mlp = readout.apply([store[("mlp", layer)] for layer in range(n_layers)])  # [batch, layer, out]
    b_O = torch.stack([block.attn.b_O for block in blocks])  # [layer, d_model], LayerScale folded
    attn_bias = torch.einsum("b,lm,mo->blo", scale, b_O, maps)

    attn = torch.empty_like(mlp)
    heads = None
    head_maps = None
    if head_layers:
        # W_O^h · centre(γ ⊙ P) folded once per head: [layer, head, d_head, out]
        W_O = torch.stack([blocks[layer].attn.W_O for layer in head_layers])
        head_maps = torch.einsum("lhkm,mo->lhko", W_O, maps)
        z = torch.stack([store[("z", layer)][:, 0] for layer in head_layers], 1)  # [batch, layer, head, d_head]
        heads = torch.einsum("b,blhk,lhko->blho", scale, z, head_maps)
        attn[:, head_layers] = heads.sum(2) + attn_bias[:, head_layers]
    other_layers = [layer for layer in range(n_layers) if layer not in head_layers]
    if other_layers:
        attn[:, other_layers] = readout.apply([store[("attn", layer)] for layer in other_layers])

    tokens = None
    if token_layers:
        first_v = store[("v", token_layers[0])]
        batch, n_tokens, n_heads = first_v.shape[:3]
        tokens = first_v.new_empty(batch, len(token_layers), n_heads, n_tokens, maps.shape[-1])
        for i, layer in enumerate(token_layers):
            # the pooled query's pattern row (exactly 0 where masked), scaled by 1/σ
            pattern = store[("pattern", layer)][:, :, 0] * scale[:, None, None]  # [batch, head, token]
            layer_maps = head_maps[head_layers.index(layer)]  # [head, d_head, out]
            tokens[:, i] = torch.einsum("bht,bthk,hko->bhto", pattern, store[("v", layer)], layer_maps)

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


_callable_module(__name__, decompose_text)  # as clip_lens.decompose
