"""Local checkpoints: their format (by content), safe reading, strict loading and finite weights.

Checkpoints are read with ``safetensors`` or ``torch.load(weights_only=True)``: no pickled code from
user files is ever executed. A pickle that ``weights_only`` refuses is explained by naming the globals
it would import (`pickle_globals`, read with ``pickletools``, never run); non-float tensors and
NaN/inf weights are refused naming the tensor (`check_finite_weights`, unless ``allow_nonfinite``).
`clip_lens.loading` builds models from what this module reads (and re-exports its names).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from open_clip.factory import convert_to_custom_text_state_dict
from torch import Tensor, nn

from clip_lens.errors import CheckpointNotFoundError, CorruptCheckpointError, StateDictMismatchError

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def _looks_like_path(pretrained: Union[str, Path]) -> bool:
    text = str(pretrained)
    return isinstance(pretrained, Path) or os.sep in text or text.endswith(CHECKPOINT_SUFFIXES) or os.path.exists(text)


CHECKPOINT_FORMATS = (
    "safetensors (an 8-byte little-endian header length, then a JSON header)",
    "a torch.save zip checkpoint (PyTorch >= 1.6, starts with PK\\x03\\x04)",
    "a legacy torch.save pickle (_use_new_zipfile_serialization=False, starts with the pickle protocol byte \\x80)",
)
"""What `read_state_dict` reads, recognised by content (never by the file name's suffix)."""


def checkpoint_format(path: Union[str, Path]) -> str:
    """The format of a checkpoint file from its first bytes: ``"safetensors"``, ``"torch-zip"`` or
    ``"torch-legacy"``; [`CorruptCheckpointError`][clip_lens.CorruptCheckpointError] for an empty, truncated or unknown file."""
    from clip_lens.files import require_regular

    path = require_regular(path, "checkpoint")  # a FIFO would read as empty (or block)
    size = path.stat().st_size
    if size == 0:
        raise CorruptCheckpointError(f"Cannot read checkpoint {path}: the file is empty (0 bytes). Is the file complete?")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":
        header_length = int.from_bytes(head[:8], "little")
        if header_length <= size - 8:
            return "safetensors"
        if head[:4] != b"PK\x03\x04":
            raise CorruptCheckpointError(
                f"Cannot read checkpoint {path}: it starts like a safetensors file, but its header claims "
                f"{header_length} bytes and the file holds {size}. It is truncated; is the file complete?"
            )
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-legacy"
    named = f" (its name says {path.suffix}, but the content is not)" if path.suffix in CHECKPOINT_SUFFIXES else ""
    raise CorruptCheckpointError(
        f"Cannot read checkpoint {path}: unknown file format{named}; it starts with {head[:8]!r} ({size} bytes). "
        f"clip_lens reads {'; '.join(CHECKPOINT_FORMATS)}. Is it a complete checkpoint file?"
    )


_TORCH_ADVICE = re.compile(r"weights_only|Re-running|add_safe_globals|safe_globals|trusted source|allowlist", re.I)


def _blocked_in_message(exc: BaseException) -> list[str]:
    """The globals torch's weights_only unpickler names in its refusal (its wording varies by version)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    names = re.findall(r"GLOBAL ([\w.]+)", text)
    return list(dict.fromkeys(name if "." in name else f"builtins.{name}" for name in names))  # torch drops 'builtins.'


def _pickle_bytes(path: Path, fmt: str) -> bytes:
    """The pickle stream of a torch checkpoint (``data.pkl`` inside a zip; the file itself otherwise)."""
    if fmt == "torch-zip":
        import zipfile

        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            return archive.read(names[0]) if names else b""
    with open(path, "rb") as f:
        return f.read(64 << 20)  # the pickles come first; storages follow them


def pickle_globals(data: bytes) -> list[str]:
    """Every ``module.name`` a pickle stream would import (GLOBAL / STACK_GLOBAL opcodes), read with
    `pickletools` without executing anything. Consecutive pickles (legacy torch.save files)
    are all read; reading stops quietly at the first bytes that are not a pickle."""
    import io
    import pickletools

    found: list[str] = []
    stream = io.BytesIO(data)
    strings = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING")
    while stream.tell() < len(data):
        memo: dict[Any, Any] = {}
        stack: list[Any] = []  # only the last few pushed strings matter (STACK_GLOBAL's operands)
        try:
            for op, arg, _ in pickletools.genops(stream):
                name = op.name
                if name == "GLOBAL":
                    found.append(".".join(str(arg).split(" ", 1)))
                    stack.append(None)
                elif name == "STACK_GLOBAL":
                    if len(stack) >= 2 and isinstance(stack[-2], str) and isinstance(stack[-1], str):
                        found.append(f"{stack[-2]}.{stack[-1]}")
                    else:
                        found.append("<a global whose name is computed>")
                    stack.append(None)
                elif name in strings:
                    stack.append(arg)
                elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[arg] = stack[-1] if stack else None
                elif name == "MEMOIZE":
                    memo[len(memo)] = stack[-1] if stack else None
                elif name in ("BINGET", "LONG_BINGET", "GET"):
                    stack.append(memo.get(arg))
                elif name == "STOP":
                    break
                else:
                    stack.append(None)
                del stack[:-4]
        except Exception:  # the storages after the pickles, or a damaged stream: report what was read
            break
    return list(dict.fromkeys(found))


def _allowed_globals() -> set[str]:
    """What ``torch.load(weights_only=True)`` imports by default (private torch API: empty if it moved)."""
    try:
        from torch import _weights_only_unpickler as unpickler

        return set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())
    except Exception:
        return set()


def _blocked_globals(path: Path, fmt: str, exc: BaseException) -> list[str]:
    """The globals a refused pickle would import: named in torch's message, else found statically."""
    blocked = _blocked_in_message(exc)
    try:
        allowed = _allowed_globals()
        scanned = [
            g for g in pickle_globals(_pickle_bytes(path, fmt))
            if g not in allowed and (allowed or not g.startswith("torch."))  # no list: torch's own assumed safe
        ]
    except Exception:
        scanned = []
    return list(dict.fromkeys([*blocked, *scanned]))


def _plain_reason(exc: BaseException) -> str:
    """torch's error in one line, without its advice to load with weights_only=False."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in re.split(r"[\n.]\s", text) if line.strip()]
    useful = [line for line in lines if not _TORCH_ADVICE.search(line) and not line.startswith("Weights only load failed")]
    line = (useful or [type(exc).__name__])[0]
    line = re.sub(r"^(WeightsUnpickler error|Please file an issue[^:]*):\s*", "", line)
    return line[:300]


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor {tuple(value.shape)}"
    return type(value).__name__


def read_state_dict(path: Union[str, Path]) -> dict[str, Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict without running pickled code.

    Accepts safetensors and ``torch.save`` files (zip or legacy) of a state dict, recognised by
    their content whatever the file is called (`checkpoint_format`), optionally wrapped as
    ``{"state_dict": ...}`` (open_clip training checkpoints) with ``module.`` prefixes (DDP).
    A pickle that would import anything but tensor types is refused, naming what it would import.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"Checkpoint not found: {path}. Check the path (it is read from local disk).")
    if path.is_dir():
        raise CheckpointNotFoundError(f"{path} is a directory; pass the checkpoint file inside it.")
    fmt = checkpoint_format(path)
    if fmt == "safetensors":
        from safetensors.torch import load_file

        try:
            checkpoint: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CorruptCheckpointError(f"Cannot read {path} as safetensors ({exc}). Is the file complete?") from exc
    else:
        try:
            with open(path, "rb") as f:  # a file object: torch must not guess the format from the name either
                checkpoint = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            blocked = _blocked_globals(path, fmt, exc)
            if not blocked and "Weights only load failed" not in str(exc):
                raise CorruptCheckpointError(
                    f"Cannot read checkpoint {path}: it is corrupt or not a PyTorch checkpoint "
                    f"({_plain_reason(exc)}). Is the file complete?"
                ) from exc
            what = (
                f"it would import {_listing(blocked, 5)}, which {'is' if len(blocked) == 1 else 'are'} not "
                "tensor data" if blocked else f"torch refused it: {_plain_reason(exc)}"
            )
            raise CorruptCheckpointError(
                f"{path} is not a tensor-only checkpoint ({what}). clip_lens loads pickled checkpoints only with "
                "torch.load(weights_only=True) and never runs code from a file. Convert it to safetensors "
                "in an environment where you trust the file and its code, e.g. "
                "safetensors.torch.save_file(model.state_dict(), 'model.safetensors'), and load that."
            ) from exc
        except Exception as exc:
            raise CorruptCheckpointError(
                f"Cannot read checkpoint {path} ({path.stat().st_size} bytes): it is truncated, corrupt or not a "
                f"PyTorch checkpoint ({type(exc).__name__}: {_plain_reason(exc)})."
            ) from exc
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise CorruptCheckpointError(
            f"{path} does not hold a state dict {{name: tensor}} (got {type(checkpoint).__name__})."
        )
    bad = [f"{k} ({_describe(v)})" for k, v in checkpoint.items() if not isinstance(v, Tensor)]
    if bad:
        raise CorruptCheckpointError(
            f"{path} does not hold a state dict {{name: tensor}}: non-tensor entries {_listing(bad)}. "
            "Save model.state_dict() itself (or a dict with the weights under 'state_dict')."
        )
    state_dict = dict(checkpoint)
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from DistributedDataParallel
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _listing(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Load ``state_dict`` into an open_clip model, naming every missing, unexpected or misshapen key
    and every tensor whose dtype is of another kind than the model's (int8/bool where it has floats)."""
    state_dict = dict(state_dict)  # never modify the caller's dict
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    expected = model.state_dict()
    position_ids = "text.transformer.embeddings.position_ids"  # HF text towers saved by transformers < 4.31
    if position_ids in state_dict and position_ids not in expected:
        del state_dict[position_ids]  # a non-persistent buffer today; open_clip drops it too
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
    wrong_dtype = [
        f"{k} ({state_dict[k].dtype}; expected {_KIND_NAMES[_dtype_kind(expected[k])]}, the model's is {expected[k].dtype})"
        for k in sorted(expected)
        if _dtype_kind(state_dict[k]) != _dtype_kind(expected[k])
    ]
    if wrong_dtype:
        raise StateDictMismatchError(
            f"The {source} holds tensors whose dtype does not fit the model ({len(wrong_dtype)}): "
            f"{_listing(wrong_dtype, 5)}. Copying them would silently turn integer/bool codes into float weights "
            "(a quantised or damaged checkpoint?). Convert it to floating-point weights (dequantise it) first.",
            [], [], wrong_dtype,
        )
    model.load_state_dict(state_dict, strict=True)


_KIND_NAMES = {"float": "floating point", "complex": "complex", "bool": "bool", "int": "an integer dtype"}


def _dtype_kind(tensor: Tensor) -> str:
    """``"float"``, ``"complex"``, ``"bool"`` or ``"int"``: tensors of one kind load into each other
    (float16 into float32 is a cast); across kinds the values would change meaning."""
    if tensor.is_floating_point():
        return "float"
    if tensor.is_complex():
        return "complex"
    return "bool" if tensor.dtype == torch.bool else "int"


# --- non-finite weights -------------------------------------------------------------------------


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """``"name (n of N values NaN/inf)"`` for every floating-point parameter or buffer of ``module``
    that holds a NaN or an infinity (empty when all are finite)."""
    found = []
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                found.append(f"{name} ({bad} of {tensor.numel()} values NaN/inf)")
    return found


def check_finite_weights(module: nn.Module, source: str, allow_nonfinite: bool = False) -> None:
    """Refuse weights holding NaN/inf (a damaged or diverged checkpoint gives NaN embeddings).

    Raises [`CorruptCheckpointError`][clip_lens.CorruptCheckpointError] naming each tensor and how many of
    its values are not finite; with ``allow_nonfinite`` (research on broken checkpoints) a
    ``UserWarning`` names them instead, so the model still loads but never silently.
    """
    bad = nonfinite_tensors(module)
    if not bad:
        return
    listing = f"{len(bad)} tensor{'s' if len(bad) > 1 else ''}: {_listing(bad, 5)}"
    if allow_nonfinite:
        warnings.warn(f"The {source} holds NaN/inf weights in {listing}; loaded anyway (allow_nonfinite=True).",
                      UserWarning, stacklevel=3)
        return
    raise CorruptCheckpointError(
        f"The {source} holds NaN/inf weights in {listing}; the model would compute NaN embeddings. Restore or "
        "re-download the checkpoint, or pass allow_nonfinite=True to load it anyway (research on broken checkpoints)."
    )
