"""Model names, pretrained tags and local checkpoints, with errors that say what to do.

Checkpoints are read with ``safetensors`` or ``torch.load(weights_only=True)``: no pickled
code from user files is ever executed (`clip_lens.checkpoints`); what a pretrained tag implies and
whether its weights can be reached is `clip_lens.pretrained_tags`; both are re-exported here. Bundled
models come from the registry ``pretrained.json`` (data: config, weights, tokenizer class, world version).
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
import functools
import json
from dataclasses import dataclass
from importlib import resources
import inspect
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import open_clip
import torch
from open_clip.factory import get_model_config
from torch import Tensor, nn

# the support table and checks (TIMM_TOWERS … unsupported_feature) live in clip_lens.catalog, which
# `clip-lens models` reads without importing torch; re-exported here
from clip_lens.catalog import (  # noqa: F401
    CUSTOM_BLOCK_FEATURES,
    NATIVE_REFUSALS,
    TIMM_TOWERS,
    Coverage,
    timm_tower_problem,
    unsupported_feature,
)
# local checkpoints and pretrained tags: their own modules, re-exported here (where users import them)
from clip_lens.checkpoints import (  # noqa: F401
    CHECKPOINT_FORMATS,
    CHECKPOINT_SUFFIXES,
    _looks_like_path,
    check_finite_weights,
    checkpoint_format,
    load_state_dict_strict,
    nonfinite_tensors,
    pickle_globals,
    read_state_dict,
)
from clip_lens.errors import (
    CheckpointNotFoundError,
    ClipLensError,
    CorruptCheckpointError,
    InputError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
    close_matches,
)
from clip_lens.pretrained_tags import (  # noqa: F401
    TAG_PREPROCESS_KEYS,
    _check_tag,
    check_tag_reachable,
    checkpoint_preprocess,
    tag_preprocess,
)

BUNDLED_REGISTRY = "pretrained.json"  # models whose weights ship inside the package (data, not code)


@dataclass
class LoadedModel:
    """What `load_open_clip` builds: the open_clip model and how to feed it."""

    model: nn.Module
    name: str
    pretrained: Optional[str]
    tokenizer: Optional[Callable] = None


@functools.cache
def bundled_models() -> dict[str, dict[str, Any]]:
    """The registry of bundled models: ``{name: {"config": file, "weights": file, …}}``."""
    return json.loads(resources.files("clip_lens").joinpath(BUNDLED_REGISTRY).read_text())


def bundled_world(model: Any) -> tuple[Optional[int], bool]:
    """The shapes world a bundled model (or model name) was trained on: its registry entry's
    ``world_version`` (None for other models) and ``camouflage`` (``toy-shapes-camo``)."""
    name = model if isinstance(model, str) else getattr(model, "model_name", None)
    entry = bundled_models().get(name or "", {})
    version = entry.get("world_version")
    return (None if version is None else int(version)), bool(entry.get("camouflage", False))


def load_bundled(
    name: str,
    weights_file: Union[str, Path, None] = None,
    *,
    allow_nonfinite: bool = False,
    preprocess: Optional[Mapping[str, Any]] = None,
) -> LoadedModel:
    """Build a bundled model (e.g. ``"toy-shapes"``) from the weights inside the package, or with
    its architecture and tokenizer from ``weights_file`` (a checkpoint of its training run).
    ``preprocess`` overrides fields of its preprocessing (open_clip's ``image_mean`` … meaning);
    non-finite weights are refused unless ``allow_nonfinite`` (see `check_finite_weights`)."""
    from open_clip.factory import set_model_preprocess_cfg
    from open_clip.model import CLIP

    entry = bundled_models()[name]
    package = resources.files("clip_lens")
    meta = json.loads(package.joinpath(entry["config"]).read_text())
    weights = package.joinpath(entry["weights"])
    if not weights.is_file():
        raise CheckpointNotFoundError(
            f"The bundled weights of '{name}' are missing ({entry['weights']}); reinstall clip_lens or "
            f"train them with `python -m clip_lens.toy.train`."
        )
    if weights_file is not None:
        state_dict, source = read_state_dict(Path(weights_file)), str(weights_file)
    else:
        with resources.as_file(weights) as path:
            state_dict, source = read_state_dict(path), f"bundled:{entry['weights']}"
    model = CLIP(**meta["model_cfg"])
    load_state_dict_strict(model, state_dict, source=f"checkpoint {source} of {name}")
    check_finite_weights(model, f"checkpoint {source} of {name}", allow_nonfinite)
    set_model_preprocess_cfg(model, {**meta["preprocess_cfg"], **(preprocess or {})})
    return LoadedModel(model.eval(), name, source, bundled_tokenizer(name, entry).from_dict(meta["tokenizer"]))


def bundled_tokenizer(name: str, entry: Mapping[str, Any]) -> Any:
    """The tokenizer class a bundled model's registry entry names (``"tokenizer": "module:Class"``,
    built with ``Class.from_dict`` from the model's config): data, so that loading imports no
    particular tokenizer (the shapes world's lives in `clip_lens.toy`, above the core)."""
    import importlib

    target = entry.get("tokenizer")
    module, _, attribute = str(target).partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"the registry entry of bundled model '{name}' ({BUNDLED_REGISTRY}) names the tokenizer {target!r}, which "
            f"cannot be imported ({type(exc).__name__}: {exc}); it must be 'module:Class'. Reinstall clip_lens."
        ) from exc



def list_models(include_unsupported: bool = False) -> list[str]:
    """open_clip model names whose towers HookedCLIP reproduces exactly, bundled models first.

    With ``include_unsupported``: every open_clip name (see `unsupported_feature` for why
    some are refused).
    """
    names = open_clip.list_models()
    if not include_unsupported:
        names = [name for name in names if unsupported_feature(get_model_config(name)) is None]
    return [*bundled_models(), *names]


@contextmanager
def timm_create_kwargs(**kwargs: Any) -> Iterator[None]:
    """Pass ``kwargs`` (e.g. ``depth=2``) to every ``timm.create_model`` open_clip calls in the block.

    open_clip's configs cannot reshape a timm tower (``vision_cfg.layers`` is ignored for them), but
    timm's model functions take the same architecture arguments as keyword overrides.
    """
    if not kwargs:
        yield
        return
    import open_clip.timm_model as timm_model

    create = timm_model.timm.create_model

    def reshaped(name: str, **options: Any) -> nn.Module:
        return create(name, **{**options, **kwargs})

    timm_model.timm.create_model = reshaped
    try:
        yield
    finally:
        timm_model.timm.create_model = create


def model_coverage() -> list[Coverage]:
    """Every open_clip model name with its refusal reason (None when supported) and pretrained tag count."""
    return [
        Coverage(name, unsupported_feature(get_model_config(name)), len(open_clip.list_pretrained_tags_by_model(name)))
        for name in open_clip.list_models()
    ]



def _merge(base: dict, overrides: Mapping[str, Any]) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _override_fields() -> tuple[set[str], dict[str, set[str]]]:
    """Keys open_clip accepts at the top level of a model config, and inside each sub-config."""
    from open_clip.coca_model import CoCa, MultimodalCfg
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

    top = {"custom_text"}
    for cls in (CLIP, CustomTextCLIP, CoCa):
        top |= {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "cast_dtype")}
    nested = {
        "vision_cfg": {f.name for f in dataclasses.fields(CLIPVisionCfg)},
        "text_cfg": {f.name for f in dataclasses.fields(CLIPTextCfg)},
        "multimodal_cfg": {f.name for f in dataclasses.fields(MultimodalCfg)},
    }
    return top, nested


