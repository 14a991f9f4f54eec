"""Exception types of clip_lens.

Every error a user can trigger derives from [`ClipLensError`][clip_lens.ClipLensError] and from the builtin
exception a caller would naturally catch (``ValueError``, ``FileNotFoundError`` …), so
``except ValueError`` keeps working. Messages say what was wrong and what to do.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class ClipLensError(Exception):
    """Base class of all clip_lens errors."""


class ModelNotFoundError(ClipLensError, ValueError):
    """An unknown model name or pretrained tag."""


class CheckpointNotFoundError(ClipLensError, FileNotFoundError):
    """A checkpoint path that does not exist."""


class CorruptCheckpointError(ClipLensError, ValueError):
    """A checkpoint file that cannot be read as a state dict."""


class StateDictMismatchError(ClipLensError, ValueError):
    """A state dict whose keys or shapes do not match the model."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], mismatched: list[str]):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


class InputError(ClipLensError, ValueError):
    """Images or tokens of the wrong shape, dtype or range."""


class HookNameError(ClipLensError, KeyError):
    """A hook name that the model does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class IndexOutOfRangeError(InputError, IndexError):
    """A layer, head or position index outside the model (an [`InputError`][clip_lens.InputError] and an ``IndexError``)."""


class UnsupportedArchitectureError(ClipLensError, NotImplementedError):
    """An open_clip feature that HookedCLIP cannot reproduce exactly."""


def close_matches(word: str, choices: Iterable[str], n: int = 5) -> str:
    """A ' Did you mean: a, b?' suffix for error messages ('' when nothing is close)."""
    found = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(found)}?" if found else ""


class StoreCorruptError(InputError):
    """A collected store (`clip_lens.collect`) whose data or metadata is damaged, missing or
    not its own: a chunk file deleted, truncated, flipped or copied from elsewhere, a bad ``done/``
    marker, edited metadata. An [`InputError`][clip_lens.InputError] (the store is the bad input), so code that
    handles bad input handles it too. ``array``, ``chunk`` and ``rows`` (``(start, stop)``) name the
    damaged part when it is one chunk; the message says how to repair it."""

    def __init__(self, message: str, array: str | None = None, chunk: int | None = None, rows: tuple[int, int] | None = None):
        super().__init__(message)
        self.array, self.chunk, self.rows = array, chunk, rows


class StoreLockedError(ClipLensError, RuntimeError):
    """A store that another ``collect`` is writing (its ``lock`` file names the process)."""


class StoreWriteError(ClipLensError, OSError):
    """Writing a store failed (full disk, read-only folder …); finished chunks are kept."""


class StoreWarning(UserWarning):
    """Something about a store the user should know that is not an error: a store without
    checksums, stray files in ``done/``, chunks found damaged and recomputed by ``collect``."""
