"""clip_lens: TransformerLens-style mechanistic interpretability for OpenCLIP models."""

from clip_lens.cache import CLIPActivationCache
from clip_lens.config import TowerConfig
from clip_lens.decompose import Decomposition, decompose
from clip_lens.decompose_text import decompose_text
from clip_lens.errors import (
    CheckpointNotFoundError,
    ClipLensError,
    CorruptCheckpointError,
    HookNameError,
    IndexOutOfRangeError,
    InputError,
    ModelNotFoundError,
    StateDictMismatchError,
    UnsupportedArchitectureError,
)
from clip_lens.hooked_clip import HookedCLIP
from clip_lens.loading import list_models
from clip_lens.patching import PatchingResult, activation_patch, attribution_patch

__version__ = "0.1.0"

__all__ = [
    "CLIPActivationCache",
    "CheckpointNotFoundError",
    "ClipLensError",
    "CorruptCheckpointError",
    "Decomposition",
    "HookNameError",
    "HookedCLIP",
    "IndexOutOfRangeError",
    "InputError",
    "ModelNotFoundError",
    "StateDictMismatchError",
    "PatchingResult",
    "TowerConfig",
    "UnsupportedArchitectureError",
    "activation_patch",
    "attribution_patch",
    "decompose",
    "decompose_text",
    "list_models",
]
