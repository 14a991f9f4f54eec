"""CLIPActivationCache: TransformerLens' ActivationCache for both CLIP towers."""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformer_lens import ActivationCache
from transformer_lens.utilities import Slice

from clip_lens.errors import HookNameError, UnsupportedArchitectureError, close_matches


class CLIPActivationCache(ActivationCache):
    """Activations of one forward pass, keyed by hook name.

    The image tower's keys are top level, the text tower's start with ``text.``. TransformerLens'
    helpers (``decompose_resid``, ``accumulated_resid``, ``stack_head_results``,
    ``apply_ln_to_stack``, ``compute_head_results``) read the image tower; use ``cache.text``
    for the same helpers on the text tower. The final LayerNorm of the image tower is
    ``ln_post`` (``ln_final`` for text): ``apply_ln_to_stack(stack, layer=n_layers)`` divides
    by its cached scale after centring, so ``(stack.sum(0) * ln_post.w + ln_post.b) @ proj``
    reproduces the embedding (taking the pooled position: CLS for ``tok``). With
    ``final_ln_after_pool`` (LN of the pooled vector) every token is divided by its image's one
    pooled scale, so average-pooling the result over patches gives the LN input's share. With an
    attentional pooler the final LayerNorm acts on the pooler's output, not on the residual
    stream, and applying it to a residual stack raises ``UnsupportedArchitectureError``.
    """

    final_ln = "ln_post"

    def __getitem__(self, key: Any) -> torch.Tensor:
        try:
            return super().__getitem__(key)
        except KeyError:
            if isinstance(key, str):
                raise HookNameError(
                    f"'{key}' is not in this cache.{close_matches(key, self.cache_dict)} "
                    "(Was it excluded by names_filter?)"
                ) from None
            raise

    def _get_cached_ln_scale(
        self, layer: Optional[int], mlp_input: bool, pos_slice: Slice, batch_slice: Optional[Slice] = None
    ) -> torch.Tensor:
        if layer is None or layer == self.model.cfg.n_layers:
            if self.model.cfg.pool_type == "attn":
                raise UnsupportedArchitectureError(
                    f"{self.final_ln} normalises the attentional pooler's output, not the residual stream, "
                    "so it cannot be applied to a residual stack (layer=n_layers); use a layer < n_layers "
                    "or apply_ln=False."
                )
            scale = self[f"{self.final_ln}.hook_scale"]
            if scale.ndim >= 2 + self.has_batch_dim:  # a position axis: LN before pooling
                scale = pos_slice.apply(scale, dim=-2)
            if batch_slice is not None and self.has_batch_dim:
                scale = batch_slice.apply(scale)
            return scale
        return super()._get_cached_ln_scale(layer, mlp_input, pos_slice, batch_slice)

    def apply_ln_to_stack(
        self,
        residual_stack: torch.Tensor,
        layer: Optional[int] = None,
        mlp_input: bool = False,
        pos_slice: Any = None,
        batch_slice: Any = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> torch.Tensor:
        """TransformerLens ``apply_ln_to_stack``; a pooled final LN scale also divides per-token stacks.

        With ``final_ln_after_pool`` the cached ``ln_post.hook_scale`` is one value per image
        (``[batch, 1]``). A stack with a position axis (``[components, batch, pos, d_model]``) is
        centred per token and divided by that image's scale; pooling it afterwards (mean over
        patches) equals centring and scaling the pooled vector, as the model does.
        """
        if layer is None or layer == -1:
            layer = self.model.cfg.n_layers
        if not (layer == self.model.cfg.n_layers and self.model.cfg.final_ln_after_pool and not recompute_ln):
            return super().apply_ln_to_stack(
                residual_stack, layer, mlp_input, pos_slice, batch_slice, has_batch_dim, recompute_ln
            )
        if not isinstance(batch_slice, Slice):
            batch_slice = Slice(batch_slice)
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        residual_stack = residual_stack - residual_stack.mean(dim=-1, keepdim=True)
        scale = self[f"{self.final_ln}.hook_scale"]
        if self.has_batch_dim:
            scale = batch_slice.apply(scale)
        if residual_stack.ndim > scale.ndim + 1:  # a position axis the pooled scale lacks
            scale = scale.unsqueeze(-2)
        return residual_stack / scale

    def decompose_resid(
        self,
        layer: Optional[int] = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: Any = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ):
        """TransformerLens ``decompose_resid``; with ``ln_pre`` the embedding term is its output.

        ``hook_embed + hook_pos_embed`` only equals ``blocks.0.hook_resid_pre`` when the tower
        has no ``ln_pre``; otherwise the single term ``embed`` (= ``ln_pre`` output) is used so
        that the components always add up to the residual stream.
        """
        if not incl_embeds or not self.model.cfg.has_ln_pre:
            return super().decompose_resid(
                layer, mlp_input, mode, apply_ln, pos_slice, incl_embeds, return_labels  # type: ignore[arg-type]
            )
        if not isinstance(pos_slice, Slice):
            pos_slice = Slice(pos_slice)  # as TransformerLens: an int index drops the position axis
        if layer is None or layer == -1:
            layer = self.model.cfg.n_layers
        components = pos_slice.apply(self["blocks.0.hook_resid_pre"], dim=-2)[None]
        labels = ["embed"]
        if layer > 0 or (mlp_input and mode != "mlp"):  # any block outputs to add
            rest, rest_labels = super().decompose_resid(
                layer, mlp_input, mode, False, pos_slice, incl_embeds=False, return_labels=True  # type: ignore[arg-type]
            )
            components = torch.cat([components, rest], dim=0)
            labels += rest_labels
        if apply_ln:
            components = self.apply_ln_to_stack(components, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (components, labels) if return_labels else components

    @property
    def text(self) -> "CLIPActivationCache":
        """The text tower's activations as a cache of their own (``text.`` prefix removed)."""
        prefix = "text."
        sub = {k[len(prefix):]: v for k, v in self.cache_dict.items() if k.startswith(prefix)}
        cache = TextActivationCache(sub, self.model.text, has_batch_dim=self.has_batch_dim)
        return cache


class TextActivationCache(CLIPActivationCache):
    """A :class:`CLIPActivationCache` over the text tower (final LayerNorm ``ln_final``)."""

    final_ln = "ln_final"

    def __getitem__(self, key: Any) -> torch.Tensor:
        try:
            return super().__getitem__(key)
        except KeyError as exc:  # also TransformerLens' (name, layer) keys, which raise a bare KeyError
            note = getattr(self.model, "unhooked_note", None)  # a Hugging Face text tower: 2 hooks only
            if note is None:
                raise
            what = str(exc) if isinstance(exc, HookNameError) else f"'{exc.args[0]}' is not in this cache."
            raise HookNameError(f"{what} {note}") from None