# Override values that must be positive integers (a size or a count), per sub-config ("" = top level).
# vision_cfg.layers and image_size take sequences too and are checked on their own.
POSITIVE_INT_FIELDS: dict[str, tuple[str, ...]] = {
    "": ("embed_dim",),
    "vision_cfg": ("width", "head_width", "patch_size", "attn_pooler_queries", "attn_pooler_heads"),
    "text_cfg": ("context_length", "vocab_size", "width", "heads", "layers"),
    "multimodal_cfg": ("context_length", "vocab_size", "width", "heads", "layers", "dim_head", "n_queries", "attn_pooler_heads"),
}


def _override_types() -> dict[str, dict[str, type]]:
    """``{sub-config: {field: bool | str}}``: fields open_clip declares as plain bool or str."""
    from open_clip.coca_model import MultimodalCfg
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    out: dict[str, dict[str, type]] = {"": {"quick_gelu": bool, "custom_text": bool}}
    for key, cls in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg), ("multimodal_cfg", MultimodalCfg)):
        out[key] = {f.name: f.type for f in dataclasses.fields(cls) if f.type in (bool, str) and f.default is not None}
    return out


def _check_value(model_name: str, section: str, key: str, value: Any, types: dict[str, dict[str, type]]) -> Any:
    """``value`` of override ``section.key`` checked (and numpy integers made ints); [`InputError`][clip_lens.InputError] if invalid."""
    from clip_lens.config import _kind, as_int

    where = f"{section}.{key}" if section else key
    prefix = f"Invalid config_overrides for {model_name}: "

    def positive(v: Any, what: str) -> int:
        number = as_int(v, prefix + what)
        if number < 1:
            raise InputError(f"{prefix}{what} must be a positive integer, got {number}.")
        return number

    if value is None and (section, key) == ("vision_cfg", "patch_size"):  # timm towers have none
        return value
    if key in POSITIVE_INT_FIELDS.get(section, ()) or (section == "vision_cfg" and key in ("layers", "image_size")):
        if isinstance(value, (list, tuple)) and (section, key) in (("vision_cfg", "layers"), ("vision_cfg", "image_size")):
            n = 4 if key == "layers" else 2  # ResNet stage depths; image (height, width)
            if len(value) != n:
                raise InputError(f"{prefix}{where} takes one positive integer or {n} of them, got {len(value)}: {value!r}.")
            return type(value)(positive(v, f"{where}[{i}]") for i, v in enumerate(value))
        return positive(value, where)
    if key == "mlp_ratio" and section:
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
            raise InputError(f"{prefix}{where} must be a positive number, got {_kind(value)}.")
        if not float(value) > 0 or float(value) == float("inf"):
            raise InputError(f"{prefix}{where} must be a positive number, got {value!r}.")
        return value
    if key == "patch_dropout" and section == "vision_cfg":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise InputError(f"{prefix}{where} must be a number in [0, 1), got {_kind(value)}.")
        return value
    expected = types.get(section, {}).get(key)
    if value is None or key == "attentional_pool":  # None: open_clip's default; attentional_pool: also a str
        return value
    if expected is bool and not isinstance(value, bool):
        raise InputError(f"{prefix}{where} must be True or False, got {_kind(value)}.")
    if expected is str and not isinstance(value, str):
        raise InputError(f"{prefix}{where} must be a string, got {_kind(value)}.")
    return value


