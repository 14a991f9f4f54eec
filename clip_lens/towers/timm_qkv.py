"""The q/k/v projections of timm attention modules in TransformerLens' layout (shared by the timm towers).

`TimmQKV` is the mixin of the hooked attentions of `clip_lens.towers.timm_vit` (ViT, EVA) and
`clip_lens.towers.fastvit`; its own module so that neither tower module imports the other.
"""

from __future__ import annotations

from typing import Optional

import einops
from jaxtyping import Float
from torch import Tensor, nn


def _qkv(attn: nn.Module) -> list[tuple[Tensor, Optional[Tensor]]]:
    """``[(W, b)]`` for q, k, v (``W [h*d, m]``) of a timm ``Attention``/``EvaAttention``/``AttentionRope``."""
    fused = getattr(attn, "qkv", None)
    if fused is None:
        return [(p.weight, p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    weights = fused.weight.chunk(3, dim=0)
    if fused.bias is not None:
        biases = fused.bias.chunk(3, dim=0)
    elif getattr(attn, "q_bias", None) is not None:  # EVA: q and v biases, k's is a zero buffer
        biases = (attn.q_bias, attn.k_bias, attn.v_bias)
    else:
        biases = (None, None, None)
    return list(zip(weights, biases))


class TimmQKV:
    """``W_Q/W_K/W_V`` ``[h, m, d]`` and ``b_Q/b_K/b_V`` ``[h, d]`` (TransformerLens layout) of the timm
    attention module ``self.source`` (fused ``qkv`` or separate projections; mixin of the hooked
    attentions of timm towers)."""

    def _weight(self, which: int) -> Float[Tensor, "h m d"]:
        return einops.rearrange(_qkv(self.source)[which][0], "(h d) m -> h m d", h=self.n_heads)

    def _bias(self, which: int) -> Float[Tensor, "h d"]:
        b = _qkv(self.source)[which][1]
        if b is None:
            return self.source.proj.weight.new_zeros(self.n_heads, self.d_head)
        return einops.rearrange(b, "(h d) -> h d", h=self.n_heads)

    W_Q = property(lambda self: self._weight(0))
    W_K = property(lambda self: self._weight(1))
    W_V = property(lambda self: self._weight(2))
    b_Q = property(lambda self: self._bias(0))
    b_K = property(lambda self: self._bias(1))
    b_V = property(lambda self: self._bias(2))
