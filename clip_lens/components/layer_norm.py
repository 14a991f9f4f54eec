"""LayerNorm with TransformerLens hooks, sharing the weight of an open_clip LayerNorm."""

from __future__ import annotations

import torch.nn.functional as F
from jaxtyping import Float
from open_clip.transformer import LayerNormFp32
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from clip_lens.errors import UnsupportedArchitectureError


def hooks_active(*points: HookPoint) -> bool:
    """True when any of the hook points has a forward or backward hook attached.

    Activations that cost extra to expose (attention scores, per-head results, the LN scale)
    are computed explicitly only when someone is listening; otherwise the fused kernel runs.
    """
    return any(p._forward_hooks or p._backward_hooks for p in points)


class LayerNorm(nn.Module):
    """``LN(x) = w * (x - mean) / scale + b`` with ``hook_scale`` and ``hook_normalized``.

    Hooks (TransformerLens semantics):
        hook_scale: ``Float[Tensor, "*batch_pos 1"]``, ``sqrt(var(x) + eps)``.
        hook_normalized: ``Float[Tensor, "*batch_pos d_model"]``, the output (affine applied).
    """

    def __init__(self, source: nn.Module):
        super().__init__()
        if not isinstance(source, nn.LayerNorm):
            raise UnsupportedArchitectureError(
                f"normalization layer {type(source).__name__} is not supported (only LayerNorm)."
            )
        if not source.elementwise_affine:
            raise UnsupportedArchitectureError("LayerNorm without elementwise affine is not supported.")
        self.weight = source.weight
        self.bias = source.bias
        self.eps = source.eps
        self.normalized_shape = source.normalized_shape
        self.compute_in_fp32 = isinstance(source, LayerNormFp32)
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    @property
    def w(self) -> Float[Tensor, "d_model"]:
        """TransformerLens' name for the LayerNorm weight (the same parameter as ``weight``)."""
        return self.weight

    @property
    def b(self) -> Float[Tensor, "d_model"]:
        """TransformerLens' name for the LayerNorm bias (``bias``; zeros when the norm has none)."""
        return self.weight.new_zeros(self.weight.shape) if self.bias is None else self.bias

    def forward(self, x: Float[Tensor, "*batch_pos d_model"]) -> Float[Tensor, "*batch_pos d_model"]:
        dtype = x.dtype
        if self.compute_in_fp32:
            x = x.float()
        if hooks_active(self.hook_scale):
            centred = x - x.mean(-1, keepdim=True)
            scale = self.hook_scale((centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            out = centred / scale * self.weight + (0 if self.bias is None else self.bias)
        else:
            out = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return self.hook_normalized(out.to(dtype))
