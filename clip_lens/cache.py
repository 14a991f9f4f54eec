"""CLIPActivationCache: TransformerLens' ActivationCache for both CLIP towers."""

from __future__ import annotations

from typing import Any, Optional

import torch
from jaxtyping import Float, Int
from transformer_lens import ActivationCache
from transformer_lens.utilities import Slice

from clip_lens.errors import HookNameError, InputError, UnsupportedArchitectureError, close_matches


class PooledSlice(Slice):
    """``pos_slice="pooled"``: each sequence's own pooled position (one index per batch row).

    Applied along a position axis it gathers ``tensor[..., b, index[b], ...]`` and drops the
    axis, as an integer ``pos_slice`` does; the batch axis is the one before it.
    """

    def __init__(self, index: Int[torch.Tensor, "batch"]):
        self.index = index
        self.slice = index
        self.mode = "pooled"

    def apply(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        dim = dim % tensor.ndim
        if dim == 0 or tensor.shape[dim - 1] != self.index.shape[0]:
            raise InputError(
                f"pos_slice='pooled' picks one position per sequence, so the axis before the positions must be "
                f"the batch ({self.index.shape[0]} sequences); got shape {tuple(tensor.shape)}. Slice the batch "
                "after the call instead of with batch_slice."
            )
        shape = [1] * tensor.ndim
        shape[dim - 1] = self.index.shape[0]
        size = list(tensor.shape)
        size[dim] = 1
        index = self.index.to(tensor.device).view(shape).expand(size)
        return tensor.gather(dim, index).squeeze(dim)

    def indices(self, max_ctx: Optional[int] = None):
        return self.index.cpu().numpy()


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
    tokens: Optional[torch.Tensor] = None
    """The text tower's token ids of the run (set by ``HookedCLIP.run_with_cache``), for ``pos_slice="pooled"``."""

    def pooled_positions(self) -> Int[torch.Tensor, "batch"]:
        """Each sequence's pooled position: the class token for CLS pooling (image tower), each
        prompt's own EOT/argmax/eos token (text tower)."""
        cfg = self.model.cfg
        if cfg.tower == "text":
            if self.tokens is None:
                raise InputError("pos_slice='pooled' on the text tower needs the tokens: run model.run_with_cache(text=...).")
            return self.model.pooled_positions(self.tokens)
        if cfg.pool_type != "tok":
            raise UnsupportedArchitectureError(
                f"pos_slice='pooled' needs one pooled position; this image tower pools with '{cfg.pool_type}' "
                "(average the patch positions instead, e.g. pos_slice=(n_prefix_tokens, None) then .mean(-2))."
            )
        batch = self["hook_embed"].shape[0] if "hook_embed" in self.cache_dict else next(iter(self.values())).shape[0]
        return torch.zeros(batch, dtype=torch.long)

    def _pos(self, pos_slice: Any) -> Any:
        """TransformerLens' ``pos_slice``, plus ``"pooled"`` ([`PooledSlice`][clip_lens.cache.PooledSlice])."""
        if isinstance(pos_slice, str):
            if pos_slice != "pooled":
                raise InputError(f"pos_slice={pos_slice!r}: the only named slice is 'pooled'.")
            return PooledSlice(self.pooled_positions())
        return pos_slice

    # TransformerLens' stack helpers, with pos_slice="pooled" (pass it by keyword)
    def accumulated_resid(self, *args: Any, pos_slice: Any = None, **kwargs: Any):
        return super().accumulated_resid(*args, pos_slice=self._pos(pos_slice), **kwargs)

    def stack_head_results(self, *args: Any, pos_slice: Any = None, **kwargs: Any):
        return super().stack_head_results(*args, pos_slice=self._pos(pos_slice), **kwargs)

    def stack_neuron_results(self, *args: Any, pos_slice: Any = None, **kwargs: Any):
        return super().stack_neuron_results(*args, pos_slice=self._pos(pos_slice), **kwargs)

    def get_full_resid_decomposition(self, layer: Optional[int] = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False, pos_slice: Any = None,
                                     return_labels: bool = False, project_output_onto: Optional[torch.Tensor] = None):
        """TransformerLens ``get_full_resid_decomposition`` (heads, neurons, embeddings, biases);
        with ``ln_pre`` the two embedding rows become one, ``embed`` (``ln_pre``'s output), so the
        rows always add up to the residual stream. Needs ``hook_result`` in the cache."""
        pos_slice = self._pos(pos_slice)
        if not self.model.cfg.has_ln_pre:
            return super().get_full_resid_decomposition(layer, mlp_input, expand_neurons, apply_ln, pos_slice,
                                                        return_labels, project_output_onto)
        if layer is None or layer == -1:
            layer = self.model.cfg.n_layers
        stack, labels = super().get_full_resid_decomposition(layer, mlp_input, expand_neurons, False, pos_slice, True)
        if not isinstance(pos_slice, Slice):
            pos_slice = Slice(pos_slice)
        keep = [i for i, label in enumerate(labels) if label != "pos_embed"]
        stack[labels.index("embed")] = pos_slice.apply(self["blocks.0.hook_resid_pre"], dim=-2)
        stack, labels = stack[keep], [labels[i] for i in keep]
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        if project_output_onto is not None:
            stack = stack @ project_output_onto
        return (stack, labels) if return_labels else stack

    def logit_attrs(
        self,
        residual_stack: Float[torch.Tensor, "components *batch_pos d_model"],
        texts: Any = None,
        incorrect_texts: Any = None,
        *,
        images: Optional[torch.Tensor] = None,
        incorrect_images: Optional[torch.Tensor] = None,
        tokens: Any = None,
        incorrect_tokens: Any = None,
        pos_slice: Any = None,
        batch_slice: Any = None,
        has_batch_dim: bool = True,
    ) -> Float[torch.Tensor, "components *batch_pos"]:
        """Each component's share of ``embedding · t`` (TransformerLens' ``logit_attrs`` for CLIP).

        The stack is scaled by the final LayerNorm (``apply_ln_to_stack(layer=-1)``), then dotted
        with the residual directions of ``texts`` (image cache) or ``images`` (``cache.text``):
        one text for the whole batch, or one per batch row. With ``incorrect_texts`` the
        direction is the difference, so the attributions explain a logit difference. Divide by
        ``‖embedding‖`` and multiply by ``logit_scale`` for shares of the zero-shot logit.

        TransformerLens' names work too: ``tokens=``/``incorrect_tokens=`` (token ids or strings of
        the answer texts) are ``texts``/``incorrect_texts`` on the image cache, as in
        ``cache.logit_attrs(stack, tokens=model.to_tokens(["a dog"]))``. On ``cache.text`` the
        answers are images, so ``tokens=`` is refused there.
        """
        texts, incorrect_texts = self._tl_tokens(texts, incorrect_texts, tokens, incorrect_tokens)
        clip = self._clip_model()
        if self.model.cfg.tower == "text":
            if images is None or texts is not None:
                raise InputError("cache.text.logit_attrs takes images=... (the text tower is read with image directions).")
            directions = clip.images_to_residual_directions(images)
            if incorrect_images is not None:
                directions = directions - clip.images_to_residual_directions(incorrect_images)
        else:
            if texts is None or images is not None:
                raise InputError("cache.logit_attrs takes texts=... (use cache.text.logit_attrs(stack, images=...) for the text tower).")
            directions = clip.texts_to_residual_directions(texts)
            if incorrect_texts is not None:
                incorrect = clip.texts_to_residual_directions(incorrect_texts)
                if incorrect.shape != directions.shape:
                    raise InputError(
                        f"texts and incorrect_texts must pair up: got {directions.shape[0]} and {incorrect.shape[0]}."
                    )
                directions = directions - incorrect
        if directions.shape[0] == 1:
            directions = directions[0]
        scaled = self.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        if directions.ndim == 2:  # one per batch row: broadcast over any position axis
            if not has_batch_dim or scaled.ndim < 3 or scaled.shape[1] != directions.shape[0]:
                raise InputError(
                    f"{directions.shape[0]} directions need a stack with that many batch rows at axis 1; "
                    f"got {tuple(scaled.shape)}. Pass one text for the whole batch or one per row."
                )
            directions = directions.view(directions.shape[0], *([1] * (scaled.ndim - 3)), directions.shape[1])
        return (scaled * directions).sum(-1)

    def _tl_tokens(self, texts: Any, incorrect_texts: Any, tokens: Any, incorrect_tokens: Any) -> tuple[Any, Any]:
        """``texts``/``incorrect_texts`` from TransformerLens' ``tokens``/``incorrect_tokens`` (one name each)."""
        if tokens is None and incorrect_tokens is None:
            return texts, incorrect_texts
        if self.model.cfg.tower == "text":
            raise InputError(
                "cache.text.logit_attrs reads the text tower with image directions: pass images=... (and "
                "incorrect_images=...), not tokens=."
            )
        if (tokens is not None and texts is not None) or (incorrect_tokens is not None and incorrect_texts is not None):
            raise InputError("pass the answer texts once: texts= (clip_lens) or tokens= (TransformerLens), not both.")
        return (texts if tokens is None else tokens), (incorrect_texts if incorrect_tokens is None else incorrect_tokens)

    def _clip_model(self):
        model = getattr(self, "clip_model", None) or self.model
        if not hasattr(model, "texts_to_residual_directions"):
            raise InputError("this cache was not made by HookedCLIP.run_with_cache; build one with it.")
        return model

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
        pos_slice = self._pos(pos_slice)
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
        pos_slice = self._pos(pos_slice)
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
        pos_slice = self._pos(pos_slice)
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
        cache.tokens = self.tokens
        cache.clip_model = self.model
        return cache


class TextActivationCache(CLIPActivationCache):
    """A [`CLIPActivationCache`][clip_lens.CLIPActivationCache] over the text tower (final LayerNorm ``ln_final``)."""

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
