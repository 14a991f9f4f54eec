"""Residual block and MLP with TransformerLens hooks around open_clip's (or timm's) modules."""

from __future__ import annotations

from typing import Any, Optional

from jaxtyping import Float
from open_clip.transformer import LayerScale, ResidualAttentionBlock
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from clip_lens.components.attention import Attention, HeadAttention
from clip_lens.components.layer_norm import LayerNorm
from clip_lens.errors import InputError, UnsupportedArchitectureError


def _layer_scale(module: nn.Module) -> Optional[nn.Parameter]:
    if isinstance(module, nn.Identity):
        return None
    if isinstance(module, LayerScale):
        return module.gamma
    raise UnsupportedArchitectureError(f"residual scaling {type(module).__name__} is not supported.")


class MLP(nn.Module):
    """``fc_out(norm(act(fc_in(x)))) * layer_scale`` reusing the wrapped linear layers and activation module.

    Hooks: ``hook_pre [batch, n, d_mlp]`` (before the activation), ``hook_post`` (after), and
    ``ln_inner.hook_scale/normalized`` where the MLP normalises its hidden layer (EVA02).

    Weights in TransformerLens layout: ``W_in [m, d_mlp]``, ``b_in [d_mlp]``, ``W_out [d_mlp, m]``,
    ``b_out [m]``. ``W_out``/``b_out`` include the block's LayerScale (``layer_scale``, set by
    `TransformerBlock`), so ``hook_post @ W_out + b_out`` is what enters the residual; with
    ``ln_inner`` they fold its weight, bias and centring in, as ``TimmAttention.W_O`` does:
    ``hook_mlp_out = hook_post @ W_out / ln_inner.hook_scale + b_out``.
    """

    def __init__(self, fc_in: nn.Module, act: nn.Module, fc_out: nn.Module, inner_norm: Optional[nn.Module] = None,
                 layer_scale: Optional[Tensor] = None):
        super().__init__()
        self.c_fc = fc_in
        self.act = act
        self.c_proj = fc_out
        self.ln_inner = None if inner_norm is None or isinstance(inner_norm, nn.Identity) else LayerNorm(inner_norm)
        self.layer_scale = layer_scale
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    @classmethod
    def from_open_clip(cls, mlp: nn.Sequential) -> "MLP":
        return cls(mlp.c_fc, mlp.gelu, mlp.c_proj)

    @property
    def d_mlp(self) -> int:
        return self.c_fc.out_features

    # --- weights in TransformerLens layout -------------------------------------------------
    @property
    def W_in(self) -> Float[Tensor, "m d_mlp"]:
        return self.c_fc.weight.T

    @property
    def b_in(self) -> Float[Tensor, "d_mlp"]:
        bias = self.c_fc.bias
        return self.c_fc.weight.new_zeros(self.d_mlp) if bias is None else bias

    @property
    def W_out(self) -> Float[Tensor, "d_mlp m"]:
        w = self.c_proj.weight.T
        if self.ln_inner is not None:
            w = w * self.ln_inner.weight[:, None]
            w = w - w.mean(0, keepdim=True)
        return w if self.layer_scale is None else w * self.layer_scale

    @property
    def b_out(self) -> Float[Tensor, "m"]:
        proj = self.c_proj
        b = proj.weight.new_zeros(proj.out_features) if proj.bias is None else proj.bias
        if self.ln_inner is not None and self.ln_inner.bias is not None:
            b = b + self.ln_inner.bias @ proj.weight.T
        return b if self.layer_scale is None else b * self.layer_scale

    def hidden(self, x: Float[Tensor, "batch n d_model"]) -> Float[Tensor, "batch n d_mlp"]:
        return self.hook_post(self.act(self.hook_pre(self.c_fc(x))))

    def forward(self, x: Float[Tensor, "batch n d_model"]) -> Float[Tensor, "batch n d_model"]:
        hidden = self.hidden(x)
        if self.ln_inner is not None:
            hidden = self.ln_inner(hidden)
        out = self.c_proj(hidden)
        return out if self.layer_scale is None else out * self.layer_scale


