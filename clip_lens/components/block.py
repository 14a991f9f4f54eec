"""Residual block and MLP with TransformerLens hooks around open_clip's modules."""

from __future__ import annotations

from typing import Optional

from jaxtyping import Float
from open_clip.transformer import LayerScale, ResidualAttentionBlock
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from clip_lens.components.attention import Attention
from clip_lens.components.layer_norm import LayerNorm
from clip_lens.errors import UnsupportedArchitectureError


def _layer_scale(module: nn.Module) -> Optional[nn.Parameter]:
    if isinstance(module, nn.Identity):
        return None
    if isinstance(module, LayerScale):
        return module.gamma
    raise UnsupportedArchitectureError(f"residual scaling {type(module).__name__} is not supported.")


class MLP(nn.Module):
    """``c_proj(act(c_fc(x)))`` reusing open_clip's linear layers and activation module.

    Hooks: ``hook_pre [batch, n, d_mlp]`` (before the activation), ``hook_post`` (after).
    """

    def __init__(self, mlp: nn.Sequential):
        super().__init__()
        self.c_fc = mlp.c_fc
        self.act = mlp.gelu
        self.c_proj = mlp.c_proj
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch n d_model"]) -> Float[Tensor, "batch n d_model"]:
        return self.c_proj(self.hook_post(self.act(self.hook_pre(self.c_fc(x)))))


class TransformerBlock(nn.Module):
    """``resid_mid = resid_pre + attn(ln1(resid_pre))``; ``resid_post = resid_mid + mlp(ln2(resid_mid))``.

    LayerScale multiplies into ``hook_attn_out``/``hook_mlp_out`` (what enters the residual).
    Hooks: ``hook_resid_pre``, ``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_out``,
    ``hook_resid_post``, all ``[batch, n, d_model]``.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        if not isinstance(block, ResidualAttentionBlock):
            raise UnsupportedArchitectureError(
                f"block type {type(block).__name__} is not supported: custom attention blocks "
                "(qk_norm, scaled_cosine_attn, scale_heads, scale_attn_inner, scale_attn, scale_fc) "
                "change the attention maths and are not reproduced."
            )
        if hasattr(block, "ln_1_kv"):
            raise UnsupportedArchitectureError("cross-attention blocks are not supported.")
        self.ln1 = LayerNorm(block.ln_1)
        self.attn = Attention(block.attn, _layer_scale(block.ls_1))
        self.ln2 = LayerNorm(block.ln_2)
        self.mlp = MLP(block.mlp)
        self.mlp_scale = _layer_scale(block.ls_2)
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(
        self, resid_pre: Float[Tensor, "batch n d_model"], attn_mask: Optional[Tensor] = None
    ) -> Float[Tensor, "batch n d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), attn_mask))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.mlp(self.ln2(resid_mid))
        if self.mlp_scale is not None:
            mlp_out = mlp_out * self.mlp_scale
        mlp_out = self.hook_mlp_out(mlp_out)
        return self.hook_resid_post(resid_mid + mlp_out)
