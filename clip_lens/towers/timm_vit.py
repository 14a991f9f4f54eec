"""Hooked timm image towers: plain ViT (CLIP, MobileCLIP2-L), SigLIP/SigLIP2, EVA/EVA02, PE-Core.

open_clip builds these as a ``TimmModel`` whose ``trunk`` is a timm ``VisionTransformer`` or
``Eva``. [`TimmVisionTower`][clip_lens.towers.timm_vit.TimmVisionTower] shares the trunk's parameters and re-runs it with the same
TransformerLens hook names as `VisionTower`, plus the hooks of what
the native tower lacks: ``attn.hook_rot_q/hook_rot_k`` (after rotary embeddings),
``attn.ln_inner.*`` (EVA02's LayerNorm of the heads before the output projection),
``mlp.hook_pre_linear`` and ``mlp.ln_inner.*`` (SwiGLU and its LayerNorm), and the MAP
pooler's ``attn_pool.*``. A module this file does not reproduce exactly is refused by its
class name in `check_trunk`, which needs only the module tree (it runs on the meta
device before anything is built).
"""

from __future__ import annotations

from typing import Optional

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from clip_lens.components import MLP, GatedMLP, HeadAttention, LayerNorm, TransformerBlock, hooks_active
from clip_lens.components.readout import ReadoutPlan
from clip_lens.config import TowerConfig
from clip_lens.errors import UnsupportedArchitectureError
from clip_lens.towers.timm_qkv import TimmQKV, _qkv
from clip_lens.weights import TowerWeights

TRUNKS = ("VisionTransformer", "Eva")
BLOCKS = ("Block", "EvaBlock", "EvaBlockPostNorm")
ATTENTIONS = ("Attention", "EvaAttention", "AttentionRope")
MLPS = ("Mlp", "SwiGLU", "GluMlp", "GeGluMlp")
POOLS = ("token", "avg", "map")


def _is_identity(module: Optional[nn.Module]) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _name(module: nn.Module) -> str:
    return type(module).__name__


def _norm_problem(module: Optional[nn.Module], where: str) -> Optional[str]:
    if _is_identity(module) or isinstance(module, nn.LayerNorm):
        return None
    return f"{where} normalisation {_name(module)} (only LayerNorm is reproduced)"


def _attention_problem(attn: nn.Module) -> Optional[str]:
    if _name(attn) not in ATTENTIONS:
        return f"attention {_name(attn)}"
    if getattr(attn, "gate", None) is not None:
        return "gated attention (sigmoid gate on the heads)"
    if getattr(attn, "num_kv_groups", 1) != 1:
        return "grouped-query attention (num_kv_heads)"
    for part in ("q_norm", "k_norm", "norm"):
        problem = _norm_problem(getattr(attn, part, None), f"attention {part}")
        if problem:
            return problem
    return None


def _mlp_problem(mlp: nn.Module) -> Optional[str]:
    if _name(mlp) not in MLPS:
        return f"MLP {_name(mlp)}"
    if not isinstance(getattr(mlp, "fc2", getattr(mlp, "w2", None)), nn.Linear):
        return f"MLP {_name(mlp)} with convolutional layers"
    return _norm_problem(getattr(mlp, "norm", None), "MLP")