def _check_overrides(model_name: str, config: Mapping[str, Any], overrides: Any) -> dict:
    """``overrides`` with its values checked (numpy integers become ints).

    Raises [`InputError`][clip_lens.InputError] naming any key open_clip would reject, and any size or count that is
    not a positive integer (``layers: -1`` or ``0``, ``width: 64.5``, ``layers: True``) or a flag that
    is not a bool, before anything is built.
    """
    if not isinstance(overrides, Mapping):
        raise InputError(
            "config_overrides must be a dict such as {'vision_cfg': {'layers': 2}}, "
            f"got {type(overrides).__name__}."
        )
    try:
        top, nested = _override_fields()
        types = _override_types()
    except Exception:  # an open_clip without these classes: open_clip itself will complain
        return dict(overrides)
    top |= set(config)
    checked: dict[str, Any] = {}
    for key, value in overrides.items():
        if not isinstance(key, str) or key not in top:
            raise InputError(
                f"Invalid config_overrides for {model_name}: unknown key '{key}'.{close_matches(str(key), top)} "
                f"Top-level keys: {', '.join(sorted(top))}."
            )
        if key in nested:
            if not isinstance(value, Mapping):
                raise InputError(
                    f"Invalid config_overrides for {model_name}: '{key}' must be a dict of fields, "
                    f"got {type(value).__name__}."
                )
            for sub in value:
                if sub not in nested[key]:
                    raise InputError(
                        f"Invalid config_overrides for {model_name}: unknown key '{key}.{sub}'."
                        f"{close_matches(str(sub), nested[key])} "
                        f"Valid {key} keys: {', '.join(sorted(nested[key]))}."
                    )
            checked[key] = {sub: _check_value(model_name, key, sub, v, types) for sub, v in value.items()}
        else:
            checked[key] = _check_value(model_name, "", key, value, types)
    return checked


