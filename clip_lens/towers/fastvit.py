"""Hooked MobileCLIP FastViT image tower (timm ``FastVit``: ``fastvit_mci0`` … ``fastvit_mci4``).

open_clip builds MobileCLIP-S1/S2 and MobileCLIP2-S0/S2/S3/S4 as a ``TimmModel`` whose ``trunk`` is
a timm ``FastVit`` with ``timm_pool="avg"`` and ``timm_proj=None``: the trunk's own classifier
head maps to the embedding. The forward is

    x = stem(pixels)                      three MobileOne blocks (conv-BN branches, GELU), stride 4
    for each stage s:
        x = downsample_s(x)               PatchEmbed, where the width changes: grouped 7×7 + 3×3
                                          stride-2 conv-BN branches [→ SE] → GELU, then a 1×1
                                          MobileOne block
        x = x + pos_enc_s(x)              RepConditionalPosEnc (depthwise 7×7), attention stages
        for each block b:
            RepMixer block:  x = x + γ_m ⊙ (mixer(x) − norm(x))     RepMixer adds its residual itself
                             x = x + γ ⊙ ConvMlp(x)
            attention block: x = x + γ₁ ⊙ (Σ_h z_h W_O^h + b_O)     MHSA over the H·W positions of
                                                                     norm(x): BatchNorm2d, or
                                                                     LayerNorm2d in mci3/mci4
                             x = x + γ₂ ⊙ ConvMlp(x)
    f = final_conv(x)                     MobileOne block: (grouped 3×3 + 1×1 conv-BN) → SqueezeExcite
                                          → GELU; f is [C, H, W], C = 2 × the last stage's width
    embedding = W_fc · mean_p f[:, p] + b_fc                 ClassifierHead: average pool → fc

mci0–mci2 have four stages, the last one attention; mci3/mci4 have five, the last two attention
(different widths, hence different head counts: 32-dim heads throughout).

**What is exact in the decomposition.** ``final_conv`` is non-linear (GELU) and its
SqueezeExcite gates every channel by a statistic of the whole map, so no block, head or stage
before it has an exact *direct* contribution to the embedding: a block's write reaches the
embedding only through that non-linearity. There is no norm after ``final_conv`` (the trunk is
built with ``fork_feat=False``: no per-stage norms; ``ClassifierHead`` is pool → dropout → fc); in
mci3/mci4 the LayerNorm2d sits inside the attention blocks only. From ``f`` on, everything is
affine, so with ``N = H·W`` final positions

    embedding = Σ_p (f[:, p] / N) @ W  +  b,        W = W_fcᵀ [C, E], b = b_fc (composed with
                                                   open_clip's linear projection if there is one)

is the exact split: ``feature_map = mean_p f[:, p] @ W``, ``positions[p] = f[:, p] @ W / N``
(summing to ``feature_map``) and ``bias = b`` (None without biases). Per-head effects are
available by intervention (patch ``stages.{s}.blocks.{b}.attn.hook_result``), not as additive terms.

Reparameterised (inference-mode) trunks are accepted too: the convolutional modules
(MobileOneBlock, RepMixer, ReparamLargeKernelConv, RepConditionalPosEnc) are called as they are,
so their reparameterised form runs exactly and every hook keeps its meaning.
"""

from __future__ import annotations

from typing import Optional, Union

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from clip_lens.components.attention import HeadAttention
from clip_lens.components.layer_norm import hooks_active
from clip_lens.config import TowerConfig
from clip_lens.decompose import Decomposition, _layers
from clip_lens.errors import InputError, UnsupportedArchitectureError
from clip_lens.towers.conv import ConvTower, as_map, as_tokens
from clip_lens.towers.timm_qkv import TimmQKV, _qkv

STEM_BLOCKS = ("MobileOneBlock",)
BLOCKS = ("RepMixerBlock", "AttentionBlock")
MIXERS = ("RepMixer",)
ATTENTIONS = ("Attention",)
NORMS = ("BatchNorm2d", "LayerNorm2d")
MLPS = ("ConvMlp",)
SCALES = ("LayerScale2d", "Identity")
DROP_PATHS = ("DropPath", "Identity")
POOLS = ("avg", "fast", "fastavg")


def _name(module: Optional[nn.Module]) -> str:
    return type(module).__name__


