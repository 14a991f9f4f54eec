"""Atomic file writes: a reader never sees a half-written file, a crash keeps the old one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union

Payload = Union[bytes, str, Callable[[BinaryIO], None]]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Union[str, Path], data: Payload) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    ``data`` is bytes, text (UTF-8), or a callable that writes into the binary file it is given
    (``lambda f: torch.save(obj, f)``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_text(path: Union[str, Path], what: str) -> str:
    """A UTF-8 text file (a BOM is dropped); undecodable bytes raise an InputError naming the byte
    and its line. ``what`` names the file in the message ("text bank file")."""
    from clip_lens.errors import InputError

    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise InputError(
            f"{what} {str(path)!r} is not UTF-8: byte 0x{raw[error.start]:02x} on line {line} cannot be "
            "decoded; re-save the file as UTF-8."
        ) from error


def read_json(path: Union[str, Path], what: str, expected: str, object_pairs_hook=None) -> Any:
    """A UTF-8 JSON file (:func:`read_text`); invalid JSON raises an InputError with the line and
    column and ``expected``, what the file should hold (e.g. ``'{"NAME.png": [[x0, y0, x1, y1]]}'``)."""
    from clip_lens.errors import InputError

    text = read_text(path, what)
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as error:
        raise InputError(
            f"{what} {str(path)!r} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}; "
            f"fix the file (it should hold {expected})."
        ) from error
