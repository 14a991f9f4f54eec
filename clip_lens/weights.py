"""TransformerLens' weight API for hooked CLIP towers: stacked weights, ``fold_ln``, ``center_writing_weights``.

[`TowerWeights`][clip_lens.weights.TowerWeights] gives every hooked tower (and [`HookedCLIP`][clip_lens.HookedCLIP], for its image
tower) TransformerLens' model-level weights, stacked over layers in TransformerLens layout
(``W_Q [n_layers, h, m, d]`` …, ``QK``/``OV`` as ``FactoredMatrix``). [`process_weights`][clip_lens.weights.process_weights]
rewrites the shared parameters in place so that the LayerNorms' affine maps live in the weights
that read them (``fold_ln``) and every residual writer has mean zero (``center_writing_weights``),
leaving the model's outputs unchanged. See ``docs/concepts/weights.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.FactoredMatrix import FactoredMatrix

from clip_lens.components import AttentionalPooler, GatedMLP, LayerNorm, TransformerBlock
from clip_lens.components.attention import Attention
from clip_lens.errors import IndexOutOfRangeError, InputError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from clip_lens.hooked_clip import HookedCLIP

Reader = tuple[Tensor, Tensor]
"""A linear map reading a LayerNorm's output: ``(weight [out, m], bias [out])``, views of parameters."""


# --- stacked weights ---------------------------------------------------------------------------


def _stacked(part: str, name: str, doc: str) -> property:
    def get(self) -> Tensor:
        return torch.stack([getattr(getattr(block, part), name) for block in self._weights_tower().blocks])

    return property(get, doc=doc)


def _patch_conv(tower: nn.Module) -> nn.Conv2d:
    """The patchify convolution of an image tower (a plain linear map of each patch), or raise."""
    conv = getattr(tower, "conv1", None)
    if getattr(tower, "family", "vit") != "vit":
        raise UnsupportedArchitectureError(
            f"a {tower.family} image tower has no patch embedding (its stem is a stack of convolutions), so it has no W_E."
        )
    if conv is None:  # timm
        patch_embed = tower.trunk.patch_embed
        conv = getattr(patch_embed, "proj", None)
        norm = getattr(patch_embed, "norm", None)
        if type(patch_embed).__name__ != "PatchEmbed" or not (norm is None or isinstance(norm, nn.Identity)):
            raise UnsupportedArchitectureError(
                f"the patch embedding {type(patch_embed).__name__} of this tower is not a plain linear map of "
                "the patches (a convolutional stem or a normalised embedding), so it has no W_E."
            )
    if (
        not isinstance(conv, nn.Conv2d) or tuple(conv.kernel_size) != tuple(conv.stride)
        or any(conv.padding) or conv.groups != 1
    ):
        raise UnsupportedArchitectureError("the patch embedding is not a plain patchify convolution, so it has no W_E.")
    return conv


