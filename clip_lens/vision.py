"""The hooked image tower: an open_clip ``VisionTransformer`` with TransformerLens hooks."""

from __future__ import annotations

from typing import Optional

import einops
import torch
from jaxtyping import Float
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from clip_lens.components import AttentionalPooler, LayerNorm, TransformerBlock
from clip_lens.components.readout import ReadoutPlan
from clip_lens.config import TowerConfig
from clip_lens.errors import UnsupportedArchitectureError
from clip_lens.weights import TowerWeights


def _unsupported_visual(visual: nn.Module) -> str:
    return (f"image tower {type(visual).__name__} is not supported: HookedCLIP wraps open_clip's VisionTransformer "
            "and ModifiedResNet, and timm ViTs, ConvNeXts and FastViTs.")


class VisionTower(TowerWeights, nn.Module):
    """Hooked copy of an open_clip ``VisionTransformer`` sharing its parameters.

    Hooks, in forward order (``n = 1 + grid_h * grid_w``, ``m = d_model``, ``E = d_embed``):

    ========================================  =====================================
    ``hook_embed``                            ``[batch, n, m]`` CLS + patch embeddings
    ``hook_pos_embed``                        ``[batch, n, m]`` positional embedding
    ``ln_pre.hook_scale/normalized``          ``[batch, n, 1]`` / ``[batch, n, m]``
    ``blocks.{l}.*``                          see `TransformerBlock`
    ``attn_pool.*`` (attentional pooler)      see `AttentionalPooler`
    ``ln_post.hook_scale/normalized``         per token, or ``[batch, 1]`` after pooling
    ``hook_pooled``                           ``[batch, m]`` (``[batch, d_out]`` with a pooler)
    ``hook_image_embed``                      ``[batch, E]`` un-normalised image embedding
    ========================================  =====================================
    """

    family = "vit"

    @property
    def spatial_hook(self) -> str:
        """The last block's ``hook_resid_post``: its last ``grid_h · grid_w`` positions are the patch tokens."""
        return f"blocks.{self.cfg.n_layers - 1}.hook_resid_post"

    def __init__(self, visual: nn.Module, model_name: str | None = None):
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise UnsupportedArchitectureError(_unsupported_visual(visual))
        if getattr(visual, "attn_pool_type", "") in ("parallel", "cascade"):
            raise UnsupportedArchitectureError(
                f"attentional_pool='{visual.attn_pool_type}' (open_clip marks it untested WIP) is not supported."
            )
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.ln_pre = None if isinstance(visual.ln_pre, nn.Identity) else LayerNorm(visual.ln_pre)
        self.blocks = nn.ModuleList(TransformerBlock.from_open_clip(b) for b in visual.transformer.resblocks)
        self.attn_pool = None if visual.attn_pool is None else AttentionalPooler(visual.attn_pool)
        self.ln_post = LayerNorm(visual.ln_post)
        self.proj = visual.proj
        self.pool_type = visual.pool_type
        self.final_ln_after_pool = bool(visual.final_ln_after_pool) and self.attn_pool is None
        self.hook_pooled = HookPoint()
        self.hook_image_embed = HookPoint()

        first = visual.transformer.resblocks[0]
        d_model = visual.transformer.width
        self.cfg = TowerConfig(
            tower="vision",
            n_layers=len(self.blocks),
            n_heads=first.attn.num_heads,
            d_model=d_model,
            d_head=first.attn.head_dim,
            d_mlp=first.mlp.c_fc.out_features,
            n_ctx=self.positional_embedding.shape[0],
            d_embed=None if self.proj is None else self.proj.shape[1],
            act_fn=type(first.mlp.gelu).__name__,
            pool_type="attn" if self.attn_pool is not None else self.pool_type,
            final_ln_after_pool=self.final_ln_after_pool,
            has_ln_pre=self.ln_pre is not None,
            layer_scale=self.blocks[0].attn.layer_scale is not None,
            image_size=tuple(visual.image_size),
            patch_size=tuple(visual.patch_size),
            grid_size=tuple(visual.grid_size),
            n_prefix_tokens=1,
            attn_pooler_heads=None if self.attn_pool is None else self.attn_pool.n_heads,
            attn_pooler_queries=None if self.attn_pool is None else self.attn_pool.query.shape[0],
            model_name=model_name,
            dtype=self.conv1.weight.dtype,
        )

    @property
    def device_weight(self) -> Tensor:
        """A parameter whose device/dtype is the tower's."""
        return self.conv1.weight

    def output_affine(self) -> tuple[Float[Tensor, "m E"], None]:
        """The projection after pooling (identity without one): ``pooled @ W``."""
        if self.proj is not None:
            return self.proj, None
        ln = self.ln_post.weight
        return torch.eye(ln.shape[0], device=ln.device, dtype=ln.dtype), None

    def _pool_weights(self, n: int) -> Tensor:
        """Weights of open_clip's pooling over ``n`` tokens (or queries): the first, or the mean of the rest."""
        weights = self.device_weight.new_zeros(n)
        if self.pool_type == "tok":
            weights[0] = 1.0
        elif self.pool_type == "avg":
            weights[1:] = 1.0 / (n - 1)
        else:
            raise UnsupportedArchitectureError(
                f"pool_type='{self.pool_type}' returns one embedding per token; decompose() needs a pooled image embedding."
            )
        return weights

    def readout_plan(self) -> ReadoutPlan:
        weight, bias = self.output_affine()
        if self.attn_pool is not None:  # CoCa: ln_k per token, ln_post per query, then pooling
            n_queries = self.attn_pool.query.shape[0]
            return ReadoutPlan(slice(None), self._pool_weights(n_queries), weight, bias, token_norm="attn_pool.ln_k",
                               pooler="attn_pool", query_norm="ln_post")
        weights = self._pool_weights(self.cfg.n_ctx)
        positions = slice(0, 1) if self.pool_type == "tok" else slice(1, None)
        norm = "pooled_norm" if self.final_ln_after_pool else "token_norm"
        return ReadoutPlan(positions, weights[positions], weight, bias, **{norm: "ln_post"})

    def pool(self, x: Float[Tensor, "batch n m"]) -> Float[Tensor, "batch m"]:
        if self.pool_type == "avg":
            return x[:, 1:].mean(dim=1)
        if self.pool_type == "tok":
            return x[:, 0]
        return x

    def embed(self, images: Float[Tensor, "batch 3 H W"]) -> Float[Tensor, "batch n m"]:
        """The residual stream entering block 0 (``blocks.0.hook_resid_pre``)."""
        x = self.conv1(images)
        x = einops.rearrange(x, "b m gh gw -> b (gh gw) m")
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        embed = self.hook_embed(torch.cat([cls, x], dim=1))
        pos = self.hook_pos_embed(self.positional_embedding.to(x.dtype).expand(x.shape[0], -1, -1))
        x = embed + pos
        return x if self.ln_pre is None else self.ln_pre(x)

    def readout(self, x: Float[Tensor, "batch n m"]) -> Float[Tensor, "batch E"]:
        """The image embedding from the final residual stream: ``ln_post``, pooling, projection."""
        if self.attn_pool is not None:
            pooled = self.pool(self.ln_post(self.attn_pool(x)))
        elif self.final_ln_after_pool:
            pooled = self.ln_post(self.pool(x))
        else:
            pooled = self.pool(self.ln_post(x))
        pooled = self.hook_pooled(pooled)
        if self.proj is not None:
            pooled = pooled @ self.proj
        return self.hook_image_embed(pooled)

    def forward(
        self,
        images: Float[Tensor, "batch 3 H W"],
        start_at_layer: Optional[int] = None,
        stop_at_layer: Optional[int] = None,
    ) -> Float[Tensor, "batch E"]:
        """The image embedding; TransformerLens' ``start_at_layer`` (then ``images`` is the residual
        stream ``[batch, n, m]`` entering that block) and ``stop_at_layer`` (returns the residual
        stream entering that block, ``[batch, n, m]``)."""
        layers = self.cfg.layer_range(start_at_layer, stop_at_layer)
        x = self.embed(images) if start_at_layer is None else images
        for layer in layers:
            x = self.blocks[layer](x)
        return x if stop_at_layer is not None else self.readout(x)