def check_trunk(trunk: nn.Module, visual: Optional[nn.Module] = None) -> Optional[str]:
    """Why a timm trunk (and open_clip's head around it) cannot be hooked exactly, or None.

    Reads only the module tree and flags, so it works on a model built on the meta device.
    """
    if _name(trunk) == "ConvNeXt":
        from clip_lens.towers.convnext import check_convnext

        return check_convnext(trunk, visual)
    if _name(trunk) == "FastVit":
        from clip_lens.towers.fastvit import check_fastvit

        return check_fastvit(trunk, visual)
    if _name(trunk) not in TRUNKS:
        return f"timm {_name(trunk)} (hooked timm towers: VisionTransformer, Eva, ConvNeXt, FastVit)"
    if getattr(trunk, "dynamic_img_size", False):
        return "dynamic_img_size"
    if getattr(trunk, "rope_mixed", False):
        return "mixed (per-layer learned) rotary embeddings"
    if getattr(trunk, "rope", None) is not None and _name(trunk.rope) != "RotaryEmbeddingCat":
        return f"rotary embedding {_name(trunk.rope)}"
    pool = trunk.global_pool
    if pool not in POOLS:
        return f"global_pool='{pool}' (supported: token, avg, map)"
    attn_pool = getattr(trunk, "attn_pool", None)
    if pool == "map":
        if _name(attn_pool) != "AttentionPoolLatent":
            return f"attention pooler {_name(attn_pool)}"
        if attn_pool.pos_embed is not None or attn_pool.pool not in ("token", "avg") or attn_pool.mlp is None:
            return "AttentionPoolLatent with a position embedding, no pooling or no MLP"
        problem = _norm_problem(attn_pool.q_norm, "pooler q") or _norm_problem(attn_pool.norm, "pooler")
        if problem:
            return problem
    for part in ("norm_pre", "norm", "fc_norm"):
        problem = _norm_problem(getattr(trunk, part, None), part)
        if problem:
            return problem
    if not _is_identity(trunk.norm) and not _is_identity(trunk.fc_norm):
        return "both a final norm and fc_norm"
    if getattr(trunk, "patch_drop", None) is not None and _name(trunk.patch_drop) not in ("Identity", "PatchDropout"):
        return f"patch dropout {_name(trunk.patch_drop)}"
    for i, block in enumerate(trunk.blocks):
        if _name(block) not in BLOCKS:
            return f"block type {_name(block)} (layer {i})"
        problem = (
            _norm_problem(block.norm1, "block") or _norm_problem(block.norm2, "block")
            or _attention_problem(block.attn) or _mlp_problem(block.mlp)
        )
        if problem:
            return f"{problem} (layer {i})"
    if visual is not None:
        for name, module in visual.head.named_children():
            if name not in ("drop", "proj"):
                return f"open_clip head '{name}' ({_name(module)}; only a linear projection is linear)"
    return None


def _layer_scale(block: nn.Module, which: int) -> Optional[Tensor]:
    """LayerScale gamma of a timm ``Block`` (``ls1``/``ls2``) or ``EvaBlock`` (``gamma_1``/``gamma_2``)."""
    if hasattr(block, f"gamma_{which}") or _name(block) == "EvaBlockPostNorm":
        return getattr(block, f"gamma_{which}", None)
    module = getattr(block, f"ls{which}")
    return None if isinstance(module, nn.Identity) else module.gamma


