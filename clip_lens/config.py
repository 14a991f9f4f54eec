"""Configuration of a hooked tower, read off the open_clip modules it wraps.

``HookedCLIP.cfg`` (vision) and ``HookedCLIP.text.cfg`` (text) are `TowerConfig`
objects. They carry the fields TransformerLens' ``ActivationCache`` helpers read
(``n_layers``, ``n_heads``, ``d_model``, ``d_head``, ``d_mlp``, ``normalization_type``,
``attn_only``) plus what describes the CLIP tower (pooling, image size, context length).
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from clip_lens.errors import IndexOutOfRangeError, InputError


def _kind(value: Any) -> str:
    """``value`` as an error message shows it: its repr (short) and its type."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{text} ({type(value).__module__ + '.' if type(value).__module__ not in ('builtins',) else ''}{type(value).__name__})"


def as_int(value: Any, what: str, error: type[InputError] = InputError) -> int:
    """``value`` as a Python ``int``, for an index or a size passed by a user.

    Accepts Python and numpy integers and 0-d integer tensors. Refuses bools, floats (``2.0``
    too: a float index is a bug upstream, not a rounding question), ``None`` and everything
    else with ``error`` (an [`InputError`][clip_lens.InputError]) naming ``what``.
    """
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 and value.dtype != torch.bool and not (value.is_floating_point() or value.is_complex()):
            if value.is_meta:
                raise error(f"{what} is a tensor on the meta device (no value); pass a Python int.")
            return int(value.item())
        raise error(f"{what} must be an integer, got {_kind(value)}.")
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b":  # numpy bools too
        raise error(f"{what} must be an integer, got the bool {value!r}.")
    try:
        return operator.index(value)  # int, numpy integers, anything with __index__; never floats
    except TypeError:
        hint = f" Pass int({value!r}) if you mean {int(value)}." if isinstance(value, float) and value.is_integer() else ""
        raise error(f"{what} must be an integer, got {_kind(value)}.{hint}") from None


@dataclass
class TowerConfig:
    """Shape and feature summary of one tower (vision or text)."""

    tower: str
    """``"vision"`` or ``"text"``."""
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    n_ctx: int
    """Sequence length: 1 + patches for vision, context length (+1 with a CLS) for text."""
    d_embed: Optional[int]
    """Width of the joint embedding (output of the projection); None without projection."""
    act_fn: str
    pool_type: str
    """vision: ``tok``/``avg``/``none``/``attn``; text: ``argmax``/``eos``/``first``/``last``/``none``."""
    final_ln_after_pool: bool = False
    has_ln_pre: bool = False
    layer_scale: bool = False
    image_size: Optional[tuple[int, int]] = None
    patch_size: Optional[tuple[int, int]] = None
    grid_size: Optional[tuple[int, int]] = None
    context_length: Optional[int] = None
    vocab_size: Optional[int] = None
    causal: bool = False
    n_prefix_tokens: int = 0
    """Class/register tokens before the patch tokens (vision), e.g. 1 for CLS, 0 for SigLIP."""
    gated_mlp: bool = False
    """SwiGLU MLPs (``mlp.hook_pre_linear`` exists)."""
    attn_pooler_heads: Optional[int] = None
    attn_pooler_queries: Optional[int] = None
    model_name: Optional[str] = None
    normalization_type: str = "LN"
    attn_only: bool = False
    final_rms: bool = False
    positional_embedding_type: str = "standard"
    use_attn_result: bool = False
    """Compute ``hook_result`` on every forward (otherwise only when it is hooked)."""
    n_key_value_heads: Optional[int] = None
    """TransformerLens' grouped-query field: always None (every head has its own keys and values)."""
    dtype: torch.dtype = torch.float32
    device: Optional[torch.device] = None
    """Where the tower lives, kept current by [`HookedCLIP`][clip_lens.HookedCLIP] (TransformerLens' helpers read it)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def layer_range(self, start: Optional[int], stop: Optional[int]) -> range:
        """The blocks a forward with ``start_at_layer``/``stop_at_layer`` runs (negative counts from
        the end, as in TransformerLens); raises [`IndexOutOfRangeError`][clip_lens.IndexOutOfRangeError] outside ``[0, n_layers]``."""
        bounds = []
        for name, value, default in (("start_at_layer", start, 0), ("stop_at_layer", stop, self.n_layers)):
            if value is None:
                bounds.append(default)
                continue
            value = as_int(value, name, IndexOutOfRangeError)
            index = value + self.n_layers if value < 0 else value
            if not 0 <= index <= self.n_layers:
                raise IndexOutOfRangeError(
                    f"{name}={value} is outside the {self.tower} tower's {self.n_layers} layers; "
                    f"use 0..{self.n_layers} (or -{self.n_layers}..-1)."
                )
            bounds.append(index)
        if bounds[0] > bounds[1]:
            raise IndexOutOfRangeError(f"start_at_layer={start} comes after stop_at_layer={stop}.")
        return range(*bounds)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dtype"] = str(self.dtype)
        d["device"] = None if self.device is None else str(self.device)
        return d
