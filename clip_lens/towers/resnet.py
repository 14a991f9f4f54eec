"""The hooked ResNet image tower: open_clip's ``ModifiedResNet`` (RN50, RN101, RN50x4/x16/x64).

The tower is a three-convolution stem, four stages of bottleneck blocks and an attention pool.
BatchNorm runs in eval mode, where it is a fixed per-channel affine map, so the wrapped conv/BN
modules are called as they are (parameters shared with the open_clip model).

A bottleneck block (``s`` = stage, ``b`` = block)::

    resid_post = ReLU( bn3(conv3(pool(ReLU(bn2(conv2(ReLU(bn1(conv1(x))))))))) + shortcut(x) )

with ``shortcut`` the identity, or ``avgpool → 1×1 conv → bn`` where the block changes shape.
The ReLU *after* the residual add makes every block non-linear in its own output: there is no
residual stream that blocks write to additively, hence no per-block direct terms.

The attention pool reads the last feature map as tokens ``f_p`` (``p = 1 … HW``, row-major),
prepends their mean ``f_0 = (1/HW) Σ_p f_p`` and adds a learned positional embedding ``pos_t``.
Only the mean token's output is kept, so one query attends to ``1 + HW`` keys::

    x_t     = f_t + pos_t
    A[h, t] = softmax_t( (x_0 W_Q^h + b_Q^h) · (x_t W_K^h + b_K^h) / √d_head )
    embed   = Σ_h Σ_t A[h, t] (x_t W_V^h + b_V^h) W_O^h + b_O

(``W_O``/``b_O`` are the pool's ``c_proj``: nothing follows it). With the pattern ``A`` frozen at
its forward value the embedding is linear in ``x``, which `ResNetTower.decompose` splits exactly:
per head, per spatial position (the mean token's share spread over the positions it averages),
the positional embedding's share and the value/output biases.
"""

from __future__ import annotations

import math
from typing import Optional

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from clip_lens.components.attention import HeadAttention
from clip_lens.config import TowerConfig
from clip_lens.decompose import Decomposition, LayerSpec, _layers
from clip_lens.errors import IndexOutOfRangeError, UnsupportedArchitectureError
from clip_lens.towers.conv import ConvTower

STAGES = ("layer1", "layer2", "layer3", "layer4")


def check_resnet(visual: nn.Module) -> Optional[str]:
    """Why ``visual`` (an open_clip ``ModifiedResNet``) cannot be reproduced exactly, or None."""
    for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "avgpool", *STAGES, "attnpool"):
        if not isinstance(getattr(visual, name, None), nn.Module):
            return f"a ModifiedResNet without '{name}' (a modified open_clip?)"
    for stage in STAGES:
        for i, block in enumerate(getattr(visual, stage)):
            for act in ("act1", "act2", "act3"):
                kind = type(getattr(block, act, None)).__name__
                if kind != "ReLU":
                    return f"{stage}.{i}.{act} is {kind}, not the ReLU of open_clip's Bottleneck"
    for act in ("act1", "act2", "act3"):
        if not isinstance(getattr(visual, act, None), nn.ReLU):
            return f"the stem's {act} is not a ReLU"
    pool = visual.attnpool
    if pool.positional_embedding.shape[0] - 1 != math.isqrt(pool.positional_embedding.shape[0] - 1) ** 2:
        return "the attention pool's positional embedding is not a square grid plus one"
    return None


