"""What the convolutional image towers (ResNet, ConvNeXt, FastViT) share.

A convolutional tower has no single residual stream of fixed shape: its feature map shrinks and
widens from stage to stage. The hook contract (``docs/concepts/hooks.md``) therefore names
stages and blocks (``stages.{s}.blocks.{b}.hook_resid_pre``, ``stages.{s}.downsample.*``) with
``[batch, C, H, W]`` maps, keeps the ViT names where the concept exists (attention heads:
``attn.hook_pattern/hook_z/hook_result``; a ResNet's attention pool: ``attn_pool.*``), and gives
every tower the same two read-out hooks:

==============================  ==========================================================
``hook_spatial_tokens``         ``[batch, H·W, C]`` the last feature map as tokens, row-major
                                over ``cfg.grid_size`` (what a ViT's last-layer patch tokens are
                                to plugins: ``model.visual.spatial_hook`` names it)
``hook_image_embed``            ``[batch, E]`` the un-normalised image embedding
==============================  ==========================================================

Each family decomposes itself (``tower.decompose``): what is exact is a field of the
[`Decomposition`][clip_lens.Decomposition], what does not exist is None.
"""

from __future__ import annotations

from typing import Optional

import einops
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from clip_lens.errors import UnsupportedArchitectureError

def as_tokens(feature_map: Float[Tensor, "batch C H W"]) -> Float[Tensor, "batch HW C"]:
    """A ``[batch, C, H, W]`` map as row-major tokens ``[batch, H·W, C]``."""
    return einops.rearrange(feature_map, "b c h w -> b (h w) c")


def as_map(tokens: Float[Tensor, "batch HW C"], grid: tuple[int, int]) -> Float[Tensor, "batch C H W"]:
    """Row-major tokens ``[batch, H·W, C]`` back to a ``[batch, C, H, W]`` map."""
    return einops.rearrange(tokens, "b (h w) c -> b c h w", h=grid[0], w=grid[1])


class ConvTower(nn.Module):
    """Base of the hooked convolutional image towers.

    Subclasses set ``family``, ``cfg`` (a [`TowerConfig`][clip_lens.config.TowerConfig] with
    ``grid_size`` the final feature map's ``(H, W)``, ``d_model`` its channels,
    ``n_prefix_tokens = 0``) and implement ``features`` (pixels to the last feature map, every
    stage hooked), ``head`` (that map to the embedding) and ``decompose``.
    """

    family: str = "conv"
    spatial_hook = "hook_spatial_tokens"
    """The hook plugins read as a ViT's last-layer patch tokens: ``[batch, H·W, C]``."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_spatial_tokens = HookPoint()
        self.hook_image_embed = HookPoint()

    @property
    def device_weight(self) -> Tensor:
        """A parameter whose device/dtype is the tower's."""
        return next(self.parameters())

    def features(self, images: Float[Tensor, "batch 3 H W"]) -> Float[Tensor, "batch C h w"]:
        raise NotImplementedError

    def head(self, tokens: Float[Tensor, "batch HW C"]) -> Float[Tensor, "batch E"]:
        raise NotImplementedError

    def spatial_tokens(self, images: Float[Tensor, "batch 3 H W"]) -> Float[Tensor, "batch HW C"]:
        """The last feature map as tokens (through ``hook_spatial_tokens``)."""
        return self.hook_spatial_tokens(as_tokens(self.features(images)))

    def forward(
        self,
        images: Float[Tensor, "batch 3 H W"],
        start_at_layer: Optional[int] = None,
        stop_at_layer: Optional[int] = None,
    ) -> Float[Tensor, "batch E"]:
        self.refuse_layer_range(start_at_layer, stop_at_layer)
        return self.hook_image_embed(self.head(self.spatial_tokens(images)))

    def refuse_layer_range(self, start_at_layer: Optional[int], stop_at_layer: Optional[int]) -> None:
        """Raise for TransformerLens' ``start_at_layer``/``stop_at_layer``: there is no residual stream
        of fixed shape to start or stop at."""
        if start_at_layer is not None or stop_at_layer is not None:
            raise UnsupportedArchitectureError(
                f"start_at_layer/stop_at_layer need one residual stream of fixed shape; a {self.family} tower's "
                "feature map changes shape from stage to stage. Patch a stage's hook instead "
                "(e.g. stages.2.blocks.0.hook_resid_pre), or use model.run_with_hooks."
            )

    def readout_plan(self):
        raise UnsupportedArchitectureError(
            f"a {self.family} image tower has no transformer read-out plan; model.decompose(images) "
            "runs the tower's own exact decomposition."
        )
