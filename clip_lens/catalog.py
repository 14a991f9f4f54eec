"""What HookedCLIP supports among open_clip's models, readable without importing torch or open_clip.

``clip-lens models`` used to import open_clip (and with it torch and timm: 12–14 s) only to list
names read from JSON files. Here the same list is read from open_clip's installed files directly:
its model configs (``open_clip/model_configs/*.json``, filtered and ordered as
``open_clip.factory._rescan_model_configs`` does) and its pretrained tag table
(``open_clip/pretrained.py``, executed as a stand-alone module with its optional torch-backed imports
blocked: it only builds dictionaries). `clip_lens.loading` re-exports the support table
(`TIMM_TOWERS` …) and `unsupported_feature`; `clip_lens.loading.list_models` / `model_coverage` stay
the reference (open_clip's own functions) and ``tests/acceptance/test_first_hour.py`` compares them
with `fast_list_models` / `fast_model_coverage`.

A timm image tower that no `TIMM_TOWERS` pattern names is checked structurally (timm builds it on
the meta device: torch and timm imported). `TIMM_CHECKED` holds those verdicts for the timm version
they were computed with; with another timm installed they are computed again.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

# What HookedCLIP reproduces, and why not where it does not: one table, read before anything is
# built. timm image towers go by architecture name (the first matching pattern wins); a timm name
# matching none is checked structurally on the meta device (no weights) by check_trunk.
TIMM_TOWERS: tuple[tuple[str, Optional[str]], ...] = (
    (r"^vit_.*siglip", None),  # SigLIP / SigLIP2: ViT + MAP attention pooler
    (r"^(eva02_|eva_giant)", None),  # EVA01 / EVA02: rotary, SwiGLU, LayerNorm in attention and MLP, post-norm
    (r"^vit_pe_core_", None),  # PE-Core: 2-D rotary, attention pooler
    (r"^vit_.*_clip_", None),  # CLIP-style timm ViTs (MobileCLIP2-L-14)
    (r"^vit_base_mci_", None),  # MobileCLIP-B: ViT after a conv stem (the stem is the embedding term)
    (r"^vitamin_", None),  # ViTamin: conv stages (the embedding term), then a ViT with GeGLU MLPs
    (r"^convnext", None),  # ConvNeXt: stages of depthwise-conv blocks (clip_lens/towers/convnext.py)
    (r"^fastvit", None),  # MobileCLIP FastViT: RepMixer and attention stages (clip_lens/towers/fastvit.py)
    (r"^swin", "Swin image tower (windowed attention with relative position bias)"),
    (r"^vit_relpos", "ViT with relative position bias"),
)
NATIVE_REFUSALS = {
    "attentional_pool": "attentional_pool='{value}' (open_clip marks it untested WIP)",
    "custom_block": "custom attention block in the {tower} tower ({features})",
    "timm_proj": "timm_proj='mlp' (a non-linear projection head)",
    "timm_pool": "timm_pool='{value}' (a convolutional attention pool)",
}
CUSTOM_BLOCK_FEATURES = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
# timm towers no TIMM_TOWERS pattern names: check_trunk's verdict (None: supported), by timm version.
# Used only when that timm is installed (else recomputed); a test recomputes them with timm.
TIMM_CHECKED: dict[str, dict[str, Optional[str]]] = {
    "1.0.31": {"vit_medium_patch16_gap_256": None},
}


@dataclass
class Coverage:
    """One open_clip model name: why it is refused (None: supported) and how many pretrained tags it has."""

    name: str
    reason: Optional[str]
    n_tags: int


def _table_row(timm_name: str) -> Optional[tuple[str, Optional[str]]]:
    """The first `TIMM_TOWERS` row whose pattern matches ``timm_name``, or None."""
    return next((row for row in TIMM_TOWERS if re.search(row[0], timm_name)), None)


@functools.cache
def timm_tower_problem(timm_name: str) -> Optional[str]:
    """Why the timm image tower ``timm_name`` cannot be hooked exactly, or None (see ``TIMM_TOWERS``)."""
    row = _table_row(timm_name)
    if row is not None:
        return row[1]
    import timm
    import torch

    from clip_lens.towers.timm_vit import check_trunk

    try:
        with torch.device("meta"):  # module tree only: no memory, no weights, no download
            trunk = timm.create_model(timm_name, pretrained=False)
    except Exception as exc:  # an architecture this timm cannot build
        return f"timm cannot build '{timm_name}' ({type(exc).__name__}: {exc})"
    return check_trunk(trunk)


def unsupported_feature(config: Mapping[str, Any], _timm_problem: Optional[Any] = None) -> Optional[str]:
    """Why an open_clip model config cannot be hooked exactly, or None if it can."""
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    timm_name = vision.get("timm_model_name")
    if timm_name:
        problem = (_timm_problem or timm_tower_problem)(timm_name)
        if problem is not None:
            return f"timm image tower {timm_name}: {problem}"
        if vision.get("timm_proj") == "mlp" and not re.search(r"^convnext", timm_name):
            return NATIVE_REFUSALS["timm_proj"]
        if vision.get("timm_pool") in ("abs_attn", "rot_attn"):
            return NATIVE_REFUSALS["timm_pool"].format(value=vision["timm_pool"])
        return None
    if isinstance(vision.get("layers"), (list, tuple)):  # open_clip's ModifiedResNet
        return None if not any(text.get(k) for k in CUSTOM_BLOCK_FEATURES) else NATIVE_REFUSALS["custom_block"].format(
            tower="text", features=", ".join(k for k in CUSTOM_BLOCK_FEATURES if text.get(k)))
    if isinstance(vision.get("attentional_pool"), str):
        return NATIVE_REFUSALS["attentional_pool"].format(value=vision["attentional_pool"])
    towers = [(vision, "image")] + ([] if text.get("hf_model_name") else [(text, "text")])
    for cfg, tower in towers:
        custom = [k for k in CUSTOM_BLOCK_FEATURES if cfg.get(k)]
        if custom or cfg.get("block_type") == "custom":
            return NATIVE_REFUSALS["custom_block"].format(tower=tower, features=", ".join(custom) or "block_type=custom")
    return None


def _distribution_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _checked_timm_problem(timm_name: str) -> Optional[str]:
    """`timm_tower_problem` without importing timm when the verdict is known for the installed timm."""
    known = TIMM_CHECKED.get(_distribution_version("timm") or "", {})
    if _table_row(timm_name) is None and timm_name in known:
        return known[timm_name]
    return timm_tower_problem(timm_name)


def fast_unsupported_feature(config: Mapping[str, Any]) -> Optional[str]:
    """`unsupported_feature` with the known timm verdicts (`TIMM_CHECKED`) instead of building the towers."""
    return unsupported_feature(config, _checked_timm_problem)


def _open_clip_dir() -> Path:
    """The installed open_clip package folder, found without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text.lower())]


