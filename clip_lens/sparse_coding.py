"""Sparse codes of vectors over a dictionary of unit vectors (text embeddings), batched over signals.

Two coders, both plain torch (scikit-learn's ``orthogonal_mp`` / ``SparseCoder`` would add a
dependency of ~40 MB for two loops of a few lines, and work one signal at a time on the CPU):

- `orthogonal_matching_pursuit` (OMP; Pati et al. 1993): signed codes with exactly ``k`` atoms. At
  each step every signal takes the atom most correlated (in absolute value) with its residual, then
  all its chosen atoms are refitted by least squares, so the residual is orthogonal to their span.
  Gandelsman et al. (ICLR 2025) name each neuron's rank-1 direction this way.
- `nonnegative_sparse_code`: ``argmin_w ½‖wᵀD − x‖² + λ‖w‖₁`` subject to ``w ≥ 0`` (FISTA with the
  non-negative soft threshold), the problem SpLiCE (Bhalla et al., NeurIPS 2024) solves with ADMM;
  ``λ`` sets the sparsity.

`centered_dictionary` prepares a bank as both papers do: embeddings mean-centred over the bank, then
normalised to unit length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from clip_lens.errors import InputError


@dataclass
class SparseCode:
    """``k`` atoms per signal and their coefficients (atoms in the order they were chosen)."""

    indices: Int[Tensor, "signal k"]
    """Dictionary rows used by each signal; ``-1`` where a signal was already reconstructed exactly."""
    coefficients: Float[Tensor, "signal k"]
    n_atoms: int

    def dense(self) -> Float[Tensor, "signal atom"]:
        """The codes as a dense ``[signal, atom]`` matrix (zeros off the support)."""
        dense = torch.zeros(len(self.indices), self.n_atoms, dtype=self.coefficients.dtype, device=self.coefficients.device)
        used = self.indices >= 0
        rows = torch.arange(len(self.indices), device=self.indices.device)[:, None].expand_as(self.indices)
        dense.index_put_((rows[used], self.indices[used]), self.coefficients[used], accumulate=True)
        return dense

    def reconstruct(self, dictionary: Float[Tensor, "atom d"]) -> Float[Tensor, "signal d"]:
        """``Σ_j coefficient_j · dictionary[index_j]`` for every signal."""
        atoms = dictionary[self.indices.clamp_min(0)]  # [signal, k, d]
        weights = torch.where(self.indices >= 0, self.coefficients, torch.zeros_like(self.coefficients))
        return torch.einsum("sk,skd->sd", weights.to(atoms.dtype), atoms)


def _check(signals: Tensor, dictionary: Tensor, what: str) -> None:
    if not isinstance(dictionary, Tensor) or dictionary.ndim != 2 or len(dictionary) == 0:
        raise InputError(f"the dictionary must be a non-empty [atoms, d] tensor, got {_shape(dictionary)}.")
    if not isinstance(signals, Tensor) or signals.ndim != 2:
        raise InputError(f"{what} must be a [n, d] tensor, got {_shape(signals)}.")
    if signals.shape[1] != dictionary.shape[1]:
        raise InputError(
            f"{what} have width {signals.shape[1]} but the dictionary's atoms have width {dictionary.shape[1]}; "
            "embed the bank with the same model (its d_embed) as the vectors you code."
        )
    for name, tensor in ((what, signals), ("the dictionary", dictionary)):
        if not torch.isfinite(tensor).all():
            raise InputError(f"{name} contain NaN or inf values; code finite vectors.")


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def centered_dictionary(embeddings: Float[Tensor, "atom d"]) -> tuple[Float[Tensor, "atom d"], Float[Tensor, "d"]]:
    """A bank's embeddings mean-centred over the bank and normalised, and the mean that was removed.

    Centring removes the direction every text shares (CLIP's modality offset), which would otherwise
    be the first atom of every code.
    """
    if not isinstance(embeddings, Tensor) or embeddings.ndim != 2 or len(embeddings) < 2:
        raise InputError(f"a dictionary needs at least two [atom, d] embeddings, got {_shape(embeddings)}.")
    mean = embeddings.mean(0)
    centred = embeddings - mean
    norms = centred.norm(dim=-1)
    if (norms <= 1e-8 * embeddings.norm(dim=-1).clamp_min(1e-30)).any():
        raise InputError("a bank text equals the bank's mean embedding after centring; give distinct texts.")
    return centred / norms[:, None], mean


@torch.no_grad()
def orthogonal_matching_pursuit(
    signals: Float[Tensor, "signal d"],
    dictionary: Float[Tensor, "atom d"],
    k: int,
    tol: float = 1e-7,
) -> SparseCode:
    """``k``-sparse signed codes of every signal over unit-norm dictionary rows, by OMP.

    Args:
        signals: the vectors to code, one per row.
        dictionary: unit-norm atoms, one per row (e.g. `centered_dictionary` of a text bank).
        k: atoms per signal (at most the number of atoms and the width ``d``).
        tol: a signal whose residual norm falls below ``tol · ‖signal‖`` stops taking atoms (its
            remaining indices are ``-1``, coefficients 0): further atoms would fit rounding noise.

    Returns:
        A `SparseCode`; ``code.reconstruct(dictionary)`` is each signal's projection on its atoms.
    """
    _check(signals, dictionary, "signals")
    n_atoms, d = dictionary.shape
    if not isinstance(k, int) or not 1 <= k <= min(n_atoms, d):
        raise InputError(f"k must be an integer in 1..{min(n_atoms, d)} (atoms, width), got {k!r}.")
    n = len(signals)
    dictionary = dictionary.to(signals.dtype)
    indices = torch.full((n, k), -1, dtype=torch.long, device=signals.device)
    coefficients = torch.zeros(n, k, dtype=signals.dtype, device=signals.device)
    residual = signals.clone()
    scale = signals.norm(dim=-1)
    active = scale > 0
    taken = torch.zeros(n, n_atoms, dtype=torch.bool, device=signals.device)
    rows = torch.arange(n, device=signals.device)
    for step in range(k):
        active &= residual.norm(dim=-1) > tol * scale
        if not active.any():
            break
        scores = (residual @ dictionary.T).abs().masked_fill(taken, -1.0)
        best = scores.argmax(-1)
        indices[:, step] = torch.where(active, best, indices[:, step])
        taken[rows[active], best[active]] = True
        # refit every active signal on its atoms so far: least squares over [d, step + 1]
        support = indices[active, : step + 1]  # all ≥ 0 for an active signal
        atoms = dictionary[support]  # [a, s, d]
        gram = atoms @ atoms.transpose(1, 2)
        target = atoms @ signals[active].unsqueeze(-1)  # [a, s, 1]
        fitted = torch.linalg.lstsq(gram, target).solution.squeeze(-1)  # normal equations, rank-safe
        coefficients[active, : step + 1] = fitted
        residual[active] = signals[active] - torch.einsum("as,asd->ad", fitted, atoms)
    return SparseCode(indices, coefficients, n_atoms)


@torch.no_grad()
def nonnegative_sparse_code(
    signals: Float[Tensor, "signal d"],
    dictionary: Float[Tensor, "atom d"],
    l1: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    allowed: Optional[Bool[Tensor, "signal atom"]] = None,
) -> Float[Tensor, "signal atom"]:
    """Non-negative lasso codes ``argmin_{w ≥ 0} ½‖wᵀD − x‖² + l1·‖w‖₁`` of every signal (dense).

    Solved by FISTA (Beck & Teboulle 2009) with step ``1/L``, ``L = ‖D‖₂²``, and the proximal map
    ``max(0, w − l1/L)``; stops when no coefficient moves by more than ``tol`` (relative to the
    largest) or after ``max_iter`` iterations. A larger ``l1`` gives sparser codes; ``l1 ≥ max_j
    ⟨x, D_j⟩`` gives the zero code. ``allowed`` restricts each signal to some atoms (the others stay
    0): with ``l1=0`` it is non-negative least squares on a given support.
    """
    _check(signals, dictionary, "signals")
    if not l1 >= 0:
        raise InputError(f"l1 must be a non-negative number, got {l1!r}.")
    dictionary = dictionary.to(signals.dtype)
    lipschitz = torch.linalg.matrix_norm(dictionary, ord=2) ** 2
    step = 1.0 / lipschitz
    correlation = signals @ dictionary.T  # [n, atom]: the gradient's constant part
    gram = dictionary @ dictionary.T
    if allowed is not None:
        if allowed.shape != correlation.shape:
            raise InputError(f"allowed must be [signals, atoms] = {tuple(correlation.shape)}, got {_shape(allowed)}.")
        correlation = correlation.masked_fill(~allowed, float("-inf"))  # the clamp keeps those atoms at 0
    w = torch.zeros_like(correlation)
    y, t = w.clone(), 1.0
    for _ in range(max_iter):
        new = (y - step * (y @ gram - correlation) - step * l1).clamp_min(0)  # -inf → 0 for atoms not allowed
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = new + ((t - 1) / t_new) * (new - w)
        moved = (new - w).abs().max()
        w, t = new, t_new
        if moved <= tol * w.abs().max().clamp_min(1e-12):
            break
    return w
