"""Model names, pretrained tags and local checkpoints, with errors that say what to do.

Checkpoints are read with ``safetensors`` or ``torch.load(weights_only=True)``: no pickled
code from user files is ever executed.
"""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import open_clip
import torch
from open_clip.factory import convert_to_custom_text_state_dict, get_model_config
from torch import Tensor, nn

from clip_lens.errors import (
    CheckpointNotFoundError,
    ClipLensError,
    CorruptCheckpointError,
    InputError,
    ModelNotFoundError,
    StateDictMismatchError,
    UnsupportedArchitectureError,
    close_matches,
)

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def list_models() -> list[str]:
    """open_clip model names whose towers HookedCLIP reproduces exactly (ViT image + text)."""
    return [name for name in open_clip.list_models() if unsupported_feature(get_model_config(name)) is None]


def unsupported_feature(config: Mapping[str, Any]) -> Optional[str]:
    """Why an open_clip model config cannot be hooked exactly, or None if it can."""
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if vision.get("timm_model_name"):
        return f"timm image tower ({vision['timm_model_name']})"
    if isinstance(vision.get("layers"), (list, tuple)):
        return "ResNet image tower"
    if text.get("hf_model_name"):
        return f"Hugging Face text tower ({text['hf_model_name']})"
    if isinstance(vision.get("attentional_pool"), str):
        return f"attentional_pool='{vision['attentional_pool']}'"
    for cfg, tower in ((vision, "image"), (text, "text")):
        custom = [k for k in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc") if cfg.get(k)]
        if custom or cfg.get("block_type") == "custom":
            return f"custom attention block in the {tower} tower ({', '.join(custom) or 'block_type=custom'})"
    return None


def _merge(base: dict, overrides: Mapping[str, Any]) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def model_config(model_name: str, overrides: Optional[Mapping[str, Any]] = None) -> dict:
    """The open_clip config of ``model_name`` with ``overrides`` merged in (nested dicts merge)."""
    config = get_model_config(model_name)
    if config is None:
        raise ModelNotFoundError(
            f"Unknown model '{model_name}'.{close_matches(model_name, open_clip.list_models())} "
            "clip_lens.list_models() lists the names HookedCLIP supports."
        )
    return _merge(config, overrides or {})


def _looks_like_path(pretrained: Union[str, Path]) -> bool:
    text = str(pretrained)
    return isinstance(pretrained, Path) or os.sep in text or text.endswith(CHECKPOINT_SUFFIXES) or os.path.exists(text)


def read_state_dict(path: Union[str, Path]) -> dict[str, Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict without running pickled code."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"Checkpoint not found: {path}. Check the path (it is read from local disk).")
    if path.is_dir():
        raise CheckpointNotFoundError(f"{path} is a directory; pass the checkpoint file inside it.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            checkpoint: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CorruptCheckpointError(f"Cannot read {path} as safetensors ({exc}). Is the file complete?") from exc
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CorruptCheckpointError(
                f"{path} is not a tensor-only checkpoint, or it is corrupt ({str(exc).splitlines()[0]}). "
                "clip_lens loads with torch.load(weights_only=True) and never unpickles code: "
                "re-save it with torch.save(model.state_dict(), path) or as .safetensors."
            ) from exc
        except Exception as exc:
            raise CorruptCheckpointError(f"Cannot read checkpoint {path} ({type(exc).__name__}: {exc}).") from exc
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise CorruptCheckpointError(f"{path} does not hold a state dict of tensors (got {type(checkpoint).__name__}).")
    state_dict = dict(checkpoint)
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from DistributedDataParallel
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _listing(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Load ``state_dict`` into an open_clip model, naming every missing, unexpected or misshapen key."""
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    expected = model.state_dict()
    for key in ("logit_scale", "logit_bias"):  # scalar vs 1-d parameter, as open_clip does
        if key in state_dict and key in expected and state_dict[key].shape != expected[key].shape:
            if state_dict[key].numel() == expected[key].numel():
                state_dict[key] = state_dict[key].reshape(expected[key].shape)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
        raise StateDictMismatchError(
            f"The {source} does not match the model architecture: " + "; ".join(parts)
            + ". Is it a checkpoint of this model name?",
            missing, unexpected, mismatched,
        )
    model.load_state_dict(state_dict, strict=True)


def load_open_clip(
    model_name: str,
    pretrained: Union[str, Path, None] = None,
    *,
    config_overrides: Optional[Mapping[str, Any]] = None,
    cache_dir: Optional[str] = None,
) -> tuple[nn.Module, str, Optional[str], Any]:
    """Build the open_clip model behind :meth:`HookedCLIP.from_pretrained`.

    Returns ``(model, model_name, pretrained_tag_or_path, preprocess)``.
    """
    if not isinstance(model_name, str):
        raise InputError(f"model_name must be a string such as 'ViT-B-16', got {type(model_name).__name__}.")
    config = model_config(model_name, config_overrides)
    feature = unsupported_feature(config)
    if feature is not None:
        raise UnsupportedArchitectureError(
            f"'{model_name}' uses a {feature}, which HookedCLIP does not reproduce exactly. "
            "Supported: open_clip VisionTransformer image towers with open_clip text towers (clip_lens.list_models())."
        )
    kwargs: dict[str, Any] = {}
    if config_overrides:
        kwargs = {k: v for k, v in config.items() if k in config_overrides}
    try:
        if pretrained is None:
            model = open_clip.create_model(model_name, pretrained=None, **kwargs)
        elif _looks_like_path(pretrained):
            state_dict = read_state_dict(pretrained)
            model = open_clip.create_model(model_name, pretrained=None, **kwargs)
            load_state_dict_strict(model, state_dict, source=f"checkpoint {pretrained}")
            pretrained = str(pretrained)
        elif pretrained in open_clip.list_pretrained_tags_by_model(model_name):
            try:
                model = open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir, **kwargs)
            except RuntimeError as exc:
                raise ClipLensError(
                    f"Could not fetch the '{pretrained}' weights of {model_name} ({exc}). Without network "
                    "access, download the checkpoint elsewhere and pass its local path as pretrained=."
                ) from exc
        else:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            raise ModelNotFoundError(
                f"'{pretrained}' is neither a pretrained tag of {model_name} nor an existing checkpoint file."
                f"{close_matches(str(pretrained), tags)} Tags: {', '.join(tags) or 'none'}."
            )
    except TypeError as exc:  # open_clip's config dataclasses reject unknown keys
        raise InputError(f"Invalid config_overrides for {model_name}: {exc}") from exc
    model.eval()
    return model, model_name, None if pretrained is None else str(pretrained), None
