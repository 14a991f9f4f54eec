"""clip_lens: TransformerLens-style mechanistic interpretability for OpenCLIP models.

The public names are imported on first use (PEP 562), so that ``import clip_lens.errors`` or the
``clip-lens`` command line does not pay for torch and open_clip before it needs them.
"""

import importlib
from typing import TYPE_CHECKING, Any

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

__version__ = "0.1.0"

_LAZY = {
    "CLIPActivationCache": "clip_lens.cache",
    "TowerConfig": "clip_lens.config",
    "Decomposition": "clip_lens.decompose",
    "decompose": "clip_lens.decompose",
    "decompose_text": "clip_lens.decompose_text",
    "HookedCLIP": "clip_lens.hooked_clip",
    "list_models": "clip_lens.loading",
    "PatchingResult": "clip_lens.patching",
    "activation_patch": "clip_lens.patching",
    "attribution_patch": "clip_lens.patching",
    "SecondOrder": "clip_lens.second_order",
    "SecondOrderMaps": "clip_lens.second_order",
    "second_order": "clip_lens.second_order",
    "second_order_maps": "clip_lens.second_order",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from clip_lens.cache import CLIPActivationCache
    from clip_lens.config import TowerConfig
    from clip_lens.decompose import Decomposition, decompose
    from clip_lens.decompose_text import decompose_text
    from clip_lens.hooked_clip import HookedCLIP
    from clip_lens.loading import list_models
    from clip_lens.patching import PatchingResult, activation_patch, attribution_patch
    from clip_lens.second_order import SecondOrder, SecondOrderMaps, second_order, second_order_maps


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    raise AttributeError(f"module 'clip_lens' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))


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
    "SecondOrder",
    "SecondOrderMaps",
    "TowerConfig",
    "UnsupportedArchitectureError",
    "activation_patch",
    "attribution_patch",
    "decompose",
    "decompose_text",
    "list_models",
    "second_order",
    "second_order_maps",
]


def _callable_module(name: str, function: Any) -> None:
    """Make module ``name`` callable as ``function``. ``clip_lens.decompose`` is both a public function
    (``from clip_lens import decompose``, imported lazily) and the module that defines it: once the
    module has been imported (``clip_lens.collect`` does), Python binds the *module* to the package's
    attribute, so ``from clip_lens import decompose`` would return a module that cannot be called."""
    import sys
    import types

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

    sys.modules[name].__class__ = CallableModule
