"""Value checks that need no host-device synchronisation inside a hot loop.

A check such as ``torch.isfinite(x).all()`` is a tensor on the device; turning it into a Python
bool waits for the device to finish everything queued before it. Inside [`deferred`][clip_lens.checks.deferred]
(as [`collect`][clip_lens.collect.collect] runs each store chunk) the checks are kept as device
tensors and evaluated together, with one synchronisation, when the block ends; outside it they are
evaluated at once, as before.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch
from torch import Tensor

from clip_lens.errors import InputError

_pending: contextvars.ContextVar[Optional[list[tuple[Tensor, str]]]] = contextvars.ContextVar("clip_lens_checks", default=None)


def require_finite(tensor: Tensor, message: str) -> None:
    """Raise [`InputError`][clip_lens.InputError] ``message`` when ``tensor`` holds NaN or inf: now, or at the end of
    the enclosing [`deferred`][clip_lens.checks.deferred] block."""
    ok = torch.isfinite(tensor).all()
    pending = _pending.get()
    if pending is None:
        if not ok:
            raise InputError(message)
    else:
        pending.append((ok, message))


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Collect the checks made inside the block and evaluate them all when it ends (one
    synchronisation); the first failing one raises its [`InputError`][clip_lens.InputError]."""
    pending: list[tuple[Tensor, str]] = []
    token = _pending.set(pending)
    try:
        yield
    finally:
        _pending.reset(token)
    if pending:
        results = torch.stack([ok for ok, _ in pending]).tolist()  # the one synchronisation
        for passed, (_, message) in zip(results, pending):
            if not passed:
                raise InputError(message)
