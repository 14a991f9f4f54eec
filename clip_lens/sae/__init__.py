"""Sparse autoencoders on any hook point of a HookedCLIP, in SAELens' format and semantics.

- `clip_lens.sae.config`: `SAEConfig` (SAELens' ``cfg.json`` layout).
- `clip_lens.sae.model`: `SAE` (standard / topk / jumprelu / gated / abstopk) and `load_sae`.
- `clip_lens.sae.io`: SAELens' folder format (``cfg.json`` + ``sae_weights.safetensors``), `save_sae`.
- `clip_lens.sae.splice`: ``model.add_sae``, ``run_with_saes``, ``run_with_cache_with_saes``
  (the `SAESplicing` mixin of [`HookedCLIP`][clip_lens.HookedCLIP]).
- `clip_lens.sae.activations`: `ActivationSource`, a memory-bounded shuffled stream of
  any hook's activations (or decomposition terms) over an image set.
- `clip_lens.sae.train`: `train_sae` (TopK, BatchTopK, ReLU+L1; resumable) and
  `evaluate_sae`.

The training modules are imported on first use: ``hooked_clip`` imports the splicing mixin from
this package, and training imports ``hooked_clip``'s neighbours.
"""

import importlib
from typing import Any

from clip_lens.sae.io import load_config, load_sparsity, save_sae
from clip_lens.sae.model import ARCHITECTURES, SAE, SAEConfig, load_sae
from clip_lens.sae.splice import SAESplicing

_LAZY = {
    "ActivationSource": "clip_lens.sae.activations",
    "train_sae": "clip_lens.sae.train",
    "evaluate_sae": "clip_lens.sae.train",
    "TrainResult": "clip_lens.sae.train",
    "SAEEvaluation": "clip_lens.sae.train",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clip_lens.sae' has no attribute {name!r}")


__all__ = [
    "ARCHITECTURES",
    "ActivationSource",
    "SAEEvaluation",
    "TrainResult",
    "evaluate_sae",
    "train_sae",
    "SAE",
    "SAEConfig",
    "SAESplicing",
    "load_config",
    "load_sae",
    "load_sparsity",
    "save_sae",
]
