"""Hooked ConvNeXt image tower (open_clip ``convnext_*``: a ``TimmModel`` whose trunk is a timm ``ConvNeXt``).

The trunk is a stem (a patchify convolution and a LayerNorm over channels), four stages of
residual blocks and a head; open_clip adds a linear projection (or, for ``convnext_large_d``,
a two-layer MLP). Stage ``s`` owns one residual stream ``r_s`` of shape ``[C_s, H_s, W_s]``:

    r_{-1} = stem(x)                               conv(s), then LayerNorm over channels
    r_s    = D_s(r_{s-1}) + Σ_b w_{s,b}             D_s: downsample (identity where a stage has none)
    w_{s,b} = γ_ls ⊙ fc2(GELU(fc1(LN(dwconv(r)))))  block b's write, r its input
    e      = LN_head(mean_{h,w} r_last) P (+ b_P)

Inside a stage the residual adds have no activation after them. A downsample is a LayerNorm at
every position followed by a strided convolution with ``kernel == stride`` and no padding:

    D_s(u)[q] = Σ_{p ∈ patch(q)} W_{p−q} (γ_s ⊙ (u[p] − mean(u[p])) / σ_s[p] + β_s) + b_s

With every downsample scale ``σ_s[p]`` and the head scale ``σ_head`` frozen at their values in the
forward pass, ``D_s = A_s + c_s`` (``A_s`` linear, ``c_s = Σ_k W_k β_s + b_s`` the same at every cell)
and the head is linear too, so the embedding splits exactly into

    e = embed + Σ_{s,b} blocks[s,b] + bias
    embed       = H(A_last ⋯ A_0(stem output))
    blocks[s,b] = H(A_last ⋯ A_{s+1}(w_{s,b}))
    bias        = Σ_s H(A_last ⋯ A_{s+1}(c_s)) + β_head·P + b_P
    H(m)        = (C(mean_{h,w} m) ⊙ γ_head) P / σ_head           (C: subtract the channel mean)

Centring is linear, so each term is centred on its own. Because ``kernel == stride``, every
position of a stage's grid lies inside exactly one cell of the final ``[H, W]`` map, and ``A_s``
acts on each patch separately: a block's write carried to the final map, read cell by cell
(``H`` of one cell is ``(C(m[q]) ⊙ γ_head) P / (σ_head · H·W)``), splits its term over the final
positions (``block_positions``); the stem and every block together give ``positions``.

The carried maps stay in channel space (``[batch, component, C_last, H, W]``, a few blocks at a
time) until the head, so nothing of shape ``[batch, block, H_own, W_own, E]`` is built;
``directions`` project ``P`` once.
The MLP projection head (``timm_proj="mlp"``) is not linear: such towers are hooked exactly but
``decompose`` refuses them.
"""

from __future__ import annotations

from typing import Optional

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from clip_lens.components.layer_norm import LayerNorm, hooks_active
from clip_lens.config import TowerConfig
from clip_lens.decompose import Decomposition, LayerSpec, _centre, _layers, _norm_bias, _through_norm
from clip_lens.errors import InputError, UnsupportedArchitectureError
from clip_lens.towers.conv import ConvTower, as_tokens

TIMM_NORMS = ("LayerNorm", "LayerNorm2d")
"""timm's LayerNorm classes (channels-last and channels-first): the only norms reproduced."""
STEM_LAYERS = ("Conv2d", "GELU")
CLIP_HEAD = ("drop", "proj", "mlp")


def _name(module: Optional[nn.Module]) -> str:
    return type(module).__name__


def _is_identity(module: Optional[nn.Module]) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _norm_problem(norm: nn.Module, where: str) -> Optional[str]:
    if _name(norm) not in TIMM_NORMS:
        return f"{where} normalisation {_name(norm)} (only timm's LayerNorm/LayerNorm2d are reproduced)"
    if getattr(norm, "weight", None) is None:
        return f"{where} LayerNorm without elementwise affine"
    return None