def _is_identity(module: Optional[nn.Module]) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _block_problem(block: nn.Module) -> Optional[str]:
    kind = _name(block)
    if kind not in BLOCKS:
        return f"block type {kind} (known: {', '.join(BLOCKS)})"
    if _name(block.mlp) not in MLPS:
        return f"MLP {_name(block.mlp)}"
    if kind == "RepMixerBlock":
        if _name(block.token_mixer) not in MIXERS:
            return f"token mixer {_name(block.token_mixer)}"
        parts = {"layer_scale": (block.layer_scale, SCALES), "drop_path": (block.drop_path, DROP_PATHS)}
    else:
        attn = block.token_mixer
        if _name(attn) not in ATTENTIONS:
            return f"attention {_name(attn)}"
        if not (isinstance(attn.qkv, nn.Linear) and isinstance(attn.proj, nn.Linear)):
            return "attention with non-linear qkv/proj layers"
        if attn.num_heads * attn.head_dim != attn.proj.in_features:
            return "attention whose heads do not tile its width"
        if _name(block.norm) not in NORMS:
            return f"attention-block normalisation {_name(block.norm)} (known: {', '.join(NORMS)})"
        parts = {
            "layer_scale_1": (block.layer_scale_1, SCALES), "layer_scale_2": (block.layer_scale_2, SCALES),
            "drop_path1": (block.drop_path1, DROP_PATHS), "drop_path2": (block.drop_path2, DROP_PATHS),
        }
    for part, (module, known) in parts.items():
        if _name(module) not in known:
            return f"{part} {_name(module)}"
    return None


def check_fastvit(trunk: nn.Module, visual: Optional[nn.Module] = None) -> Optional[str]:
    """Why a timm ``FastVit`` trunk (and open_clip's head around it) cannot be hooked exactly, or None.

    Reads only class names and flags, so it works on a model built on the meta device. The
    convolutional modules are run as they are (training or reparameterised form alike); what is
    re-implemented (stage and block wiring, per-head attention, pooling) must be a known class.
    """
    if _name(trunk) != "FastVit":
        return f"timm {_name(trunk)} (not a FastVit)"
    if getattr(trunk, "fork_feat", False):
        return "fork_feat=True (a dense-prediction FastVit without the classifier head)"
    if not isinstance(trunk.stem, nn.Sequential) or any(_name(b) not in STEM_BLOCKS for b in trunk.stem):
        return f"stem {_name(trunk.stem)} (expected a Sequential of MobileOneBlocks)"
    for s, stage in enumerate(trunk.stages):
        if _name(stage) != "FastVitStage":
            return f"stage type {_name(stage)} (stage {s})"
        down = stage.downsample
        if not _is_identity(down):
            if _name(down) != "PatchEmbed" or not isinstance(getattr(down, "proj", None), nn.Sequential):
                return f"downsample {_name(down)} (stage {s})"
            kinds = [_name(m) for m in down.proj]
            if kinds != ["ReparamLargeKernelConv", "MobileOneBlock"]:
                return f"downsample layers {kinds} (stage {s})"
        if not _is_identity(stage.pos_emb) and _name(stage.pos_emb) != "RepConditionalPosEnc":
            return f"positional encoding {_name(stage.pos_emb)} (stage {s})"
        for b, block in enumerate(stage.blocks):
            problem = _block_problem(block)
            if problem:
                return f"{problem} (stages.{s}.blocks.{b})"
    if _name(trunk.final_conv) != "MobileOneBlock":
        return f"final_conv {_name(trunk.final_conv)} (expected a MobileOneBlock)"
    head = trunk.head
    if _name(head) != "ClassifierHead":
        return f"classifier head {_name(head)}"
    pool_type = getattr(head.global_pool, "pool_type", None)
    if pool_type not in POOLS:
        return f"global pool '{pool_type}' (only average pooling is linear)"
    if not (isinstance(head.fc, nn.Linear) or _is_identity(head.fc)) or not _is_identity(head.flatten):
        return f"classifier {_name(head.fc)} (a convolutional classifier)"
    if visual is not None:
        for name, module in visual.head.named_children():
            known = {"drop": nn.Dropout, "proj": nn.Linear}
            if not isinstance(module, known.get(name, ())):
                return f"open_clip head '{name}' ({_name(module)}; only a linear projection is linear)"
    return None


