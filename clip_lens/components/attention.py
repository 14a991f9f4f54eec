"""Per-head attention recomputed from a fused ``nn.MultiheadAttention``.

open_clip's blocks call ``nn.MultiheadAttention`` with ``need_weights=False``, which hides
q/k/v, the pattern and the per-head outputs from forward hooks. `Attention` reads the
same ``in_proj_weight``/``out_proj`` parameters and computes them head by head.
"""

from __future__ import annotations

import math
from typing import Optional

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.FactoredMatrix import FactoredMatrix
from transformer_lens.hook_points import HookPoint

from clip_lens.components.layer_norm import LayerNorm, hooks_active
from clip_lens.errors import UnsupportedArchitectureError


def _check_plain_mha(mha: nn.MultiheadAttention) -> None:
    if mha.bias_k is not None or mha.bias_v is not None:
        raise UnsupportedArchitectureError("nn.MultiheadAttention with add_bias_kv is not supported.")
    if mha.add_zero_attn:
        raise UnsupportedArchitectureError("nn.MultiheadAttention with add_zero_attn is not supported.")


def _qkv_weights(mha: nn.MultiheadAttention) -> tuple[Tensor, Tensor, Tensor]:
    if mha._qkv_same_embed_dim:
        return tuple(mha.in_proj_weight.chunk(3, dim=0))  # type: ignore[return-value]
    return mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight


def _qkv_biases(mha: nn.MultiheadAttention) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    if mha.in_proj_bias is None:
        return None, None, None
    return tuple(mha.in_proj_bias.chunk(3, dim=0))  # type: ignore[return-value]