class PoolAttention(HeadAttention):
    """The attention pool's multi-head attention, head by head, from its ``q_proj``/``k_proj``/
    ``v_proj``/``c_proj`` (TransformerLens layout: ``W_Q/W_K/W_V [h, C, d]``, ``W_O [h, d, E]``).

    Only the query of the mean token (position 0) is computed: it is the only output open_clip
    keeps. The pattern is always materialised (no fused kernel), so every hook is exact.

    Hooks (``n = 1 + H·W``): ``hook_q [batch, 1, h, d]``, ``hook_k``/``hook_v [batch, n, h, d]``,
    ``hook_attn_scores``/``hook_pattern [batch, h, 1, n]``, ``hook_z [batch, 1, h, d]``,
    ``hook_result [batch, 1, h, E]`` (``z_h W_O^h``, without ``b_O``).
    """

    def __init__(self, pool: nn.Module):
        d_model = pool.q_proj.in_features
        super().__init__(pool.num_heads, d_model, d_model // pool.num_heads)
        self.q_proj, self.k_proj, self.v_proj, self.c_proj = pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj
        self.d_out = pool.c_proj.out_features

    def _linear(self, which: int) -> nn.Linear:
        return (self.q_proj, self.k_proj, self.v_proj)[which]

    @property
    def W_Q(self) -> Float[Tensor, "h m d"]:
        return einops.rearrange(self.q_proj.weight, "(h d) m -> h m d", h=self.n_heads)

    @property
    def W_K(self) -> Float[Tensor, "h m d"]:
        return einops.rearrange(self.k_proj.weight, "(h d) m -> h m d", h=self.n_heads)

    @property
    def W_V(self) -> Float[Tensor, "h m d"]:
        return einops.rearrange(self.v_proj.weight, "(h d) m -> h m d", h=self.n_heads)

    b_Q = property(lambda self: einops.rearrange(self.q_proj.bias, "(h d) -> h d", h=self.n_heads))
    b_K = property(lambda self: einops.rearrange(self.k_proj.bias, "(h d) -> h d", h=self.n_heads))
    b_V = property(lambda self: einops.rearrange(self.v_proj.bias, "(h d) -> h d", h=self.n_heads))

    @property
    def W_O(self) -> Float[Tensor, "h d E"]:
        return einops.rearrange(self.c_proj.weight, "e (h d) -> h d e", h=self.n_heads)

    @property
    def b_O(self) -> Float[Tensor, "E"]:
        return self.c_proj.bias

    def project(self, x: Float[Tensor, "batch n m"], which: int) -> Float[Tensor, "batch n h d"]:
        linear = self._linear(which)
        return einops.rearrange(F.linear(x, linear.weight, linear.bias), "b n (h d) -> b n h d", h=self.n_heads)

    def fused_output(self, z: Float[Tensor, "batch n hd"]) -> Float[Tensor, "batch n E"]:
        return self.c_proj(z)

    def forward(self, x: Float[Tensor, "batch n m"]) -> Float[Tensor, "batch 1 E"]:
        q = self.hook_q(self.project(x[:, :1], 0))
        k = self.hook_k(self.project(x, 1))
        v = self.hook_v(self.project(x, 2))
        scores = self.hook_attn_scores(torch.einsum("bqhd,bkhd->bhqk", q * (1.0 / math.sqrt(self.d_head)), k))
        pattern = self.hook_pattern(scores.softmax(dim=-1))
        z = self.hook_z(torch.einsum("bhqk,bkhd->bqhd", pattern, v))
        result = self.hook_result(torch.einsum("bqhd,hde->bqhe", z, self.W_O))
        return result.sum(-2) + self.b_O


class AttentionPool(nn.Module):
    """open_clip's ``AttentionPool2d`` on row-major tokens ``[batch, H·W, C]``: the mean token is
    prepended, the positional embedding added, and the mean token's attention output returned.

    Hooks: ``hook_tokens [batch, 1+HW, C]`` (mean token, then the spatial tokens, before the
    positional embedding), ``hook_pos_embed [batch, 1+HW, C]``, ``attn.*`` (see `PoolAttention`).
    """

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.positional_embedding = pool.positional_embedding
        self.hook_tokens = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.attn = PoolAttention(pool)

    def forward(self, tokens: Float[Tensor, "batch HW C"]) -> Float[Tensor, "batch E"]:
        x = self.hook_tokens(torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1))
        pos = self.hook_pos_embed(self.positional_embedding.to(x.dtype).expand(x.shape[0], -1, -1))
        return self.attn(x + pos)[:, 0]