# --- shapes ------------------------------------------------------------------------------------
def _conv_size(size: int, conv: nn.Conv2d, axis: int) -> int:
    """Output length of ``conv`` along ``axis`` (0: H, 1: W) for an input of length ``size``."""
    k, s, d = conv.kernel_size[axis], conv.stride[axis], conv.dilation[axis]
    padding = conv.padding
    if isinstance(padding, str):  # 'valid' or 'same' (stride 1 only in torch)
        return size if padding == "same" else (size - d * (k - 1) - 1) // s + 1
    return (size + 2 * padding[axis] - d * (k - 1) - 1) // s + 1


def _spatial_conv(block: nn.Module) -> Optional[nn.Conv2d]:
    """The conv that sets a MobileOne / large-kernel block's output size (every branch agrees)."""
    if getattr(block, "reparam_conv", None) is not None:
        return block.reparam_conv
    if getattr(block, "large_conv", None) is not None:
        return block.large_conv.conv
    if getattr(block, "conv_kxk", None) is not None:
        return block.conv_kxk[0].conv
    if getattr(block, "conv_scale", None) is not None:
        return block.conv_scale.conv
    return None  # identity branch only: stride 1


def _grid(trunk: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` of the final feature map for ``image_size`` pixels."""
    layers = list(trunk.stem)
    for stage in trunk.stages:
        if not _is_identity(stage.downsample):
            layers.extend(stage.downsample.proj)
    layers.append(trunk.final_conv)
    size = list(image_size)
    for layer in layers:
        conv = _spatial_conv(layer)
        if conv is not None:
            size = [_conv_size(size[axis], conv, axis) for axis in (0, 1)]
    return size[0], size[1]


# --- hooked modules ----------------------------------------------------------------------------
class FastViTAttention(TimmQKV, HeadAttention):
    """The multi-head self-attention of a FastViT ``AttentionBlock``, split into heads.

    Runs on the block's normalised map as tokens ``[batch, n = H·W, C]`` (row-major). Weights in
    TransformerLens layout from timm's fused ``qkv`` and ``proj``; ``W_O``/``b_O`` include the
    block's LayerScale ``γ₁``, so ``hook_result.sum(-2) + b_O`` is what enters the stream
    (``hook_attn_out`` as tokens). Hooks: see `HeadAttention`.
    """

    def __init__(self, attn: nn.Module, layer_scale: Optional[nn.Module]):
        super().__init__(attn.num_heads, attn.proj.out_features, attn.head_dim)
        self.source = attn
        self.layer_scale = None if _is_identity(layer_scale) else layer_scale

    @property
    def gamma(self) -> Optional[Float[Tensor, "m"]]:
        """The LayerScale ``γ₁`` ``[C]`` (stored ``[C, 1, 1]`` by timm), or None."""
        return None if self.layer_scale is None else self.layer_scale.gamma.reshape(-1)

    @property
    def W_O(self) -> Float[Tensor, "h d m"]:
        w = einops.rearrange(self.source.proj.weight, "m (h d) -> h d m", h=self.n_heads)
        return w if self.gamma is None else w * self.gamma

    @property
    def b_O(self) -> Float[Tensor, "m"]:
        proj = self.source.proj
        b = proj.weight.new_zeros(self.d_model) if proj.bias is None else proj.bias
        return b if self.gamma is None else b * self.gamma

    def project(self, x: Float[Tensor, "batch n m"], which: int) -> Float[Tensor, "batch n h d"]:
        return einops.rearrange(F.linear(x, *_qkv(self.source)[which]), "b n (h d) -> b n h d", h=self.n_heads)

    def fused_output(self, z: Float[Tensor, "batch n hd"]) -> Float[Tensor, "batch n m"]:
        out = self.source.proj(z)
        return out if self.gamma is None else out * self.gamma

    def forward(self, x: Float[Tensor, "batch n m"]) -> Float[Tensor, "batch n m"]:
        q = self.hook_q(self.project(x, 0))
        k = self.hook_k(self.project(x, 1))
        v = self.hook_v(self.project(x, 2))
        z = self.hook_z(self.attend(q, k, v, None))
        return self.output(z)


class Norm2d(nn.Module):
    """An attention block's channel norm (timm's ``BatchNorm2d`` or ``LayerNorm2d``, run as it is).

    Hooks: ``hook_normalized`` ``[batch, C, H, W]``; for a LayerNorm2d also ``hook_scale``
    ``[batch, 1, H, W]`` (``sqrt(var_C + eps)`` per position; the norm is then recomputed
    explicitly, only while that hook is active). An eval-mode BatchNorm has no per-input scale.
    """

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.source = norm
        self.is_layer_norm = _name(norm) == "LayerNorm2d"
        self.hook_normalized = HookPoint()
        if self.is_layer_norm:
            self.hook_scale = HookPoint()

    def forward(self, x: Float[Tensor, "batch C H W"]) -> Float[Tensor, "batch C H W"]:
        if not (self.is_layer_norm and hooks_active(self.hook_scale)):
            return self.hook_normalized(self.source(x))
        ln = self.source
        centred = x - x.mean(1, keepdim=True)
        scale = self.hook_scale((centred.pow(2).mean(1, keepdim=True) + ln.eps).sqrt())
        out = centred / scale
        if ln.weight is not None:
            out = out * ln.weight[:, None, None]
        if ln.bias is not None:
            out = out + ln.bias[:, None, None]
        return self.hook_normalized(out)


class HookedRepMixerBlock(nn.Module):
    """A FastViT RepMixer block (timm modules run as they are, hooks between them).

    RepMixer adds its own residual: ``mixer_out = x + γ_m ⊙ (mixer(x) − norm(x))`` (or its
    reparameterised single depthwise conv), so ``hook_mixer_out`` is the *stream* after the token
    mixer (TransformerLens' ``resid_mid``), not a write; the mixer's write is
    ``hook_mixer_out − hook_resid_pre``.

    Hooks (``[batch, C, H, W]``): ``hook_resid_pre``, ``hook_mixer_out``, ``hook_mlp_out`` (the
    ConvMlp write after LayerScale), ``hook_resid_post``.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.token_mixer = block.token_mixer
        self.mlp = block.mlp
        self.layer_scale = block.layer_scale
        self.drop_path = block.drop_path
        self.hook_resid_pre = HookPoint()
        self.hook_mixer_out = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch C H W"]) -> Float[Tensor, "batch C H W"]:
        x = self.hook_resid_pre(x)
        x = self.hook_mixer_out(self.token_mixer(x))
        mlp_out = self.hook_mlp_out(self.layer_scale(self.mlp(x)))
        return self.hook_resid_post(x + self.drop_path(mlp_out))


class HookedAttentionBlock(nn.Module):
    """A FastViT attention block: ``x + γ₁ ⊙ MHSA(norm(x))``, then ``+ γ₂ ⊙ ConvMlp(·)``.

    Hooks: ``hook_resid_pre``, ``norm.*`` (see `Norm2d`), ``attn.*`` (see `FastViTAttention`,
    ``n = H·W`` row-major), ``hook_attn_out`` (after LayerScale), ``hook_resid_mid``,
    ``hook_mlp_out`` (after LayerScale), ``hook_resid_post``; maps are ``[batch, C, H, W]``.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm = Norm2d(block.norm)
        self.attn = FastViTAttention(block.token_mixer, block.layer_scale_1)
        self.drop_path1 = block.drop_path1
        self.mlp = block.mlp
        self.layer_scale_2 = block.layer_scale_2
        self.drop_path2 = block.drop_path2
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch C H W"]) -> Float[Tensor, "batch C H W"]:
        x = self.hook_resid_pre(x)
        grid = (x.shape[-2], x.shape[-1])
        attn_out = self.hook_attn_out(as_map(self.attn(as_tokens(self.norm(x))), grid))
        x = self.hook_resid_mid(x + self.drop_path1(attn_out))
        mlp_out = self.hook_mlp_out(self.layer_scale_2(self.mlp(x)))
        return self.hook_resid_post(x + self.drop_path2(mlp_out))


class HookedDownsample(nn.Module):
    """A stage's ``PatchEmbed`` (7×7 + 3×3 stride-2 conv-BN branches [→ SE] [→ GELU], then a 1×1
    MobileOne block), run as it is; ``hook_out`` ``[batch, C_out, ⌈H/2⌉, ⌈W/2⌉]``."""

    def __init__(self, patch_embed: nn.Module):
        super().__init__()
        self.proj = patch_embed.proj
        self.hook_out = HookPoint()

    def forward(self, x: Float[Tensor, "batch C H W"]) -> Float[Tensor, "batch C2 H2 W2"]:
        return self.hook_out(self.proj(x))


class HookedStage(nn.Module):
    """A FastViT stage: ``hook_in`` → downsample (``downsample.hook_out``, where there is one) →
    conditional positional encoding ``x + dwconv₇ₓ₇(x)`` (``hook_pos_embed_out``, where there is
    one) → blocks (`HookedRepMixerBlock` or `HookedAttentionBlock`)."""

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.hook_in = HookPoint()
        self.downsample = None if _is_identity(stage.downsample) else HookedDownsample(stage.downsample)
        self.pos_emb = None if _is_identity(stage.pos_emb) else stage.pos_emb
        if self.pos_emb is not None:  # only hooks that fire exist
            self.hook_pos_embed_out = HookPoint()
        self.blocks = nn.ModuleList(
            HookedAttentionBlock(b) if _name(b) == "AttentionBlock" else HookedRepMixerBlock(b) for b in stage.blocks
        )
        # timm builds one token mixer per stage
        attention = any(isinstance(b, HookedAttentionBlock) for b in self.blocks)
        self.token_mixer = "attention" if attention else "repmixer"

    def forward(self, x: Float[Tensor, "batch C H W"]) -> Float[Tensor, "batch C2 H2 W2"]:
        x = self.hook_in(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.pos_emb is not None:
            x = self.hook_pos_embed_out(self.pos_emb(x))
        for block in self.blocks:
            x = block(x)
        return x


class FastViTTower(ConvTower):
    """Hooked copy of an open_clip ``TimmModel`` whose trunk is a timm ``FastVit`` (MobileCLIP).

    Parameters are shared with the trunk; every convolutional module is timm's own, so outputs
    equal open_clip's (fp32, ≤1e-5 after normalisation). Hooks, in forward order (maps
    ``[batch, C, H, W]``; ``n = H·W`` of the stage, ``h`` heads of ``d = 32``; ``E = d_embed``):

    ==================================================  ===============================================
    ``hook_stem_out``                                   the stem's output (stride 4)
    ``stages.{s}.hook_in``                              the stage's input, before its downsample
    ``stages.{s}.downsample.hook_out``                  after the PatchEmbed downsample (where present)
    ``stages.{s}.hook_pos_embed_out``                   after ``x + pos_enc(x)`` (attention stages)
    ``stages.{s}.blocks.{b}.hook_resid_pre``            the block's input stream
    RepMixer blocks:
    ``….hook_mixer_out``                                the stream after RepMixer (its residual is
                                                        inside: ``x + γ_m ⊙ (mixer(x) − norm(x))``)
    ``….hook_mlp_out``                                  ConvMlp write after LayerScale
    Attention blocks:
    ``….norm.hook_normalized``                          the normalised map (``norm.hook_scale``
                                                        ``[batch, 1, H, W]`` for LayerNorm2d: mci3/4)
    ``….attn.hook_q/hook_k/hook_v``                     ``[batch, n, h, d]``
    ``….attn.hook_attn_scores/hook_pattern``            ``[batch, h, n, n]``
    ``….attn.hook_z``                                   ``[batch, n, h, d]``
    ``….attn.hook_result``                              ``[batch, n, h, C]`` per-head write, γ₁ folded
                                                        in (computed only when hooked)
    ``….hook_attn_out``                                 attention write after LayerScale
    ``….hook_resid_mid``                                stream after the attention
    ``….hook_mlp_out``                                  ConvMlp write after LayerScale
    ``stages.{s}.blocks.{b}.hook_resid_post``           the block's output stream
    ``hook_spatial_tokens``                             ``[batch, H·W, C]`` ``final_conv``'s output
                                                        (after SE and GELU) as row-major tokens
    ``hook_pooled``                                     ``[batch, C]`` global average
    ``hook_image_embed``                                ``[batch, E]`` un-normalised embedding
    ==================================================  ===============================================

    ``cfg.n_layers`` counts the attention blocks (``cfg.extra["attn_blocks"]`` names them),
    ``cfg.n_heads`` is the head count of the last one (``extra["attn_heads"]`` per block: mci3/4's
    two attention stages differ), ``d_model``/``grid_size`` describe the final map.

    [`decompose`][clip_lens.towers.fastvit.FastViTTower.decompose] is exact from ``final_conv``'s output
    on (see the module docstring): ``feature_map`` + ``bias``, with ``positions`` per final cell.
    """

    family = "fastvit"
    decomposition_layer_counts = (0, 1)
    """No exact per-head terms; one token layer, the final feature map (see `decomposition_layers`)."""

    def __init__(self, visual: nn.Module, model_name: Optional[str] = None):
        super().__init__()
        trunk = visual.trunk
        problem = check_fastvit(trunk, visual)
        if problem:
            raise UnsupportedArchitectureError(f"FastViT image tower with {problem} is not reproduced exactly.")
        self.stem = trunk.stem
        self.hook_stem_out = HookPoint()
        self.stages = nn.ModuleList(HookedStage(stage) for stage in trunk.stages)
        self.final_conv = trunk.final_conv
        self.hook_pooled = HookPoint()
        self.head_drop = trunk.head.drop
        self.fc = trunk.head.fc
        self.clip_head = visual.head  # open_clip's projection after the trunk (empty for MobileCLIP)
        for name in ("hook_spatial_tokens", "hook_pooled", "hook_image_embed"):  # list the hooks in forward order
            self._modules[name] = self._modules.pop(name)

        image_size = tuple(visual.image_size)
        grid = _grid(trunk, image_size)
        attn_blocks = [
            (f"stages.{s}.blocks.{b}", block)
            for s, stage in enumerate(self.stages) for b, block in enumerate(stage.blocks)
            if isinstance(block, HookedAttentionBlock)
        ]
        last_attn = attn_blocks[-1][1].attn if attn_blocks else None
        last_mlp = trunk.stages[-1].blocks[-1].mlp if len(trunk.stages[-1].blocks) else None
        weight, _ = self.output_affine()
        self.cfg = TowerConfig(
            tower="vision",
            n_layers=len(attn_blocks),
            n_heads=0 if last_attn is None else last_attn.n_heads,
            d_model=trunk.final_conv.out_chs,
            d_head=0 if last_attn is None else last_attn.d_head,
            d_mlp=0 if last_mlp is None else last_mlp.fc1.out_channels,
            n_ctx=grid[0] * grid[1],
            d_embed=weight.shape[1],
            act_fn="GELU",
            pool_type="avg",
            layer_scale=any(_name(m) == "LayerScale2d" for m in trunk.modules()),
            image_size=image_size,
            patch_size=None,
            grid_size=grid,
            n_prefix_tokens=0,
            model_name=model_name,
            dtype=self.device_weight.dtype,
            extra={
                "family": "fastvit",
                "timm_model": trunk.default_cfg.get("architecture") if hasattr(trunk, "default_cfg") else None,
                "stage_depths": [len(stage.blocks) for stage in self.stages],
                "stage_widths": [int(info["num_chs"]) for info in trunk.feature_info],
                "token_mixers": [stage.token_mixer for stage in self.stages],
                "attn_blocks": [name for name, _ in attn_blocks],
                "attn_heads": [block.attn.n_heads for _, block in attn_blocks],
                "reparameterized": any(getattr(m, "reparam_conv", None) is not None for m in trunk.modules()),
            },
        )

    # --- forward -----------------------------------------------------------------------------
    def features(self, images: Float[Tensor, "batch 3 H W"]) -> Float[Tensor, "batch C h w"]:
        """Pixels to ``final_conv``'s output (every stage hooked)."""
        x = self.hook_stem_out(self.stem(images))
        for stage in self.stages:
            x = stage(x)
        return self.final_conv(x)

    def head(self, tokens: Float[Tensor, "batch HW C"]) -> Float[Tensor, "batch E"]:
        """Global average pool (``hook_pooled``), timm's classifier ``fc``, open_clip's head."""
        pooled = self.hook_pooled(tokens.mean(1))
        return self.clip_head(self.fc(self.head_drop(pooled)))

    def output_affine(self) -> tuple[Float[Tensor, "C E"], Optional[Float[Tensor, "E"]]]:
        """The pooled vector to the embedding, composed: ``pooled @ W + b`` (``b`` None without biases)."""
        ref = self.device_weight
        layers = [self.fc] + [m for name, m in self.clip_head.named_children() if name == "proj"]
        weight: Optional[Tensor] = None
        bias: Optional[Tensor] = None
        for layer in layers:
            if not isinstance(layer, nn.Linear):
                continue  # Identity
            weight = layer.weight.T if weight is None else weight @ layer.weight.T
            if bias is not None:
                bias = bias @ layer.weight.T
            if layer.bias is not None:
                bias = layer.bias if bias is None else bias + layer.bias
        if weight is None:
            weight = torch.eye(self.final_conv.out_chs, device=ref.device, dtype=ref.dtype)
        return weight, bias

    # --- decomposition -----------------------------------------------------------------------
    def _check_specs(self, heads, tokens) -> bool:
        """Validate ``heads``/``tokens``; True when per-position terms are requested."""
        where = ", ".join(self.cfg.extra["attn_blocks"]) or "none"
        if not (heads is None or (isinstance(heads, str) and heads == "all")):
            raise InputError(
                f"heads={heads!r}: a FastViT image tower has no exact per-head terms. Its attention blocks "
                f"({where}) write before final_conv, whose SqueezeExcite gate and GELU are non-linear, so no "
                "head has a direct contribution. What exists: heads='all' (default) or None, giving feature_map "
                "+ bias, and tokens='all' for the split over the final map's positions; to study a head, patch "
                "stages.{s}.blocks.{b}.attn.hook_result."
            )
        if tokens is None:
            return False
        if isinstance(tokens, str) and tokens == "all":
            return True
        grid = self.cfg.grid_size
        usage = (f"tokens={tokens!r}: a FastViT image tower has one token layer, its final feature map; tokens='all' "
                 f"(or [0]) splits feature_map over its {grid[0]}×{grid[1]} positions (Decomposition.positions), None does not.")
        if isinstance(tokens, str):
            raise InputError(usage)
        try:
            return bool(_layers(tokens, 1, "tokens"))  # [0] is what collect records for "all"
        except InputError as exc:
            raise InputError(usage) from exc

    def decompose(
        self,
        model,
        images: Float[Tensor, "batch 3 H W"],
        *,
        heads: Union[str, None] = "all",
        tokens: Union[str, None] = None,
        directions: Optional[Float[Tensor, "n_directions E"]] = None,
    ) -> Decomposition:
        """The exact split of the image embedding after ``final_conv`` (see the module docstring).

        ``embedding = feature_map + bias``; with ``tokens="all"``, ``positions [batch, H·W, out]``
        holds each final position's term ``f[:, p] @ W / (H·W)`` (they sum to ``feature_map``).
        ``heads``: ``"all"`` or None (no per-head term is exact; ``heads`` stays None). With
        ``directions [n_dir, E]`` (validated by the caller), ``W`` and ``b`` are projected before
        contracting. The read-out runs in the weights' dtype even under autocast.
        """
        with_positions = self._check_specs(heads, tokens)
        features = self.spatial_tokens(images)  # the forward itself (hooks included)
        embedding = self.hook_image_embed(self.head(features))
        dtype = self.device_weight.dtype
        # fp16 under autocast would flush small per-position terms: contract in the weights' precision
        with torch.autocast(images.device.type, enabled=False):
            features = features.to(dtype)
            embedding = embedding.to(dtype)
            weight, bias = self.output_affine()
            embedding_norm = embedding.norm(dim=-1)
            if directions is not None:  # linear in the output axis: project the read-out once
                weight = weight @ directions.T
                bias = None if bias is None else bias @ directions.T
                embedding = embedding @ directions.T
            feature_map = features.mean(1) @ weight
            positions = None
            if with_positions:
                positions = torch.einsum("bpc,co->bpo", features, weight) / features.shape[1]
            bias_term = None if bias is None else bias.expand(features.shape[0], -1).clone()
        return Decomposition(
            embedding=embedding,
            embedding_norm=embedding_norm,
            embed=None,
            attn=None,
            attn_bias=None,
            mlp=None,
            bias=bias_term,
            heads=None,
            tokens=None,
            projected=directions is not None,
            family=self.family,
            feature_map=feature_map,
            positions=positions,
        )