def _check_heads(model_name: str, config: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """Attention widths that do not split into heads (open_clip would fail deep inside torch)."""
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    checks = []
    if "vision_cfg" in overrides and not vision.get("timm_model_name") and not isinstance(vision.get("layers"), (list, tuple)):
        checks.append(("vision_cfg", "head_width", vision.get("width"), vision.get("head_width")))
    if "text_cfg" in overrides and not text.get("hf_model_name"):
        checks.append(("text_cfg", "heads", text.get("width"), text.get("heads")))
    for section, field, width, divisor in checks:
        if isinstance(width, int) and isinstance(divisor, int) and divisor > 0 and width % divisor:
            raise InputError(
                f"Invalid config_overrides for {model_name}: {section}.width={width} is not a multiple of "
                f"{section}.{field}={divisor}, so it does not split into attention heads."
            )


def model_config(model_name: str, overrides: Optional[Mapping[str, Any]] = None) -> dict:
    """The open_clip config of ``model_name`` with ``overrides`` merged in (nested dicts merge).

    Unknown override keys raise [`InputError`][clip_lens.InputError] naming the key and the close valid ones; so do
    sizes and counts that are not positive integers (numpy integers are accepted), flags that are
    not bools, and widths that do not split into the attention heads.
    """
    if not isinstance(model_name, str):
        raise InputError(f"model_name must be a string such as 'ViT-B-16', got {type(model_name).__name__}.")
    try:
        config = get_model_config(model_name)  # 'hf-hub:' names fetch their config, 'local-dir:' read it
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"No open_clip config for '{model_name}' ({exc}). A 'local-dir:' model needs "
            "open_clip_config.json in that directory."
        ) from exc
    except Exception as exc:
        raise ModelNotFoundError(
            f"Could not fetch the config of '{model_name}' ({type(exc).__name__}: {exc}). Hub models need "
            "network access; offline, use a built-in name (clip_lens.list_models()) with a local checkpoint path."
        ) from exc
    if config is None:
        raise ModelNotFoundError(
            f"Unknown model '{model_name}'.{close_matches(model_name, [*bundled_models(), *open_clip.list_models()])} "
            "clip_lens.list_models() lists the names HookedCLIP supports."
        )
    if overrides is None:
        return config
    overrides = _check_overrides(model_name, config, overrides)
    merged = _merge(config, overrides)
    _check_heads(model_name, merged, overrides)
    return merged


# local checkpoints (formats, safe reading, strict loading, finite weights) and pretrained tags live in
# clip_lens.checkpoints and clip_lens.pretrained_tags; re-exported above


# --- open_clip's create_model keyword arguments ---------------------------------------------------

# precision (open_clip's names) -> the one dtype HookedCLIP's weights get; autocast runs at call time
PRECISION_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "amp": torch.float32, "amp_bf16": torch.float32, "amp_bfloat16": torch.float32,
    "pure_fp16": torch.float16, "pure_bf16": torch.bfloat16,
}
MIXED_PRECISIONS = ("fp16", "bf16")  # open_clip keeps LayerNorms (and more) in fp32 for these
REFUSED_CREATE_KWARGS = {
    "jit": "a TorchScript model has no hook points",
    "aug_cfg": "it configures training augmentation; HookedCLIP's preprocess is open_clip's evaluation transform",
    "load_weights": "pass pretrained=None for random weights instead",
    "require_pretrained": "HookedCLIP always loads the weights pretrained= names, or fails",
    "pretrained_image": "it downloads base timm weights into the image tower only (a partial model)",
    "pretrained_text": "it downloads base Hugging Face weights into the text tower only (a partial model)",
    "pretrained_image_path": "it loads one tower non-strictly; load a full checkpoint with pretrained=PATH",
    "pretrained_text_path": "it loads one tower non-strictly; load a full checkpoint with pretrained=PATH",
    "weights_only": "clip_lens always reads pickles with weights_only=True and never runs code from a file",
}
INTERPOLATIONS = ("bicubic", "bilinear")  # open_clip's evaluation transform ('random' is for training)
RESIZE_MODES = ("shortest", "longest", "squash")
PREPROCESS_FIELDS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")


