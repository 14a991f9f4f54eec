"""The SAE's configuration in SAELens' (v6) layout: `SAEConfig`, the architectures and dtypes it names.

Below `clip_lens.sae.model` (the module) and `clip_lens.sae.io` (the files): both read a config, neither
needs the other to do so. ``SAEConfig.from_dict`` also reads the older flat ``cfg.json`` of SAELens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from clip_lens.errors import InputError

ARCHITECTURES = ("standard", "topk", "jumprelu", "gated", "abstopk")
"""The SAELens architectures clip_lens runs (SAELens' names)."""
TOPK = ("topk", "abstopk")
"""Architectures that keep ``k`` features per input."""
NORMALIZATIONS = ("none", "layer_norm", "constant_norm_rescale")
"""``normalize_activations`` values applied at run time (SAELens' names)."""
RESHAPES = ("none", "hook_z")
DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "torch.float32": torch.float32, "torch.float64": torch.float64, "torch.float16": torch.float16,
    "torch.bfloat16": torch.bfloat16,
}
"""The dtype strings of SAELens' ``DTYPE_MAP``."""
SAE_LENS_FORMAT_VERSION = "6.0.0"
"""Written as ``metadata.sae_lens_version`` when absent: SAELens reads cfg.json in the v6 layout only
when this version is >= 6 (older versions are converted from the flat layout)."""

# Keys of a pre-6 flat cfg.json that SAELens moves into ``metadata`` (LLM_METADATA_KEYS).
_LEGACY_METADATA_KEYS = (
    "model_class_name", "hook_head_index", "model_from_pretrained_kwargs", "prepend_bos",
    "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path",
    "sae_lens_version", "sae_lens_training_version",
)
_LEGACY_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
                   "activation_fn_str": "activation_fn"}


def extra_parameters(architecture: str) -> tuple[str, ...]:
    """The ``[d_sae]`` parameters an architecture has besides ``W_enc``, ``W_dec``, ``b_dec`` (and
    ``b_enc``, which every architecture but ``gated`` has), in SAELens' names."""
    return {"jumprelu": ("threshold",), "gated": ("b_gate", "b_mag", "r_mag")}.get(architecture, ())


def dtype_from_str(name: str) -> torch.dtype:
    """``"float32"``/``"torch.float32"`` … to a ``torch.dtype`` (InputError for others)."""
    if name not in DTYPES:
        raise InputError(f"SAE dtype {name!r} is not one of {sorted(set(DTYPES))}.")
    return DTYPES[name]