class TimmAttention(TimmQKV, HeadAttention):
    """Self-attention of a timm block split into heads (see `HeadAttention` for the hooks).

    Extra hooks: ``hook_rot_q``/``hook_rot_k`` ``[batch, n, h, d]`` (after rotary embeddings, the
    prefix tokens unrotated, as timm does) and ``ln_inner.hook_scale/normalized`` (EVA02's
    LayerNorm over the concatenated heads). ``hook_q``/``hook_k`` are taken after timm's
    ``q_norm``/``k_norm``. With ``ln_inner`` the heads stay additive with its scale frozen:
    ``W_O`` folds its weight and centring, and ``hook_result`` is ``z_h W_O^h / scale``.
    """

    def __init__(self, attn: nn.Module, layer_scale: Optional[Tensor], n_prefix_tokens: int, rotary: bool = False):
        super().__init__(attn.num_heads, attn.proj.out_features, attn.head_dim)
        self.source = attn
        self.layer_scale = layer_scale
        self.n_prefix_tokens = getattr(attn, "num_prefix_tokens", n_prefix_tokens)  # left unrotated
        self.q_norm = None if _is_identity(attn.q_norm) else attn.q_norm
        self.k_norm = None if _is_identity(attn.k_norm) else attn.k_norm
        self.ln_inner = None if _is_identity(attn.norm) else LayerNorm(attn.norm)
        self.rotate_half = bool(getattr(attn, "rotate_half", False))
        if rotary:  # only towers with rotary embeddings have these hooks (every hook fires)
            self.hook_rot_q = HookPoint()
            self.hook_rot_k = HookPoint()

    @property
    def W_O(self) -> Float[Tensor, "h d m"]:
        """Per-head output weights; with ``ln_inner``: its weight and centring folded in (divide
        by its scale for the head's output)."""
        w = self.source.proj.weight.T  # [h*d, m]
        if self.ln_inner is not None:
            w = w * self.ln_inner.weight[:, None]
            w = w - w.mean(0, keepdim=True)
        w = einops.rearrange(w, "(h d) m -> h d m", h=self.n_heads)
        return w if self.layer_scale is None else w * self.layer_scale

    @property
    def b_O(self) -> Float[Tensor, "m"]:
        proj = self.source.proj
        b = proj.weight.new_zeros(self.d_model) if proj.bias is None else proj.bias
        if self.ln_inner is not None and self.ln_inner.bias is not None:
            b = b + self.ln_inner.bias @ proj.weight.T
        return b if self.layer_scale is None else b * self.layer_scale

    # --- forward -----------------------------------------------------------------------------
    def project(self, x: Float[Tensor, "batch n m"], which: int) -> Float[Tensor, "batch n h d"]:
        weight, bias = _qkv(self.source)[which]
        return einops.rearrange(F.linear(x, weight, bias), "b n (h d) -> b n h d", h=self.n_heads)

    def rotate(self, x: Float[Tensor, "batch n h d"], rope: Tensor) -> Float[Tensor, "batch n h d"]:
        from timm.layers.pos_embed_sincos import apply_rot_embed_cat

        npt = self.n_prefix_tokens
        rotated = apply_rot_embed_cat(x[:, npt:], rope[:, None, :], half=self.rotate_half)  # rope [n, 2d]
        return torch.cat([x[:, :npt], rotated.type_as(x)], dim=1)

    def fused_output(self, z: Float[Tensor, "batch n hd"]) -> Float[Tensor, "batch n m"]:
        if self.ln_inner is not None:
            z = self.ln_inner(z)
        out = self.source.proj(z)
        return out if self.layer_scale is None else out * self.layer_scale

    def output(self, z: Float[Tensor, "batch n h d"]) -> Float[Tensor, "batch n m"]:
        if self.ln_inner is None or not (self.use_attn_result or hooks_active(self.hook_result)):
            return super().output(z)
        flat = einops.rearrange(z, "b n h d -> b n (h d)")
        centred = flat - flat.mean(-1, keepdim=True)
        scale = self.ln_inner.hook_scale((centred.pow(2).mean(-1, keepdim=True) + self.ln_inner.eps).sqrt())
        self.ln_inner.hook_normalized(centred / scale * self.ln_inner.weight + self.ln_inner.bias)
        result = self.hook_result(torch.einsum("bnhd,hdm->bnhm", z, self.W_O) / scale[..., None])
        return result.sum(-2) + self.b_O

    def forward(
        self, x: Tensor, attn_mask: Optional[Tensor] = None, rope: Optional[Tensor] = None,
        key_input: Optional[Tensor] = None, value_input: Optional[Tensor] = None,
    ) -> Float[Tensor, "batch n m"]:
        """``x``: the query input, also the key and value input unless ``key_input``/``value_input``
        are given; each ``[batch, n, m]`` or one copy per head ``[batch, n, h, m]``."""
        q = self.project_input(x, 0)
        k = self.project_input(x if key_input is None else key_input, 1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.hook_q(q), self.hook_k(k)
        v = self.hook_v(self.project_input(x if value_input is None else value_input, 2))
        if rope is not None:
            q = self.hook_rot_q(self.rotate(q, rope))
            k = self.hook_rot_k(self.rotate(k, rope))
        z = self.hook_z(self.attend(q, k, v, attn_mask))
        return self.output(z)


def _mlp(mlp: nn.Module) -> MLP:
    name = _name(mlp)
    if name == "SwiGLU":
        return GatedMLP(mlp.fc1_g, mlp.fc1_x, mlp.act, mlp.fc2, mlp.norm)
    if name == "GeGluMlp":  # ViTamin: LayerNorm on the input, then GELU-gated
        return GatedMLP(mlp.w0, mlp.w1, mlp.act, mlp.w2, input_norm=mlp.norm)
    if name == "GluMlp":
        return GatedMLP(mlp.fc1, None, mlp.act, mlp.fc2, mlp.norm, gate_last=mlp.gate_last)
    return MLP(mlp.fc1, mlp.act, mlp.fc2, mlp.norm)


def _block(block: nn.Module, n_prefix_tokens: int, rotary: bool) -> TransformerBlock:
    if _name(block) == "EvaBlockPostNorm":  # residual post-norm: the norms act on the branch outputs
        return TransformerBlock(
            None, TimmAttention(block.attn, None, n_prefix_tokens, rotary), None, _mlp(block.mlp),
            ln1_post=LayerNorm(block.norm1), ln2_post=LayerNorm(block.norm2),
        )
    return TransformerBlock(
        LayerNorm(block.norm1), TimmAttention(block.attn, _layer_scale(block, 1), n_prefix_tokens, rotary),
        LayerNorm(block.norm2), _mlp(block.mlp), _layer_scale(block, 2),
    )


class PoolerAttention(HeadAttention):
    """The cross-attention of timm's ``AttentionPoolLatent``: learned latent queries attend to the tokens.

    Weights in TransformerLens layout from its ``q``/``kv``/``proj`` linears (``q`` may be absent:
    the latent is the query). Hooks as `HeadAttention`, with ``n_query`` latent queries.
    """

    def __init__(self, pool: nn.Module):
        super().__init__(pool.num_heads, pool.proj.out_features, pool.head_dim)
        self.source = pool
        self.q_norm = None if _is_identity(pool.q_norm) else pool.q_norm
        self.k_norm = None if _is_identity(pool.k_norm) else pool.k_norm

    def _kv(self, which: int) -> tuple[Tensor, Optional[Tensor]]:
        kv = self.source.kv
        bias = None if kv.bias is None else kv.bias.chunk(2)[which]
        return kv.weight.chunk(2)[which], bias

    W_K = property(lambda self: einops.rearrange(self._kv(0)[0], "(h d) m -> h m d", h=self.n_heads))
    W_V = property(lambda self: einops.rearrange(self._kv(1)[0], "(h d) m -> h m d", h=self.n_heads))

    @property
    def b_V(self) -> Float[Tensor, "h d"]:
        b = self._kv(1)[1]
        return self.W_V.new_zeros(self.n_heads, self.d_head) if b is None else einops.rearrange(
            b, "(h d) -> h d", h=self.n_heads)

    @property
    def W_O(self) -> Float[Tensor, "h d m"]:
        return einops.rearrange(self.source.proj.weight, "m (h d) -> h d m", h=self.n_heads)

    @property
    def b_O(self) -> Float[Tensor, "m"]:
        return self.source.proj.bias

    def fused_output(self, z: Float[Tensor, "batch n hd"]) -> Float[Tensor, "batch n m"]:
        return self.source.proj(z)

    def forward(self, x: Float[Tensor, "batch n m"]) -> Float[Tensor, "batch n_query m"]:
        split = "b n (h d) -> b n h d"
        latent = self.source.latent.expand(x.shape[0], -1, -1)
        q = einops.rearrange(self.source.q(latent), split, h=self.n_heads)
        k = einops.rearrange(F.linear(x, *self._kv(0)), split, h=self.n_heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.hook_q(q), self.hook_k(k)
        v = self.hook_v(einops.rearrange(F.linear(x, *self._kv(1)), split, h=self.n_heads))
        z = self.hook_z(self.attend(q, k, v, None))
        return self.output(z)


class LatentAttentionPool(nn.Module):
    """timm's ``AttentionPoolLatent`` (the MAP head of SigLIP and PE-Core), hooked.

    ``out = attn(tokens) + mlp(ln(attn(tokens)))`` per latent query, then the queries are pooled.
    Hooks (under ``attn_pool.``): ``attn.*`` (see `PoolerAttention`), ``hook_attn_out``,
    ``ln.*``, ``mlp.*``, ``hook_mlp_out`` and ``hook_out``, all ``[batch, n_query, m]``.
    """

    has_mlp = True

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.attn = PoolerAttention(pool)
        self.ln = LayerNorm(pool.norm) if not _is_identity(pool.norm) else None
        self.mlp = _mlp(pool.mlp)
        self.pool = pool.pool
        self.latent = pool.latent
        self.hook_attn_out = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_out = HookPoint()

    @property
    def n_heads(self) -> int:
        return self.attn.n_heads

    @property
    def pool_weights(self) -> Float[Tensor, "n_query"]:
        n = self.latent.shape[1]
        weights = self.latent.new_zeros(n)
        if self.pool == "token":
            weights[0] = 1.0
        else:
            weights[:] = 1.0 / n
        return weights

    def forward(self, x: Float[Tensor, "batch n m"]) -> Float[Tensor, "batch m"]:
        attn_out = self.hook_attn_out(self.attn(x))
        hidden = attn_out if self.ln is None else self.ln(attn_out)
        out = self.hook_out(attn_out + self.hook_mlp_out(self.mlp(hidden)))
        return out[:, 0] if self.pool == "token" else out.mean(1)


class TimmVisionTower(TowerWeights, nn.Module):
    """Hooked copy of an open_clip ``TimmModel`` whose trunk is a timm ``VisionTransformer`` or ``Eva``.

    Hooks, in forward order (``n = prefix + grid_h * grid_w``, ``m = d_model``, ``E = d_embed``):

    ========================================  ===============================================
    ``hook_embed``                            ``[batch, n, m]`` class/register tokens + patch embeddings
    ``hook_pos_embed``                        ``[batch, n, m]`` absolute position embedding (0 where none)
    ``ln_pre.hook_scale/normalized``          ``norm_pre`` (CLIP-style ViTs, PE-Core)
    ``blocks.{l}.*``                          see [`TimmAttention`][clip_lens.towers.timm_vit.TimmAttention], `TransformerBlock`
    ``ln_post.hook_scale/normalized``         the final norm per token, or timm's ``fc_norm`` after pooling
    ``attn_pool.*``                           the MAP pooler ([`LatentAttentionPool`][clip_lens.towers.timm_vit.LatentAttentionPool])
    ``hook_pooled``                           ``[batch, m]`` the pooled vector
    ``hook_image_embed``                      ``[batch, E]`` un-normalised image embedding
    ========================================  ===============================================
    """

    family = "vit"

    @property
    def spatial_hook(self) -> str:
        """The last block's ``hook_resid_post``: its last ``grid_h · grid_w`` positions are the patch tokens."""
        return f"blocks.{self.cfg.n_layers - 1}.hook_resid_post"

    def __init__(self, visual: nn.Module, model_name: Optional[str] = None):
        super().__init__()
        trunk = visual.trunk
        problem = check_trunk(trunk, visual)
        if problem:
            raise UnsupportedArchitectureError(f"timm image tower with {problem} is not reproduced exactly.")
        self.trunk = trunk
        self.head = visual.head
        self.n_prefix_tokens = trunk.num_prefix_tokens
        self.no_embed_class = bool(getattr(trunk, "no_embed_class", False))
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.ln_pre = None if _is_identity(trunk.norm_pre) else LayerNorm(trunk.norm_pre)
        rotary = getattr(trunk, "rope", None) is not None
        self.blocks = nn.ModuleList(_block(b, self.n_prefix_tokens, rotary) for b in trunk.blocks)
        self.attn_pool = LatentAttentionPool(trunk.attn_pool) if trunk.global_pool == "map" else None
        # pool_include_prefix: timm's ViT feeds the pooler the patches only, Eva every token
        self.pool_from = 0 if getattr(trunk, "pool_include_prefix", True) else self.n_prefix_tokens
        self.final_ln_after_pool = _is_identity(trunk.norm)
        final_norm = trunk.fc_norm if self.final_ln_after_pool else trunk.norm
        self.ln_post = None if _is_identity(final_norm) else LayerNorm(final_norm)
        self.pool_type = {"token": "tok", "avg": "avg", "map": "attn"}[trunk.global_pool]
        self.hook_pooled = HookPoint()
        self.hook_image_embed = HookPoint()

        first = self.blocks[0]
        grid = tuple(trunk.patch_embed.grid_size)
        weight, _ = self.output_affine()
        self.cfg = TowerConfig(
            tower="vision",
            n_layers=len(self.blocks),
            n_heads=first.attn.n_heads,
            d_model=trunk.embed_dim,
            d_head=first.attn.d_head,
            d_mlp=first.mlp.d_mlp,
            n_ctx=self.n_prefix_tokens + grid[0] * grid[1],
            d_embed=weight.shape[1],
            act_fn=_name(first.mlp.act),
            pool_type=self.pool_type,
            final_ln_after_pool=self.final_ln_after_pool and self.ln_post is not None,
            has_ln_pre=self.ln_pre is not None,
            layer_scale=first.attn.layer_scale is not None,
            image_size=tuple(trunk.patch_embed.img_size),
            patch_size=tuple(trunk.patch_embed.patch_size),
            grid_size=grid,
            attn_pooler_heads=None if self.attn_pool is None else self.attn_pool.n_heads,
            attn_pooler_queries=None if self.attn_pool is None else self.attn_pool.latent.shape[1],
            model_name=model_name,
            positional_embedding_type="rotary" if self.rope is not None else "standard",
            gated_mlp=isinstance(first.mlp, GatedMLP),
            n_prefix_tokens=self.n_prefix_tokens,
            dtype=self.device_weight.dtype,
            extra={"timm_model": trunk.default_cfg.get("architecture"), "attn_ln_inner": first.attn.ln_inner is not None,
                   "mlp_ln_inner": first.mlp.ln_inner is not None},
        )

    @property
    def rope(self) -> Optional[nn.Module]:
        return getattr(self.trunk, "rope", None)

    @property
    def device_weight(self) -> Tensor:
        """A parameter whose device/dtype is the tower's."""
        return self.blocks[0].attn.source.proj.weight

    def output_affine(self) -> tuple[Float[Tensor, "m E"], Optional[Float[Tensor, "E"]]]:
        """timm's classifier head and open_clip's projection after it, composed: ``pooled @ W + b``."""
        ref = self.device_weight
        weight, bias = torch.eye(self.trunk.embed_dim, device=ref.device, dtype=ref.dtype), None
        layers = [self.trunk.head] + [m for name, m in self.head.named_children() if name == "proj"]
        for layer in layers:
            if isinstance(layer, nn.Linear):
                weight = weight @ layer.weight.T
                if bias is not None:
                    bias = bias @ layer.weight.T
                if layer.bias is not None:
                    bias = layer.bias if bias is None else bias + layer.bias
        return weight, bias

    def readout_plan(self) -> ReadoutPlan:
        weight, bias = self.output_affine()
        ln_post = None if self.ln_post is None else "ln_post"
        token_norm = None if self.final_ln_after_pool else ln_post
        pooled_norm = ln_post if self.final_ln_after_pool else None
        if self.attn_pool is not None:
            return ReadoutPlan(slice(self.pool_from, None), self.attn_pool.pool_weights, weight, bias,
                               token_norm=token_norm, pooler="attn_pool", pooled_norm=pooled_norm)
        n = self.cfg.n_ctx
        if self.pool_type == "tok":
            positions, count = slice(0, 1), 1
        else:
            positions, count = slice(self.n_prefix_tokens, None), n - self.n_prefix_tokens
        pool_weights = weight.new_full((count,), 1.0 / count)
        return ReadoutPlan(positions, pool_weights, weight, bias, token_norm=token_norm, pooled_norm=pooled_norm)

    def pool(self, x: Float[Tensor, "batch n m"]) -> Float[Tensor, "batch m"]:
        if self.attn_pool is not None:
            return self.attn_pool(x[:, self.pool_from:])
        if self.pool_type == "tok":
            return x[:, 0]
        return x[:, self.n_prefix_tokens:].mean(dim=1)

    def embed(self, images: Float[Tensor, "batch 3 H W"]) -> Float[Tensor, "batch n m"]:
        """The residual stream entering block 0 (``blocks.0.hook_resid_pre``)."""
        trunk = self.trunk
        x = trunk.patch_embed(images)  # [batch, grid_h * grid_w, m]
        prefix = [t.expand(x.shape[0], -1, -1) for t in (trunk.cls_token, trunk.reg_token) if t is not None]
        embed = self.hook_embed(torch.cat([*prefix, x], dim=1))
        pos = trunk.pos_embed
        if pos is None:
            pos = embed.new_zeros(1, *embed.shape[1:])
        elif self.no_embed_class and self.n_prefix_tokens:  # no position embedding for the prefix tokens
            pos = torch.cat([pos.new_zeros(1, self.n_prefix_tokens, pos.shape[-1]), pos], dim=1)
        x = embed + self.hook_pos_embed(pos.to(x.dtype).expand(x.shape[0], -1, -1))
        return x if self.ln_pre is None else self.ln_pre(x)

    def readout(self, x: Float[Tensor, "batch n m"]) -> Float[Tensor, "batch E"]:
        """The image embedding from the final residual stream: final norm, pooling, heads."""
        if self.ln_post is not None and not self.final_ln_after_pool:
            x = self.ln_post(x)
        pooled = self.pool(x)
        if self.ln_post is not None and self.final_ln_after_pool:
            pooled = self.ln_post(pooled)
        pooled = self.hook_pooled(pooled)
        embedding = self.head(self.trunk.head(pooled))
        return self.hook_image_embed(embedding)

    def forward(
        self,
        images: Float[Tensor, "batch 3 H W"],
        start_at_layer: Optional[int] = None,
        stop_at_layer: Optional[int] = None,
    ) -> Float[Tensor, "batch E"]:
        """The image embedding; ``start_at_layer``/``stop_at_layer`` as `VisionTower.forward`."""
        layers = self.cfg.layer_range(start_at_layer, stop_at_layer)
        x = self.embed(images) if start_at_layer is None else images
        rope = None if self.rope is None else self.rope.get_embed()
        for layer in layers:
            x = self.blocks[layer](x, rope=rope) if rope is not None else self.blocks[layer](x)
        return x if stop_at_layer is not None else self.readout(x)
