"""Small seeded models shared by the test suite (offline: random init, no downloads)."""

from __future__ import annotations

from typing import Any, Optional

import open_clip
import torch

from clip_lens import HookedCLIP
from clip_lens.loading import model_config

# Same architecture features, fewer layers/narrower: keeps the suite fast on 2 CPU cores.
SHRINK = {"vision_cfg": {"layers": 2}, "text_cfg": {"layers": 2}}


def build_open_clip(name: str, overrides: Optional[dict[str, Any]] = None, seed: int = 0) -> torch.nn.Module:
    """A seeded random-init open_clip model of ``name`` with ``overrides`` merged into its config."""
    overrides = SHRINK if overrides is None else overrides
    torch.manual_seed(seed)
    config = model_config(name, overrides)
    model = open_clip.create_model(name, pretrained=None, **{k: v for k, v in config.items() if k in overrides})
    return model.eval()


def hooked_pair(name: str, overrides: Optional[dict[str, Any]] = None, seed: int = 0):
    """``(open_clip_model, HookedCLIP)`` sharing parameters."""
    model = build_open_clip(name, overrides, seed)
    return model, HookedCLIP.from_open_clip(model, name)


def random_images(model: HookedCLIP, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.cfg.image_size, generator=g)


def random_tokens(model: HookedCLIP, batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    """Token ids shaped like real tokenizer output: SOT, words, EOT (the largest id), padding."""
    g = torch.Generator().manual_seed(seed)
    ctx, vocab = model.text.cfg.context_length, model.text.cfg.vocab_size
    tokens = torch.zeros(batch, ctx, dtype=torch.long)
    tokens[:, 0] = vocab - 2
    tokens[:, 1:length] = torch.randint(1, vocab - 2, (batch, length - 1), generator=g)
    tokens[:, length] = vocab - 1
    return tokens