class Bottleneck(nn.Module):
    """A hooked open_clip ``Bottleneck`` (shared conv/BN modules; ReLUs not in place, so cached
    activations are never overwritten).

    Hooks (``P`` = planes, ``4P`` = output channels):
        hook_resid_pre ``[batch, C_in, H, W]``: the block's input.
        hook_conv1 ``[batch, P, H, W]``: ReLU(bn1(conv1(x))).
        hook_conv2 ``[batch, P, H, W]``: ReLU(bn2(conv2(·))), before the anti-aliasing average pool
        of a stride-2 block.
        hook_out ``[batch, 4P, H', W']``: the residual branch's output (bn3), before the add.
        hook_shortcut ``[batch, 4P, H', W']``: the downsample branch (avgpool, 1×1 conv, bn); only
        where the block has one (the first block of each stage).
        hook_resid_post ``[batch, 4P, H', W']``: ReLU(out + shortcut).
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.conv1, self.bn1 = block.conv1, block.bn1
        self.conv2, self.bn2 = block.conv2, block.bn2
        self.avgpool = block.avgpool
        self.conv3, self.bn3 = block.conv3, block.bn3
        self.downsample = block.downsample
        self.hook_resid_pre = HookPoint()
        self.hook_conv1 = HookPoint()
        self.hook_conv2 = HookPoint()
        self.hook_out = HookPoint()
        if self.downsample is not None:
            self.hook_shortcut = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch C H W"]) -> Float[Tensor, "batch C2 H2 W2"]:
        x = self.hook_resid_pre(x)
        h = self.hook_conv1(F.relu(self.bn1(self.conv1(x))))
        h = self.hook_conv2(F.relu(self.bn2(self.conv2(h))))
        out = self.hook_out(self.bn3(self.conv3(self.avgpool(h))))
        shortcut = x if self.downsample is None else self.hook_shortcut(self.downsample(x))
        return self.hook_resid_post(F.relu(out + shortcut))


class ResNetStage(nn.Module):
    """One of ``layer1 … layer4``: ``hook_in [batch, C, H, W]``, then its bottleneck ``blocks``."""

    def __init__(self, layer: nn.Sequential):
        super().__init__()
        self.hook_in = HookPoint()
        self.blocks = nn.ModuleList(Bottleneck(block) for block in layer)

    def forward(self, x: Float[Tensor, "batch C H W"]) -> Float[Tensor, "batch C2 H2 W2"]:
        x = self.hook_in(x)
        for block in self.blocks:
            x = block(x)
        return x


class ResNetTower(ConvTower):
    """Hooked copy of an open_clip ``ModifiedResNet`` sharing its parameters.

    Hooks, in forward order (``C`` channels of the map at that point, ``h`` pool heads of width
    ``d``, ``HW`` = positions of the last feature map, ``C_L`` its channels, ``E`` = d_embed):

    ==============================================  ==============================================
    ``hook_stem_out``                               ``[batch, C, H/4, W/4]`` three convs + avgpool
    ``stages.{s}.hook_in``                          ``[batch, C, H, W]`` (s = 0..3: layer1..layer4)
    ``stages.{s}.blocks.{b}.hook_resid_pre``        ``[batch, C_in, H, W]`` the block's input
    ``stages.{s}.blocks.{b}.hook_conv1``            ``[batch, P, H, W]`` first 1×1 conv, BN, ReLU
    ``stages.{s}.blocks.{b}.hook_conv2``            ``[batch, P, H, W]`` 3×3 conv, BN, ReLU
    ``stages.{s}.blocks.{b}.hook_out``              ``[batch, 4P, H', W']`` branch output (bn3)
    ``stages.{s}.blocks.{b}.hook_shortcut``         ``[batch, 4P, H', W']`` downsample branch
                                                    (first block of a stage only)
    ``stages.{s}.blocks.{b}.hook_resid_post``       ``[batch, 4P, H', W']`` ReLU(out + shortcut)
    ``hook_spatial_tokens``                         ``[batch, HW, C_L]`` layer4's output, row-major
    ``attn_pool.hook_tokens``                       ``[batch, 1+HW, C_L]`` mean token, then spatial
    ``attn_pool.hook_pos_embed``                    ``[batch, 1+HW, C_L]`` positional embedding
    ``attn_pool.attn.hook_q``                       ``[batch, 1, h, d]`` (the mean token's query)
    ``attn_pool.attn.hook_k`` / ``hook_v``          ``[batch, 1+HW, h, d]``
    ``attn_pool.attn.hook_attn_scores``             ``[batch, h, 1, 1+HW]`` scaled dot products
    ``attn_pool.attn.hook_pattern``                 ``[batch, h, 1, 1+HW]`` softmax of the scores
    ``attn_pool.attn.hook_z``                       ``[batch, 1, h, d]``
    ``attn_pool.attn.hook_result``                  ``[batch, 1, h, E]`` per head through c_proj
                                                    (without its bias)
    ``hook_image_embed``                            ``[batch, E]`` the un-normalised embedding
    ==============================================  ==============================================

    ``cfg`` treats the attention pool as the tower's one attention layer (heads ``L0H{h}``,
    ``n_ctx = 1 + HW``); ``cfg.extra`` holds ``stage_depths``, ``stage_channels`` and ``width``.
    """

    family = "resnet"

    def __init__(self, visual: nn.Module, model_name: Optional[str] = None):
        super().__init__()
        # re-registered below so that hook_dict lists the hooks in forward order
        spatial_hook, embed_hook = self._modules.pop("hook_spatial_tokens"), self._modules.pop("hook_image_embed")
        problem = check_resnet(visual)
        if problem is not None:
            raise UnsupportedArchitectureError(f"cannot hook this ResNet image tower: {problem}.")
        self.conv1, self.bn1 = visual.conv1, visual.bn1
        self.conv2, self.bn2 = visual.conv2, visual.bn2
        self.conv3, self.bn3 = visual.conv3, visual.bn3
        self.avgpool = visual.avgpool
        self.hook_stem_out = HookPoint()
        self.stages = nn.ModuleList(ResNetStage(getattr(visual, stage)) for stage in STAGES)
        self.hook_spatial_tokens = spatial_hook
        self.attn_pool = AttentionPool(visual.attnpool)
        self.hook_image_embed = embed_hook

        pool = self.attn_pool.attn
        side = math.isqrt(self.attn_pool.positional_embedding.shape[0] - 1)
        image_size = visual.image_size
        image_size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        self.cfg = TowerConfig(
            tower="vision",
            n_layers=1,
            n_heads=pool.n_heads,
            d_model=pool.d_model,
            d_head=pool.d_head,
            d_mlp=0,
            n_ctx=1 + side * side,
            d_embed=pool.d_out,
            act_fn="ReLU",
            pool_type="attn",
            image_size=image_size,
            patch_size=None,
            grid_size=(side, side),
            n_prefix_tokens=0,
            attn_pooler_heads=pool.n_heads,
            attn_pooler_queries=1,
            model_name=model_name,
            dtype=self.conv1.weight.dtype,
            extra={
                "family": "resnet",
                "stage_depths": [len(stage.blocks) for stage in self.stages],
                "stage_channels": [stage.blocks[-1].bn3.num_features for stage in self.stages],
                "width": self.conv3.out_channels,
            },
        )

    @property
    def device_weight(self) -> Tensor:
        return self.conv1.weight

    # --- forward --------------------------------------------------------------------------------
    def stem(self, images: Float[Tensor, "batch 3 H W"]) -> Float[Tensor, "batch C h w"]:
        x = F.relu(self.bn1(self.conv1(images)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.hook_stem_out(self.avgpool(x))

    def features(self, images: Float[Tensor, "batch 3 H W"]) -> Float[Tensor, "batch C h w"]:
        x = self.stem(images)
        for stage in self.stages:
            x = stage(x)
        return x

    def head(self, tokens: Float[Tensor, "batch HW C"]) -> Float[Tensor, "batch E"]:
        return self.attn_pool(tokens)

    # --- decomposition -------------------------------------------------------------------------
    @staticmethod
    def _pool_layers(spec: LayerSpec, what: str) -> list[int]:
        try:
            return _layers(spec, 1, what)
        except IndexOutOfRangeError as exc:
            raise IndexOutOfRangeError(
                f"{exc} A ResNet image tower has one attention layer, its attention pool (layer 0): "
                f"heads=0 gives per-head terms (L0H0 …), tokens=0 splits them over the final feature map's "
                f"positions (plus pos_embed per head). The bottleneck blocks end in a ReLU after their residual "
                f"add, so they have no direct terms."
            ) from None

    def decompose(
        self,
        model,
        images: Float[Tensor, "batch 3 H W"],
        *,
        heads: LayerSpec = "all",
        tokens: LayerSpec = None,
        directions: Optional[Float[Tensor, "n_directions E"]] = None,
    ) -> Decomposition:
        """Exact direct contributions of the attention pool to the image embedding.

        With the pool's pattern ``A[h, t]`` frozen at its forward value (``t = 0`` the mean token,
        ``t = 1 … HW`` the spatial tokens ``f_p``, positional embedding ``pos_t``)::

            embedding   = Σ_h heads[h] + b_O                              (= attn; attn_bias = b_O)
            heads[h]    = Σ_p tokens[h, p] + pos_embed[h] + b_V^h W_O^h
            tokens[h,p] = (A[h, p] + A[h, 0] / HW) · f_p W_V^h W_O^h      (the mean token's share
                                                                          spread over the positions)
            pos_embed[h] = Σ_t A[h, t] · pos_t W_V^h W_O^h
            positions[p] = Σ_h tokens[h, p]

        ``W_O``/``b_O`` are the pool's ``c_proj``, the last map of the tower (no LayerNorm follows).
        ``embed``, ``mlp`` and ``bias`` are None: the bottleneck blocks end in a ReLU after their
        residual add, so no block has a direct (additive) term; everything reaches the embedding
        through the final feature map, which ``tokens``/``positions`` split by position.

        Args:
            model: the [`HookedCLIP`][clip_lens.HookedCLIP] holding this tower.
            images: validated pixels ``[batch, 3, H, W]``.
            heads: ``"all"``, 0 / [0] (the pool) or None: per-head terms (and ``pos_embed``).
            tokens: the same forms: per-head, per-position terms (and ``positions``); implies heads.
            directions: None or ``[n_directions, E]`` on the model's device and dtype; every term
                is projected on them (``out`` = n_directions), the maps projected before contracting.
        """
        token_layers = self._pool_layers(tokens, "tokens")
        head_layers = sorted(set(self._pool_layers(heads, "heads")) | set(token_layers))
        store: dict[str, Tensor] = {}

        def save(key: str):
            def hook(activation: Tensor, hook) -> None:
                store[key] = activation

            return hook

        fwd_hooks = [
            ("attn_pool.hook_tokens", save("tokens")),
            ("attn_pool.hook_pos_embed", save("pos")),
            ("attn_pool.attn.hook_pattern", save("pattern")),
            ("hook_image_embed", save("embedding")),
        ]
        dtype = self.device_weight.dtype
        with torch.no_grad():
            with model.hooks(fwd_hooks=fwd_hooks):
                self(images)
            # The read-out runs in the weights' precision even under autocast (small per-token
            # terms would lose their low bits in fp16).
            with torch.autocast(images.device.type, enabled=False):
                store = {key: value.to(dtype) for key, value in store.items()}
                return self._contributions(store, head_layers, token_layers, directions)

    def _contributions(
        self, store: dict[str, Tensor], head_layers: list[int], token_layers: list[int], directions: Optional[Tensor]
    ) -> Decomposition:
        attn = self.attn_pool.attn
        features = store["tokens"][:, 1:]  # [batch, HW, C]: f_p (the mean token is spread over them)
        pos = store["pos"]  # [batch, 1+HW, C]
        pattern = store["pattern"][:, :, 0]  # [batch, h, 1+HW]: the one query's row
        embedding = store["embedding"]
        n_positions = features.shape[1]

        W_V, b_V, W_O, b_O = attn.W_V, attn.b_V, attn.W_O, attn.b_O
        embedding_norm = embedding.norm(dim=-1)
        if directions is not None:  # contract early: project the output maps once
            W_O = W_O @ directions.T  # [h, d, n_directions]
            b_O = b_O @ directions.T
            embedding = embedding @ directions.T
        batch = features.shape[0]

        # every position's weight per head: its own pattern entry plus its share of the mean token's
        weights = pattern[..., 1:] + pattern[..., :1] / n_positions  # [batch, h, HW]
        values = torch.einsum("bpc,hcd->bphd", features, W_V)  # f_p W_V^h, no bias
        pos_z = torch.einsum("bht,bthd->bhd", pattern, torch.einsum("btc,hcd->bthd", pos, W_V))
        pos_embed = torch.einsum("bhd,hdo->bho", pos_z, W_O)  # [batch, h, out]
        value_bias = torch.einsum("hd,hdo->ho", b_V, W_O)  # Σ_t A[h, t] = 1: b_V^h W_O^h per head

        token_terms = None
        if token_layers:
            weighted = values * einops.rearrange(weights, "b h p -> b p h 1")
            token_terms = torch.einsum("bphd,hdo->bhpo", weighted, W_O)  # [batch, h, HW, out]
            feature_part = token_terms.sum(2)
        else:
            feature_part = torch.einsum("bhd,hdo->bho", torch.einsum("bhp,bphd->bhd", weights, values), W_O)
        head_terms = feature_part + pos_embed + value_bias  # [batch, h, out]
        attn_bias = b_O.expand(batch, 1, -1)
        return Decomposition(
            embedding=embedding,
            embedding_norm=embedding_norm,
            embed=None,
            attn=(head_terms.sum(1) + b_O)[:, None],
            attn_bias=attn_bias.clone(),
            mlp=None,
            bias=None,
            heads=head_terms[:, None] if head_layers else None,
            tokens=token_terms[:, None] if token_terms is not None else None,
            head_layers=head_layers,
            token_layers=token_layers,
            projected=directions is not None,
            family="resnet",
            positions=token_terms.sum(1) if token_terms is not None else None,
            pos_embed=pos_embed if head_layers else None,
        )