class TowerWeights:
    """TransformerLens' model-level weights of a hooked tower (mixin of the tower classes).

    Stacked over layers, in TransformerLens layout (``m`` = d_model, ``h`` heads, ``d`` = d_head):

    =========================  ===========================  ===========================================
    ``W_Q``, ``W_K``, ``W_V``  ``[n_layers, h, m, d]``      read the ``ln1`` output
    ``b_Q``, ``b_K``, ``b_V``  ``[n_layers, h, d]``         zeros where the model has no bias
    ``W_O``                    ``[n_layers, h, d, m]``      LayerScale folded in (EVA02: ``ln_inner`` too)
    ``b_O``                    ``[n_layers, m]``
    ``W_in``, ``W_gate``       ``[n_layers, m, d_mlp]``     ``W_gate`` only for gated MLPs (else None)
    ``b_in``, ``b_gate``       ``[n_layers, d_mlp]``
    ``W_out``                  ``[n_layers, d_mlp, m]``     LayerScale folded in (EVA02: ``ln_inner`` too)
    ``b_out``                  ``[n_layers, m]``
    ``QK``, ``OV``             ``[n_layers, h, m, m]``      ``FactoredMatrix``: ``W_Q W_K^T``, ``W_V W_O``
    ``W_E``                    ``[vocab, m]`` (text), ``[3·p·p, m]`` (image: the patchify convolution,
                               pixels ordered ``(channel, row, column)``)
    ``W_pos``                  ``[n_ctx, m]``               absolute position embedding
    ``W_proj``, ``b_proj``     ``[m, E]``, ``[E]``          the affine read-out of the pooled vector
    =========================  ===========================  ===========================================

    They are computed from the shared parameters on every access (no copies to keep in sync).
    """

    def _weights_tower(self) -> nn.Module:
        return self

    W_Q = _stacked("attn", "W_Q", "Query weights ``[n_layers, h, m, d]``.")
    W_K = _stacked("attn", "W_K", "Key weights ``[n_layers, h, m, d]``.")
    W_V = _stacked("attn", "W_V", "Value weights ``[n_layers, h, m, d]``.")
    W_O = _stacked("attn", "W_O", "Output weights ``[n_layers, h, d, m]`` (LayerScale folded in).")
    b_Q = _stacked("attn", "b_Q", "Query biases ``[n_layers, h, d]``.")
    b_K = _stacked("attn", "b_K", "Key biases ``[n_layers, h, d]``.")
    b_V = _stacked("attn", "b_V", "Value biases ``[n_layers, h, d]``.")
    b_O = _stacked("attn", "b_O", "Output biases ``[n_layers, m]`` (LayerScale folded in).")
    W_in = _stacked("mlp", "W_in", "MLP input weights ``[n_layers, m, d_mlp]`` (the linear branch of a gated MLP).")
    b_in = _stacked("mlp", "b_in", "MLP input biases ``[n_layers, d_mlp]``.")
    W_out = _stacked("mlp", "W_out", "MLP output weights ``[n_layers, d_mlp, m]`` (LayerScale folded in).")
    b_out = _stacked("mlp", "b_out", "MLP output biases ``[n_layers, m]`` (LayerScale folded in).")

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Float[Tensor, "m"]:
        """TransformerLens' ``accumulated_bias``: the attention (and MLP) output biases written into
        the residual stream before block ``layer`` (with ``mlp_input``, also block ``layer``'s
        attention bias). Not additive in post-norm blocks (EVA02-E)."""
        tower = self._weights_tower()
        total = tower.blocks[0].attn.b_O.new_zeros(tower.cfg.d_model)
        for index in tower.cfg.layer_range(None, layer):
            total = total + tower.blocks[index].attn.b_O
            if include_mlp_biases:
                total = total + tower.blocks[index].mlp.b_out
        if mlp_input:
            if layer >= tower.cfg.n_layers:
                raise IndexOutOfRangeError(f"mlp_input needs a block: layer must be < {tower.cfg.n_layers}, got {layer}.")
            total = total + tower.blocks[layer].attn.b_O
        return total

    @property
    def W_gate(self) -> Optional[Float[Tensor, "n_layers m d_mlp"]]:
        """Gate weights of a gated MLP (SwiGLU/GeGLU) ``[n_layers, m, d_mlp]``; None otherwise."""
        blocks = self._weights_tower().blocks
        if not isinstance(blocks[0].mlp, GatedMLP):
            return None
        return torch.stack([block.mlp.W_gate for block in blocks])

    @property
    def b_gate(self) -> Optional[Float[Tensor, "n_layers d_mlp"]]:
        """Gate biases of a gated MLP ``[n_layers, d_mlp]``; None otherwise (not in TransformerLens)."""
        blocks = self._weights_tower().blocks
        if not isinstance(blocks[0].mlp, GatedMLP):
            return None
        return torch.stack([block.mlp.b_gate for block in blocks])

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q W_K^T`` per layer and head, ``[n_layers, h, m, m]`` (rotary/QK-norm not included)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V W_O`` per layer and head, ``[n_layers, h, m, m]``."""
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def W_E(self) -> Tensor:
        """Token embedding ``[vocab, m]`` (text), or the patchify convolution as a matrix
        ``[3·p_h·p_w, m]`` (image; pixels of a patch flattened as ``(channel, row, column)``)."""
        tower = self._weights_tower()
        if hasattr(tower, "token_embedding"):
            return tower.token_embedding.weight
        return einops.rearrange(_patch_conv(tower).weight, "m c ph pw -> (c ph pw) m")

    @property
    def b_E(self) -> Float[Tensor, "m"]:
        """Bias of the patchify convolution (zeros without one; zeros for text)."""
        tower = self._weights_tower()
        if hasattr(tower, "token_embedding"):
            weight = tower.token_embedding.weight
            return weight.new_zeros(weight.shape[1])
        conv = _patch_conv(tower)
        return conv.weight.new_zeros(conv.out_channels) if conv.bias is None else conv.bias

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx m"]:
        """Absolute position embedding ``[n_ctx, m]``, as ``hook_pos_embed`` adds it (timm: zeros on
        prefix tokens that get none). Raises for a tower without one."""
        tower = self._weights_tower()
        if hasattr(tower, "positional_embedding"):
            return tower.positional_embedding
        pos = tower.trunk.pos_embed
        if pos is None:
            raise UnsupportedArchitectureError("this tower has no absolute position embedding (rotary only), so no W_pos.")
        pos = pos[0]
        if tower.no_embed_class and tower.n_prefix_tokens:
            pos = torch.cat([pos.new_zeros(tower.n_prefix_tokens, pos.shape[-1]), pos], dim=0)
        return pos

    def _readout_affine(self) -> tuple[Tensor, Optional[Tensor]]:
        tower = self._weights_tower()
        if hasattr(tower, "output_affine"):  # image towers
            return tower.output_affine()
        proj = tower.text_projection
        if isinstance(proj, nn.Linear):
            return proj.weight.T, proj.bias
        if proj is None:
            ln = tower.ln_final.weight
            return torch.eye(ln.shape[0], device=ln.device, dtype=ln.dtype), None
        return proj, None

    @property
    def W_proj(self) -> Float[Tensor, "m E"]:
        """The read-out into the joint embedding space ``[m, E]``: ``embedding = pooled @ W_proj + b_proj``,
        where ``pooled`` is ``hook_pooled`` (the pooled, ``ln_post``/``ln_final``-normalised vector).
        CLIP's analogue of TransformerLens' ``W_U``; timm towers: timm's head and open_clip's projection composed."""
        return self._readout_affine()[0]

    @property
    def b_proj(self) -> Float[Tensor, "E"]:
        """Bias of the read-out ``[E]`` (zeros without one)."""
        weight, bias = self._readout_affine()
        return weight.new_zeros(weight.shape[1]) if bias is None else bias

    # --- TransformerLens' analyses of the weights ----------------------------------------------
    def _transformer_blocks(self, what: str) -> nn.ModuleList:
        """The tower's transformer blocks, or an error saying why ``what`` needs them."""
        tower = self._weights_tower()
        blocks = getattr(tower, "blocks", None)
        if blocks is None:
            family = getattr(tower, "family", None)
            kind = f"a {family} image tower (convolutional stages)" if family else "this tower"
            raise UnsupportedArchitectureError(f"{what} needs transformer blocks with attention heads; {kind} has none.")
        return blocks

    def tl_parameters(self) -> dict[str, Tensor]:
        """The tower's weights under TransformerLens' names, what ``transformer_lens.SVDInterpreter``
        reads: ``blocks.{l}.attn.W_Q`` … ``b_O`` (``[h, m, d]``, ``[h, d, m]``), ``blocks.{l}.mlp.W_in``
        … ``b_out``, ``blocks.{l}.ln1.w``/``ln2.w`` (pre-norm blocks) and ``unembed.W_U`` = `W_proj`
        ``[m, E]``, CLIP's unembedding: the read-out into the joint embedding space.

        So ``SVDInterpreter(model).get_singular_vectors("OV", layer, num_vectors=k, head_index=h)``
        gives ``[E, 1, k]``: the top right-singular vectors of the head's OV circuit written into
        the joint embedding space, comparable with text embeddings. It reads ``cfg.d_vocab`` as the
        width of ``W_U``, so this sets the tower config's ``d_vocab`` to ``E``.
        """
        blocks = self._transformer_blocks("tl_parameters (what SVDInterpreter reads)")
        params: dict[str, Tensor] = {}
        for layer, block in enumerate(blocks):
            for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
                params[f"blocks.{layer}.attn.{name}"] = getattr(block.attn, name)
            for name in ("W_in", "b_in", "W_out", "b_out"):
                params[f"blocks.{layer}.mlp.{name}"] = getattr(block.mlp, name)
            for ln in ("ln1", "ln2"):
                norm = getattr(block, ln, None)
                if isinstance(norm, LayerNorm):
                    params[f"blocks.{layer}.{ln}.w"], params[f"blocks.{layer}.{ln}.b"] = norm.w, norm.b
        params["unembed.W_U"] = self.W_proj
        self._weights_tower().cfg.d_vocab = params["unembed.W_U"].shape[1]  # SVDInterpreter's width of W_U
        return params

    def all_composition_scores(self, mode: str) -> Float[Tensor, "n_layers n_heads n_layers n_heads"]:
        """TransformerLens' ``all_composition_scores``: how much each head's output is read by each
        later head, ``scores[l1, h1, l2, h2] = ‖OV[l1, h1] · X[l2, h2]‖_F / (‖OV[l1, h1]‖_F ‖X[l2, h2]‖_F)``
        with ``X`` = ``QK`` (``mode="Q"``), ``QK.T`` (``"K"``) or ``OV`` (``"V"``); zero where
        ``l2 <= l1`` (a head cannot read what it or a later layer writes). From the weights as they
        are (fold the LayerNorms first for TransformerLens' usual numbers); rotary embeddings and
        QK-norm are not part of ``QK``.
        """
        from transformer_lens.utilities import composition_scores

        if mode not in ("Q", "K", "V"):
            raise InputError(f"mode must be 'Q', 'K' or 'V' (which input of the later head), got {mode!r}.")
        self._transformer_blocks("all_composition_scores")
        left = self.OV
        right = {"Q": lambda: self.QK, "K": lambda: self.QK.T, "V": lambda: left}[mode]()
        scores = composition_scores(left, right, broadcast_dims=True)
        layers = torch.arange(scores.shape[0], device=scores.device)
        later = layers[:, None, None, None] < layers[None, None, :, None]
        return torch.where(later, scores, torch.zeros_like(scores))


