"""HookedCLIP: an OpenCLIP model with TransformerLens hook points on both towers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from clip_lens.cache import CLIPActivationCache
from clip_lens.checks import require_finite
from clip_lens.config import TowerConfig
from clip_lens.errors import HookNameError, InputError, UnsupportedArchitectureError, close_matches
from clip_lens.sae.splice import SAESplicing
from clip_lens.text import TextTower
from clip_lens.towers.hf_text import HFTextEncoder, HFTextTower, LazyHFTokenizer
from clip_lens.vision import VisionTower
from clip_lens.weights import CLIPWeights

RETURN_TYPES = ("tuple", "image_features", "text_features", "logits", "loss", None)
"""What [`HookedCLIP.forward`][clip_lens.HookedCLIP.forward] can return (``return_type``)."""
TOWER_PREFIX = "visual."  # the image tower's hooks are exposed without this prefix


def _eval_transform(model: nn.Module) -> Optional[Callable]:
    """open_clip's evaluation transform (PIL image -> tensor) from the model's preprocess config."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = getattr(model.visual, "preprocess_cfg", None)
    if not cfg:
        return None
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def _image_tower(visual: nn.Module, model_name: Optional[str]) -> nn.Module:
    """The hooked image tower of a family: open_clip's ViT or ResNet, or a timm trunk (SigLIP, EVA,
    PE-Core, … ViTs; ConvNeXt; FastViT)."""
    kind = type(visual).__name__
    if kind == "ModifiedResNet":
        from clip_lens.towers.resnet import ResNetTower

        return ResNetTower(visual, model_name)
    if kind == "TimmModel":
        trunk = type(visual.trunk).__name__
        if trunk == "ConvNeXt":
            from clip_lens.towers.convnext import ConvNeXtTower

            return ConvNeXtTower(visual, model_name)
        if trunk == "FastVit":
            from clip_lens.towers.fastvit import FastViTTower

            return FastViTTower(visual, model_name)
        from clip_lens.towers.timm_vit import TimmVisionTower

        return TimmVisionTower(visual, model_name)
    return VisionTower(visual, model_name)


def _text_tower(model: nn.Module, model_name: Optional[str]) -> nn.Module:
    """The hooked text tower: open_clip's own text transformer, or a Hugging Face one (run as it is)."""
    if isinstance(getattr(model, "text", None), HFTextEncoder):
        return HFTextTower(model.text, model_name)
    return TextTower(model, model_name)


