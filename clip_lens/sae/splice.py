"""Splicing SAEs into a HookedCLIP (SAELens' ``HookedSAETransformer`` API).

``model.add_sae(sae)`` replaces the activation at ``sae.cfg.hook_name`` by ``sae(activation)``
for every forward pass until ``model.reset_saes()``; ``model.saes([...])`` does so inside a
``with`` block and ``run_with_saes`` / ``run_with_cache_with_saes`` / ``run_with_hooks_with_saes``
for one call. With ``use_error_term=True`` the SAE adds back its clean reconstruction error, so the
model's outputs are unchanged (bit for bit) while the features are observable, and an edit of the
features (a hook on ``hook_sae_acts_post``) changes the output by exactly its effect on the
reconstruction.

How: a forward hook on the hook point (registered first, and with torch directly, so
``reset_hooks(including_permanent=True)`` cannot half-remove a splice) returns the SAE's output,
and the SAE's own hook points become children of that hook point. ``setup()`` then names them
``<hook_name>.hook_sae_acts_post`` etc., exactly as in SAELens' caches, and they work with
``run_with_hooks``, ``run_with_cache`` and ``names_filter`` like any other hook. The hook point
itself then carries what flows on (the SAE's output); its input is at ``<hook_name>.hook_sae_input``.
The SAE's parameters are not the model's: ``model.state_dict()`` and ``model.to()`` leave them out.

Checks at splice time (`SAESplicing.add_sae`), against what the SAE says it was trained on:

* a hook the model lacks: ``HookNameError`` (close names listed); a width that differs: ``InputError``;
* an SAE clip_lens trained (``metadata.clip_lens_training`` records the model and the hook):
  another model, or a ``hook_name`` that differs from the recorded hook (the other tower, another
  layer), is an ``InputError``: the SAE would read activations it never saw;
* SAELens' own ``model_name`` naming another model: a ``UserWarning``, not an error. SAELens never
  checks it and tools spell the same weights differently (``ViT-B-32`` vs
  ``open-clip:laion/CLIP-ViT-B-32-laion2B-s34B-b79K``); set ``sae.cfg.model_name`` to the model's
  name to silence it.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from torch import Tensor
from torch.utils.hooks import RemovableHandle
from transformer_lens.hook_points import HookPoint

from clip_lens.errors import InputError
from clip_lens.sae.model import SAE

SAEs = Union[SAE, Sequence[SAE]]

_BLOCK_HOOK = re.compile(
    r"(?P<text>text\.)?blocks\.\d+\.(?P<what>hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|"
    r"hook_mlp_out|attn\.hook_z)"
)


@dataclass
class _Splice:
    sae: SAE
    use_error_term: bool
    hook_point: HookPoint
    handle: RemovableHandle


class SAESplicing:
    """Mixin for [`HookedCLIP`][clip_lens.HookedCLIP]: attach SAEs to hook points (SAELens semantics).

    The model must be a ``HookedRootModule`` whose ``setup()`` rebuilds ``hook_dict``.
    """

    # --- state ------------------------------------------------------------------------------
    @property
    def _sae_splices(self) -> dict[str, _Splice]:
        table = self.__dict__.get("_sae_splice_table")
        if table is None:
            table = self.__dict__["_sae_splice_table"] = {}
        return table

    @property
    def acts_to_saes(self) -> dict[str, SAE]:
        """The spliced SAEs by hook name."""
        return {name: splice.sae for name, splice in self._sae_splices.items()}

    # --- attach / detach ----------------------------------------------------------------------
    def add_sae(self, sae: SAE, use_error_term: Optional[bool] = None) -> None:
        """Splice ``sae`` into the model at ``sae.cfg.hook_name`` until `reset_saes`.

        An SAE already at that hook point is replaced.

        Args:
            sae: an `SAE` whose ``cfg.hook_name`` is one of the model's hooks.
            use_error_term: add the SAE's clean error back (outputs unchanged unless a hook on the
                SAE intervenes); ``None`` keeps ``sae.use_error_term``.

        Raises:
            HookNameError: the hook name is not one of the model's (close names are listed).
            InputError: not an SAE, no hook name, or ``d_in`` differs from the hook's width.
        """
        if not isinstance(sae, SAE):
            raise InputError(
                f"add_sae takes a clip_lens.sae.SAE, got {type(sae).__name__}; load one with SAE.load(folder)."
            )
        name = sae.cfg.hook_name
        if not name:
            raise InputError(
                "the SAE has no hook_name, so it is unknown where to splice it; set sae.cfg.hook_name "
                "(e.g. 'blocks.3.hook_resid_post')."
            )
        head = sae.cfg.metadata.get("hook_head_index")
        if head is not None:
            raise InputError(
                f"the SAE reads one attention head (hook_head_index={head}) of '{name}'; splicing per-head SAEs "
                "is not supported (run sae.encode on cache[hook_name][..., head, :] instead)."
            )
        for spliced in self._sae_splices:
            if name.startswith(spliced + "."):
                raise InputError(
                    f"'{name}' is a hook of the SAE spliced at '{spliced}'; an SAE cannot be spliced into another SAE."
                )
        self._check_provenance(sae, name)
        self.check_hook_name(name)
        self._check_width(sae, name)
        device = getattr(self, "device", None)
        if device is not None and sae.device != device:
            raise InputError(
                f"the SAE is on {sae.device} but the model is on {device}; move it with sae.to({str(device)!r})."
            )
        if name in self._sae_splices:
            self._detach(name)
        use_error_term = sae.use_error_term if use_error_term is None else bool(use_error_term)
        hook_point = self.hook_dict[name]

        def splice(module: Any, inputs: Any, output: Tensor) -> Tensor:
            return sae.run(output, use_error_term=use_error_term)

        handle = hook_point.register_forward_hook(splice, prepend=True)
        for hook_name, point in sae.hook_dict.items():
            hook_point.add_module(hook_name, point)
        self._sae_splices[name] = _Splice(sae, use_error_term, hook_point, handle)
        self.setup()

    def reset_saes(self, act_names: Union[str, Sequence[str], None] = None) -> None:
        """Remove the SAEs at ``act_names`` (all by default); unknown names raise [`InputError`][clip_lens.InputError]."""
        names = list(self._sae_splices) if act_names is None else (
            [act_names] if isinstance(act_names, str) else list(act_names))
        unknown = [n for n in names if n not in self._sae_splices]
        if unknown:
            attached = ", ".join(self._sae_splices) or "none"
            raise InputError(f"no SAE is spliced at {', '.join(unknown)} (spliced: {attached}).")
        for name in names:
            self._detach(name)
        self.setup()

    def _detach(self, name: str) -> None:
        splice = self._sae_splices.pop(name)
        splice.handle.remove()
        for hook_name in splice.sae.hook_dict:
            splice.hook_point._modules.pop(hook_name, None)
        splice.sae.setup()  # give the SAE's hook points back their own names

    def _check_provenance(self, sae: SAE, name: str) -> None:
        """Refuse an SAE clip_lens trained on another model or hook; warn when SAELens' ``model_name``
        names another model (module docstring: why one is an error and the other a warning)."""
        here = getattr(self, "model_name", None)
        training = sae.cfg.metadata.get("clip_lens_training") if isinstance(sae.cfg.metadata, dict) else None
        args = training.get("args") if isinstance(training, dict) else None
        source = args.get("source") if isinstance(args, dict) else None
        source = source if isinstance(source, dict) else {}
        trained_model, trained_hook = source.get("model"), source.get("hook_name")
        if trained_model and here and trained_model != here:
            raise InputError(
                f"the SAE was trained on model '{trained_model}' (metadata.clip_lens_training), not '{here}'; splice it "
                f"into a HookedCLIP of '{trained_model}'."
            )
        if isinstance(trained_hook, str) and trained_hook and trained_hook != name:
            towers = {h: "text" if h.startswith("text.") else "image" for h in (trained_hook, name)}
            what = (f"the {towers[trained_hook]} tower's '{trained_hook}', but its hook_name says the "
                    f"{towers[name]} tower's '{name}'") if towers[trained_hook] != towers[name] else (
                    f"'{trained_hook}', but its hook_name says '{name}'")
            raise InputError(
                f"the SAE was trained on {what} (cfg.json was edited?); set sae.cfg.hook_name = {trained_hook!r} "
                "or use an SAE trained on that hook."
            )
        if not trained_model and sae.cfg.model_name and here and sae.cfg.model_name != here:
            warnings.warn(
                f"the SAE's model_name is '{sae.cfg.model_name}' but the model is '{here}'; splicing it anyway (SAELens "
                f"does not check model_name). If it was trained on other weights its features mean nothing here; set "
                f"sae.cfg.model_name = {here!r} to silence this.", UserWarning, stacklevel=3,
            )

    def _check_width(self, sae: SAE, name: str) -> None:
        """Compare ``d_in`` with the hook's width where the config says it (resid/attn_out/mlp_out/
        hook_z of a block); every other hook is checked on the first forward pass."""
        match = _BLOCK_HOOK.fullmatch(name)
        if match is None:
            return
        tower = self.text if match["text"] else self
        cfg = getattr(tower, "cfg", None)
        d_model, n_heads, d_head = (getattr(cfg, a, None) for a in ("d_model", "n_heads", "d_head"))
        if match["what"] == "attn.hook_z":
            if n_heads is None or d_head is None:
                return
            hook_z = sae.cfg.reshape_activations == "hook_z"
            width = n_heads * d_head if hook_z else d_head
            what = f"n_heads*d_head = {n_heads}*{d_head} = {width}" if hook_z else f"d_head = {d_head}"
            hint = "" if hook_z or sae.cfg.d_in != n_heads * d_head else (
                "; set sae.cfg.reshape_activations = 'hook_z' to read all heads flattened")
        else:
            if d_model is None:
                return
            width, what, hint = d_model, f"d_model = {d_model}", ""
        if sae.cfg.d_in != width:
            raise InputError(
                f"the SAE reads width d_in={sae.cfg.d_in} but '{name}' has width {what}{hint}; "
                "use an SAE trained on this hook point of this model."
            )

    # --- temporary splices --------------------------------------------------------------------
    @contextmanager
    def saes(self, saes: SAEs = (), reset_saes_end: bool = True,
             use_error_term: Optional[bool] = None) -> Iterator[Any]:
        """Splice ``saes`` inside a ``with`` block; on exit (``reset_saes_end``) remove them and put
        back any SAE they displaced, as it was."""
        saes = [saes] if isinstance(saes, SAE) else list(saes)
        displaced = {}
        added: list[str] = []
        try:
            for sae in saes:
                name = sae.cfg.hook_name
                if name in self._sae_splices and name not in displaced:
                    displaced[name] = self._sae_splices[name]
                self.add_sae(sae, use_error_term=use_error_term)
                added.append(name)
            yield self
        finally:
            if reset_saes_end:
                for name in dict.fromkeys(added):
                    if name in self._sae_splices:
                        self._detach(name)
                for name, old in displaced.items():
                    self.add_sae(old.sae, use_error_term=old.use_error_term)
                self.setup()

    def run_with_saes(self, *model_args: Any, saes: SAEs = (), reset_saes_end: bool = True,
                      use_error_term: Optional[bool] = None, **model_kwargs: Any) -> Any:
        """One forward pass with ``saes`` spliced (see `saes`)."""
        with self.saes(saes=saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args: Any, saes: SAEs = (), reset_saes_end: bool = True,
                                 use_error_term: Optional[bool] = None, **kwargs: Any) -> tuple[Any, Any]:
        """``run_with_cache`` with ``saes`` spliced: the cache also holds each SAE's hooks under
        ``<hook_name>.hook_sae_input`` … ``<hook_name>.hook_sae_output``."""
        with self.saes(saes=saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self.run_with_cache(*model_args, **kwargs)

    def run_with_hooks_with_saes(self, *model_args: Any, saes: SAEs = (), reset_saes_end: bool = True,
                                 use_error_term: Optional[bool] = None,
                                 fwd_hooks: Sequence[tuple[Union[str, Callable], Callable]] = (),
                                 bwd_hooks: Sequence[tuple[Union[str, Callable], Callable]] = (),
                                 reset_hooks_end: bool = True, clear_contexts: bool = False,
                                 **model_kwargs: Any) -> Any:
        """``run_with_hooks`` with ``saes`` spliced; hooks may name the SAEs' hook points."""
        with self.saes(saes=saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self.run_with_hooks(*model_args, fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks),
                                       reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts,
                                       **model_kwargs)
