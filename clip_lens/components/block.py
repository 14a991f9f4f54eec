"""Residual block and MLP with TransformerLens hooks around open_clip's (or timm's) modules."""

from __future__ import annotations

from typing import Any, Optional

from jaxtyping import Float
from open_clip.transformer import LayerScale, ResidualAttentionBlock
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from clip_lens.components.attention import Attention, HeadAttention
from clip_lens.components.layer_norm import LayerNorm
from clip_lens.errors import UnsupportedArchitectureError


def _layer_scale(module: nn.Module) -> Optional[nn.Parameter]:
    if isinstance(module, nn.Identity):
        return None
    if isinstance(module, LayerScale):
        return module.gamma
    raise UnsupportedArchitectureError(f"residual scaling {type(module).__name__} is not supported.")


class MLP(nn.Module):
    """``fc_out(norm(act(fc_in(x))))`` reusing the wrapped linear layers and activation module.

    Hooks: ``hook_pre [batch, n, d_mlp]`` (before the activation), ``hook_post`` (after), and
    ``ln_inner.hook_scale/normalized`` where the MLP normalises its hidden layer (EVA02).
    """

    def __init__(self, fc_in: nn.Module, act: nn.Module, fc_out: nn.Module, inner_norm: Optional[nn.Module] = None):
        super().__init__()
        self.c_fc = fc_in
        self.act = act
        self.c_proj = fc_out
        self.ln_inner = None if inner_norm is None or isinstance(inner_norm, nn.Identity) else LayerNorm(inner_norm)
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    @classmethod
    def from_open_clip(cls, mlp: nn.Sequential) -> "MLP":
        return cls(mlp.c_fc, mlp.gelu, mlp.c_proj)

    @property
    def d_mlp(self) -> int:
        return self.c_fc.out_features

    def hidden(self, x: Float[Tensor, "batch n d_model"]) -> Float[Tensor, "batch n d_mlp"]:
        return self.hook_post(self.act(self.hook_pre(self.c_fc(x))))

    def forward(self, x: Float[Tensor, "batch n d_model"]) -> Float[Tensor, "batch n d_model"]:
        hidden = self.hidden(x)
        if self.ln_inner is not None:
            hidden = self.ln_inner(hidden)
        return self.c_proj(hidden)


class GatedMLP(MLP):
    """``fc_out(norm(act(x W_gate) * (x W_in)))`` (SwiGLU), TransformerLens' gated-MLP hooks:
    ``hook_pre`` (gate before the activation), ``hook_pre_linear`` (the linear branch),
    ``hook_post`` (their product), all ``[batch, n, d_mlp]``.

    ``fc_gate``/``fc_in`` are two linear layers, or (``fc_in=None``) one packed layer whose output
    halves are ``[gate, linear]`` (``[linear, gate]`` with ``gate_last``). ``input_norm``: a
    LayerNorm the MLP applies to its input first (ViTamin's GeGLU), hooked as ``ln_in.*``.
    """

    def __init__(self, fc_gate: nn.Module, fc_in: Optional[nn.Module], act: nn.Module, fc_out: nn.Module,
                 inner_norm: Optional[nn.Module] = None, gate_last: bool = False,
                 input_norm: Optional[nn.Module] = None):
        super().__init__(fc_gate, act, fc_out, inner_norm)
        self.fc_in = fc_in
        self.gate_last = gate_last
        self.ln_in = None if input_norm is None or isinstance(input_norm, nn.Identity) else LayerNorm(input_norm)
        self.hook_pre_linear = HookPoint()

    @property
    def d_mlp(self) -> int:
        return self.c_fc.out_features // (2 if self.fc_in is None else 1)

    def hidden(self, x: Float[Tensor, "batch n d_model"]) -> Float[Tensor, "batch n d_mlp"]:
        if self.ln_in is not None:
            x = self.ln_in(x)
        if self.fc_in is None:
            gate, linear = self.c_fc(x).chunk(2, dim=-1)
            if self.gate_last:
                gate, linear = linear, gate
        else:
            gate, linear = self.c_fc(x), self.fc_in(x)
        gate, linear = self.hook_pre(gate), self.hook_pre_linear(linear)
        return self.hook_post(self.act(gate) * linear)


class TransformerBlock(nn.Module):
    """``resid_mid = resid_pre + attn(ln1(resid_pre))``; ``resid_post = resid_mid + mlp(ln2(resid_mid))``.

    LayerScale multiplies into ``hook_attn_out``/``hook_mlp_out`` (what enters the residual).
    Hooks: ``hook_resid_pre``, ``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_out``,
    ``hook_resid_post``, all ``[batch, n, d_model]``.

    A residual post-norm block (EVA02-E) has no ``ln1``/``ln2`` but ``ln1_post``/``ln2_post``:
    ``attn_out = ln1_post(attn(resid_pre))``, ``mlp_out = ln2_post(mlp(resid_mid))``.
    """

    def __init__(self, ln1: Optional[LayerNorm], attn: HeadAttention, ln2: Optional[LayerNorm], mlp: MLP,
                 mlp_scale: Optional[nn.Parameter] = None, ln1_post: Optional[LayerNorm] = None,
                 ln2_post: Optional[LayerNorm] = None):
        super().__init__()
        self.ln1 = ln1
        self.attn = attn
        self.ln1_post = ln1_post
        self.ln2 = ln2
        self.mlp = mlp
        self.mlp_scale = mlp_scale
        self.ln2_post = ln2_post
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    @classmethod
    def from_open_clip(cls, block: nn.Module) -> "TransformerBlock":
        """Wrap an open_clip ``ResidualAttentionBlock``, sharing its parameters."""
        if not isinstance(block, ResidualAttentionBlock):
            raise UnsupportedArchitectureError(
                f"block type {type(block).__name__} is not supported: custom attention blocks "
                "(qk_norm, scaled_cosine_attn, scale_heads, scale_attn_inner, scale_attn, scale_fc) "
                "change the attention maths and are not reproduced."
            )
        if hasattr(block, "ln_1_kv"):
            raise UnsupportedArchitectureError("cross-attention blocks are not supported.")
        return cls(
            LayerNorm(block.ln_1), Attention(block.attn, _layer_scale(block.ls_1)), LayerNorm(block.ln_2),
            MLP.from_open_clip(block.mlp), _layer_scale(block.ls_2),
        )

    def forward(
        self, resid_pre: Float[Tensor, "batch n d_model"], attn_mask: Optional[Tensor] = None, **attn_kwargs: Any
    ) -> Float[Tensor, "batch n d_model"]:
        """``attn_kwargs``: extra attention inputs (``rope=`` for rotary towers)."""
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.attn(resid_pre if self.ln1 is None else self.ln1(resid_pre), attn_mask, **attn_kwargs)
        if self.ln1_post is not None:
            attn_out = self.ln1_post(attn_out)
        attn_out = self.hook_attn_out(attn_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.mlp(resid_mid if self.ln2 is None else self.ln2(resid_mid))
        if self.mlp_scale is not None:
            mlp_out = mlp_out * self.mlp_scale
        if self.ln2_post is not None:
            mlp_out = self.ln2_post(mlp_out)
        mlp_out = self.hook_mlp_out(mlp_out)
        return self.hook_resid_post(resid_mid + mlp_out)