@functools.cache
def open_clip_configs() -> dict[str, dict]:
    """open_clip's model configs by name, as ``open_clip.factory._MODEL_CONFIGS`` holds them when
    open_clip is imported (the JSON files with embed_dim, vision_cfg and text_cfg, in natural order)."""
    configs = {}
    for path in sorted((_open_clip_dir() / "model_configs").glob("*.json")):
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        if all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
            configs[path.stem] = config
    return dict(sorted(configs.items(), key=lambda item: _natural_key(item[0])))


@functools.cache
def pretrained_tags() -> dict[str, list[str]]:
    """open_clip's pretrained tags by model name (``open_clip.pretrained._PRETRAINED``), read by running
    ``open_clip/pretrained.py`` as a stand-alone module: its relative imports (constants, version) come
    from the package folder, its optional ``safetensors.torch`` and ``huggingface_hub`` imports are
    blocked (they would import torch; the table does not use them)."""
    folder = _open_clip_dir()
    package_name = "_clip_lens_open_clip_files"
    package = types.ModuleType(package_name)
    package.__path__ = [str(folder)]
    blocked = ("safetensors.torch", "huggingface_hub")
    saved = {name: sys.modules.get(name, ...) for name in (*blocked, package_name)}
    try:
        for name in blocked:
            if saved[name] is ...:  # not imported yet: make `import` fail (ImportError) instead of importing
                sys.modules[name] = None  # type: ignore[assignment]
        sys.modules[package_name] = package
        spec = importlib.util.spec_from_file_location(f"{package_name}.pretrained", folder / "pretrained.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, value in saved.items():
            if value is ...:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
        for name in [name for name in sys.modules if name.startswith(package_name + ".")]:
            del sys.modules[name]
    return {model: list(tags) for model, tags in module._PRETRAINED.items()}


def _bundled_names() -> list[str]:
    from importlib import resources

    return list(json.loads(resources.files("clip_lens").joinpath("pretrained.json").read_text()))


def fast_list_models(include_unsupported: bool = False) -> list[str]:
    """`clip_lens.loading.list_models` without importing torch (the same names in the same order)."""
    if "open_clip" in sys.modules:  # imported already (configs may have been added): ask it, as loading.list_models does
        import open_clip
        from open_clip.factory import get_model_config

        names = open_clip.list_models()
        if not include_unsupported:
            names = [name for name in names if unsupported_feature(get_model_config(name)) is None]
        return [*_bundled_names(), *names]
    configs = open_clip_configs()
    names = [name for name, config in configs.items() if include_unsupported or fast_unsupported_feature(config) is None]
    return [*_bundled_names(), *names]


def fast_model_coverage() -> list[Coverage]:
    """`clip_lens.loading.model_coverage` without importing torch (the same rows)."""
    if "open_clip" in sys.modules:  # as loading.model_coverage (this module stays below loading)
        import open_clip
        from open_clip.factory import get_model_config

        return [Coverage(name, unsupported_feature(get_model_config(name)), len(open_clip.list_pretrained_tags_by_model(name)))
                for name in open_clip.list_models()]
    tags = pretrained_tags()
    return [Coverage(name, fast_unsupported_feature(config), len(tags.get(name, [])))
            for name, config in open_clip_configs().items()]