def _downsample_problem(downsample: nn.Module, where: str) -> Optional[str]:
    """A downsample must be LayerNorm → a conv whose patches do not overlap (kernel == stride, no padding)."""
    if _is_identity(downsample):
        return None
    if not isinstance(downsample, nn.Sequential) or len(downsample) != 2:
        return f"{where} downsample {_name(downsample)} (expected LayerNorm2d then a strided convolution)"
    norm, conv = downsample
    problem = _norm_problem(norm, f"{where} downsample")
    if problem:
        return problem
    if _name(conv) != "Conv2d":
        return f"{where} downsample convolution {_name(conv)}"
    if (
        tuple(conv.kernel_size) != tuple(conv.stride) or conv.padding not in ((0, 0), 0)
        or tuple(conv.dilation) != (1, 1) or conv.groups != 1
    ):
        return (
            f"{where} downsample with overlapping or padded patches (kernel {tuple(conv.kernel_size)}, stride "
            f"{tuple(conv.stride)}, padding {conv.padding}, dilation {tuple(conv.dilation)}, groups {conv.groups})"
        )
    return None


def _mlp_problem(mlp: nn.Module, where: str) -> Optional[str]:
    if _name(mlp) == "GlobalResponseNormMlp":
        return f"{where} MLP with Global Response Norm (ConvNeXt-V2 GRN)"
    if _name(mlp) != "Mlp":
        return f"{where} MLP {_name(mlp)}"
    if not _is_identity(mlp.norm):
        return f"{where} MLP with a norm {_name(mlp.norm)}"
    return None


def check_convnext(trunk: nn.Module, visual: Optional[nn.Module] = None) -> Optional[str]:
    """Why a timm ``ConvNeXt`` trunk (and open_clip's head around it) cannot be hooked exactly, or None.

    Reads only the module tree and flags, so it works on a model built on the meta device.
    """
    if _name(trunk) != "ConvNeXt":
        return f"trunk {_name(trunk)} (expected ConvNeXt)"
    stem = list(trunk.stem)
    if not stem or any(_name(m) not in STEM_LAYERS for m in stem[:-1]):
        return f"stem ({', '.join(_name(m) for m in stem)}; expected convolutions then LayerNorm2d)"
    problem = _norm_problem(stem[-1], "stem")
    if problem:
        return problem
    if not _is_identity(trunk.norm_pre):
        return "head_norm_first (a LayerNorm before pooling)"
    for s, stage in enumerate(trunk.stages):
        where = f"stage {s}"
        if _name(stage) != "ConvNeXtStage":
            return f"{where} {_name(stage)}"
        problem = _downsample_problem(stage.downsample, where)
        if problem:
            return problem
        for b, block in enumerate(stage.blocks):
            where = f"stage {s} block {b}"
            if _name(block) != "ConvNeXtBlock":
                return f"block type {_name(block)} ({where})"
            if not _is_identity(block.shortcut):
                return f"a block shortcut {_name(block.shortcut)} ({where})"
            problem = _norm_problem(block.norm, where) or _mlp_problem(block.mlp, where)
            if problem:
                return problem
    head = trunk.head
    if _name(head) != "NormMlpClassifierHead":
        return f"timm head {_name(head)}"
    pool = getattr(head.global_pool, "pool_type", _name(head.global_pool))
    if pool != "avg":
        return f"global_pool='{pool}' (only 'avg' is reproduced)"
    problem = _norm_problem(head.norm, "head")
    if problem:
        return problem
    if not _is_identity(head.pre_logits):
        return "a hidden layer in timm's head (head_hidden_size)"
    if visual is not None:  # open_clip resets timm's classifier; a bare trunk (meta check) still has one
        if not _is_identity(head.fc):
            return f"timm classifier {_name(head.fc)} kept in front of open_clip's head"
        for name, module in visual.head.named_children():
            if name not in CLIP_HEAD:
                return f"open_clip head '{name}' ({_name(module)}; only a linear or MLP projection is reproduced)"
            if name == "mlp":
                problem = _mlp_problem(module, "open_clip head")
                if problem:
                    return problem
    return None