@dataclass(frozen=True)
class CreateOptions:
    """The open_clip ``create_model``/``create_model_and_transforms`` keyword arguments that
    `HookedCLIP.from_pretrained` accepts, checked, with open_clip's meaning.

    ``preprocess`` gathers ``force_preprocess_cfg`` and ``image_mean``/``image_std``/
    ``image_interpolation``/``image_resize_mode`` (the latter win), applied last, as open_clip does.
    """

    force_quick_gelu: bool = False
    force_custom_text: bool = False
    force_image_size: Union[int, tuple[int, int], None] = None
    force_context_length: Optional[int] = None
    preprocess: dict = dataclasses.field(default_factory=dict)

    def force_into(self, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` (parts of a model config passed to open_clip as keyword arguments, which win
        over its ``force_*`` arguments) with the forced values written into the parts it holds."""
        config = copy.deepcopy(config)
        if self.force_quick_gelu and "quick_gelu" in config:
            config["quick_gelu"] = True
        if self.force_image_size is not None and "vision_cfg" in config:
            config["vision_cfg"]["image_size"] = self.force_image_size
        if self.force_context_length is not None and "text_cfg" in config:
            config["text_cfg"]["context_length"] = self.force_context_length
        return config

    def create_kwargs(self) -> dict[str, Any]:
        """The arguments to pass on to ``open_clip.create_model`` (only those set)."""
        out: dict[str, Any] = {}
        if self.force_quick_gelu:
            out["force_quick_gelu"] = True
        if self.force_custom_text:
            out["force_custom_text"] = True
        if self.force_image_size is not None:
            out["force_image_size"] = self.force_image_size
        if self.force_context_length is not None:
            out["force_context_length"] = self.force_context_length
        return out


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        from clip_lens.config import _kind

        raise InputError(f"{name} must be True or False, got {_kind(value)}.")
    return value


def _triple(value: Any, name: str, positive: bool) -> tuple[float, float, float]:
    """Three finite numbers (one per RGB channel), as open_clip's ``image_mean``/``image_std``."""
    import math

    try:
        numbers = tuple(float(v) for v in value) if not isinstance(value, (str, bytes)) else None
    except (TypeError, ValueError):
        numbers = None
    if numbers is None or len(numbers) != 3 or not all(math.isfinite(v) for v in numbers):
        raise InputError(f"{name} must be three finite numbers, one per RGB channel, got {value!r}.")
    if positive and min(numbers) <= 0:
        raise InputError(f"{name} must be positive (the transform divides by it), got {value!r}.")
    return numbers  # type: ignore[return-value]


def _check_preprocess(overrides: Mapping[str, Any], origin: Mapping[str, str]) -> dict[str, Any]:
    """Preprocessing fields checked against what open_clip's evaluation transform accepts."""
    from clip_lens.config import as_int

    out: dict[str, Any] = {}
    for key, value in overrides.items():
        name = origin.get(key, f"force_preprocess_cfg[{key!r}]")
        if key not in PREPROCESS_FIELDS:
            raise InputError(f"{name}: unknown preprocessing field.{close_matches(str(key), PREPROCESS_FIELDS)} "
                             f"Fields: {', '.join(PREPROCESS_FIELDS)}.")
        if value is None:
            continue
        if key in ("mean", "std"):
            out[key] = _triple(value, name, positive=key == "std")
        elif key == "interpolation":
            if value not in INTERPOLATIONS:
                why = " ('random' is a training augmentation)" if value == "random" else ""
                raise InputError(f"{name}={value!r} is not one of {', '.join(INTERPOLATIONS)}{why}.")
            out[key] = value
        elif key == "resize_mode":
            if value not in RESIZE_MODES:
                raise InputError(f"{name}={value!r} is not one of {', '.join(RESIZE_MODES)}.")
            out[key] = value
        elif key == "mode":
            if value != "RGB":
                raise InputError(f"{name}={value!r}: open_clip's transform only makes 'RGB' images.")
            out[key] = value
        elif key == "size":
            out[key] = _image_size(value, name)
        else:  # fill_color
            out[key] = as_int(value, name)
    return out


def _image_size(value: Any, name: str) -> Union[int, tuple[int, int]]:
    from clip_lens.config import as_int

    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise InputError(f"{name} takes one positive integer or two (height, width), got {value!r}.")
        sizes = tuple(as_int(v, f"{name}[{i}]") for i, v in enumerate(value))
    else:
        sizes = (as_int(value, name),)
    if min(sizes) < 1:
        raise InputError(f"{name} must be positive, got {value!r}.")
    return sizes if len(sizes) == 2 else sizes[0]  # type: ignore[return-value]


def create_options(
    *,
    force_quick_gelu: bool = False,
    force_custom_text: bool = False,
    force_patch_dropout: Optional[float] = None,
    force_image_size: Any = None,
    force_context_length: Any = None,
    force_preprocess_cfg: Optional[Mapping[str, Any]] = None,
    image_mean: Any = None,
    image_std: Any = None,
    image_interpolation: Optional[str] = None,
    image_resize_mode: Optional[str] = None,
    output_dict: Optional[bool] = None,
    **others: Any,
) -> CreateOptions:
    """Check open_clip's ``create_model`` keyword arguments as `HookedCLIP.from_pretrained` takes them.

    Those that cannot apply to a hooked model raise [`InputError`][clip_lens.InputError] saying why
    (``jit``, ``output_dict=True``, a training-only patch dropout, …); unknown names are refused with
    the close valid ones.
    """
    for name, value in others.items():
        if name in REFUSED_CREATE_KWARGS:
            if name == "weights_only" and value is True:
                continue  # what clip_lens does anyway
            raise InputError(f"open_clip's {name}= does not apply to HookedCLIP: {REFUSED_CREATE_KWARGS[name]}.")
        known = [*(p for p in inspect.signature(create_options).parameters if p != "others"), *REFUSED_CREATE_KWARGS, "precision", "tag",
                 "allow_nonfinite", "config_overrides", "cache_dir", "device", "dtype", "fold_ln",
                 "center_writing_weights"]
        raise InputError(f"from_pretrained got an unknown keyword argument {name!r}.{close_matches(name, known)}")
    if output_dict not in (None, False):
        raise InputError(
            "output_dict=True does not apply to HookedCLIP: its forward chooses the output with return_type= "
            "('tuple', 'image_features', 'text_features', 'logits', 'loss')."
        )
    if force_patch_dropout not in (None, 0, 0.0):
        raise InputError(
            f"force_patch_dropout={force_patch_dropout!r} does not apply to HookedCLIP: patch dropout only acts in "
            "training, and a hooked model runs in eval mode (exact decompositions need every patch)."
        )
    if force_preprocess_cfg is not None and not isinstance(force_preprocess_cfg, Mapping):
        raise InputError(f"force_preprocess_cfg must be a dict such as {{'mean': (0.5, 0.5, 0.5)}}, "
                         f"got {type(force_preprocess_cfg).__name__}.")
    preprocess = _check_preprocess(dict(force_preprocess_cfg or {}), {})
    named = {"mean": image_mean, "std": image_std, "interpolation": image_interpolation, "resize_mode": image_resize_mode}
    origin = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
              "resize_mode": "image_resize_mode"}
    preprocess.update(_check_preprocess({k: v for k, v in named.items() if v is not None}, origin))
    return CreateOptions(
        force_quick_gelu=_flag(force_quick_gelu, "force_quick_gelu"),
        force_custom_text=_flag(force_custom_text, "force_custom_text"),
        force_image_size=None if force_image_size is None else _image_size(force_image_size, "force_image_size"),
        force_context_length=None if force_context_length is None else _positive(force_context_length, "force_context_length"),
        preprocess=preprocess,
    )


def _positive(value: Any, name: str) -> int:
    from clip_lens.config import as_int

    number = as_int(value, name)
    if number < 1:
        raise InputError(f"{name} must be a positive integer, got {number}.")
    return number


def precision_dtype(precision: Optional[str], dtype: Optional[torch.dtype]) -> torch.dtype:
    """The parameter dtype of open_clip's ``precision`` name (or of ``dtype``; float32 by default).

    ``amp``/``amp_bf16`` keep fp32 weights (run under ``model.autocast(...)``); ``pure_fp16``/
    ``pure_bf16`` convert every weight. open_clip's ``fp16``/``bf16`` keep LayerNorms in fp32, which
    HookedCLIP (one dtype for all weights) cannot reproduce: refused, naming the alternatives.
    """
    if precision is None:
        return torch.float32 if dtype is None else dtype
    if precision in MIXED_PRECISIONS:
        raise InputError(
            f"precision={precision!r} keeps open_clip's LayerNorms in fp32 while other weights are "
            f"{precision}; HookedCLIP gives all weights one dtype. Use precision='pure_{precision}' (every weight "
            f"{precision}) or precision='amp{'' if precision == 'fp16' else '_bf16'}' (fp32 weights, run under "
            f"model.autocast('{precision}'))."
        )
    if precision not in PRECISION_DTYPES:
        raise InputError(f"unknown precision {precision!r}.{close_matches(str(precision), PRECISION_DTYPES)} "
                         f"Choose one of {', '.join(PRECISION_DTYPES)}.")
    chosen = PRECISION_DTYPES[precision]
    if dtype is not None and dtype != chosen:
        raise InputError(f"precision={precision!r} means {chosen} weights but dtype={dtype}; pass one of them.")
    return chosen


def load_open_clip(
    model_name: str,
    pretrained: Union[str, Path, None] = None,
    *,
    config_overrides: Optional[Mapping[str, Any]] = None,
    cache_dir: Optional[str] = None,
    tag: Optional[str] = None,
    allow_nonfinite: bool = False,
    options: Optional[CreateOptions] = None,
) -> LoadedModel:
    """Build the open_clip model behind `HookedCLIP.from_pretrained`.

    ``tag`` names the pretrained tag whose preprocessing a local checkpoint (or random weights)
    gets; ``options`` are open_clip's ``create_model`` keyword arguments (`create_options`);
    loaded weights holding NaN/inf are refused unless ``allow_nonfinite`` (`check_finite_weights`).
    """
    options = options or CreateOptions()
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise InputError(
            "pretrained must be None, an open_clip pretrained tag or a checkpoint path, "
            f"got {type(pretrained).__name__}."
        )
    if isinstance(model_name, str) and model_name in bundled_models():
        return _load_bundled_checked(model_name, pretrained, config_overrides, tag, allow_nonfinite, options)
    config = model_config(model_name, config_overrides)
    feature = unsupported_feature(config)
    if feature is not None:
        raise UnsupportedArchitectureError(
            f"'{model_name}' uses a {feature}, which HookedCLIP does not reproduce exactly. "
            "`clip-lens models --all` lists every open_clip model with the reason."
        )
    is_path = pretrained is not None and _looks_like_path(pretrained)
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained is not None and not is_path and pretrained not in tags:
        raise ModelNotFoundError(
            f"'{pretrained}' is neither a pretrained tag of {model_name} nor an existing checkpoint file."
            f"{close_matches(str(pretrained), tags)} Tags: {', '.join(tags) or 'none'}."
        )
    if tag is not None:
        tag = _check_tag(model_name, tag)
        if pretrained is not None and not is_path and pretrained != tag:
            raise InputError(f"pretrained={pretrained!r} and tag={tag!r} name two different tags; pass one of them.")
    kwargs: dict[str, Any] = dict(options.create_kwargs())
    if config_overrides:  # open_clip lets these replace whole sub-configs, so the forced values go in too
        kwargs.update(options.force_into({k: v for k, v in config.items() if k in config_overrides}))
    tokenizer, hf_repo = None, config.get("text_cfg", {}).get("hf_model_name")
    if hf_repo:  # Hugging Face text tower: its config from local files, never a silent download
        from clip_lens.towers.hf_text import prepare_hf_text_cfg

        is_tag = pretrained is not None and not is_path
        kwargs["text_cfg"], tokenizer = prepare_hf_text_cfg(model_name, config["text_cfg"], allow_download=is_tag)

    # open_clip ignores vision_cfg.layers for a timm tower; clip_lens passes it to timm as depth
    timm_depth = config["vision_cfg"].get("layers") if "layers" in (config_overrides or {}).get("vision_cfg", {}) else None
    timm_options = {"depth": timm_depth} if config["vision_cfg"].get("timm_model_name") and timm_depth else {}

    def build(weights_tag: Optional[str] = None) -> nn.Module:
        try:
            with timm_create_kwargs(**timm_options):
                return open_clip.create_model(model_name, pretrained=weights_tag, cache_dir=cache_dir, **kwargs)
        except (TypeError, ValueError, AssertionError, IndexError, ZeroDivisionError) as exc:
            if not config_overrides and not options.create_kwargs():
                raise
            # open_clip's constructors reject override values of the wrong type or range
            raise InputError(
                f"Invalid config_overrides or open_clip options for {model_name}: building the model failed with "
                f"{type(exc).__name__}: {exc or '(no message)'}. Check the overridden values."
            ) from exc

    if pretrained is None:
        model = build()
        preprocess = tag_preprocess(model_name, tag) if tag is not None else {}
    elif is_path:
        state_dict = read_state_dict(pretrained)  # read (and fail) before building anything
        model = build()
        source = f"checkpoint {pretrained}"
        if options.force_image_size is not None or options.force_context_length is not None:
            _resize_position_embeddings(state_dict, model)
        load_state_dict_strict(model, state_dict, source=source)
        check_finite_weights(model, source, allow_nonfinite)
        preprocess = tag_preprocess(model_name, tag) if tag is not None else checkpoint_preprocess(model_name, source)
        pretrained = str(pretrained)
    else:
        check_tag_reachable(model_name, pretrained, cache_dir)
        try:
            model = build(pretrained)
        except RuntimeError as exc:
            raise ClipLensError(
                f"Could not fetch the '{pretrained}' weights of {model_name} ({exc}). Without network "
                "access, download the checkpoint elsewhere and pass its local path as pretrained= "
                f"(with tag={pretrained!r} for its preprocessing)."
            ) from exc
        check_finite_weights(model, f"'{pretrained}' weights of {model_name}", allow_nonfinite)
        preprocess = {}  # open_clip applied the tag's
    if preprocess or options.preprocess:
        from open_clip.factory import set_model_preprocess_cfg

        set_model_preprocess_cfg(model, {**model.visual.preprocess_cfg, **preprocess, **options.preprocess})
    model.eval()
    if hf_repo:  # name the HF model by its repo id, not the cache snapshot its config was read from
        model.text.config.name_or_path = hf_repo
    return LoadedModel(model, model_name, None if pretrained is None else str(pretrained), tokenizer)


def _resize_position_embeddings(state_dict: dict[str, Tensor], model: nn.Module) -> None:
    """open_clip's resizing of a checkpoint's position embeddings to ``force_image_size`` /
    ``force_context_length`` (what its own ``load_checkpoint`` does)."""
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    resize_pos_embed(state_dict, model)
    resize_text_pos_embed(state_dict, model)


def _load_bundled_checked(
    model_name: str,
    pretrained: Union[str, Path, None],
    config_overrides: Optional[Mapping[str, Any]],
    tag: Optional[str],
    allow_nonfinite: bool,
    options: CreateOptions,
) -> LoadedModel:
    """A bundled model: no config overrides, tags or architecture options; a local checkpoint of
    the same architecture and preprocessing overrides are fine."""
    if config_overrides:
        raise InputError(f"'{model_name}' is a bundled model: it takes no config_overrides=.")
    if tag is not None:
        raise InputError(f"'{model_name}' is a bundled model: it has no pretrained tags, so tag= does not apply.")
    if options.create_kwargs():
        raise InputError(
            f"'{model_name}' is a bundled model of a fixed architecture: {', '.join(options.create_kwargs())}= "
            "does not apply (its weights fix the image size, context length and activation)."
        )
    if pretrained is not None and not Path(pretrained).is_file():
        raise InputError(
            f"'{model_name}' is a bundled model: pretrained= can only be a local checkpoint of the same "
            f"architecture (e.g. a training run's steps/model-500.safetensors); {str(pretrained)!r} is not a file."
        )
    return load_bundled(model_name, pretrained, allow_nonfinite=allow_nonfinite, preprocess=options.preprocess)