class CLIPWeights(TowerWeights):
    """[`TowerWeights`][clip_lens.weights.TowerWeights] of [`HookedCLIP`][clip_lens.HookedCLIP]: the image tower's weights (the text
    tower's are ``model.text.W_Q`` …), and TransformerLens' switches for the optional hooks,
    applied to every block of both towers."""

    def _weights_tower(self) -> nn.Module:
        return self.visual

    def _hooked_towers(self) -> list[nn.Module]:
        """Towers with hooked blocks (a Hugging Face text tower has none)."""
        return [tower for tower in (self.visual, self.text) if hasattr(tower, "blocks")]

    def _set_block_flag(self, method: str, value: bool) -> None:
        for tower in self._hooked_towers():
            for block in tower.blocks:
                getattr(block, method)(value)
        self.setup()  # the optional hook points came or went: refresh hook_dict

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """TransformerLens' ``use_split_qkv_input``: ``blocks.{l}.hook_q_input``/``hook_k_input``/``hook_v_input``
        ``[batch, n, h, m]`` (``resid_pre`` per head, before ``ln1``) exist and feed q, k, v head by head.
        Mutually exclusive with [`set_use_attn_in`][clip_lens.HookedCLIP.set_use_attn_in]."""
        self._set_block_flag("set_use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """TransformerLens' ``use_attn_in``: ``blocks.{l}.hook_attn_in`` ``[batch, n, h, m]`` (``resid_pre``
        per head, before ``ln1``) exists and feeds q, k and v."""
        self._set_block_flag("set_use_attn_in", use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """TransformerLens' ``use_hook_mlp_in``: ``blocks.{l}.hook_mlp_in`` ``[batch, n, m]`` (``resid_mid``
        before ``ln2``) exists."""
        self._set_block_flag("set_use_hook_mlp_in", use_hook_mlp_in)

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute ``attn.hook_result`` on every forward (otherwise only while it is hooked)."""
        for tower in self._hooked_towers():
            tower.cfg.use_attn_result = bool(use_attn_result)
            for block in tower.blocks:
                block.attn.use_attn_result = bool(use_attn_result)


