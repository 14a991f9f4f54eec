"""Pretrained tags: the preprocessing a tag implies, and whether its weights can be reached offline.

`tag_preprocess` reads open_clip's tag table (mean, std, interpolation, resize mode); `checkpoint_preprocess`
gives a local checkpoint a tag's preprocessing (``tag=``); `check_tag_reachable` fails fast, with the fix,
when a tag's weights are neither in the local cache nor downloadable (``HF_HUB_OFFLINE``, no network).
`clip_lens.loading` uses them (and re-exports their names).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import warnings
from typing import Any, Mapping, Optional

import open_clip

from clip_lens.errors import ClipLensError, ModelNotFoundError, close_matches

# --- preprocessing of pretrained tags -----------------------------------------------------------
TAG_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def tag_preprocess(model_name: str, tag: str) -> dict[str, Any]:
    """The preprocessing open_clip uses for ``model_name`` with pretrained ``tag`` (mean, std,
    interpolation, resize_mode; open_clip's defaults where the tag says nothing)."""
    from open_clip.pretrained import get_pretrained_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    merged = merge_preprocess_dict(PreprocessCfg(), get_pretrained_cfg(model_name, tag))
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in merged.items() if k in TAG_PREPROCESS_KEYS}


def _describe_preprocess(cfg: Mapping[str, Any]) -> str:
    mean = ", ".join(f"{v:g}" for v in cfg["mean"])
    std = ", ".join(f"{v:g}" for v in cfg["std"])
    return f"mean ({mean}), std ({std}), {cfg['interpolation']}, {cfg['resize_mode']}"


def checkpoint_preprocess(model_name: str, source: str) -> dict[str, Any]:
    """Preprocessing for a local checkpoint of ``model_name`` given without ``tag=``.

    When every pretrained tag of the model preprocesses alike, theirs (a SigLIP checkpoint gets
    mean 0.5 and ``squash``, not open_clip's default for a file). When the tags disagree, open_clip's
    default, with a ``UserWarning`` naming the tags of each preprocessing and how to choose one.
    """
    from open_clip.transform import PreprocessCfg

    groups: dict[tuple, list[str]] = {}
    for tag in open_clip.list_pretrained_tags_by_model(model_name):
        cfg = tag_preprocess(model_name, tag)
        groups.setdefault(tuple(cfg[k] for k in TAG_PREPROCESS_KEYS), []).append(tag)
    if len(groups) == 1:
        return dict(zip(TAG_PREPROCESS_KEYS, next(iter(groups))))
    default = {k: tuple(v) if isinstance(v, (list, tuple)) else v
               for k, v in dataclasses.asdict(PreprocessCfg()).items() if k in TAG_PREPROCESS_KEYS}
    if groups:
        kinds = "; ".join(f"{', '.join(tags)}: {_describe_preprocess(dict(zip(TAG_PREPROCESS_KEYS, key)))}"
                          for key, tags in groups.items())
        warnings.warn(
            f"{model_name}'s pretrained tags preprocess images differently ({kinds}). The {source} is "
            f"preprocessed with open_clip's default ({_describe_preprocess(default)}); pass tag='…' naming the tag "
            "it was trained with to use that tag's preprocessing.", UserWarning, stacklevel=4,
        )
    return default


def _check_tag(model_name: str, tag: Any) -> str:
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if not isinstance(tag, str) or tag not in tags:
        raise ModelNotFoundError(
            f"tag={tag!r} is not a pretrained tag of {model_name}.{close_matches(str(tag), tags)} "
            f"Tags: {', '.join(tags) or 'none'}."
        )
    return tag


# --- pretrained tags offline ----------------------------------------------------------------------


def _tag_cached(cfg: Mapping[str, Any], cache_dir: Optional[str]) -> bool:
    """Whether open_clip would find the tag's weights without the network."""
    if cfg.get("file"):
        return os.path.isfile(cfg["file"])
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache
        from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        return any(
            isinstance(try_to_load_from_cache(repo, name, cache_dir=cache_dir), str)
            for name in [*_get_safe_alternatives(filename), filename]
        )
    url = cfg.get("url", "")
    return bool(url) and os.path.isfile(os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url)))


def _hub_offline() -> bool:
    import huggingface_hub.constants as constants

    flag = os.environ.get("HF_HUB_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or flag.upper() in ("1", "ON", "YES", "TRUE")


def check_tag_reachable(model_name: str, tag: str, cache_dir: Optional[str] = None, timeout: float = 5.0) -> None:
    """Fail fast when the weights of ``tag`` are neither cached nor downloadable.

    Offline, open_clip's download retries for most of a minute before failing; this looks in the
    local cache, then (unless ``HF_HUB_OFFLINE`` is set) opens one connection to the host with a
    ``timeout``, and raises a [`ClipLensError`][clip_lens.ClipLensError] at once when neither works.
    """
    from urllib.parse import urlparse

    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name, tag)
    if _tag_cached(cfg, cache_dir):
        return
    local = (f"download the checkpoint elsewhere and pass its local path: from_pretrained({model_name!r}, 'PATH', "
             f"tag={tag!r}) keeps the tag's preprocessing.")
    if _hub_offline():
        raise ClipLensError(f"The '{tag}' weights of {model_name} are not in the local cache and HF_HUB_OFFLINE is set: "
                            f"{local}")
    hint = f"Set HF_HUB_OFFLINE=1 to use weights already in the Hugging Face cache, or {local}"
    if cfg.get("hf_hub"):
        import huggingface_hub.constants as constants

        host = urlparse(constants.ENDPOINT).hostname
    else:
        host = urlparse(cfg.get("url", "")).hostname
    if not host:
        return
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as exc:
        raise ClipLensError(
            f"Could not fetch the '{tag}' weights of {model_name}: {host} is unreachable ({exc}) and they are not in "
            f"the local cache. {hint}"
        ) from exc