class HookedCLIP(SAESplicing, CLIPWeights, HookedRootModule):
    """An OpenCLIP model whose image and text towers expose named hook points.

    The image tower's hooks sit at the top level (``blocks.3.attn.hook_pattern``), the text
    tower's under ``text.`` (``text.blocks.3.attn.hook_pattern``); see the tables in
    `VisionTower`, `TextTower` (or
    [`HFTextTower`][clip_lens.towers.hf_text.HFTextTower]: two hooks for a Hugging Face text tower) and
    ``docs/concepts/hooks.md`` for the full ordered list with shapes. Parameters are shared
    with the open_clip model it was built from. Outputs equal open_clip's (fp32, ≤1e-5).

    Build one with [`from_pretrained`][clip_lens.HookedCLIP.from_pretrained] (a model name from ``clip_lens.list_models()``)
    or [`from_open_clip`][clip_lens.HookedCLIP.from_open_clip] (a model you already have).
    """

    def __init__(
        self,
        model: nn.Module,
        model_name: Optional[str] = None,
        pretrained: Optional[str] = None,
        preprocess: Optional[Callable] = None,
        tokenizer: Optional[Callable] = None,
    ):
        super().__init__()
        self.visual = _image_tower(model.visual, model_name)
        self.text = _text_tower(model, model_name)
        self.logit_scale = model.logit_scale
        self.logit_bias = getattr(model, "logit_bias", None)
        self.model_name = model_name
        self.pretrained = pretrained
        self.preprocess = preprocess if preprocess is not None else _eval_transform(model)
        if tokenizer is None and isinstance(self.text, HFTextTower):  # open_clip.get_tokenizer would download
            tokenizer = LazyHFTokenizer(self.text.cfg.extra["hf_model_name"], model_name=model_name)
        self.tokenizer = tokenizer
        self.eval()
        self.setup()

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        pretrained: Union[str, Path, None] = None,
        *,
        device: Union[str, torch.device] = "cpu",
        dtype: Optional[torch.dtype] = None,
        precision: Optional[str] = None,
        config_overrides: Optional[dict[str, Any]] = None,
        cache_dir: Optional[str] = None,
        tag: Optional[str] = None,
        allow_nonfinite: bool = False,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        **open_clip_kwargs: Any,
    ) -> "HookedCLIP":
        """Build a hooked model by name.

        Args:
            model_name: a name from ``clip_lens.list_models()``: an open_clip model (``"ViT-B-16"``)
                or a bundled one (``"toy-shapes"``, the shapes-world CLIP, works offline).
            pretrained: an open_clip pretrained tag (``"laion2b_s34b_b88k"``; downloaded by
                open_clip), a local checkpoint (safetensors, or a ``torch.save`` file read with
                ``torch.load(weights_only=True)``; recognised by content, whatever its suffix), or
                ``None`` for random weights.
            device: where the model lives.
            dtype: its parameter precision (``torch.float32`` unless ``precision`` says otherwise).
            precision: open_clip's name for it: ``"fp32"``, ``"amp"``/``"amp_bf16"`` (fp32 weights;
                run under ``model.autocast(...)``), ``"pure_fp16"``/``"pure_bf16"`` (every weight in
                half precision). open_clip's mixed ``"fp16"``/``"bf16"`` (LayerNorms kept in fp32) are
                refused: a hooked model has one dtype.
            config_overrides: nested dict merged into the open_clip config before building,
                e.g. ``{"vision_cfg": {"layers": 2}}`` for a shallow copy of an architecture.
            cache_dir: download cache for pretrained tags.
            tag: the pretrained tag whose preprocessing (mean, std, interpolation, resize mode) a
                local checkpoint gets, e.g. ``from_pretrained("ViT-B-16-SigLIP", "ckpt.safetensors",
                tag="webli")``. Without it a local checkpoint gets the preprocessing all the model's
                tags share, or, when they disagree, open_clip's default with a warning naming them.
            allow_nonfinite: load weights holding NaN/inf (with a warning) instead of refusing them
                with [`CorruptCheckpointError`][clip_lens.CorruptCheckpointError]: for research on broken checkpoints.
            fold_ln: fold each LayerNorm's weight and bias into the weights that read it
                (TransformerLens' ``fold_ln``); outputs are unchanged (parity ≤1e-5).
            center_writing_weights: remove the mean from every weight writing into the residual
                stream (every reader is a LayerNorm, so outputs are unchanged).
            **open_clip_kwargs: open_clip's ``create_model``/``create_model_and_transforms`` arguments
                with its meaning: ``force_quick_gelu``, ``force_custom_text``, ``force_image_size``,
                ``force_context_length``, ``force_preprocess_cfg``, ``image_mean``, ``image_std``,
                ``image_interpolation``, ``image_resize_mode``; ``output_dict``/``force_patch_dropout``
                only at their no-op values. Those that cannot apply to a hooked model (``jit``,
                ``aug_cfg``, ``pretrained_image``, …) raise [`InputError`][clip_lens.InputError] saying why
                (`clip_lens.loading.create_options`).
        """
        from clip_lens.loading import check_finite_weights, create_options, load_open_clip, precision_dtype

        dtype = precision_dtype(precision, dtype)
        options = create_options(**open_clip_kwargs)
        loaded = load_open_clip(model_name, pretrained, config_overrides=config_overrides, cache_dir=cache_dir,
                                tag=tag, allow_nonfinite=allow_nonfinite, options=options)
        hooked = cls(loaded.model, model_name=loaded.name, pretrained=loaded.pretrained, tokenizer=loaded.tokenizer)
        if fold_ln or center_writing_weights:
            from clip_lens.weights import process_weights

            process_weights(hooked, fold_ln=fold_ln, center_writing_weights=center_writing_weights)
        hooked = hooked.to(device=device, dtype=dtype)
        if dtype in (torch.float16, torch.bfloat16) and loaded.pretrained is not None:
            check_finite_weights(hooked, f"{dtype} conversion of {loaded.pretrained}", allow_nonfinite)  # overflow
        return hooked

    @classmethod
    def from_open_clip(cls, model: nn.Module, model_name: Optional[str] = None) -> "HookedCLIP":
        """Wrap an open_clip ``CLIP``/``CustomTextCLIP``/``CoCa`` model, sharing its parameters."""
        return cls(model, model_name=model_name)

    def setup(self) -> None:
        super().setup()
        renamed = {}
        for name, module in self.mod_dict.items():
            if name.startswith(TOWER_PREFIX):
                name = name[len(TOWER_PREFIX):]
                module.name = name
            renamed[name] = module
        self.mod_dict = renamed
        self.hook_dict = {n: m for n, m in renamed.items() if isinstance(m, HookPoint)}

    # --- TransformerLens surface (what ActivationCache helpers read) ---------------------
    @property
    def cfg(self) -> TowerConfig:
        """The image tower's config (``model.text.cfg`` for the text tower)."""
        self.visual.cfg.device = self.text.cfg.device = self.device  # kept current for TL helpers
        return self.visual.cfg

    @property
    def blocks(self) -> nn.ModuleList:
        """The image tower's transformer blocks (a convolutional tower has stages instead: ``model.visual.stages``)."""
        blocks = getattr(self.visual, "blocks", None)
        if blocks is None:
            raise UnsupportedArchitectureError(
                f"a {self.visual.family} image tower has no transformer blocks; its stages are model.visual.stages "
                "(hooks stages.{s}.blocks.{b}.*, see `clip-lens hooks`)."
            )
        return blocks

    @property
    def ln_final(self) -> nn.Module:
        """Alias of ``ln_post`` for TransformerLens helpers that look for ``ln_final``."""
        return self.visual.ln_post

    @property
    def spatial_hook(self) -> str:
        """The hook whose last ``grid_h · grid_w`` positions are the image's spatial tokens
        ``[batch, ..., C]``: a ViT's last ``hook_resid_post`` (prefix tokens first), a convolutional
        tower's ``hook_spatial_tokens`` (the last feature map, row-major)."""
        return self.visual.spatial_hook

    @property
    def device(self) -> torch.device:
        return self.visual.device_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.device_weight.dtype

    def _enable_hook_with_name(self, name: str, hook: Callable, dir: str) -> None:
        self.check_hook_name(name)
        super()._enable_hook_with_name(name, hook, dir)

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:
        if isinstance(name, str):
            self.check_hook_name(name)
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def check_hook_name(self, name: str) -> None:
        """Raise [`HookNameError`][clip_lens.HookNameError] (listing close names) for an unknown hook name."""
        if name not in self.hook_dict:
            note = getattr(self.text, "unhooked_note", None) if name.startswith("text.") else None
            raise HookNameError(
                f"No hook named '{name}'.{close_matches(name, self.hook_dict)}" + (f" {note}" if note else "")
            )

    def run_with_cache(
        self, *model_args: Any, names_filter=None, incl_bwd: bool = False,
        metric: Optional[Callable[[Any], Tensor]] = None, **kwargs: Any,
    ):
        """Run the model and return ``(output, CLIPActivationCache)`` (TransformerLens semantics).

        ``names_filter`` may be a hook name, a list of names or a predicate; unknown names in a
        list raise [`HookNameError`][clip_lens.HookNameError]. With ``incl_bwd=True`` the gradients of a scalar are
        cached too (keys ``<hook>_grad``): of ``metric(output)`` when a metric is given, else of
        the output itself, which must then be a scalar (``return_type="loss"``). Text inputs are
        kept on the cache (``cache.tokens``) for ``pos_slice="pooled"``.
        """
        if isinstance(names_filter, str):
            self.check_hook_name(names_filter)
        elif isinstance(names_filter, (list, tuple)):
            for name in names_filter:
                self.check_hook_name(name)
            names_filter = list(names_filter)
        text = kwargs.get("text", model_args[1] if len(model_args) > 1 else None)
        tokens = kwargs.get("tokens")
        if tokens is None and text is not None and kwargs.get("start_at_layer") is None:
            tokens = self.check_tokens(text)  # tokenized once: the cache keeps the ids
            if "text" in kwargs:
                kwargs["text"] = tokens
            else:
                model_args = (model_args[0], tokens, *model_args[2:])
        remove_batch_dim = kwargs.pop("remove_batch_dim", False)
        device = kwargs.pop("device", None)
        cache_dict, fwd, bwd = self.get_caching_hooks(
            names_filter, incl_bwd, device, remove_batch_dim=remove_batch_dim, pos_slice=kwargs.pop("pos_slice", None)
        )
        reset = kwargs.pop("reset_hooks_end", True)
        with self.hooks(fwd_hooks=fwd, bwd_hooks=bwd, reset_hooks_end=reset,
                        clear_contexts=kwargs.pop("clear_contexts", False)):
            out = self(*model_args, **kwargs)
            if incl_bwd:
                self._scalar(out if metric is None else metric(out), metric).backward()
        cache = CLIPActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)
        cache.tokens = tokens
        return out, cache

    @staticmethod
    def _scalar(value: Any, metric: Optional[Callable]) -> Tensor:
        if isinstance(value, Tensor) and value.numel() == 1 and value.requires_grad:
            return value.reshape(())
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        if isinstance(value, Tensor) and value.numel() == 1:
            got = "a scalar without gradient (computed under no_grad, or detached)"
        source = "metric(output)" if metric is not None else "the model output"
        raise InputError(
            f"incl_bwd=True differentiates a scalar, but {source} is {got}; pass return_type='loss' or "
            "metric=lambda out: <scalar tensor> (e.g. clip_lens.patching.logit_diff_metric(...))."
        )

    # --- inputs -------------------------------------------------------------------------
    def to_model_device(self, tensor: Tensor, what: str) -> Tensor:
        """``tensor`` on the model's device (copied there from another real device, as TransformerLens
        does with inputs). Raises [`InputError`][clip_lens.InputError] for a tensor or a model on the ``meta`` device
        (shapes without values) and when the copy fails, naming both devices."""
        device = self.device
        if tensor.is_meta:
            raise InputError(
                f"got {what} on the meta device: a meta tensor has a shape but no values to compute with. "
                f"Create them on a real device (the model is on {device}), e.g. with model.preprocess."
            )
        if device.type == "meta":
            raise InputError(
                "the model's weights are on the meta device (shapes without values): load real weights first, "
                "e.g. HookedCLIP.from_pretrained(name, pretrained=...) or model.to_empty(device=...) and a state dict."
            )
        if tensor.device == device:
            return tensor
        try:
            return tensor.to(device)
        except Exception as exc:  # e.g. a device this process cannot copy from
            raise InputError(
                f"got {what} on {tensor.device} but the model is on {device}, and copying them there failed "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'}); "
                f"move them with .to(model.device) or the model with model.to({str(tensor.device)!r})."
            ) from exc

    def check_images(self, images: Any) -> Float[Tensor, "batch 3 H W"]:
        """Validate a pixel batch ``[batch, 3, H, W]`` (preprocessed floats at the model's size)."""
        h, w = self.cfg.image_size
        if not isinstance(images, Tensor):
            kind = type(images).__name__
            if type(images).__module__ == "numpy":
                hint = "convert with torch.from_numpy(images) (float, [batch, 3, H, W])"
            elif isinstance(images, (list, tuple)):
                hint = "preprocess and stack them: torch.stack([model.preprocess(im) for im in images])"
            else:
                hint = "preprocess PIL images with model.preprocess(image)[None]"
            raise InputError(f"images must be a torch.Tensor [batch, 3, {h}, {w}], got {kind}; {hint}.")
        if not images.is_floating_point():
            raise InputError(
                f"images must be floating point (got {images.dtype}); convert with model.preprocess "
                "or images.float() / 255 and normalise."
            )
        if images.ndim == 3:
            raise InputError(
                f"images must be batched [batch, 3, {h}, {w}], got {tuple(images.shape)}; "
                "for a single image use images[None]."
            )
        if images.ndim != 4:
            raise InputError(f"images must have shape [batch, 3, {h}, {w}], got {tuple(images.shape)}.")
        if images.shape[1] != 3:
            hint = "use images.permute(0, 3, 1, 2) for channels-last input" if images.shape[-1] == 3 else (
                "repeat grey images with images.expand(-1, 3, -1, -1)" if images.shape[1] == 1
                else "drop the alpha channel with images[:, :3]" if images.shape[1] == 4
                else "convert them to RGB"
            )
            raise InputError(
                f"images have {images.shape[1]} channels (shape {tuple(images.shape)}) but the model takes 3 "
                f"(RGB, [batch, 3, {h}, {w}]); {hint}."
            )
        if tuple(images.shape[-2:]) != (h, w):
            raise InputError(
                f"images are {images.shape[-2]}x{images.shape[-1]} but {self.model_name or 'this model'} "
                f"takes {h}x{w}; resize with model.preprocess."
            )
        images = self.to_model_device(images, "images")
        require_finite(images, "images contain NaN or inf values.")
        return images.to(dtype=self.dtype)

    def check_tokens(self, tokens: Any) -> Int[Tensor, "batch ctx"]:
        """Validate token ids ``[batch, ctx]`` with ``0 < ctx <= context_length``; strings are tokenized."""
        if isinstance(tokens, str) or (
            isinstance(tokens, (list, tuple)) and tokens and any(isinstance(t, str) for t in tokens)
        ):
            tokens = self.to_tokens(tokens)
        if not isinstance(tokens, Tensor):
            hint = "use model.to_tokens(texts)"
            if type(tokens).__module__ == "numpy":
                hint = "convert with torch.from_numpy(tokens)"
            elif isinstance(tokens, (list, tuple)) and tokens:
                hint = "convert with torch.tensor(tokens) or " + hint
            raise InputError(
                f"tokens must be a torch.Tensor of token ids or a list of strings, got {type(tokens).__name__}; {hint}."
            )
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise InputError(f"tokens must be integer token ids, got dtype {tokens.dtype}; use model.to_tokens(texts).")
        if tokens.ndim == 1:
            raise InputError(f"tokens must be batched [batch, ctx], got {tuple(tokens.shape)}; use tokens[None].")
        if tokens.ndim != 2:
            raise InputError(f"tokens must have shape [batch, ctx], got {tuple(tokens.shape)}.")
        ctx = self.text.cfg.context_length
        if tokens.shape[1] > ctx:
            raise InputError(f"tokens have {tokens.shape[1]} positions but the context length is {ctx}; truncate them.")
        if tokens.shape[1] == 0:
            raise InputError(f"tokens have 0 positions (shape {tuple(tokens.shape)}); use model.to_tokens(texts).")
        tokens = self.to_model_device(tokens, "tokens")
        vocab = self.text.cfg.vocab_size
        if tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())  # python ints: no uint8 wrap-around in comparisons
            if lo < 0 or hi >= vocab:
                raise InputError(f"token ids must lie in [0, {vocab}), got [{lo}, {hi}].")
        return tokens.to(dtype=torch.long)

    def to_tokens(self, texts: Union[str, Sequence[str]]) -> Int[Tensor, "batch ctx"]:
        """Tokenize with the model's tokenizer (bundled, or ``open_clip.get_tokenizer(name)``)."""
        import open_clip

        if self.tokenizer is None and not self.model_name:
            raise InputError("this model has no open_clip name, so its tokenizer is unknown; pass token ids.")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            found = type(texts).__name__ if not isinstance(texts, (list, tuple)) else ", ".join(
                sorted({type(t).__name__ for t in texts if not isinstance(t, str)})
            )
            raise InputError(f"to_tokens takes a string or a list of strings, got {found}.")
        if self.tokenizer is None:  # building open_clip's tokenizer reads its BPE file: do it once
            self.tokenizer = open_clip.get_tokenizer(self.model_name, context_length=self.text.cfg.context_length)
        return self.tokenizer(list(texts)).to(self.device)

    # --- forward ------------------------------------------------------------------------
    def encode_image(self, images: Tensor, normalize: bool = False) -> Float[Tensor, "batch d_embed"]:
        """Image embeddings, as ``open_clip`` ``encode_image``."""
        out = self.visual(self.check_images(images))
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, tokens: Any, normalize: bool = False) -> Float[Tensor, "batch d_embed"]:
        """Text embeddings, as ``open_clip`` ``encode_text``."""
        out = self.text(self.check_tokens(tokens))
        return F.normalize(out, dim=-1) if normalize else out

    def forward(
        self,
        image: Optional[Tensor] = None,
        text: Any = None,
        *,
        return_type: Optional[str] = "tuple",
        start_at_layer: Optional[int] = None,
        stop_at_layer: Optional[int] = None,
        tokens: Any = None,
    ):
        """Run the towers; by default open_clip's ``(image_features, text_features, logit_scale[, logit_bias])``.

        Args:
            image: pixels ``[batch, 3, H, W]``; with ``start_at_layer`` the image tower's residual
                stream ``[batch, n, d_model]`` entering that block.
            text: token ids ``[batch, ctx]`` or strings; with ``start_at_layer`` (and no image) the
                text tower's residual stream, with ``tokens`` giving masks and pooled positions.
            return_type: one of `RETURN_TYPES`:
                ``"tuple"`` open_clip's output; ``"image_features"``/``"text_features"`` the
                L2-normalised embeddings ``[batch, d_embed]``; ``"logits"`` ``logits_per_image``
                ``[n_images, n_texts]`` (``logit_scale`` and ``logit_bias`` applied);
                ``"loss"`` the model's training loss on paired images and texts (CLIP's
                contrastive cross-entropy, or the sigmoid loss when the model has a
                ``logit_bias``); ``None`` nothing.
            start_at_layer: TransformerLens' layer range start: the run begins at this block from
                the residual stream passed as ``image`` (or ``text``). It acts on the image tower
                whenever an image is given (on the text tower otherwise).
            stop_at_layer: return the residual stream entering this block instead of an output;
                needs exactly one of ``image``/``text``.
            tokens: the token ids of a text run started with ``start_at_layer``.
        """
        if return_type not in RETURN_TYPES:
            raise InputError(f"return_type={return_type!r} is not one of {RETURN_TYPES}.")
        if stop_at_layer is not None:
            if (image is None) == (text is None):
                raise InputError(
                    "stop_at_layer returns one tower's residual stream: pass either image or text, not both."
                )
        if start_at_layer is not None or stop_at_layer is not None:
            on_image = image is not None
            if on_image and self.visual.family != "vit":  # before the residual stream's shape is checked
                self.visual.refuse_layer_range(start_at_layer, stop_at_layer)
            if on_image:
                image = self._image_input(image, start_at_layer)
                image = self.visual(image, start_at_layer, stop_at_layer)
            else:
                if start_at_layer is not None and tokens is None:
                    raise InputError("start_at_layer on the text tower needs tokens=[batch, ctx] for its masks and pooling.")
                tokens = self.check_tokens(text if start_at_layer is None else tokens)
                residual = None if start_at_layer is None else self._residual(text, self.text.cfg, "text")
                text = self.text(tokens, start_at_layer, stop_at_layer, residual=residual)
            if stop_at_layer is not None:
                return image if on_image else text
            image_features = None if image is None else F.normalize(image, dim=-1)
            text_features = F.normalize(text, dim=-1) if not on_image else (
                None if text is None else self.encode_text(text, normalize=True))
        else:
            image_features = self.encode_image(image, normalize=True) if image is not None else None
            text_features = self.encode_text(text, normalize=True) if text is not None else None
        return self._output(image_features, text_features, return_type)

    def _image_input(self, image: Any, start_at_layer: Optional[int]) -> Tensor:
        return self.check_images(image) if start_at_layer is None else self._residual(image, self.cfg, "image")

    def _residual(self, x: Any, cfg: TowerConfig, tower: str) -> Float[Tensor, "batch n m"]:
        """Validate a residual stream passed with ``start_at_layer``."""
        n = cfg.n_ctx
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != cfg.d_model or (tower == "image" and x.shape[1] != n):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            what = f"[batch, {n}, {cfg.d_model}]" if tower == "image" else f"[batch, n, {cfg.d_model}]"
            raise InputError(
                f"with start_at_layer the {tower} input is the residual stream {what}, got {shape}; "
                f"get one from model(..., stop_at_layer=layer) or a cache's blocks.<layer>.hook_resid_pre."
            )
        if not x.is_floating_point():
            raise InputError(f"with start_at_layer the {tower} input is a residual stream of floats, got dtype {x.dtype}.")
        return self.to_model_device(x, f"the {tower} residual stream").to(dtype=self.dtype)

    def _output(self, image_features: Optional[Tensor], text_features: Optional[Tensor], return_type: Optional[str]):
        if return_type is None:
            return None
        if return_type == "tuple":
            if self.logit_bias is not None:
                return image_features, text_features, self.logit_scale.exp(), self.logit_bias
            return image_features, text_features, self.logit_scale.exp()
        needs = {"image_features": (image_features,), "text_features": (text_features,)}.get(
            return_type, (image_features, text_features))
        if any(f is None for f in needs):
            which = "image and text" if len(needs) == 2 else return_type.split("_")[0]
            raise InputError(f"return_type={return_type!r} needs {which} inputs.")
        if return_type == "image_features":
            return image_features
        if return_type == "text_features":
            return text_features
        logits = self.logit_scale.exp() * image_features @ text_features.T
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        if return_type == "logits":
            return logits
        return self._loss(logits)

    def _loss(self, logits: Float[Tensor, "n n"]) -> Float[Tensor, ""]:
        """open_clip's training loss for paired rows: contrastive CE, or SigLIP's sigmoid loss."""
        n_images, n_texts = logits.shape
        if n_images != n_texts:
            raise InputError(
                f"return_type='loss' pairs image i with text i; got {n_images} images and {n_texts} texts."
            )
        if self.logit_bias is not None:  # SigLIP: +1 on the diagonal, -1 elsewhere
            labels = 2 * torch.eye(n_images, device=logits.device, dtype=logits.dtype) - 1
            return -F.logsigmoid(labels * logits).sum() / n_images
        labels = torch.arange(n_images, device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    def get_logits(self, image: Tensor, text: Any) -> tuple[Tensor, Tensor]:
        """``(logits_per_image, logits_per_text)`` as open_clip's ``get_logits``."""
        image_features = self.encode_image(image, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        logits = self.logit_scale.exp() * image_features @ text_features.T
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits, logits.T

    def residual_directions(
        self, vectors: Float[Tensor, "*k d_embed"], tower: str = "image"
    ) -> Float[Tensor, "*k d_model"]:
        """Embedding-space vectors carried back to ``tower``'s residual stream before its final LayerNorm.

        For a residual component ``c`` centred and divided by the final LN's cached scale (what
        ``cache.apply_ln_to_stack`` does), ``c · d`` is its share of ``embedding · v``; the LN bias
        adds a constant. ``d = γ ⊙ (W v)`` with ``W`` the read-out's projection (TransformerLens'
        ``tokens_to_residual_directions`` for CLIP). Needs a linear read-out: a tower with an
        attentional pooler raises (use ``decompose(..., directions=...)``, which freezes it).
        """
        if tower not in ("image", "text"):
            raise InputError(f"tower must be 'image' or 'text', got {tower!r}.")
        module = self.visual if tower == "image" else self.text
        if isinstance(module, HFTextTower) or (tower == "image" and module.readout_plan().pooler is not None):
            what = "a Hugging Face text tower is run as a whole" if tower == "text" else "its attentional pooler"
            raise UnsupportedArchitectureError(
                f"the {tower} tower's read-out is not linear in the residual stream ({what}); "
                "use model.decompose(images, directions=...), which freezes the pooler."
            )
        weight, _ = module.output_affine()
        ln = module.ln_post if tower == "image" else module.ln_final
        vectors = vectors.to(device=weight.device, dtype=weight.dtype)
        if vectors.shape[-1] != weight.shape[1]:
            raise InputError(f"vectors have width {vectors.shape[-1]} but the {tower} embedding has {weight.shape[1]}.")
        directions = vectors @ weight.T
        return directions if ln is None else directions * ln.weight

    def texts_to_residual_directions(self, texts: Any) -> Float[Tensor, "n_texts d_model"]:
        """Texts (strings or token ids) as directions in the image tower's residual stream before
        ``ln_post``: their normalised text embeddings through [`residual_directions`][clip_lens.HookedCLIP.residual_directions]."""
        with torch.no_grad():
            features = self.encode_text(texts, normalize=True)
        return self.residual_directions(features, "image")

    def images_to_residual_directions(self, images: Tensor) -> Float[Tensor, "n_images d_model"]:
        """Images as directions in the text tower's residual stream before ``ln_final``."""
        with torch.no_grad():
            features = self.encode_image(images, normalize=True)
        return self.residual_directions(features, "text")

    def to_str_tokens(self, input: Any) -> Union[list[str], list[list[str]]]:
        """Names of the positions of ``input``: a string gives its tokens (a list of strings or a
        token batch gives one list each, padding dropped); an image batch gives the image tower's
        positions (``"cls"``, ``"reg0"``…, then ``"r{row}c{col}"`` per patch)."""
        if isinstance(input, Tensor) and input.is_floating_point():
            cfg = self.cfg
            prefix = ["cls"] + [f"reg{i}" for i in range(cfg.n_prefix_tokens - 1)] if cfg.n_prefix_tokens else []
            gh, gw = cfg.grid_size
            return prefix + [f"r{r}c{c}" for r in range(gh) for c in range(gw)]
        single = isinstance(input, str)
        tokens = self.check_tokens(input)
        lists = [self._decode_ids(row) for row in tokens.tolist()]
        return lists[0] if single else lists

    def _decode_ids(self, ids: list[int]) -> list[str]:
        tokenizer = self.tokenizer
        if tokenizer is None:
            import open_clip

            tokenizer = self.tokenizer = open_clip.get_tokenizer(self.model_name, context_length=self.text.cfg.context_length)
        inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers tokenizer
        pad = getattr(self.text, "pad_id", 0)
        while ids and ids[-1] == pad:
            ids = ids[:-1]
        if hasattr(tokenizer, "vocab") and isinstance(tokenizer.vocab, list):  # the bundled word tokenizer
            return [tokenizer.vocab[i] for i in ids]
        if hasattr(tokenizer, "decoder"):  # open_clip's SimpleTokenizer
            return [tokenizer.decoder[i].replace("</w>", " ").strip() or " " for i in ids]
        if inner is not None and hasattr(inner, "convert_ids_to_tokens"):
            return list(inner.convert_ids_to_tokens(ids))
        raise UnsupportedArchitectureError(f"cannot name tokens with tokenizer {type(tokenizer).__name__}.")

    def decompose_text(self, tokens: Any, **kwargs: Any):
        """Exact decomposition of the text embedding; see [`clip_lens.decompose_text.decompose_text`][clip_lens.decompose_text.decompose_text]."""
        from clip_lens.decompose_text import decompose_text

        return decompose_text(self, tokens, **kwargs)

    def autocast(self, precision: str = "bf16"):
        """A context in which the forward pass, `run_with_cache` and `decompose` run in mixed
        ``precision`` (``"bf16"``, ``"fp16"``; ``"fp32"``: none) on the model's device, with the weights
        unchanged; see [`clip_lens.precision`][clip_lens.precision].

        Example:
            >>> with model.autocast("bf16"):  # doctest: +SKIP
            ...     parts = model.decompose(images)
        """
        from clip_lens.precision import autocast

        return autocast(self.device, precision)

    def decompose(self, images: Tensor, **kwargs: Any):
        """Exact direct-contribution decomposition of the image embedding; see [`clip_lens.decompose`][clip_lens.decompose]."""
        from clip_lens.decompose import decompose

        return decompose(self, images, **kwargs)
