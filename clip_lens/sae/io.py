"""SAELens' on-disk format: one folder per SAE.

=============================  =================================================================
``cfg.json``                   `SAEConfig.to_dict` (SAELens v6 layout: ``hook_name``,
                               ``model_name`` and ``sae_lens_version`` under ``metadata``)
``sae_weights.safetensors``    ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
                               ``b_dec [d_in]``, and ``threshold [d_sae]`` for ``jumprelu``;
                               ``gated``: ``b_gate``, ``b_mag``, ``r_mag [d_sae]`` instead of ``b_enc``
``sparsity.safetensors``       optional: ``sparsity [d_sae]``, log10 of each feature's firing rate
=============================  =================================================================

Writing is atomic per file (temporary file + ``os.replace``): the weights and the sparsity file
first, then ``cfg.json``, which carries the sha256 of each (``metadata.clip_lens_weights_sha256``,
``metadata.clip_lens_sparsity_sha256``) and so commits them; a reader (`read_sae`, used by
`clip_lens.sae.model.load_sae`, and
`load_sparsity`) verifies both checksums when they are present, so a damaged or half-replaced file
is reported, never read. A sparsity file next to a ``cfg.json`` that commits the weights but not
it was not written with them and is refused too. Reading never unpickles anything
(safetensors and JSON only) and reports a missing, foreign or damaged file as one clip_lens error
naming the file and the fix. Folders written by SAELens (v6, and the older flat ``cfg.json``) load
as they are; legacy tensors are converted as SAELens does (``log_threshold`` → ``threshold``, an
all-ones ``scaling_factor`` dropped).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import Tensor

from clip_lens.errors import CheckpointNotFoundError, CorruptCheckpointError, InputError
from clip_lens.files import atomic_write, read_json, require_regular
from clip_lens.sae.config import ARCHITECTURES, SAEConfig, extra_parameters

if TYPE_CHECKING:
    from clip_lens.sae.model import SAE

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
WEIGHTS_SHA256_KEY = "clip_lens_weights_sha256"
SPARSITY_SHA256_KEY = "clip_lens_sparsity_sha256"
_EXPECTED_CFG = '{"d_in": ..., "d_sae": ..., "architecture": ..., "metadata": {"hook_name": ...}}'


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_sae(sae: "SAE", folder: Union[str, Path], log_feature_sparsity: Optional[Tensor] = None) -> Path:
    """Write ``sae`` to ``folder`` in SAELens' format; returns the folder.

    Args:
        sae: the SAE.
        folder: created if needed; an SAE already there is replaced.
        log_feature_sparsity: optional ``[d_sae]`` log10 firing rates, written to
            ``sparsity.safetensors`` (a sparsity file left from an earlier SAE in the folder is
            removed when none is given: it would describe other weights).
    """
    from safetensors.torch import save as safetensors_bytes

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"cannot save an SAE to {folder}: it is a file; pass a folder path.")
    folder.mkdir(parents=True, exist_ok=True)
    cfg = sae.config_for_saving()
    tensors = sae.state_dict_for_saving()
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise InputError(f"the SAE's {', '.join(bad)} contain NaN or inf values; refusing to save it.")
    weights = safetensors_bytes(tensors)
    atomic_write(folder / WEIGHTS_FILENAME, weights)
    cfg.metadata[WEIGHTS_SHA256_KEY] = _sha256(weights)
    cfg.metadata.pop(SPARSITY_SHA256_KEY, None)
    sparsity_path = folder / SPARSITY_FILENAME
    if log_feature_sparsity is not None:
        sparsity = torch.as_tensor(log_feature_sparsity).detach().to("cpu").contiguous()
        if tuple(sparsity.shape) != (cfg.d_sae,) or not sparsity.is_floating_point():
            raise InputError(
                f"log_feature_sparsity must be a float tensor of shape [d_sae] = [{cfg.d_sae}], got "
                f"{sparsity.dtype} {tuple(sparsity.shape)}."
            )
        data = safetensors_bytes({"sparsity": sparsity})
        atomic_write(sparsity_path, data)
        cfg.metadata[SPARSITY_SHA256_KEY] = _sha256(data)
    elif sparsity_path.exists():
        sparsity_path.unlink()
    atomic_write(folder / CFG_FILENAME, json.dumps(cfg.to_dict(), indent=2) + "\n")
    return folder


def _folder(path: Union[str, Path]) -> Path:
    path = Path(path)
    if path.is_file() and path.name in (CFG_FILENAME, WEIGHTS_FILENAME):
        return path.parent  # the user pointed at a file inside the folder
    if not path.exists():
        raise CheckpointNotFoundError(
            f"SAE folder not found: {path}. Pass the folder holding {CFG_FILENAME} and {WEIGHTS_FILENAME} "
            "(SAELens' format; it is read from local disk)."
        )
    if not path.is_dir():
        raise CheckpointNotFoundError(
            f"{path} is a file, but an SAE is a folder holding {CFG_FILENAME} and {WEIGHTS_FILENAME} "
            "(SAELens' format); pass that folder."
        )
    return path


def load_config(folder: Union[str, Path]) -> SAEConfig:
    """The `SAEConfig` of an SAE folder (``cfg.json`` only)."""
    folder = _folder(folder)
    path = require_regular(folder / CFG_FILENAME, "SAE config")  # a FIFO is not "missing"
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"{path} is missing: an SAE folder holds {CFG_FILENAME} and {WEIGHTS_FILENAME} (SAELens' format). "
            "Check the folder, or save the SAE again with sae.save(folder)."
        )
    raw = read_json(path, "SAE config", _EXPECTED_CFG)  # nesting bounded there (files.read_json)
    if not isinstance(raw, dict):
        raise InputError(f"SAE config {path} must hold a JSON object like {_EXPECTED_CFG}, got {type(raw).__name__}.")
    try:
        return SAEConfig.from_dict(raw)
    except InputError as error:
        raise InputError(f"SAE config {path}: {error}") from error


def _read_safetensors(path: Path, what: str, expected_sha: Optional[str]) -> dict[str, Tensor]:
    from safetensors.torch import load

    require_regular(path, f"SAE {what}")
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"{path} is missing: the {what} of the SAE in {path.parent}. Copy the whole SAE folder, or save it again."
        )
    data = path.read_bytes()
    if expected_sha is not None and _sha256(data) != expected_sha:
        raise CorruptCheckpointError(
            f"{path} is damaged or was replaced: its sha256 does not match the one recorded in "
            f"{path.parent / CFG_FILENAME} ({WEIGHTS_SHA256_KEY if what == 'weights' else SPARSITY_SHA256_KEY}). "
            "Copy or save the SAE folder again."
        )
    try:
        return load(data)
    except Exception as error:  # safetensors raises its own error types
        raise CorruptCheckpointError(
            f"cannot read {path} as safetensors ({error}); the file is truncated, damaged or not a safetensors "
            "file. Copy or save the SAE folder again."
        ) from error


def _check_tensors(tensors: dict[str, Tensor], cfg: SAEConfig, path: Path) -> dict[str, Tensor]:
    """SAELens' legacy conversions, then names, shapes and finiteness against ``cfg``."""
    tensors = dict(tensors)
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = torch.exp(tensors.pop("log_threshold"))
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in tensors:
            factor = tensors.pop(name)
            if not torch.allclose(factor.float(), torch.ones_like(factor, dtype=torch.float32)):
                raise InputError(
                    f"{path} holds a finetuning '{name}' that is not all ones, which clip_lens does not support; "
                    "fold it into W_dec (W_dec *= factor[:, None]) and re-save."
                )
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
    if cfg.architecture == "gated":
        del expected["b_enc"]
    expected.update({name: (cfg.d_sae,) for name in extra_parameters(cfg.architecture)})
    missing = [name for name in expected if name not in tensors]
    if missing:
        found = ", ".join(sorted(tensors)[:8]) + (" …" if len(tensors) > 8 else "") or "no tensors"
        raise CorruptCheckpointError(
            f"{path} is not the weights of a {cfg.architecture} SAE: it lacks {', '.join(missing)} (it holds "
            f"{found}). An SAE weights file holds {', '.join(expected)} (SAELens' names); check that the folder "
            "holds an SAE and that cfg.json's architecture is right."
        )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CorruptCheckpointError(
            f"{path} holds tensors a {cfg.architecture} SAE does not have: {', '.join(unexpected[:8])}. "
            f"Check cfg.json's architecture (clip_lens runs {', '.join(ARCHITECTURES)} SAEs)."
        )
    for name, shape in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise CorruptCheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)} but cfg.json (d_in={cfg.d_in}, d_sae={cfg.d_sae}) "
                f"needs {shape}; the weights and cfg.json belong to different SAEs."
            )
        if not tensor.is_floating_point():
            raise CorruptCheckpointError(f"{path}: {name} has dtype {tensor.dtype}; SAE weights are floating point.")
        if not bool(torch.isfinite(tensor).all()):
            raise CorruptCheckpointError(f"{path}: {name} contains NaN or inf values; the SAE is damaged or diverged.")
    return tensors