class GatedMLP(MLP):
    """``fc_out(norm(act(x W_gate) * (x W_in)))`` (SwiGLU), TransformerLens' gated-MLP hooks:
    ``hook_pre`` (gate before the activation), ``hook_pre_linear`` (the linear branch),
    ``hook_post`` (their product), all ``[batch, n, d_mlp]``.

    ``fc_gate``/``fc_in`` are two linear layers, or (``fc_in=None``) one packed layer whose output
    halves are ``[gate, linear]`` (``[linear, gate]`` with ``gate_last``). ``input_norm``: a
    LayerNorm the MLP applies to its input first (ViTamin's GeGLU), hooked as ``ln_in.*``.

    Weights: ``W_gate``/``W_in`` ``[m, d_mlp]`` and ``b_gate``/``b_in`` ``[d_mlp]`` (TransformerLens
    has no ``b_gate``; timm's gate has a bias), read after ``ln_in`` where there is one.
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

    def _branch(self, which: int) -> tuple[Tensor, Optional[Tensor]]:
        """``(weight [d_mlp, m], bias)`` of the gate (0) or the linear branch (1)."""
        if self.fc_in is not None:
            layer = self.c_fc if which == 0 else self.fc_in
            return layer.weight, layer.bias
        index = (1 - which) if self.gate_last else which
        bias = None if self.c_fc.bias is None else self.c_fc.bias.chunk(2)[index]
        return self.c_fc.weight.chunk(2, dim=0)[index], bias

    def _branch_bias(self, which: int) -> Float[Tensor, "d_mlp"]:
        weight, bias = self._branch(which)
        return weight.new_zeros(weight.shape[0]) if bias is None else bias

    W_gate = property(lambda self: self._branch(0)[0].T)
    b_gate = property(lambda self: self._branch_bias(0))
    W_in = property(lambda self: self._branch(1)[0].T)
    b_in = property(lambda self: self._branch_bias(1))

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


SPLIT_QKV_HOOKS = ("hook_q_input", "hook_k_input", "hook_v_input")


class TransformerBlock(nn.Module):
    """``resid_mid = resid_pre + attn(ln1(resid_pre))``; ``resid_post = resid_mid + mlp(ln2(resid_mid))``.

    LayerScale multiplies into ``hook_attn_out``/``hook_mlp_out`` (what enters the residual).
    Hooks: ``hook_resid_pre``, ``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_out``,
    ``hook_resid_post``, all ``[batch, n, d_model]``.

    A residual post-norm block (EVA02-E) has no ``ln1``/``ln2`` but ``ln1_post``/``ln2_post``:
    ``attn_out = ln1_post(attn(resid_pre))``, ``mlp_out = ln2_post(mlp(resid_mid))``.

    TransformerLens' optional input hooks exist only while switched on (so every hook point the
    model lists fires); switch them with ``HookedCLIP.set_use_split_qkv_input`` and friends:

    - ``use_split_qkv_input``: ``hook_q_input``/``hook_k_input``/``hook_v_input`` ``[batch, n, h, m]``,
      ``resid_pre`` copied per head *before* ``ln1``; ``ln1`` then normalises each copy (its hooks fire
      three times, ``[batch, n, h, ·]``) and q/k/v are projected head by head.
    - ``use_attn_in``: ``hook_attn_in`` ``[batch, n, h, m]``, one per-head copy feeding q, k and v.
    - ``use_hook_mlp_in``: ``hook_mlp_in`` ``[batch, n, m]``, ``resid_mid`` before ``ln2``.
    """

    def __init__(self, ln1: Optional[LayerNorm], attn: HeadAttention, ln2: Optional[LayerNorm], mlp: MLP,
                 mlp_scale: Optional[nn.Parameter] = None, ln1_post: Optional[LayerNorm] = None,
                 ln2_post: Optional[LayerNorm] = None):
        super().__init__()
        self.ln1 = ln1
        self.attn = attn
        self.ln1_post = ln1_post
        self.ln2 = ln2
        if mlp_scale is not None:  # the MLP applies the LayerScale (its W_out/b_out include it)
            mlp.layer_scale = mlp_scale
        self.mlp = mlp
        self.ln2_post = ln2_post
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())
        self.use_split_qkv_input = False
        self.use_attn_in = False
        self.use_hook_mlp_in = False

    @property
    def mlp_scale(self) -> Optional[Tensor]:
        """The MLP's LayerScale (``mlp.layer_scale``), or None."""
        return self.mlp.layer_scale

    # --- TransformerLens' optional input hooks ----------------------------------------------
    def _toggle_hooks(self, names: tuple[str, ...], on: bool) -> None:
        for name in names:
            if on and name not in self._modules:
                setattr(self, name, HookPoint())
            elif not on and name in self._modules:
                delattr(self, name)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Give q, k and v their own per-head copies of ``resid_pre`` (``hook_q/k/v_input``)."""
        if use_split_qkv_input and self.use_attn_in:
            raise InputError("use_split_qkv_input and use_attn_in are mutually exclusive (as in TransformerLens); "
                             "call set_use_attn_in(False) first.")
        self.use_split_qkv_input = bool(use_split_qkv_input)
        self._toggle_hooks(SPLIT_QKV_HOOKS, self.use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Feed the attention one per-head copy of ``resid_pre`` (``hook_attn_in``)."""
        if use_attn_in and self.use_split_qkv_input:
            raise InputError("use_attn_in and use_split_qkv_input are mutually exclusive (as in TransformerLens); "
                             "call set_use_split_qkv_input(False) first.")
        self.use_attn_in = bool(use_attn_in)
        self._toggle_hooks(("hook_attn_in",), self.use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Expose the MLP's input before ``ln2`` (``hook_mlp_in``)."""
        self.use_hook_mlp_in = bool(use_hook_mlp_in)
        self._toggle_hooks(("hook_mlp_in",), self.use_hook_mlp_in)

    def _ln1(self, x: Tensor) -> Tensor:
        return x if self.ln1 is None else self.ln1(x)

    def _per_head(self, x: Float[Tensor, "batch n m"]) -> Float[Tensor, "batch n h m"]:
        """A copy of ``x`` per head (its own memory: a hook may edit one head in place)."""
        return x.unsqueeze(-2).expand(*x.shape[:-1], self.attn.n_heads, x.shape[-1]).clone()

    def _split_attn(self, resid_pre: Tensor, attn_mask: Optional[Tensor], attn_kwargs: dict) -> Tensor:
        """The attention on per-head inputs (``use_attn_in`` / ``use_split_qkv_input``), as TransformerLens."""
        if self.use_attn_in:
            attn_in = self.hook_attn_in(self._per_head(resid_pre))
            return self.attn(self._ln1(attn_in), attn_mask, **attn_kwargs)
        q_in = self.hook_q_input(self._per_head(resid_pre))
        k_in = self.hook_k_input(self._per_head(resid_pre))
        v_in = self.hook_v_input(self._per_head(resid_pre))
        return self.attn(self._ln1(q_in), attn_mask, key_input=self._ln1(k_in), value_input=self._ln1(v_in),
                         **attn_kwargs)

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
        if self.use_split_qkv_input or self.use_attn_in:
            attn_out = self._split_attn(resid_pre, attn_mask, attn_kwargs)
        else:
            attn_out = self.attn(self._ln1(resid_pre), attn_mask, **attn_kwargs)
        if self.ln1_post is not None:
            attn_out = self.ln1_post(attn_out)
        attn_out = self.hook_attn_out(attn_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_in = self.hook_mlp_in(resid_mid.clone()) if self.use_hook_mlp_in else resid_mid
        mlp_out = self.mlp(mlp_in if self.ln2 is None else self.ln2(mlp_in))
        if self.ln2_post is not None:
            mlp_out = self.ln2_post(mlp_out)
        mlp_out = self.hook_mlp_out(mlp_out)
        return self.hook_resid_post(resid_mid + mlp_out)