def _out_size(size: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int]:
    """A convolution's output ``(H, W)`` for an input of ``size``."""
    return tuple(
        (n + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1
        for i, n in enumerate(size)
    )


class LayerNorm2d(LayerNorm):
    """LayerNorm over the channels (dim 1) of a map ``[batch, C, H, W]`` or a vector ``[batch, C]``.

    Hooks: ``hook_scale`` ``[batch, 1, H, W]`` (``[batch, 1]`` for a vector), ``sqrt(var_C + eps)``
    at each position; ``hook_normalized``, same shape as the input, the affine applied. Shares the
    weight and bias of timm's ``LayerNorm`` (channels-last, in a block) or ``LayerNorm2d``.
    """

    def forward(self, x: Float[Tensor, "batch C *hw"]) -> Float[Tensor, "batch C *hw"]:
        if hooks_active(self.hook_scale):
            centred = x - x.mean(1, keepdim=True)
            scale = self.hook_scale((centred.pow(2).mean(1, keepdim=True) + self.eps).sqrt())
            affine = [-1] + [1] * (x.ndim - 2)
            out = centred / scale * self.weight.view(affine)
            if self.bias is not None:
                out = out + self.bias.view(affine)
        else:  # timm's kernel: channels last
            out = F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps).movedim(-1, 1)
        return self.hook_normalized(out)


class ConvNeXtMLP(nn.Module):
    """``fc2(act(fc1(x)))`` of a timm/open_clip ``Mlp`` (shared), hooked.

    Hooks: ``hook_pre`` (after ``fc1``) and ``hook_post`` (after the activation), ``[batch, d_mlp, H, W]``
    in a block, ``[batch, d_mlp]`` in the projection head. A block's ``Linear`` layers run
    channels-last, as timm runs them (its ``conv_mlp`` 1×1 convolutions run on the map).
    """

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.fc1, self.act, self.fc2 = mlp.fc1, mlp.act, mlp.fc2
        self.d_mlp = mlp.fc1.out_channels if isinstance(mlp.fc1, nn.Conv2d) else mlp.fc1.out_features
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    @staticmethod
    def _layer(layer: nn.Module, x: Tensor) -> Tensor:
        if isinstance(layer, nn.Linear) and x.ndim == 4:  # a Linear reads the channels last
            return layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return layer(x)

    def forward(self, x: Float[Tensor, "batch C *hw"]) -> Float[Tensor, "batch C_out *hw"]:
        pre = self.hook_pre(self._layer(self.fc1, x))
        post = self.hook_post(self.act(pre))
        return self._layer(self.fc2, post)