def read_sae(folder: Union[str, Path]) -> tuple[SAEConfig, dict[str, Tensor]]:
    """The config and the checked weights of an SAE folder (written by SAELens or by `save_sae`);
    `clip_lens.sae.model.load_sae` builds the SAE from them.

    Raises:
        CheckpointNotFoundError: the folder, ``cfg.json`` or the weights file is missing.
        InputError: ``cfg.json`` is not JSON, lacks ``d_in``/``d_sae``, or names an architecture or
            setting clip_lens does not run.
        CorruptCheckpointError: the weights are not safetensors, fail the recorded sha256, are not
            an SAE's (foreign tensor names), disagree with ``cfg.json``'s shapes, or hold NaN/inf.
    """
    folder = _folder(folder)
    cfg = load_config(folder)
    path = folder / WEIGHTS_FILENAME
    tensors = _check_tensors(_read_safetensors(path, "weights", cfg.metadata.get(WEIGHTS_SHA256_KEY)), cfg, path)
    _read_sparsity(folder, cfg)  # a damaged folder is reported when it is loaded, not later
    return cfg, tensors


def load_sparsity(folder: Union[str, Path]) -> Optional[Tensor]:
    """The ``[d_sae]`` log10 feature firing rates of an SAE folder, or ``None`` without a sparsity file."""
    folder = _folder(folder)
    return _read_sparsity(folder, load_config(folder))