# --- parameters to rewrite ---------------------------------------------------------------------


def _linear(layer: nn.Module, what: str) -> nn.Linear:
    if not isinstance(layer, nn.Linear):
        raise UnsupportedArchitectureError(f"{what} is {type(layer).__name__}, not a linear layer: cannot rewrite its weights.")
    return layer


def _with_bias(layer: nn.Linear) -> Reader:
    """``(weight, bias)`` of a linear layer, giving it a zero bias parameter if it has none."""
    if layer.bias is None:
        layer.bias = nn.Parameter(layer.weight.new_zeros(layer.out_features), requires_grad=layer.weight.requires_grad)
    return layer.weight, layer.bias


def _buffer_to_parameter(module: nn.Module, name: str, like: Tensor) -> None:
    """Turn a (zero) bias buffer into a parameter so a folded bias can live there (EVA's ``k_bias``)."""
    if name in module._buffers:
        value = module._buffers.pop(name)
        module._non_persistent_buffers_set.discard(name)
        module.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=like.requires_grad))


def _mha_readers(mha: nn.MultiheadAttention, which: tuple[int, ...]) -> list[Reader]:
    if mha._qkv_same_embed_dim:
        weights = mha.in_proj_weight.chunk(3, dim=0)
    else:  # keys/values of another width (CoCa's pooler): separate weights, one packed bias
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    if mha.in_proj_bias is None:
        mha.in_proj_bias = nn.Parameter(weights[0].new_zeros(3 * mha.embed_dim), requires_grad=weights[0].requires_grad)
    biases = mha.in_proj_bias.chunk(3)
    return [(weights[i], biases[i]) for i in which]


