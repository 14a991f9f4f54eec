"""Mixed precision: the forward pass, the decomposition and collection under ``torch.autocast``.

The weights stay in their own dtype (fp32); matrix products run in bf16 or fp16 and reductions
(LayerNorm, softmax) in fp32, as autocast chooses. The decomposition's terms then come out in the
low precision and sum to the embedding to about its rounding error (docs: Concepts → Scale
measures it against fp32).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from clip_lens.errors import InputError

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, precision: str = "fp32") -> ContextManager:
    """``torch.autocast`` on ``device`` for ``precision`` (``"fp32"``: no autocast, a null context).

    Raises:
        InputError: an unknown precision.
    """
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