def dtype_to_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class SAEConfig:
    """What an SAE is: widths, architecture and the activation it reads (SAELens v6 fields).

    ``to_dict``/``from_dict`` read and write SAELens' ``cfg.json``: the v6 layout (``hook_name``
    and ``model_name`` inside ``metadata``) and, on reading, the older flat layouts too.
    """

    d_in: int
    """Width of the activation the SAE reads (``n_heads*d_head`` for ``hook_z``)."""
    d_sae: int
    """Number of features."""
    architecture: str = "standard"
    """``"standard"`` (ReLU), ``"topk"``, ``"jumprelu"``, ``"gated"`` or ``"abstopk"``."""
    k: Optional[int] = None
    """Active features per input (``topk`` and ``abstopk`` only)."""
    hook_name: str = ""
    """The HookedCLIP hook point it reads, e.g. ``"blocks.3.hook_resid_post"``, ``"text.blocks.1.hook_resid_post"``."""
    model_name: Optional[str] = None
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    """Subtract ``b_dec`` from the input before encoding."""
    normalize_activations: str = "none"
    """``"none"``, ``"layer_norm"`` or ``"constant_norm_rescale"`` (SAELens' run-time normalisations)."""
    reshape_activations: str = "none"
    """``"hook_z"``: flatten ``[..., n_heads, d_head]`` to ``[..., n_heads*d_head]``."""
    metadata: dict = field(default_factory=dict)
    """SAELens' metadata (``sae_lens_version``, ``context_size``, …); unknown keys survive a round trip."""
    rescale_acts_by_decoder_norm: bool = False
    """``topk``/``abstopk`` only (SAELens' ``TopKSAEConfig`` field): select on ``pre * ||W_dec||`` and decode ``f / ||W_dec||``."""
    check_finite: bool = True
    """Run-time check (not written to cfg.json): a NaN/inf input raises [`InputError`][clip_lens.InputError]."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise [`InputError`][clip_lens.InputError] for a config clip_lens cannot run."""
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"SAE config: {name} must be a positive integer, got {value!r}.")
        if self.architecture not in ARCHITECTURES:
            raise InputError(
                f"SAE architecture {self.architecture!r} is not supported; clip_lens runs {', '.join(ARCHITECTURES)}."
            )
        if self.architecture in TOPK:
            if isinstance(self.k, bool) or not isinstance(self.k, int) or not 0 < self.k <= self.d_sae:
                raise InputError(
                    f"a {self.architecture} SAE needs k, an integer in [1, d_sae={self.d_sae}]; got k={self.k!r}."
                )
        if self.normalize_activations == "expected_average_only_in":
            raise InputError(
                "normalize_activations='expected_average_only_in' needs a dataset scaling factor that the SAE "
                "folder does not hold; fold it into the weights (W_enc *= s; W_dec /= s; b_dec /= s) and set "
                "normalize_activations to 'none'."
            )
        if self.normalize_activations not in NORMALIZATIONS:
            raise InputError(
                f"normalize_activations={self.normalize_activations!r} is not supported; use one of {NORMALIZATIONS}."
            )
        if self.reshape_activations not in RESHAPES:
            raise InputError(f"reshape_activations={self.reshape_activations!r} is not one of {RESHAPES}.")
        dtype_from_str(self.dtype)
        if not isinstance(self.metadata, dict):
            raise InputError(f"SAE config: metadata must be a dict, got {type(self.metadata).__name__}.")

    # --- cfg.json -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """SAELens v6 ``cfg.json``: the config fields, ``architecture``, and ``metadata`` holding
        ``hook_name``, ``model_name`` and ``sae_lens_version`` (plus every other metadata key)."""
        out: dict[str, Any] = {
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": self.dtype,
            "device": self.device,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            "reshape_activations": self.reshape_activations,
        }
        if self.architecture in TOPK:
            out["k"] = self.k
            out["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        metadata = copy.deepcopy(self.metadata)
        metadata["hook_name"] = self.hook_name
        metadata["model_name"] = self.model_name
        metadata.setdefault("sae_lens_version", SAE_LENS_FORMAT_VERSION)
        out["metadata"] = metadata
        out["architecture"] = self.architecture
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SAEConfig":
        """Read a ``cfg.json`` dict: SAELens v6 (``hook_name`` in ``metadata``) or an older flat layout
        (``hook_name``/``hook_point``, ``model_name``, ``activation_fn_str`` at the top level).
        Training-only fields are ignored; missing widths or an unknown architecture raise
        [`InputError`][clip_lens.InputError]."""
        if not isinstance(d, Mapping):
            raise InputError(f"an SAE config must be a JSON object (dict), got {type(d).__name__}.")
        missing = [k for k in ("d_in", "d_sae") if k not in d]
        if missing:
            raise InputError(
                f"SAE config lacks {' and '.join(missing)}; an SAELens cfg.json holds at least "
                '{"d_in": ..., "d_sae": ..., "architecture": ...}.'
            )
        raw = {_LEGACY_RENAMES.get(k, k): v for k, v in d.items()}
        nested = raw.get("metadata")
        if isinstance(nested, Mapping):  # v6 layout
            metadata = copy.deepcopy(dict(nested))
        else:  # pre-6 flat layout: SAELens moves these keys into metadata
            metadata = {k: copy.deepcopy(raw[k]) for k in _LEGACY_METADATA_KEYS if k in raw}
        hook_name = metadata.pop("hook_name", None) or raw.get("hook_name") or ""
        model_name = metadata.pop("model_name", None) or raw.get("model_name")
        for key in ("hook_point", "hook_point_head_index"):
            if key in metadata:
                metadata[_LEGACY_RENAMES[key]] = metadata.pop(key)

        architecture = raw.get("architecture") or "standard"
        k = raw.get("k")
        activation = raw.get("activation_fn")
        if activation is not None and architecture == "standard":
            kwargs = raw.get("activation_fn_kwargs") or {}
            if activation == "topk" and isinstance(kwargs, Mapping) and kwargs.get("k") is not None:
                architecture, k = "topk", kwargs["k"]
            elif activation != "relu":
                raise InputError(
                    f"SAE activation function {activation!r} is not supported: a standard SAE uses 'relu' "
                    "(SAELens' other architectures: topk, jumprelu)."
                )
        if architecture in TOPK and k is None:
            kwargs = raw.get("activation_fn_kwargs") or {}
            k = kwargs.get("k") if isinstance(kwargs, Mapping) else None
        if raw.get("finetuning_scaling_factor") is True:
            raise InputError(
                "this SAE uses a finetuning scaling factor (finetuning_scaling_factor: true), which clip_lens "
                "does not support; fold the factor into W_dec and set finetuning_scaling_factor to false."
            )
        normalize = raw.get("normalize_activations", "none")
        if normalize is None or normalize is False:
            normalize = "none"
        elif normalize is True:
            normalize = "expected_average_only_in"
        reshape = raw.get("reshape_activations")
        if reshape is None:
            reshape = "hook_z" if str(hook_name).endswith("hook_z") and not isinstance(nested, Mapping) else "none"
        return cls(
            d_in=raw["d_in"],
            d_sae=raw["d_sae"],
            architecture=architecture,
            k=k if architecture in TOPK else None,
            hook_name=hook_name,
            model_name=model_name,
            dtype=raw.get("dtype") or "float32",
            device=raw.get("device") or "cpu",
            apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
            normalize_activations=normalize,
            reshape_activations=reshape,
            metadata=metadata,
            rescale_acts_by_decoder_norm=architecture in TOPK and bool(raw.get("rescale_acts_by_decoder_norm")),
        )