def _timm_qkv_readers(attn: nn.Module) -> list[Reader]:
    """q, k, v of a timm ``Attention``/``EvaAttention``/``AttentionRope`` (fused or separate)."""
    fused = getattr(attn, "qkv", None)
    if fused is None:
        return [_with_bias(_linear(p, "a q/k/v projection")) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    weights = _linear(fused, "the qkv projection").weight.chunk(3, dim=0)
    if getattr(attn, "q_bias", None) is not None:  # EVA: q and v biases, k's a zero buffer -> a parameter
        _buffer_to_parameter(attn, "k_bias", attn.q_bias)
        return list(zip(weights, (attn.q_bias, attn.k_bias, attn.v_bias)))
    return list(zip(weights, _with_bias(fused)[1].chunk(3)))


def _attn_readers(attn: nn.Module) -> list[Reader]:
    if isinstance(attn, Attention):
        return _mha_readers(attn.mha, (0, 1, 2))
    return _timm_qkv_readers(attn.source)


def _mlp_input_layers(mlp: nn.Module) -> list[nn.Linear]:
    layers = [mlp.c_fc] + ([mlp.fc_in] if isinstance(mlp, GatedMLP) and mlp.fc_in is not None else [])
    return [_linear(layer, "the MLP input") for layer in layers]


def _attn_out_linear(attn: nn.Module) -> nn.Linear:
    return attn.mha.out_proj if isinstance(attn, Attention) else _linear(attn.source.proj, "the attention output")


# --- fold_ln ------------------------------------------------------------------------------------


def _fold(ln: LayerNorm, readers: list[Reader]) -> None:
    """Fold ``ln``'s affine map into the linear maps reading its output, then set it to (1, 0).

    ``W x_ln + c = (W diag(w)) x̂ + (W b + c)``; the folded weights are centred over their input
    (TransformerLens does the same: ``x̂`` has mean zero, so this changes nothing).
    """
    weight, bias = ln.weight, ln.bias
    for w, b in readers:
        if bias is not None:
            b.add_(w @ bias)
        w.mul_(weight)
        w.sub_(w.mean(-1, keepdim=True))
    weight.fill_(1.0)
    if bias is not None:
        bias.zero_()


def _block_plan(block: TransformerBlock, prefix: str) -> list[tuple[str, LayerNorm, Callable[[], list[Reader]]]]:
    plan = []
    if block.ln1 is not None:  # post-norm blocks (EVA02-E) have no LayerNorm before attention
        plan.append((f"{prefix}ln1", block.ln1, lambda: _attn_readers(block.attn)))
    mlp = block.mlp
    ln_in = getattr(mlp, "ln_in", None)
    if block.ln2 is not None and ln_in is None:  # ViTamin's ln2 feeds another LayerNorm: not foldable
        plan.append((f"{prefix}ln2", block.ln2, lambda: [_with_bias(layer) for layer in _mlp_input_layers(mlp)]))
    if ln_in is not None:
        plan.append((f"{prefix}mlp.ln_in", ln_in, lambda: [_with_bias(layer) for layer in _mlp_input_layers(mlp)]))
    if mlp.ln_inner is not None:
        plan.append((f"{prefix}mlp.ln_inner", mlp.ln_inner, lambda: [_with_bias(_linear(mlp.c_proj, "the MLP output"))]))
    if block.attn.ln_inner is not None:
        plan.append((f"{prefix}attn.ln_inner", block.attn.ln_inner,
                     lambda: [_with_bias(_attn_out_linear(block.attn))]))
    return plan


def _first_linear_readout(tower: nn.Module) -> Optional[nn.Linear]:
    """The first linear layer of a timm tower's read-out after the final norm, if it is one."""
    layers = [tower.trunk.head] + [m for name, m in tower.head.named_children() if name == "proj"]
    for layer in layers:
        if isinstance(layer, nn.Linear):
            return layer
        if not isinstance(layer, nn.Identity):
            return None
    return None


def _fold_plan(tower: nn.Module) -> list[tuple[str, LayerNorm, Callable[[], list[Reader]]]]:
    """``(name, LayerNorm, readers)`` for every LayerNorm of ``tower`` whose output only linear maps read."""
    plan = []
    for i, block in enumerate(tower.blocks):
        plan += _block_plan(block, f"blocks.{i}.")
    pool = getattr(tower, "attn_pool", None)
    if isinstance(pool, AttentionalPooler):  # CoCa: ln_k feeds keys and values, ln_q the queries
        plan.append(("attn_pool.ln_k", pool.ln_k, lambda: _mha_readers(pool.attn.mha, (1, 2))))
        plan.append(("attn_pool.ln_q", pool.ln_q, lambda: _mha_readers(pool.attn.mha, (0,))))
    elif pool is not None:  # timm MAP: the final norm feeds the latent attention's kv, pool.ln the MLP
        if pool.ln is not None:
            plan.append(("attn_pool.ln", pool.ln, lambda: [_with_bias(layer) for layer in _mlp_input_layers(pool.mlp)]))
        if tower.ln_post is not None and not tower.final_ln_after_pool:
            kv = _linear(pool.attn.source.kv, "the pooler's kv projection")
            plan.append(("ln_post", tower.ln_post, lambda: [(kv.weight, _with_bias(kv)[1])]))
    if hasattr(tower, "trunk"):
        final = tower.ln_post
        if final is not None and (pool is None or tower.final_ln_after_pool):
            layer = _first_linear_readout(tower)
            if layer is not None:  # pooling (a weighted mean) commutes with the affine map
                plan.append(("ln_post", final, lambda: [_with_bias(layer)]))
    elif hasattr(tower, "text_projection") and isinstance(tower.text_projection, nn.Linear):
        plan.append(("ln_final", tower.ln_final, lambda: [_with_bias(tower.text_projection)]))
    # not folded: ln_pre (its output is the residual stream); open_clip's ln_post/ln_final before a
    # bias-free projection matrix; post-norm ln1_post/ln2_post (their outputs enter the residual)
    return plan


def fold_layer_norms(tower: nn.Module) -> list[str]:
    """Fold every foldable LayerNorm of a hooked tower into the linear maps reading it (in place).

    Returns the folded LayerNorms' names (``blocks.0.ln1`` …). What is folded, per family, is
    listed in ``docs/concepts/weights.md``.
    """
    folded = []
    for name, ln, readers in _fold_plan(tower):
        _fold(ln, readers())
        folded.append(name)
    return folded


# --- center_writing_weights ---------------------------------------------------------------------


def _centring_problem(tower: nn.Module) -> Optional[str]:
    """Why centring the residual writers of ``tower`` could change its output, or None."""
    for i, block in enumerate(tower.blocks):
        if block.ln1 is None or block.ln2 is None:
            return (f"block {i} is a post-norm block (no ln1/ln2): its attention and MLP read the residual "
                    "stream without a LayerNorm, so a shift of the stream would change them")
    if hasattr(tower, "trunk"):
        if tower.ln_post is None:
            return "the read-out reads the residual stream without a final LayerNorm"
        if tower.attn_pool is not None and tower.final_ln_after_pool:
            return "the attention pooler reads the residual stream without a LayerNorm (fc_norm comes after it)"
        try:
            _patch_conv(tower)
        except UnsupportedArchitectureError:
            return (f"the patch embedding ({type(tower.trunk.patch_embed).__name__}) ends in a normalisation or "
                    "convolutional stem whose output cannot be centred by changing weights")
    return None


def _centre_linear(layer: nn.Linear, scale: Optional[Tensor]) -> None:
    """Centre a linear layer's output over its features; a LayerScale after it is folded in first (and set to 1)."""
    weight, bias = layer.weight, layer.bias
    if scale is not None:
        weight.mul_(scale[:, None])
        if bias is not None:
            bias.mul_(scale)
        scale.fill_(1.0)
    weight.sub_(weight.mean(0, keepdim=True))
    if bias is not None:
        bias.sub_(bias.mean())


def _centre(t: Optional[Tensor]) -> None:
    if t is not None:
        t.sub_(t.mean(-1, keepdim=True))


def centre_writing_weights(tower: nn.Module) -> list[str]:
    """Remove the mean over ``d_model`` from every weight and bias writing into ``tower``'s residual stream.

    Raises [`UnsupportedArchitectureError`][clip_lens.weights.UnsupportedArchitectureError] (before changing anything) when a reader of the
    stream is not a LayerNorm. Returns the names of what was centred.
    """
    problem = _centring_problem(tower)
    if problem:
        raise UnsupportedArchitectureError(f"center_writing_weights would change this model's output: {problem}.")
    done = []
    for i, block in enumerate(tower.blocks):
        _centre_linear(_attn_out_linear(block.attn), block.attn.layer_scale)
        _centre_linear(_linear(block.mlp.c_proj, "the MLP output"), block.mlp.layer_scale)
        done += [f"blocks.{i}.attn", f"blocks.{i}.mlp"]
    if hasattr(tower, "token_embedding"):  # text
        _centre(tower.token_embedding.weight)
        _centre(tower.positional_embedding)
        _centre(getattr(tower, "cls_emb", None))
        done += ["token_embedding", "positional_embedding"] + (["cls_emb"] if tower.cls_emb is not None else [])
        return done
    conv = _patch_conv(tower)
    conv.weight.sub_(conv.weight.mean(0, keepdim=True))
    if conv.bias is not None:
        conv.bias.sub_(conv.bias.mean())
    done.append("patch_embed")
    if hasattr(tower, "trunk"):
        trunk = tower.trunk
        for name in ("cls_token", "reg_token", "pos_embed"):
            if getattr(trunk, name, None) is not None:
                _centre(getattr(trunk, name))
                done.append(name)
    else:
        _centre(tower.class_embedding)
        _centre(tower.positional_embedding)
        done += ["class_embedding", "positional_embedding"]
    return done


# --- entry point ----------------------------------------------------------------------------------


@torch.no_grad()
def process_weights(
    model: "HookedCLIP", fold_ln: bool = False, center_writing_weights: bool = False
) -> dict[str, list[str]]:
    """TransformerLens' weight processing, in place on the parameters ``model`` shares with its
    open_clip model; both towers (a Hugging Face text tower is left as it is). Outputs are unchanged.

    Args:
        fold_ln: fold each LayerNorm's weight and bias into the linear maps that read it and set it
            to weight 1, bias 0 (the LayerNorm modules stay: TransformerLens swaps in ``LNPre``).
        center_writing_weights: subtract the per-output mean from every weight and bias writing into
            the residual stream (LayerScale is folded into them first). Refused with
            [`UnsupportedArchitectureError`][clip_lens.weights.UnsupportedArchitectureError] where a reader of the stream is not a LayerNorm.

    Returns:
        ``{"fold_ln": [...], "center_writing_weights": [...]}``: what was folded/centred, as module
        names (the text tower's under ``text.``).
    """
    towers = [("", model.visual)] + ([("text.", model.text)] if hasattr(model.text, "blocks") else [])
    if center_writing_weights:
        for prefix, tower in towers:  # refuse before changing anything
            problem = _centring_problem(tower)
            if problem:
                where = "text tower" if prefix else "image tower"
                raise UnsupportedArchitectureError(
                    f"center_writing_weights would change the output of {model.model_name or 'this model'}'s {where}: "
                    f"{problem}. Load it with center_writing_weights=False (fold_ln still works)."
                )
    done: dict[str, list[str]] = {"fold_ln": [], "center_writing_weights": []}
    for prefix, tower in towers:
        if fold_ln:
            done["fold_ln"] += [prefix + name for name in fold_layer_norms(tower)]
        if center_writing_weights:
            done["center_writing_weights"] += [prefix + name for name in centre_writing_weights(tower)]
    return done