class ConvNeXtBlock(nn.Module):
    """One timm ``ConvNeXtBlock``: ``x + γ ⊙ MLP(LN(dwconv(x)))`` (hooks in the tower's table)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.hook_resid_pre = HookPoint()  # registered in forward order (the hook listing follows it)
        self.conv_dw = block.conv_dw
        self.hook_dwconv = HookPoint()
        self.ln = LayerNorm2d(block.norm)
        self.mlp = ConvNeXtMLP(block.mlp)
        self.gamma = block.gamma  # LayerScale (None without)
        self.hook_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch C H W"]) -> Float[Tensor, "batch C H W"]:
        x = self.hook_resid_pre(x)
        h = self.mlp(self.ln(self.hook_dwconv(self.conv_dw(x))))
        if self.gamma is not None:
            h = h * self.gamma.view(-1, 1, 1)
        return self.hook_resid_post(x + self.hook_out(h))


class ConvNeXtDownsample(nn.Module):
    """A stage's downsample: LayerNorm at each position, then a convolution with ``kernel == stride``."""

    def __init__(self, downsample: nn.Sequential):
        super().__init__()
        self.ln = LayerNorm2d(downsample[0])
        self.conv = downsample[1]
        self.hook_out = HookPoint()

    def constant(self) -> Float[Tensor, "C_out"]:
        """``Σ_k W_k β + b``: what the LayerNorm bias and the conv bias add at every output cell."""
        weight = self.conv.weight
        out = weight.new_zeros(weight.shape[0]) if self.conv.bias is None else self.conv.bias
        if self.ln.bias is not None:
            out = out + torch.einsum("oihw,i->o", weight, self.ln.bias)
        return out

    def carry(
        self, maps: Float[Tensor, "batch k C H W"], scale: Float[Tensor, "batch 1 H W"]
    ) -> Float[Tensor, "batch k C_out h w"]:
        """The linear part of the downsample with its LayerNorm scale frozen, on ``k`` maps per image."""
        normed = _centre(maps, 2) * self.ln.weight.view(-1, 1, 1) / scale[:, None]
        conv = self.conv
        out = F.conv2d(normed.flatten(0, 1), conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        return out.unflatten(0, normed.shape[:2])  # maps may broadcast against the per-image scale

    def forward(self, x: Float[Tensor, "batch C H W"]) -> Float[Tensor, "batch C_out h w"]:
        return self.hook_out(self.conv(self.ln(x)))


class ConvNeXtStage(nn.Module):
    """A stage: optional downsample, then residual blocks on one ``[C, H, W]`` stream."""

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.hook_in = HookPoint()
        self.downsample = None if _is_identity(stage.downsample) else ConvNeXtDownsample(stage.downsample)
        self.blocks = nn.ModuleList(ConvNeXtBlock(b) for b in stage.blocks)

    def forward(self, x: Float[Tensor, "batch C H W"]) -> Float[Tensor, "batch C_out h w"]:
        x = self.hook_in(x)
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class ConvNeXtStem(nn.Module):
    """The stem's convolution(s), then its LayerNorm over channels (``stem.ln``)."""

    def __init__(self, stem: nn.Sequential):
        super().__init__()
        self.layers = nn.Sequential(*list(stem)[:-1])
        self.ln = LayerNorm2d(stem[-1])

    def forward(self, images: Float[Tensor, "batch 3 H W"]) -> Float[Tensor, "batch C h w"]:
        return self.ln(self.layers(images))


class ConvNeXtHead(nn.Module):
    """The read-out after pooling: ``ln`` (timm's head norm) and open_clip's ``proj`` or ``mlp``."""

    def __init__(self, trunk_head: nn.Module, clip_head: nn.Module):
        super().__init__()
        self.ln = LayerNorm2d(trunk_head.norm)
        children = dict(clip_head.named_children())
        self.proj = children.get("proj")
        self.mlp = ConvNeXtMLP(children["mlp"]) if "mlp" in children else None

    @property
    def d_embed(self) -> int:
        if self.mlp is not None:
            return self.mlp.fc2.out_features
        return self.proj.out_features if self.proj is not None else self.ln.weight.shape[0]

    def project(self, pooled: Float[Tensor, "batch C"]) -> Float[Tensor, "batch E"]:
        if self.mlp is not None:
            return self.mlp(pooled)
        return pooled if self.proj is None else self.proj(pooled)


class ConvNeXtTower(ConvTower):
    """A timm ConvNeXt image tower with TransformerLens hooks, sharing open_clip's parameters.

    Maps are ``[batch, C, H, W]`` (``C``, ``H``, ``W`` those of the stage); ``s`` counts stages, ``b``
    blocks within a stage. A LayerNorm's ``hook_scale`` is ``[batch, 1, H, W]`` (one scale per position).

    ============================================  ==============================================================
    ``stem.ln.hook_scale`` / ``hook_normalized``   the stem's LayerNorm over channels
    ``hook_stem_out``                              ``[batch, C_0, H_0, W_0]`` the stem output (``embed`` term)
    ``stages.{s}.hook_in``                         the stage's input, before its downsample
    ``stages.{s}.downsample.ln.hook_scale``        ``[batch, 1, H, W]`` (stages with a downsample; ``hook_normalized`` too)
    ``stages.{s}.downsample.hook_out``             after the strided convolution: the stage's stream starts here
    ``stages.{s}.blocks.{b}.hook_resid_pre``       the block's input
    ``stages.{s}.blocks.{b}.hook_dwconv``          after the 7×7 depthwise convolution
    ``stages.{s}.blocks.{b}.ln.hook_scale``        ``[batch, 1, H, W]``; ``ln.hook_normalized`` ``[batch, C, H, W]``
    ``stages.{s}.blocks.{b}.mlp.hook_pre``         ``[batch, d_mlp, H, W]`` after ``fc1``
    ``stages.{s}.blocks.{b}.mlp.hook_post``        ``[batch, d_mlp, H, W]`` after GELU
    ``stages.{s}.blocks.{b}.hook_out``             the block's write to the stream (after LayerScale)
    ``stages.{s}.blocks.{b}.hook_resid_post``      ``hook_resid_pre + hook_out``
    ``hook_spatial_tokens``                        ``[batch, H·W, C]`` the last map as row-major tokens
    ``head.ln.hook_scale`` / ``hook_normalized``   ``[batch, 1]`` / ``[batch, C]``: LayerNorm of the average-pooled vector
    ``hook_pooled``                                ``[batch, C]`` after the head LayerNorm
    ``head.mlp.hook_pre`` / ``hook_post``          ``[batch, 2E]`` (``timm_proj="mlp"`` only)
    ``hook_image_embed``                           ``[batch, E]`` the un-normalised embedding
    ============================================  ==============================================================

    ``cfg.extra``: ``stage_depths``, ``stage_dims``, ``block_labels`` (``"S{s}B{b}"``, the order of
    ``Decomposition.blocks``). ``decompose`` is exact with the downsample and head LayerNorm scales
    frozen (module docstring); the stem output and the blocks are its terms.
    """

    family = "convnext"

    @property
    def decomposition_layer_counts(self) -> tuple[int, int]:
        """No attention heads; one token layer (``block_positions``) per block (see `decomposition_layers`)."""
        return 0, len(self.stage_blocks)

    def __init__(self, visual: nn.Module, model_name: Optional[str] = None):
        super().__init__()
        trunk = visual.trunk
        problem = check_convnext(trunk, visual)
        if problem:
            raise UnsupportedArchitectureError(f"ConvNeXt image tower with {problem} is not reproduced exactly.")
        self.trunk = trunk
        self.stem = ConvNeXtStem(trunk.stem)
        self.hook_stem_out = HookPoint()
        self.stages = nn.ModuleList(ConvNeXtStage(stage) for stage in trunk.stages)
        # `head` is the base class's method (last map -> embedding); a submodule of the same name holds its
        # hooked parts so that the hooks read head.ln.* and head.mlp.* (add_module refuses the clash)
        self._modules["head"] = ConvNeXtHead(trunk.head, visual.head)
        self.hook_pooled = HookPoint()

        size = tuple(visual.image_size)
        grid = size
        for layer in self.stem.layers:
            if isinstance(layer, nn.Conv2d):
                grid = _out_size(grid, layer)
        for stage in self.stages:
            if stage.downsample is not None:
                grid = _out_size(grid, stage.downsample.conv)
        depths = [len(stage.blocks) for stage in self.stages]
        dims, width = [], self.stem.ln.weight.shape[0]
        for stage in self.stages:
            width = width if stage.downsample is None else stage.downsample.conv.out_channels
            dims.append(width)
        last = self.stage_blocks[-1]
        self.cfg = TowerConfig(
            tower="vision",
            n_layers=len(self.stage_blocks),
            n_heads=0,
            d_model=self.head_module.ln.weight.shape[0],
            d_head=0,
            d_mlp=last.mlp.d_mlp,
            n_ctx=grid[0] * grid[1],
            d_embed=self.head_module.d_embed,
            act_fn=_name(last.mlp.act),
            pool_type="avg",
            final_ln_after_pool=True,
            layer_scale=last.gamma is not None,
            image_size=size,
            patch_size=None,
            grid_size=grid,
            n_prefix_tokens=0,
            model_name=model_name,
            dtype=self.device_weight.dtype,
            extra={"family": "convnext", "stage_depths": depths, "stage_dims": dims, "block_labels": self.block_labels},
        )

    # --- structure ------------------------------------------------------------------------------
    @property
    def head_module(self) -> ConvNeXtHead:
        """The hooked head (``head.ln``, ``head.proj``/``head.mlp``); ``self.head`` is the method."""
        return self._modules["head"]

    @property
    def stage_blocks(self) -> list[ConvNeXtBlock]:
        """Every block, stage-major (the order of ``block_labels``). Not ``blocks``: HookedCLIP reads
        a tower's ``blocks`` as transformer blocks."""
        return [block for stage in self.stages for block in stage.blocks]

    @property
    def block_labels(self) -> list[str]:
        return [f"S{s}B{b}" for s, stage in enumerate(self.stages) for b in range(len(stage.blocks))]

    # --- forward ----------------------------------------------------------------------------------
    def features(self, images: Float[Tensor, "batch 3 H W"]) -> Float[Tensor, "batch C h w"]:
        x = self.hook_stem_out(self.stem(images))
        for stage in self.stages:
            x = stage(x)
        return x

    def head(self, tokens: Float[Tensor, "batch HW C"]) -> Float[Tensor, "batch E"]:
        head = self.head_module
        pooled = self.hook_pooled(head.ln(tokens.mean(1)))
        return head.project(pooled)

    # --- decomposition ----------------------------------------------------------------------------
    DECOMPOSE_CHUNK = 8
    """Block writes carried to the final map together (bounds the decomposition's extra memory)."""

    def _carry(
        self, maps: Float[Tensor, "batch k C H W"], first: int, scales: dict[int, Tensor]
    ) -> Float[Tensor, "batch k C_last h w"]:
        """``maps`` through the linear part of every downsample from stage ``first`` on (scales frozen)."""
        for s in range(first, len(self.stages)):
            if self.stages[s].downsample is not None:
                maps = self.stages[s].downsample.carry(maps, scales[s])
        return maps

    def decompose(
        self,
        model,
        images: Float[Tensor, "batch 3 H W"],
        *,
        heads: LayerSpec = "all",
        tokens: LayerSpec = None,
        directions: Optional[Float[Tensor, "n_directions E"]] = None,
    ) -> Decomposition:
        """Exact terms of the image embedding: ``embed`` (stem output), ``blocks`` (one per block,
        ``block_labels``) and ``bias``; with ``tokens`` (``"all"`` or indices into ``block_labels``)
        also ``block_positions`` ``[batch, block, H·W, out]`` per final cell, and always ``positions``
        ``[batch, H·W, out]`` (stem + every block per final cell, ``positions.sum(1) == total() − bias``).

        Called by [`clip_lens.decompose`][clip_lens.decompose] after it validated ``images`` and ``directions``,
        under ``torch.no_grad()``.
        """
        if heads is not None and not (isinstance(heads, str) and heads == "all"):
            raise InputError(
                f"heads={heads!r}: a ConvNeXt image tower has no attention heads; pass heads='all' (the default) "
                "or None. Its terms are embed (the stem output), blocks (one per block, parts.block_labels) and "
                "bias; per-position terms are block_positions and positions (tokens='all' or block indices)."
            )
        head = self.head_module
        if head.mlp is not None:
            raise UnsupportedArchitectureError(
                "this ConvNeXt tower projects with an MLP (timm_proj='mlp', e.g. convnext_large_d): the head is not "
                "linear, so the embedding has no exact additive decomposition. Hooks and caching still work."
            )
        labels = self.block_labels
        token_blocks = _layers(tokens, len(labels), "tokens")
        store: dict = {}

        def save(key):
            def hook(activation: Tensor, hook) -> None:
                store[key] = activation

            return hook

        fwd_hooks = [("hook_stem_out", save("stem")), ("head.ln.hook_scale", save("head_scale"))]
        for s, stage in enumerate(self.stages):
            if stage.downsample is not None:
                fwd_hooks.append((f"stages.{s}.downsample.ln.hook_scale", save(("scale", s))))
            fwd_hooks += [(f"stages.{s}.blocks.{b}.hook_out", save(("write", s, b))) for b in range(len(stage.blocks))]
        with model.hooks(fwd_hooks=fwd_hooks):
            embedding = self(images)

        # the read-out runs in the weights' precision, whatever autocast did to the forward
        with torch.autocast(images.device.type, enabled=False):
            dtype = self.device_weight.dtype
            store = {key: value.to(dtype) for key, value in store.items()}
            embedding = embedding.to(dtype)
            embedding_norm = embedding.norm(dim=-1)
            if head.proj is None:  # no projection: the pooled vector is the embedding
                weight = torch.eye(head.ln.weight.shape[0], dtype=dtype, device=embedding.device)
            else:
                weight = head.proj.weight.T  # [C, E]
            proj_bias = None if head.proj is None else head.proj.bias
            if directions is not None:  # everything below is linear in the output axis: project once
                weight = weight @ directions.T
                proj_bias = None if proj_bias is None else proj_bias @ directions.T
                embedding = embedding @ directions.T
            readout = _through_norm(head.ln, weight, 0)  # [C, out]: centring and γ_head folded in
            const = _norm_bias(head.ln, weight) + (0 if proj_bias is None else proj_bias)
            inv_scale = store["head_scale"].reciprocal()[:, None, :]  # [batch, 1, 1]

            # carry the stem output and the block writes (a few at a time: bounded memory) to the final map,
            # where the head reads them: mean over cells for the terms, cell by cell for the positions
            scales = {s: store.pop(("scale", s)) for s, stage in enumerate(self.stages) if stage.downsample is not None}
            selected = {block: i for i, block in enumerate(token_blocks)}
            terms, chosen, cells = [], [None] * len(token_blocks), 0
            components = [(0, [store.pop("stem")], [None])]  # (first downsample that applies, maps, block index)
            index = 0
            for s, stage in enumerate(self.stages):
                n = len(stage.blocks)
                for start in range(0, n, self.DECOMPOSE_CHUNK):
                    rows = range(start, min(n, start + self.DECOMPOSE_CHUNK))
                    components.append((s + 1, [store.pop(("write", s, b)) for b in rows], [index + b for b in rows]))
                index += n
            for first, maps, blocks in components:
                final = self._carry(torch.stack(maps, 1), first, scales)  # [batch, k, C_last, H, W]
                del maps[:]
                terms.append(torch.einsum("bkc,co->bko", final.mean((-2, -1)), readout) * inv_scale)
                final = einops.rearrange(final, "b k c h w -> b k (h w) c")
                cells = cells + final.sum(1)
                for i, block in enumerate(blocks):
                    if block in selected:  # read out now: keeps [batch, H·W, out], not the chunk's maps
                        chosen[selected[block]] = final[:, i] @ readout
            n_cells = cells.shape[1]
            terms = torch.cat(terms, 1)
            positions = cells @ readout * (inv_scale / n_cells)
            block_positions = None
            if token_blocks:
                block_positions = torch.stack(chosen, 1) * (inv_scale[..., None] / n_cells)

            # the constants: each downsample's, carried through the later ones, and the head's
            bias = const.expand_as(embedding)
            constant = None  # [batch, C, H, W]
            for s, stage in enumerate(self.stages):
                ds = stage.downsample
                if ds is None:
                    continue
                if constant is not None:
                    constant = ds.carry(constant[:, None], scales[s])[:, 0]
                c = ds.constant().view(1, -1, 1, 1)  # the same at every cell: broadcast until a scale varies it
                constant = c if constant is None else constant + c
            if constant is not None:
                bias = bias + constant.mean((-2, -1)) @ readout * inv_scale[:, 0]

        return Decomposition(
            embedding=embedding,
            embedding_norm=embedding_norm,
            embed=terms[:, 0],
            attn=None,
            attn_bias=None,
            mlp=None,
            bias=bias,
            heads=None,
            tokens=None,
            token_layers=list(token_blocks),
            projected=directions is not None,
            family="convnext",
            blocks=terms[:, 1:],
            block_labels=labels,
            block_positions=block_positions,
            positions=positions,
        )
