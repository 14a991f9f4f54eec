"""CLIPActivationCache: TransformerLens' ActivationCache for both CLIP towers."""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformer_lens import ActivationCache
from transformer_lens.utilities import Slice

from clip_lens.errors import HookNameError, close_matches


class CLIPActivationCache(ActivationCache):
    """Activations of one forward pass, keyed by hook name.

    The image tower's keys are top level, the text tower's start with ``text.``. TransformerLens'
    helpers (``decompose_resid``, ``accumulated_resid``, ``stack_head_results``,
    ``apply_ln_to_stack``, ``compute_head_results``) read the image tower; use ``cache.text``
    for the same helpers on the text tower. The final LayerNorm of the image tower is
    ``ln_post`` (``ln_final`` for text): ``apply_ln_to_stack(stack, layer=n_layers)`` divides
    by its cached scale after centring, so ``(stack.sum(0) * ln_post.w + ln_post.b) @ proj``
    reproduces the embedding.
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
            scale = self[f"{self.final_ln}.hook_scale"]
            if scale.ndim >= 2 + self.has_batch_dim:  # a position axis: LN before pooling
                scale = pos_slice.apply(scale, dim=-2)
            if batch_slice is not None and self.has_batch_dim:
                scale = batch_slice.apply(scale)
            return scale
        return super()._get_cached_ln_scale(layer, mlp_input, pos_slice, batch_slice)

    def decompose_resid(self, layer: Optional[int] = None, *args: Any, incl_embeds: bool = True, **kwargs: Any):
        """TransformerLens ``decompose_resid``; with ``ln_pre`` the embedding term is its output.

        ``hook_embed + hook_pos_embed`` only equals ``blocks.0.hook_resid_pre`` when the tower
        has no ``ln_pre``; otherwise the single term ``embed`` (= ``ln_pre`` output) is used so
        that the components always add up to the residual stream.
        """
        if not incl_embeds or not self.model.cfg.has_ln_pre:
            return super().decompose_resid(layer, *args, incl_embeds=incl_embeds, **kwargs)
        return_labels = kwargs.pop("return_labels", False)
        apply_ln = kwargs.pop("apply_ln", False)
        pos_slice = Slice.unwrap(kwargs.get("pos_slice")) if kwargs.get("pos_slice") is not None else None
        rest, labels = super().decompose_resid(layer, *args, incl_embeds=False, return_labels=True, **kwargs)
        embed = self["blocks.0.hook_resid_pre"]
        if pos_slice is not None:
            embed = Slice(pos_slice).apply(embed, dim=-2)
        components = torch.cat([embed[None], rest], dim=0) if len(labels) else embed[None]
        labels = ["embed"] + labels
        if apply_ln:
            components = self.apply_ln_to_stack(
                components, layer, pos_slice=kwargs.get("pos_slice"), mlp_input=kwargs.get("mlp_input", False)
            )
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
