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
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from clip_lens.errors import InputError
from clip_lens.sae.config import (  # noqa: F401  (defined in clip_lens.sae.config; re-exported where they were)
    ARCHITECTURES, DTYPES, NORMALIZATIONS, RESHAPES, SAE_LENS_FORMAT_VERSION, TOPK, SAEConfig, dtype_from_str,
    dtype_to_str, extra_parameters,
)
from clip_lens.sae.io import read_sae, save_sae

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
        return save_sae(self, folder, log_feature_sparsity=log_feature_sparsity)

    @classmethod
    def load(cls, folder: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "SAE":
        """Read an SAE folder written by SAELens or `save`; see `load_sae`."""
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


def load_sae(folder: Union[str, Path], device: Union[str, torch.device] = "cpu", sae_class: type = SAE) -> SAE:
    """Read an SAE folder (written by SAELens or by `clip_lens.sae.io.save_sae`) onto ``device``.

    Raises:
        CheckpointNotFoundError: the folder, ``cfg.json`` or the weights file is missing.
        InputError: ``cfg.json`` is not JSON, lacks ``d_in``/``d_sae``, or names an architecture or
            setting clip_lens does not run.
        CorruptCheckpointError: the weights are not safetensors, fail the recorded sha256, are not
            an SAE's (foreign tensor names), disagree with ``cfg.json``'s shapes, or hold NaN/inf.
    """
    cfg, tensors = read_sae(folder)  # every check of the files (clip_lens.sae.io)
    cfg.device = str(torch.device(device))
    sae = sae_class(cfg)
    dtype = dtype_from_str(cfg.dtype)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(tensors[name].to(dtype=dtype))
    return sae