class HeadAttention(nn.Module):
    """Attention split into heads: the hooks and maths every attention family shares.

    Subclasses say where the weights live (TransformerLens layout properties ``W_Q/W_K/W_V``
    ``[h, m, d]``, ``b_Q/b_K/b_V`` ``[h, d]``, ``W_O`` ``[h, d, m]``, ``b_O`` ``[m]``) and how
    q/k/v are projected; this class computes the pattern, ``z`` and per-head results.

    Hooks (``n`` = sequence length, ``h`` = head, ``d`` = d_head, ``m`` = d_model):
        hook_q, hook_k, hook_v: ``[batch, n, h, d]``.
        hook_attn_scores: ``[batch, h, n_query, n_key]``, scaled dot products plus the mask.
        hook_pattern: ``[batch, h, n_query, n_key]``, softmax of the scores.
        hook_z: ``[batch, n, h, d]``, pattern-weighted values.
        hook_result: ``[batch, n, h, m]``, each head's output ``z_h W_O^h`` (LayerScale folded
        in), computed only when hooked or with ``cfg.use_attn_result``.

    The block's ``hook_attn_out`` equals ``hook_result.sum(-2) + b_O``.

    The input may be one residual ``[batch, n, m]`` for q, k and v, or (TransformerLens'
    ``use_split_qkv_input``/``use_attn_in``) one copy per head ``[batch, n, h, m]``, projected
    head by head with ``W_Q/W_K/W_V`` and ``b_Q/b_K/b_V`` (`project_heads`).
    """

    def __init__(self, n_heads: int, d_model: int, d_head: int):
        super().__init__()
        self.n_heads = n_heads
        self.d_model = d_model
        self.d_head = d_head
        self.use_attn_result = False
        # a LayerNorm over the concatenated heads before the output projection (EVA02), else None
        self.ln_inner: Optional[LayerNorm] = None
        for name in ("q", "k", "v", "attn_scores", "pattern", "z", "result"):
            setattr(self, f"hook_{name}", HookPoint())

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q W_K^T`` per head, ``[h, m, m]`` (factored, as TransformerLens' ``attn.QK``)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V W_O`` per head, ``[h, m, m]`` (factored, as TransformerLens' ``attn.OV``)."""
        return FactoredMatrix(self.W_V, self.W_O)

    def project(self, x: Float[Tensor, "batch n m"], which: int) -> Float[Tensor, "batch n h d"]:
        """q, k or v (``which`` = 0, 1, 2) of one residual input, as the wrapped module computes it."""
        raise NotImplementedError

    def project_heads(self, x: Float[Tensor, "batch n h m"], which: int) -> Float[Tensor, "batch n h d"]:
        """q, k or v (``which`` = 0, 1, 2) from one input per head, with the TransformerLens-layout
        weights: ``einsum('bnhm,hmd->bnhd', x, W) + b``."""
        name = "QKV"[which]
        weight, bias = getattr(self, f"W_{name}"), getattr(self, f"b_{name}")
        return torch.einsum("bnhm,hmd->bnhd", x, weight) + bias

    def project_input(self, x: Tensor, which: int) -> Float[Tensor, "batch n h d"]:
        """`project` for ``[batch, n, m]``, `project_heads` for ``[batch, n, h, m]``."""
        return self.project_heads(x, which) if x.ndim == 4 else self.project(x, which)

    def attend(
        self,
        q: Float[Tensor, "batch nq h d"],
        k: Float[Tensor, "batch nk h d"],
        v: Float[Tensor, "batch nk h d"],
        attn_mask: Optional[Tensor],
    ) -> Float[Tensor, "batch nq h d"]:
        """Attention given hooked q/k/v; the pattern is materialised only when hooked."""
        if hooks_active(self.hook_attn_scores, self.hook_pattern):
            scores = torch.einsum("bqhd,bkhd->bhqk", q * (1.0 / math.sqrt(self.d_head)), k)
            if attn_mask is not None:
                scores = scores + attn_mask
            scores = self.hook_attn_scores(scores)
            pattern = self.hook_pattern(scores.softmax(dim=-1))
            return torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
        )
        return z.transpose(1, 2)

    def output(self, z: Float[Tensor, "batch n h d"]) -> Float[Tensor, "batch n m"]:
        if self.use_attn_result or hooks_active(self.hook_result):
            result = self.hook_result(torch.einsum("bnhd,hdm->bnhm", z, self.W_O))
            return result.sum(-2) + self.b_O
        return self.fused_output(einops.rearrange(z, "b n h d -> b n (h d)"))

    def fused_output(self, z: Float[Tensor, "batch n hd"]) -> Float[Tensor, "batch n m"]:
        """The output projection on the concatenated heads, as the wrapped module computes it."""
        raise NotImplementedError


class Attention(HeadAttention):
    """Self-attention of an open_clip block, split into heads from its fused
    ``nn.MultiheadAttention`` (``in_proj_weight`` / ``out_proj``). See `HeadAttention`
    for the hooks. ``W_O`` and ``b_O`` include the block's LayerScale, so per-head results add
    up to what enters the residual.
    """

    def __init__(self, mha: nn.MultiheadAttention, layer_scale: Optional[nn.Parameter] = None):
        _check_plain_mha(mha)
        super().__init__(mha.num_heads, mha.embed_dim, mha.head_dim)
        self.mha = mha
        self.layer_scale = layer_scale

    # --- weights in TransformerLens layout -------------------------------------------------
    @property
    def W_Q(self) -> Float[Tensor, "h m d"]:
        return einops.rearrange(_qkv_weights(self.mha)[0], "(h d) m -> h m d", h=self.n_heads)

    @property
    def W_K(self) -> Float[Tensor, "h m d"]:
        return einops.rearrange(_qkv_weights(self.mha)[1], "(h d) m -> h m d", h=self.n_heads)

    @property
    def W_V(self) -> Float[Tensor, "h m d"]:
        return einops.rearrange(_qkv_weights(self.mha)[2], "(h d) m -> h m d", h=self.n_heads)

    def _bias(self, which: int) -> Float[Tensor, "h d"]:
        b = _qkv_biases(self.mha)[which]
        if b is None:
            return _qkv_weights(self.mha)[which].new_zeros(self.n_heads, self.d_head)
        return einops.rearrange(b, "(h d) -> h d", h=self.n_heads)

    b_Q = property(lambda self: self._bias(0))
    b_K = property(lambda self: self._bias(1))
    b_V = property(lambda self: self._bias(2))

    @property
    def W_O(self) -> Float[Tensor, "h d m"]:
        w = einops.rearrange(self.mha.out_proj.weight, "m (h d) -> h d m", h=self.n_heads)
        return w if self.layer_scale is None else w * self.layer_scale

    @property
    def b_O(self) -> Float[Tensor, "m"]:
        b = self.mha.out_proj.bias
        if b is None:
            b = self.mha.out_proj.weight.new_zeros(self.d_model)
        return b if self.layer_scale is None else b * self.layer_scale

    # --- forward -----------------------------------------------------------------------------
    def project(self, x: Float[Tensor, "batch n m"], which: int) -> Float[Tensor, "batch n h d"]:
        out = F.linear(x, _qkv_weights(self.mha)[which], _qkv_biases(self.mha)[which])
        return einops.rearrange(out, "b n (h d) -> b n h d", h=self.n_heads)

    def fused_output(self, z: Float[Tensor, "batch n hd"]) -> Float[Tensor, "batch n m"]:
        out = self.mha.out_proj(z)
        return out if self.layer_scale is None else out * self.layer_scale

    def forward(
        self, x: Tensor, attn_mask: Optional[Tensor] = None,
        key_input: Optional[Tensor] = None, value_input: Optional[Tensor] = None,
    ) -> Float[Tensor, "batch n m"]:
        """``x``: the query input, also the key and value input unless ``key_input``/``value_input``
        are given; each ``[batch, n, m]`` or one copy per head ``[batch, n, h, m]``.
        ``attn_mask``: additive, ``[n, n]`` or ``[batch, 1 or h, n, n]``."""
        q = self.hook_q(self.project_input(x, 0))
        k = self.hook_k(self.project_input(x if key_input is None else key_input, 1))
        v = self.hook_v(self.project_input(x if value_input is None else value_input, 2))
        z = self.hook_z(self.attend(q, k, v, attn_mask))
        return self.output(z)


class AttentionalPooler(nn.Module):
    """open_clip's ``AttentionalPooler``: learned queries cross-attend to the tokens.

    Hooks (under ``attn_pool.``): ``ln_q.*`` ``[batch, n_queries, ·]``, ``ln_k.*`` ``[batch, n, ·]``,
    ``attn.hook_q [batch, n_queries, h, d]``, ``attn.hook_k``/``attn.hook_v [batch, n, h, d]``,
    ``attn.hook_attn_scores``/``attn.hook_pattern [batch, h, n_queries, n]``,
    ``attn.hook_z [batch, n_queries, h, d]``, ``hook_out [batch, n_queries, d_out]``.
    """

    has_mlp = False

    def __init__(self, pooler: nn.Module):
        super().__init__()
        _check_plain_mha(pooler.attn)
        self.query = pooler.query
        self.ln_q = LayerNorm(pooler.ln_q)
        self.ln_k = LayerNorm(pooler.ln_k)
        self.attn = Attention(pooler.attn)
        self.hook_out = HookPoint()

    @property
    def n_heads(self) -> int:
        return self.attn.n_heads

    def forward(self, x: Float[Tensor, "batch n m"]) -> Float[Tensor, "batch n_queries d_out"]:
        x = self.ln_k(x)
        # Expanded before ln_q (row-wise, so identical) to give every hook a batch axis.
        q = self.ln_q(self.query.unsqueeze(0).expand(x.shape[0], -1, -1))
        attn = self.attn
        q = attn.hook_q(attn.project(q, 0))
        k = attn.hook_k(attn.project(x, 1))
        v = attn.hook_v(attn.project(x, 2))
        z = attn.hook_z(attn.attend(q, k, v, None))
        return self.hook_out(attn.output(z))
