"""Training sparse autoencoders on an `ActivationSource`.

Three recipes, each converted at the end into the SAELens architecture that runs it:

==============  ===========================================================  ===================
``topk``        ``f = relu(top_k(pre))`` per token (Gao et al. 2024), AuxK    ``"topk"`` (same k)
``batchtopk``   the ``k × batch`` largest ``relu(pre)`` of the whole batch    ``"jumprelu"``
                (Bussmann et al. 2024), AuxK
``relu``        ``f = relu(pre)``, loss + ``l1 · Σ f_i ‖W_dec_i‖``,           ``"standard"``
                dead features resampled (Bricken et al. 2023)
==============  ===========================================================  ===================

with ``pre = (x - b_dec) @ W_enc + b_enc`` and ``x̂ = f @ W_dec + b_dec``. The reconstruction loss
is the normalised MSE ``Σ‖x - x̂‖² / (batch · s²)`` where ``s² = mean ‖x - b_dec₀‖²`` is measured once
on the first batch, so learning rates and ``l1`` do not depend on the activations' scale.

- Decoder rows are kept at unit norm: the gradient's component along each row is removed before
  the Adam step and the rows are renormalised after it.
- ``b_dec`` starts at the geometric median (Weiszfeld) of the first batch (or its mean, or 0);
  ``W_enc`` starts as ``W_decᵀ``.
- A feature is *dead* when it has not fired on the last ``dead_after`` tokens. TopK and BatchTopK
  add the AuxK loss (the ``k_aux = d_in / 2`` largest dead pre-activations reconstruct the
  residual ``x - x̂``, weight ``aux_coef``, scaled down when fewer than ``k_aux`` are dead); ReLU
  resamples dead features every ``dead_after`` tokens towards inputs drawn with probability ∝
  their squared error (encoder column ``0.2 ×`` the mean alive norm, Adam moments reset).
- BatchTopK → JumpReLU: SAELens' threshold, an exponential moving average (rate 0.01) of the
  smallest positive activation kept in each batch, given to every feature; here bias-corrected
  (divided by ``1 - 0.99^steps``) so that short runs are not pulled towards the EMA's start at 0.
- Learning rate: linear warm-up, constant, linear decay to 0 over the last 20% of the steps.

Resumption: every ``checkpoint_every`` steps ``checkpoint.pt`` is replaced atomically with the
parameters, Adam's state, the generator, the step, the history and the activation stream's
position (`ActivationSource.state_dict`). Running `train_sae` again with the same
arguments continues from it and ends bit for bit where an uninterrupted run ends; other arguments
raise [`InputError`][clip_lens.InputError]. No global RNG is used: everything random draws from generators seeded
by ``seed``.

We do not use the ``overcomplete`` package: its SAEs have no decoder bias (so they are not
SAELens SAEs), its AuxK is not the dead-feature AuxK, it tracks dead codes per epoch, it has no
checkpointing, and importing ``overcomplete.sae`` imports OpenCV, scikit-image, scikit-learn,
SciPy and ``matplotlib.pyplot``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from clip_lens.errors import InputError
from clip_lens.files import atomic_write
from clip_lens.sae.activations import ActivationSource
from clip_lens.sae.model import SAE, SAEConfig

TRAINING_ARCHITECTURES = ("topk", "batchtopk", "relu")
"""What `train_sae` trains (converted to the SAELens architectures in ``CONVERTED``)."""
B_DEC_INITS = ("geometric_median", "mean", "zeros")
FORMAT = "clip_lens.sae_train/1"
THRESHOLD_RATE = 0.01
"""SAELens' ``topk_threshold_lr``: EMA rate of the BatchTopK threshold."""
CONVERTED = {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard"}


@dataclass
class TrainResult:
    """What `train_sae` returns."""

    sae: SAE
    """The trained SAE in inference form (``topk``, ``jumprelu`` for batchtopk, ``standard`` for relu)."""
    history: list[dict]
    """Per log step: ``step``, ``loss``, ``mse`` (per element), ``explained_variance``, ``l0``
    (active features per token), ``dead_fraction``, ``lr``, and ``aux_loss`` (topk/batchtopk, when
    features are dead), ``threshold`` (batchtopk), ``l1_loss`` and ``resampled`` (relu: features
    resampled so far), measured on that step's training batch before its update."""
    final: dict
    """``mse``, ``explained_variance``, ``l0`` of `sae` on the next ``final_batches`` batches of
    the stream (not trained on), the ``dead_fraction`` at the end of training, and ``tokens`` seen."""
    steps: int
    resumed_from: Optional[int] = None
    """The step a checkpoint was resumed from (None: trained from scratch)."""
    checkpoint_dir: Optional[Path] = None


@dataclass
class SAEEvaluation:
    """An SAE on a data set: reconstruction, sparsity, and what splicing it costs downstream."""

    explained_variance: float
    """``1 - Σ‖x - x̂‖² / Σ‖x - mean(x)‖²`` over every evaluated row."""
    mse: float
    """Mean squared error per element."""
    l0: float
    """Mean number of active features per row."""
    dead_fraction: float
    """Share of features that never fired on the evaluation rows."""
    n_rows: int
    zero_shot: Optional[dict[str, float]] = None
    """Zero-shot accuracy with the SAE spliced in (per attribute on the shapes world, else ``{"accuracy": …}``)."""
    zero_shot_clean: Optional[dict[str, float]] = None
    """The same without the SAE."""

    @property
    def zero_shot_drop(self) -> Optional[dict[str, float]]:
        """``clean - spliced`` accuracy per key."""
        if self.zero_shot is None or self.zero_shot_clean is None:
            return None
        return {key: self.zero_shot_clean[key] - self.zero_shot[key] for key in self.zero_shot}

    def to_dict(self) -> dict:
        return {**asdict(self), "zero_shot_drop": self.zero_shot_drop}


class _TrainingSAE(nn.Module):
    """Parameters and running statistics of one training run (the checkpointed module)."""

    def __init__(self, d_in: int, d_sae: int, architecture: str, k: Optional[int], generator: torch.Generator):
        super().__init__()
        self.architecture, self.k = architecture, k
        w_dec = torch.randn(d_sae, d_in, generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("scale", torch.ones(()))  # s = sqrt(mean ‖x - b_dec₀‖²)
        self.register_buffer("since_fired", torch.zeros(d_sae, dtype=torch.long))  # tokens since each feature fired
        self.register_buffer("threshold_ema", torch.zeros((), dtype=torch.float64))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("resampled", torch.zeros((), dtype=torch.long))  # features resampled so far (relu)

    def pre(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        if self.architecture == "relu":
            return torch.relu(pre)
        if self.architecture == "topk":
            values, indices = torch.topk(pre, self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        flat = torch.relu(pre).flatten()
        values, indices = torch.topk(flat, min(flat.numel(), self.k * pre.shape[0]), sorted=False)
        return torch.zeros_like(flat).scatter(-1, indices, values).view_as(pre)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pre = self.pre(x)
        f = self.activate(pre)
        return pre, f, f @ self.W_dec + self.b_dec

    @property
    def threshold(self) -> float:
        """The bias-corrected BatchTopK threshold (0 before any update)."""
        n = int(self.threshold_updates)
        return 0.0 if n == 0 else float(self.threshold_ema / (1 - (1 - THRESHOLD_RATE) ** n))

    @torch.no_grad()
    def update_threshold(self, f: Tensor) -> None:
        positive = f[f > 0]
        if positive.numel():
            self.threshold_ema.mul_(1 - THRESHOLD_RATE).add_(THRESHOLD_RATE * positive.min().double())
            self.threshold_updates += 1


def geometric_median(x: Float[Tensor, "n d"], iterations: int = 100, tol: float = 1e-6) -> Float[Tensor, "d"]:
    """The point minimising the summed Euclidean distance to the rows (Weiszfeld's algorithm)."""
    x = x.double()
    median = x.mean(0)
    for _ in range(iterations):
        weights = 1 / (x - median).norm(dim=1).clamp_min(1e-8)
        new = (weights[:, None] * x).sum(0) / weights.sum()
        shift = (new - median).norm()
        median = new
        if shift <= tol * median.norm().clamp_min(1e-12):
            break
    return median.float()


def _lr_at(step: int, steps: int, lr: float, warmup: int, decay: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    decay_steps = int(decay * steps)
    if decay_steps and step >= steps - decay_steps:
        return lr * (steps - step) / decay_steps
    return lr


def _check_args(source, d_sae, architecture, k, l1, steps, lr, checkpoint_every, b_dec_init, dead_after, aux_coef,
                warmup, decay) -> None:
    if not isinstance(source, ActivationSource):
        raise InputError(
            f"source must be a clip_lens.sae.ActivationSource, got {type(source).__name__}; build one with "
            "ActivationSource(model, images, hook_name)."
        )
    if architecture not in TRAINING_ARCHITECTURES:
        raise InputError(f"architecture={architecture!r} is not one of {TRAINING_ARCHITECTURES}.")
    if isinstance(d_sae, bool) or not isinstance(d_sae, int) or d_sae < 1:
        raise InputError(f"d_sae must be a positive integer, got {d_sae!r}.")
    if architecture in ("topk", "batchtopk"):
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= d_sae:
            raise InputError(f"architecture={architecture!r} needs k, an integer in [1, d_sae={d_sae}]; got k={k!r}.")
        if l1 is not None:
            raise InputError(f"l1 is the ReLU SAE's sparsity penalty; {architecture} is sparse through k (drop l1).")
    else:
        if k is not None:
            raise InputError("k applies to topk/batchtopk; a relu SAE is made sparse by l1.")
        if not isinstance(l1, (int, float)) or isinstance(l1, bool) or not l1 >= 0:
            raise InputError(f"architecture='relu' needs l1 >= 0 (e.g. l1=1.0), got {l1!r}.")
    for name, value in (("steps", steps), ("checkpoint_every", checkpoint_every), ("dead_after", dead_after)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}.")
    if not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
        raise InputError(f"lr must be a positive number, got {lr!r}.")
    if b_dec_init not in B_DEC_INITS:
        raise InputError(f"b_dec_init={b_dec_init!r} is not one of {B_DEC_INITS}.")
    if not isinstance(aux_coef, (int, float)) or aux_coef < 0:
        raise InputError(f"aux_coef must be >= 0, got {aux_coef!r}.")
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0):
        raise InputError(f"warmup must be a number of steps >= 0, got {warmup!r}.")
    if not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise InputError(f"decay is the share of the steps decayed to 0, in [0, 1); got {decay!r}.")


def _check_matryoshka(matryoshka: Optional[Sequence[int]], d_sae: int) -> tuple[int, ...]:
    if matryoshka is None:
        return ()
    sizes = list(matryoshka) if isinstance(matryoshka, (list, tuple)) else None
    if (not sizes or any(isinstance(m, bool) or not isinstance(m, int) for m in sizes)
            or sizes != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] >= d_sae):
        raise InputError(
            f"matryoshka must be a list of increasing dictionary sizes, each in [1, d_sae={d_sae}), e.g. "
            f"[{max(1, d_sae // 16)}, {max(2, d_sae // 4)}]; got {matryoshka!r}."
        )
    return tuple(sizes)


def _batch_metrics(x: Tensor, x_hat: Tensor, f: Tensor) -> dict[str, float]:
    err = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    return {
        "mse": float(err / x.numel()),
        "explained_variance": float(1 - err / total),
        "l0": float((f > 0).sum(-1).float().mean()),
    }


def _next(iterator, source: ActivationSource, consumed: int) -> Tensor:
    try:
        return next(iterator)
    except StopIteration:
        raise InputError(
            f"the activation source ran out after {consumed} batches (epochs={source.epochs}); "
            "train with an endless source (epochs=None) or fewer steps."
        ) from None


def train_sae(
    source: ActivationSource,
    d_sae: int,
    *,
    architecture: str = "topk",
    k: Optional[int] = None,
    l1: Optional[float] = None,
    steps: int = 1000,
    lr: Optional[float] = None,
    seed: int = 0,
    warmup: Optional[int] = None,
    decay: float = 0.2,
    dead_after: Optional[int] = None,
    aux_coef: float = 1 / 32,
    matryoshka: Optional[Sequence[int]] = None,
    b_dec_init: str = "geometric_median",
    log_every: Optional[int] = None,
    final_batches: int = 4,
    checkpoint_dir: Union[str, Path, None] = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    progress: bool = True,
    device: Union[str, torch.device, None] = None,
    callback: Optional[Callable[[int, Optional[dict]], None]] = None,
) -> TrainResult:
    """Train an SAE on ``source`` for ``steps`` batches and return it in SAELens form.

    Args:
        source: the activations (its ``token_batch`` is the training batch size).
        d_sae: number of features.
        architecture: ``"topk"``, ``"batchtopk"`` or ``"relu"`` (see the module docstring).
        k: active features per token (topk; on average for batchtopk).
        l1: sparsity penalty of ``relu`` (on the scale-free loss: e.g. 0.05–1; larger is sparser).
        steps: optimizer steps (one batch each).
        lr: Adam learning rate; default ``2e-4 / sqrt(d_sae / 16384)`` (Gao et al.'s scaling).
        seed: seeds the initialisation and resampling (the stream has its own seed).
        warmup: warm-up steps (default ``steps // 20``); decay: share of the steps decayed to 0.
        dead_after: tokens without firing after which a feature is dead (default
            ``min(10M, 1000 batches)``, SAELens' window).
        aux_coef: AuxK weight (topk, batchtopk).
        matryoshka: nested dictionary sizes (Matryoshka SAE, Bussmann et al. 2025; Nabeshima 2024),
            e.g. ``[8, 32]`` with ``d_sae=128``: the reconstruction loss is the mean of the losses of
            the first 8, the first 32 and all 128 features, so the first features must reconstruct on
            their own and hold the general concepts (a "large" feature rather than "large circle",
            "large square", … — less feature absorption). Increasing, each below ``d_sae``; None: a
            plain SAE. The trained SAE runs like any other (the prefixes only shape training).
        b_dec_init: ``"geometric_median"``, ``"mean"`` or ``"zeros"`` of the first batch.
        log_every: steps between history entries (default ``steps // 100``, at least 1).
        final_batches: batches after training on which `TrainResult.final` is measured.
        checkpoint_dir: folder for ``checkpoint.pt`` (and, at the end, ``sae/`` and ``history.json``);
            None: no checkpoints.
        checkpoint_every: steps between checkpoints.
        resume: continue from ``checkpoint_dir/checkpoint.pt`` when it exists (False: start over).
        progress: show a tqdm bar.
        device: where the SAE trains (default: the source's device).
        callback: called as ``callback(step, metrics)`` after every step (``metrics`` on log steps,
            else None), after that step's checkpoint.

    Raises:
        InputError: bad arguments, or a checkpoint made with other arguments.
    """
    d_in = source.d_in if isinstance(source, ActivationSource) else None
    dead_after = dead_after if dead_after is not None else (
        min(10_000_000, 1000 * source.token_batch) if isinstance(source, ActivationSource) else None)
    if lr is None:
        lr = 2e-4 / math.sqrt(d_sae / 16384) if isinstance(d_sae, int) and d_sae > 0 else lr
    _check_args(source, d_sae, architecture, k, l1, steps, lr, checkpoint_every, b_dec_init, dead_after, aux_coef,
                warmup, decay)
    prefixes = _check_matryoshka(matryoshka, d_sae)
    warmup = steps // 20 if warmup is None else warmup
    log_every = max(1, steps // 100) if log_every is None else log_every
    for name, value, low in (("log_every", log_every, 1), ("final_batches", final_batches, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}.")
    device = torch.device(device) if device is not None else source.device
    args = {
        "format": FORMAT, "d_in": d_in, "d_sae": d_sae, "architecture": architecture, "k": k, "l1": l1,
        "steps": steps, "lr": lr, "seed": seed, "warmup": warmup, "decay": decay, "dead_after": dead_after,
        "aux_coef": aux_coef, "b_dec_init": b_dec_init,
        "matryoshka": None if matryoshka is None else [int(m) for m in matryoshka], "log_every": log_every, "source": source.describe(),
    }
    args = json.loads(json.dumps(args))  # as stored: tuples become lists

    generator = torch.Generator().manual_seed(seed)
    sae = _TrainingSAE(d_in, d_sae, architecture, k, generator).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    step, history, resumed_from = 0, [], None
    path = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if path is not None and resume and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        _check_resume(json.loads(state["args"]), args, path)
        sae.load_state_dict(state["sae"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        source.load_state_dict(state["source"])
        step, history, resumed_from = int(state["step"]), json.loads(state["history"]), int(state["step"])
        pending = None
    else:
        source.reset()
        pending = _next(source, source, 0).to(device, torch.float32)
        _initialise(sae, pending, b_dec_init)

    def checkpoint() -> None:
        if path is None:
            return
        state = {
            "args": json.dumps(args), "step": step, "sae": sae.state_dict(), "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(), "source": source.state_dict(), "history": json.dumps(history),
        }
        atomic_write(path, lambda f: torch.save(state, f))

    bar = tqdm(total=steps, initial=step, desc=f"train SAE on {source.name}", unit="step", disable=not progress)
    try:
        while step < steps:
            x = pending if pending is not None else _next(source, source, step).to(device, torch.float32)
            pending = None
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, lr, warmup, decay)
            metrics = _train_step(sae, optimizer, x, architecture, l1, aux_coef, dead_after, generator, step, prefixes)
            step += 1
            logged = None
            if step % log_every == 0 or step == steps:
                logged = {"step": step, **metrics, "lr": optimizer.param_groups[0]["lr"]}
                history.append(logged)
                bar.set_postfix(ev=f"{metrics['explained_variance']:.3f}", l0=f"{metrics['l0']:.1f}",
                                dead=f"{metrics['dead_fraction']:.2f}")
            bar.update(1)
            if step % checkpoint_every == 0 or step == steps:
                checkpoint()
            if callback is not None:
                callback(step, logged)
    finally:
        bar.close()

    result_sae = _convert(sae, source, args)
    final = _final_metrics(result_sae, sae, source, final_batches, device, steps, history)
    result_sae.cfg.metadata["clip_lens_training"]["final"] = final
    if checkpoint_dir is not None:
        result_sae.save(Path(checkpoint_dir) / "sae")
        atomic_write(Path(checkpoint_dir) / "history.json", json.dumps({"history": history, "final": final}, indent=1))
    return TrainResult(result_sae, history, final, steps, resumed_from, None if checkpoint_dir is None else Path(checkpoint_dir))


def _check_resume(stored: dict, args: dict, path: Path) -> None:
    if stored.get("format") != FORMAT:
        raise InputError(f"{path} is not a clip_lens SAE training checkpoint (format {stored.get('format')!r}).")
    changed = sorted(key for key in set(stored) | set(args) if stored.get(key) != args.get(key))
    if changed:
        parts = []
        for key in changed:
            old, new = stored.get(key), args.get(key)
            if isinstance(old, dict) and isinstance(new, dict):
                sub = sorted(s for s in set(old) | set(new) if old.get(s) != new.get(s))
                parts += [f"{key}.{s}: checkpoint {old.get(s)!r}, now {new.get(s)!r}" for s in sub]
            else:
                parts.append(f"{key}: checkpoint {old!r}, now {new!r}")
        raise InputError(
            f"{path} was written by a run with other arguments ({'; '.join(parts)}). Resume with the same "
            "arguments, pass resume=False to start over, or use another checkpoint_dir."
        )


@torch.no_grad()
def _initialise(sae: _TrainingSAE, x: Tensor, b_dec_init: str) -> None:
    if b_dec_init == "geometric_median":
        sae.b_dec.copy_(geometric_median(x))
    elif b_dec_init == "mean":
        sae.b_dec.copy_(x.mean(0))
    scale = (x - sae.b_dec).pow(2).sum(-1).mean().sqrt()
    sae.scale.copy_(scale.clamp_min(1e-12))


def _train_step(sae: _TrainingSAE, optimizer, x: Tensor, architecture: str, l1: Optional[float], aux_coef: float,
                dead_after: int, generator: torch.Generator, step: int, prefixes: Sequence[int] = ()) -> dict[str, float]:
    scale2 = sae.scale.pow(2)
    dead = sae.since_fired >= dead_after
    pre, f, x_hat = sae(x)
    err = x - x_hat
    mse = err.pow(2).sum(-1).mean() / scale2
    loss = mse
    if prefixes:  # Matryoshka: the first m features must reconstruct x on their own, for every m
        nested = [(x - f[:, :m] @ sae.W_dec[:m] - sae.b_dec).pow(2).sum(-1).mean() / scale2 for m in prefixes]
        loss = (loss + sum(nested)) / (len(prefixes) + 1)
    extra: dict[str, float] = {}
    if architecture == "relu":
        sparsity = (f * sae.W_dec.norm(dim=1)).sum(-1).mean() / sae.scale
        loss = loss + l1 * sparsity
        extra["l1_loss"] = float(sparsity.detach())
    elif aux_coef > 0 and bool(dead.any()):
        n_dead = int(dead.sum())
        k_aux = max(1, x.shape[1] // 2)
        values, indices = torch.topk(pre.masked_fill(~dead, -torch.inf), min(k_aux, n_dead), dim=-1, sorted=False)
        aux_f = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        aux = (aux_f @ sae.W_dec - err.detach()).pow(2).sum(-1).mean() / scale2
        loss = loss + aux_coef * min(n_dead / k_aux, 1.0) * aux
        extra["aux_loss"] = float(aux.detach())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        w, g = sae.W_dec, sae.W_dec.grad
        g -= (g * w).sum(1, keepdim=True) * w  # keep the step tangent to the unit sphere
    optimizer.step()
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        fired = (f > 0).any(0)
        sae.since_fired += x.shape[0]
        sae.since_fired[fired] = 0
        if architecture == "batchtopk":
            sae.update_threshold(f)
            extra["threshold"] = sae.threshold
        if architecture == "relu":
            steps_per_window = max(1, dead_after // x.shape[0])
            if (step + 1) % steps_per_window == 0:
                sae.resampled += _resample(sae, optimizer, x, err.detach(), dead_after, generator)
            extra["resampled"] = int(sae.resampled)
    with torch.no_grad():
        metrics = _batch_metrics(x, x_hat, f)
    return {"loss": float(loss.detach()), **metrics, "dead_fraction": float((sae.since_fired >= dead_after).float().mean()), **extra}


@torch.no_grad()
def _resample(sae: _TrainingSAE, optimizer, x: Tensor, err: Tensor, dead_after: int, generator: torch.Generator) -> int:
    """Point dead features at inputs drawn ∝ squared error (Bricken et al.); returns how many."""
    dead = (sae.since_fired >= dead_after).nonzero().flatten()
    if len(dead) == 0:
        return 0
    weights = err.pow(2).sum(-1).double().cpu()
    if not bool(weights.sum() > 0):
        return 0
    rows = torch.multinomial(weights, len(dead), replacement=True, generator=generator).to(x.device)
    directions = x[rows] - sae.b_dec
    directions /= directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive = torch.ones(sae.W_enc.shape[1], dtype=torch.bool, device=x.device)
    alive[dead] = False
    norm = sae.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.ones((), device=x.device)
    sae.W_dec[dead] = directions
    sae.W_enc[:, dead] = directions.T * 0.2 * norm
    sae.b_enc[dead] = 0
    for param, index in ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,))):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][index] = 0
    sae.since_fired[dead] = 0
    return len(dead)


def _convert(trained: _TrainingSAE, source: ActivationSource, args: dict) -> SAE:
    """The trained parameters as a SAELens-architecture `SAE`."""
    architecture = CONVERTED[trained.architecture]
    hook = source.hook_name or source.name
    cfg = SAEConfig(
        d_in=trained.W_dec.shape[1], d_sae=trained.W_dec.shape[0], architecture=architecture,
        k=trained.k if architecture == "topk" else None, hook_name=hook, model_name=source.model.model_name,
        device=str(trained.W_dec.device), reshape_activations="hook_z" if hook.endswith("attn.hook_z") else "none",
        metadata={"clip_lens_training": {"args": args, "trained_as": trained.architecture}},
    )
    sae = SAE(cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(getattr(trained, name))
        if architecture == "jumprelu":
            sae.threshold.fill_(trained.threshold)
    return sae.eval()


@torch.no_grad()
def _final_metrics(sae: SAE, trained: _TrainingSAE, source, n_batches: int, device, steps: int, history) -> dict:
    sums = _Sums(sae.cfg.d_in, sae.cfg.d_sae, device)
    for _ in range(n_batches):
        try:
            x = next(source).to(device, torch.float32)
        except StopIteration:
            break
        f = sae.encode(x)
        sums.add(x, sae.decode(f), f)
    if sums.n:
        out = sums.result()
        del out["dead_fraction"], out["n_rows"]  # of a few batches only: the tracker's below is the one
    else:  # a finite stream that ended with training: the last logged batch
        out = {key: history[-1][key] for key in ("mse", "explained_variance", "l0")} if history else {}
    out["dead_fraction"] = history[-1]["dead_fraction"] if history else 0.0
    out["tokens"] = steps * source.token_batch
    return out


class _Sums:
    """Streaming sums for explained variance, MSE, L0 and features that fired."""

    def __init__(self, d_in: int, d_sae: int, device):
        self.n = 0
        self.sq_err = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.sum_x2 = torch.zeros((), dtype=torch.float64, device=device)
        self.active = torch.zeros((), dtype=torch.float64, device=device)
        self.fired = torch.zeros(d_sae, dtype=torch.bool, device=device)
        self.d_in = d_in

    def add(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.n += len(x)
        self.sq_err += (x - x_hat).pow(2).sum()
        self.sum_x += x.sum(0)
        self.sum_x2 += x.pow(2).sum()
        self.active += (f > 0).sum()
        self.fired |= (f > 0).any(0)

    def result(self) -> dict:
        total = (self.sum_x2 - self.sum_x.pow(2).sum() / self.n).clamp_min(1e-12)
        return {
            "mse": float(self.sq_err / (self.n * self.d_in)), "explained_variance": float(1 - self.sq_err / total),
            "l0": float(self.active / self.n), "dead_fraction": float((~self.fired).float().mean()), "n_rows": self.n,
        }


@torch.no_grad()
def evaluate_sae(
    model,
    sae: SAE,
    images: Any = None,
    *,
    texts: Optional[Sequence[str]] = None,
    labels: Optional[Sequence[int]] = None,
    positions: Any = None,
    n_images: int = 512,
    batch_size: int = 64,
    zero_shot: bool = True,
) -> SAEEvaluation:
    """Reconstruction quality of ``sae`` on ``images`` and the zero-shot accuracy of the model with it
    spliced in (``model.saes``), against the model alone.

    Args:
        model: the [`HookedCLIP`][clip_lens.HookedCLIP] the SAE was trained on.
        sae: an `SAE` on one of its hook points (or a decomposition term, then no splicing).
        images: anything `ActivationSource` takes; default: ``n_images`` held-out shapes-world
            scenes (seed 1000) for the bundled ``toy-shapes`` model.
        texts, labels: class prompts and each image's class index for zero-shot accuracy on
            ``images``; without them, the shapes world's single-attribute zero-shot accuracy
            ([`clip_lens.toy.evaluate.zero_shot_accuracy`][clip_lens.toy.evaluate.zero_shot_accuracy] on ``n_images`` scenes) when the
            model is ``toy-shapes``, else none.
        positions: rows per image (default: those the SAE was trained on, else ``"all"``).
        zero_shot: also measure zero-shot accuracy.

    Raises:
        InputError: the SAE's width does not match its hook point; images are needed; bad labels.
    """
    from clip_lens.collect import shapes_world_images
    from clip_lens.toy.evaluate import HELD_OUT_SEED, shapes_world_version, zero_shot_accuracy

    if not isinstance(sae, SAE):
        raise InputError(f"sae must be a clip_lens.sae.SAE, got {type(sae).__name__}.")
    version = shapes_world_version(model)
    toy = version is not None
    if images is None and sae.cfg.hook_name.startswith("text."):
        raise InputError(f"{sae.cfg.hook_name} is a text-tower hook: pass the texts to evaluate on as images=[...].")
    if images is None:
        if not toy:
            raise InputError("evaluate_sae needs images (the shapes-world default is only for the toy-shapes model).")
        images = shapes_world_images(n_images, seed=HELD_OUT_SEED, image_size=model.cfg.image_size[0], version=version)
    trained = sae.cfg.metadata.get("clip_lens_training", {}).get("args", {}).get("source", {})
    if positions is None:
        positions = trained.get("positions", "all")
        positions = positions if isinstance(positions, str) else list(positions)
    hook = sae.cfg.hook_name
    if hook.startswith("term:"):
        kind = trained.get("term")
        source = ActivationSource(model, images, term=kind, layer=trained.get("layer"), head=trained.get("head"),
                                  normalized=bool(trained.get("normalized")), batch_size=batch_size,
                                  buffer_size=2**16, token_batch=4096, shuffle=False, epochs=1, device=sae.device)
    else:
        source = ActivationSource(model, images, hook, positions=positions, batch_size=batch_size,
                                  buffer_size=max(2**16, 4 * batch_size * (model.cfg.n_ctx + 1)),
                                  token_batch=4096, shuffle=False, epochs=1, device=sae.device)
    if source.d_in != sae.cfg.d_in:
        raise InputError(
            f"the SAE reads width d_in={sae.cfg.d_in} but {source.name} of this model has width {source.d_in}; "
            "use an SAE trained on this hook point of this model."
        )
    sums = _Sums(sae.cfg.d_in, sae.cfg.d_sae, sae.device)
    for x in source:
        x = x.to(sae.device, sae.dtype)
        f = sae.encode(x)
        sums.add(x, sae.decode(f), f)
    out = sums.result()
    result = SAEEvaluation(out["explained_variance"], out["mse"], out["l0"], out["dead_fraction"], out["n_rows"])
    if not zero_shot or hook.startswith("term:") or not hasattr(model, "saes"):
        return result
    if texts is not None or labels is not None:
        result.zero_shot_clean, result.zero_shot = _classify(model, sae, images, texts, labels, batch_size)
    elif toy:
        clean = zero_shot_accuracy(model, n_images)
        with model.saes(saes=[sae]):
            spliced = zero_shot_accuracy(model, n_images)
        result.zero_shot_clean, result.zero_shot = clean.accuracy, spliced.accuracy
    return result


def _classify(model, sae: SAE, images: Any, texts, labels, batch_size: int) -> tuple[dict, dict]:
    from clip_lens.collect import image_source

    if texts is None or labels is None:
        raise InputError("zero-shot accuracy needs both texts (one prompt per class) and labels (a class index per image).")
    data = image_source(images, getattr(model, "preprocess", None))
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or len(labels) != len(data):
        raise InputError(f"labels must hold one class index per image ({len(data)}), got shape {tuple(labels.shape)}.")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(texts)):
        raise InputError(f"labels must lie in [0, {len(texts)}) (one per prompt), got [{int(labels.min())}, {int(labels.max())}].")
    correct = {"clean": 0, "spliced": 0}
    for mode in correct:
        context = model.saes(saes=[sae]) if mode == "spliced" else _Nothing()
        with context:
            prompts = model.encode_text(model.to_tokens(list(texts)), normalize=True)
            for start in range(0, len(data), batch_size):
                pixels, _ = data.load(start, min(len(data), start + batch_size))
                emb = model.encode_image(pixels.to(model.device, model.dtype), normalize=True)
                predicted = (emb @ prompts.T).argmax(-1).cpu()
                correct[mode] += int((predicted == labels[start:start + len(pixels)]).sum())
    n = max(1, len(data))
    return {"accuracy": correct["clean"] / n}, {"accuracy": correct["spliced"] / n}


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