def _read_sparsity(folder: Path, cfg: SAEConfig) -> Optional[Tensor]:
    """The sparsity file of ``folder`` checked like the weights: against its recorded sha256; and,
    when ``cfg.json`` commits the weights (clip_lens wrote it) but records no sparsity checksum, the
    file was not written with them and is refused. Its shape and values are checked too."""
    path = folder / SPARSITY_FILENAME
    if not path.exists():
        return None
    expected = cfg.metadata.get(SPARSITY_SHA256_KEY)
    if expected is None and cfg.metadata.get(WEIGHTS_SHA256_KEY) is not None:
        raise CorruptCheckpointError(
            f"{path} was not written with this SAE: {folder / CFG_FILENAME} commits the weights "
            f"({WEIGHTS_SHA256_KEY}) but records no {SPARSITY_SHA256_KEY}. Delete the file, or save the SAE "
            "again with sae.save(folder, log_feature_sparsity=...)."
        )
    tensors = _read_safetensors(path, "sparsity", expected)
    sparsity = tensors.get("sparsity")
    if sparsity is None or tuple(sparsity.shape) != (cfg.d_sae,) or not sparsity.is_floating_point():
        got = "no 'sparsity' tensor" if sparsity is None else f"'sparsity' {sparsity.dtype} of shape {tuple(sparsity.shape)}"
        raise CorruptCheckpointError(
            f"{path} holds {got}; SAELens' sparsity file holds a float 'sparsity' [d_sae] = [{cfg.d_sae}]."
        )
    if bool(torch.isnan(sparsity).any()) or bool((sparsity > 0).any()):  # log10 of a rate: at most 0, -inf when dead
        raise CorruptCheckpointError(
            f"{path} holds values that are not log10 firing rates (NaN or above 0); the file is damaged. "
            "Copy or save the SAE folder again."
        )
    return sparsity
