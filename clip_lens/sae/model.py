"""Sparse autoencoders in SAELens' (v6) semantics: config, maths and hook points.

An SAE reads an activation ``x`` of width ``d_in`` at one hook point and writes it as a sparse
combination of ``d_sae`` feature directions::

    x_n   = norm_in(x)                       normalize_activations ("none", "layer_norm", "constant_norm_rescale")
    pre   = (x_n - b_dec·[apply_b_dec_to_input]) @ W_enc + b_enc
    f     = act(pre)                          architecture:
                                                standard  relu(pre)
                                                topk      the k largest entries of pre, then relu (others 0)
                                                abstopk   the k entries of pre largest in magnitude, signed (others 0)
                                                jumprelu  relu(pre) · [pre > relu(threshold)]
    recon = norm_out(f @ W_dec + b_dec)

A ``gated`` SAE (SAELens' ``GatedSAE``) has no ``b_enc``; with ``c = x_n - b_dec``::

    f     = [c @ W_enc + b_gate > 0] · relu(c @ (W_enc · exp(r_mag)) + b_mag)

(``hook_sae_acts_pre`` is the magnitude path's pre-activation, as in SAELens.)

With ``use_error_term`` the output is ``recon + error`` where ``error = x - recon_clean`` is computed
without any hook intervention (SAELens' definition), so the model downstream sees exactly ``x``
unless a hook on the SAE changes something; the error is a constant for gradients (computed under
``no_grad``, as SAELens does).

``reshape_activations="hook_z"`` flattens ``[..., n_heads, d_head]`` to ``[..., n_heads*d_head]`` on
the way in; `SAE.forward` restores the input's shape on the way out (`SAE.decode`
returns the flat width).

Hook points (SAELens names; under ``<hook_name>.`` when spliced into a model, see
`clip_lens.sae.splice`):

==========================  ===================  =================================================
``hook_sae_input``          ``[..., d_in]``       the input (flattened for ``hook_z``), before normalisation
``hook_sae_acts_pre``       ``[..., d_sae]``      encoder pre-activations
``hook_sae_acts_post``      ``[..., d_sae]``      feature activations (edit these to steer/ablate)
``hook_sae_recons``         ``[..., d_in]``       ``f @ W_dec + b_dec`` (still normalised)
``hook_sae_error``          ``[..., d_in]``       ``x - recon_clean`` (only with ``use_error_term``)
``hook_sae_output``         ``[..., d_in]``       what the SAE returns (flat width)
==========================  ===================  =================================================
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

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


class SAE(HookedRootModule):
    """A sparse autoencoder on one hook point, with SAELens' parameters, maths and hook names.

    Parameters: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
    ``b_dec [d_in]``, and ``threshold [d_sae]`` for ``jumprelu``; a ``gated`` SAE has
    ``b_gate``, ``b_mag`` and ``r_mag [d_sae]`` instead of ``b_enc``. The module docstring gives the
    equations and the hook table. Build one with `from_config`, read one with `load`
    (SAELens' folder format, see `clip_lens.sae.io`), splice it into a model with
    ``model.add_sae(sae)`` / ``model.run_with_saes(..., saes=[sae])``.

    Args:
        cfg: the config.
        use_error_term: `forward` returns ``recon + error`` (the input, unless a hook on the
            SAE intervenes) instead of the reconstruction.
    """

    def __init__(self, cfg: SAEConfig, use_error_term: bool = False):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.use_error_term = use_error_term
        dtype = dtype_from_str(cfg.dtype)
        device = torch.device(cfg.device)
        # SAELens' initialisation: W_dec Kaiming-uniform, W_enc its transpose, zero biases.
        w_dec = torch.empty(cfg.d_sae, cfg.d_in, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous())
        if cfg.architecture != "gated":
            self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype, device=device))
        for name in extra_parameters(cfg.architecture):  # zeros, as SAELens initialises them
            setattr(self, name, nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device)))
        self.hook_sae_input = HookPoint()
        self.hook_sae_acts_pre = HookPoint()
        self.hook_sae_acts_post = HookPoint()
        self.hook_sae_output = HookPoint()
        self.hook_sae_recons = HookPoint()
        self.hook_sae_error = HookPoint()
        self._norm_state: Optional[tuple[Tensor, ...]] = None  # set by encode() for a following decode()
        self.setup()

    # --- construction and files -----------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Union[SAEConfig, Mapping[str, Any]], use_error_term: bool = False) -> "SAE":
        """A freshly initialised SAE from an `SAEConfig` or a ``cfg.json`` dict."""
        if not isinstance(cfg, SAEConfig):
            cfg = SAEConfig.from_dict(cfg)
        return cls(cfg, use_error_term=use_error_term)

    def save(self, folder: Union[str, Path], log_feature_sparsity: Optional[Tensor] = None) -> Path:
        """Write SAELens' folder format (``cfg.json``, ``sae_weights.safetensors`` and, when given,
        ``sparsity.safetensors``) atomically; see `clip_lens.sae.io.save_sae`."""
        from clip_lens.sae.io import save_sae

        return save_sae(self, folder, log_feature_sparsity=log_feature_sparsity)

    @classmethod
    def load(cls, folder: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "SAE":
        """Read an SAE folder written by SAELens or `save`; see `clip_lens.sae.io.load_sae`."""
        from clip_lens.sae.io import load_sae

        return load_sae(folder, device=device, sae_class=cls)

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def extra_repr(self) -> str:
        cfg = self.cfg
        k = f", k={cfg.k}" if cfg.architecture in TOPK else ""
        return f"{cfg.architecture}, d_in={cfg.d_in}, d_sae={cfg.d_sae}{k}, hook_name={cfg.hook_name!r}"

    # --- the maths --------------------------------------------------------------------------
    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations of ``x`` (``[..., n_heads, d_head]`` is accepted for ``hook_z``).

        Fires ``hook_sae_input``, ``hook_sae_acts_pre`` and ``hook_sae_acts_post``. With a run-time
        normalisation the input's statistics are kept for the next `decode` (as in SAELens).
        """
        flat = self._flatten(x)
        acts, self._norm_state = self._encode(flat, hooked=True, check=True)
        return acts

    def decode(self, f: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        """``norm_out(f @ W_dec + b_dec)`` at the flat width ``d_in``; fires ``hook_sae_recons``.

        With ``normalize_activations`` other than ``"none"`` it undoes the normalisation of the
        input passed to the last `encode`.
        """
        if self.cfg.normalize_activations != "none" and self._norm_state is None:
            raise InputError(
                f"decode() of an SAE with normalize_activations={self.cfg.normalize_activations!r} needs the "
                "statistics of an input: call encode(x) first, or run sae(x)."
            )
        return self._decode(f.to(self.dtype), self._norm_state, hooked=True)

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """The reconstruction of ``x`` (in ``x``'s shape and dtype), or with ``use_error_term`` the
        reconstruction plus the clean error, which equals ``x`` exactly unless a hook intervenes."""
        return self.run(x, use_error_term=self.use_error_term)

    def run(self, x: Tensor, use_error_term: bool) -> Tensor:
        """`forward` with an explicit ``use_error_term`` (what a spliced SAE calls)."""
        flat = self._flatten(x)
        acts, state = self._encode(flat, hooked=True, check=True)
        recons = self._decode(acts, state, hooked=True)
        if use_error_term:
            with torch.no_grad():
                clean_acts, clean_state = self._encode(flat, hooked=False, check=False)
                clean = self._decode(clean_acts, clean_state, hooked=False)
                error = flat - clean
                hooked_error = self.hook_sae_error(error)
                # recons + hooked_error, arranged so that it is flat bit for bit when no hook changed
                # anything (recons == clean, hooked_error == error); gradients flow through recons only.
                base = flat.detach() + (hooked_error - error)
            out = base + (recons - clean)
        else:
            out = recons
        out = self.hook_sae_output(out)
        return out.reshape(x.shape).to(x.dtype)

    # --- internals ------------------------------------------------------------------------
    def _flatten(self, x: Tensor) -> Tensor:
        """``x`` at the SAE's width and dtype (``hook_z``: heads flattened); InputError otherwise."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
            raise InputError(f"an SAE reads floating-point activations [..., {self.cfg.d_in}], got {got}.")
        d_in = self.cfg.d_in
        if x.ndim >= 1 and x.shape[-1] == d_in:
            flat = x
        elif self.cfg.reshape_activations == "hook_z" and x.ndim >= 2 and x.shape[-2] * x.shape[-1] == d_in:
            flat = x.flatten(-2)
        else:
            where = f" for '{self.cfg.hook_name}'" if self.cfg.hook_name else ""
            width = x.shape[-1] if x.ndim else 0
            extra = (f" (hook_z: n_heads*d_head = {x.shape[-2]}*{x.shape[-1]} = {x.shape[-2] * x.shape[-1]})"
                     if x.ndim >= 2 and self.cfg.reshape_activations == "hook_z" else "")
            raise InputError(
                f"the SAE{where} reads width d_in={d_in}, but the activation has width {width}{extra} "
                f"(shape {tuple(x.shape)}); use an SAE trained on this hook point of this model."
            )
        if flat.device != self.device:
            raise InputError(
                f"the SAE is on {self.device} but the activation is on {flat.device}; "
                f"move it with sae.to({str(flat.device)!r})."
            )
        return flat.to(self.dtype)

    def _encode(self, x: Tensor, hooked: bool, check: bool) -> tuple[Tensor, Optional[tuple[Tensor, ...]]]:
        if check and self.cfg.check_finite and not bool(torch.isfinite(x).all()):
            where = f" at '{self.cfg.hook_name}'" if self.cfg.hook_name else ""
            raise InputError(
                f"the SAE's input{where} contains NaN or inf values; check the model's input "
                "(or set sae.cfg.check_finite = False to skip this check)."
            )
        x = self._hook(self.hook_sae_input, x, hooked)
        x, state = self._normalize_in(x)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        if self.cfg.architecture == "gated":  # SAELens' GatedSAE.encode
            active = (x @ self.W_enc + self.b_gate > 0).to(x.dtype)
            magnitude = self._hook(self.hook_sae_acts_pre, x @ (self.W_enc * self.r_mag.exp()) + self.b_mag, hooked)
            return self._hook(self.hook_sae_acts_post, active * torch.relu(magnitude), hooked), state
        pre = self._hook(self.hook_sae_acts_pre, x @ self.W_enc + self.b_enc, hooked)
        return self._hook(self.hook_sae_acts_post, self._activation(pre), hooked), state

    def _activation(self, pre: Tensor) -> Tensor:
        arch = self.cfg.architecture
        if arch == "standard":
            return torch.relu(pre)
        if arch == "jumprelu":
            return torch.relu(pre) * (pre > torch.relu(self.threshold)).to(pre.dtype)
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        if arch == "abstopk":  # the k largest in magnitude, keeping their sign (SAELens' AbsTopK)
            indices = torch.topk(pre.abs(), k=self.cfg.k, dim=-1, sorted=False).indices
            return torch.zeros_like(pre).scatter(-1, indices, pre.gather(-1, indices))
        values, indices = torch.topk(pre, k=self.cfg.k, dim=-1, sorted=False)  # top k first, then relu
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))

    def _decode(self, f: Tensor, state: Optional[tuple[Tensor, ...]], hooked: bool) -> Tensor:
        if self.cfg.architecture in TOPK and self.cfg.rescale_acts_by_decoder_norm:
            f = f / self.W_dec.norm(dim=-1)
        recons = self._hook(self.hook_sae_recons, f @ self.W_dec + self.b_dec, hooked)
        return self._normalize_out(recons, state)

    @staticmethod
    def _hook(point: HookPoint, x: Tensor, hooked: bool) -> Tensor:
        return point(x) if hooked else x

    def _normalize_in(self, x: Tensor) -> tuple[Tensor, Optional[tuple[Tensor, ...]]]:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":  # scale every vector to norm sqrt(d_in)
            coeff = (self.cfg.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)
            return x * coeff, (coeff,)
        if mode == "layer_norm":  # SAELens: centre, divide by (unbiased std + 1e-5); no affine
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            return x / (std + 1e-5), (mu, std)
        return x, None

    def _normalize_out(self, x: Tensor, state: Optional[tuple[Tensor, ...]]) -> Tensor:
        mode = self.cfg.normalize_activations
        if mode == "none":
            return x
        try:
            if mode == "constant_norm_rescale":
                return x / state[0]
            return x * state[1] + state[0]
        except RuntimeError as error:  # shapes of a decode() after an encode() of another batch
            raise InputError(
                f"decode() got features of shape {tuple(x.shape[:-1])} but the last encode() was of another batch; "
                "decode the features of the input just encoded."
            ) from error

    def state_dict_for_saving(self) -> dict[str, Tensor]:
        """The tensors of ``sae_weights.safetensors`` (SAELens' names), contiguous on the CPU."""
        return {name: p.detach().to("cpu").contiguous() for name, p in self.named_parameters()}

    def config_for_saving(self) -> SAEConfig:
        """The config with ``dtype``/``device`` of the parameters as they are now."""
        return dataclasses.replace(self.cfg, dtype=dtype_to_str(self.dtype), device=str(self.device),
                                   metadata=copy.deepcopy(self.cfg.metadata))
