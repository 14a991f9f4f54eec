"""TEXTSPAN (Gandelsman et al., ICLR 2024): a text basis for the outputs of one head.

Greedy: among the text directions, take the one along which the head's mean-centred outputs vary
most; remove that direction from the outputs and from every text; repeat ``m`` times.

Everything runs on the ``[d, d]`` covariance instead of the ``[N, d]`` outputs, so the cost per
step does not grow with the number of images, and on a batch of heads at once:

* Removing a direction ``u`` from the outputs, ``C ← C (I − P)`` with ``P = u uᵀ/‖u‖²``, turns the
  covariance into ``(I − P) Σ (I − P)``; the projected variance of text ``r`` is ``r Σ rᵀ``.
* The chosen directions are mutually orthogonal (each is a text already stripped of the earlier
  ones), so the span reconstruction is ``mean + (C − mean) U Uᵀ`` with ``U`` their unit vectors.
* ``rank``: as in the reference implementation, the texts are first projected on the top-``rank``
  right singular vectors of the (uncentred) outputs, so that only the part of a text the head can
  express is scored and removed. Work then happens in those ``rank`` coordinates (exact, since
  the outputs' variance outside them is left alone and counted in the total).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from clip_lens.errors import InputError


@dataclass
class Span:
    """TEXTSPAN of one head (or a batch of heads: every field gains a leading ``head`` axis)."""

    indices: Int[Tensor, "m"]
    """Chosen text rows, in the order they were picked."""
    explained_variance: Float[Tensor, "m"]
    """Share of the outputs' total variance removed at each step (sums to ≤ 1)."""
    basis: Float[Tensor, "m d"]
    """Orthonormal span directions (the chosen texts after removing the earlier ones)."""
    mean: Float[Tensor, "d"]
    """Mean output over the images."""
    total_variance: Float[Tensor, ""]
    """``trace`` of the outputs' covariance (population)."""

    def head(self, h: int) -> "Span":
        """Head ``h`` of a batched span."""
        return Span(self.indices[h], self.explained_variance[h], self.basis[h], self.mean[h], self.total_variance[h])

    @property
    def cumulative(self) -> Float[Tensor, "m"]:
        return self.explained_variance.cumsum(-1)

    def reconstruct(self, outputs: Float[Tensor, "n d"], m: Optional[int] = None) -> Float[Tensor, "n d"]:
        """``outputs`` projected on the span of the first ``m`` texts (default all), around the mean."""
        basis = self.basis[..., : (m or self.basis.shape[-2]), :]
        centred = outputs - self.mean.unsqueeze(-2)
        return self.mean.unsqueeze(-2) + (centred @ basis.transpose(-1, -2)) @ basis


def _moments(c: Float[Tensor, "head n d"], chunk: int = 4096) -> tuple[Float[Tensor, "head d"], Float[Tensor, "head d d"]]:
    """Mean and (population) covariance in float64, from float32 products over image chunks, so
    that memory stays at one chunk and the mean never cancels against the second moment."""
    n = c.shape[-2]
    mean = sum(x.double().sum(-2) for x in c.split(chunk, -2)) / n
    centre = mean.unsqueeze(-2).to(c.dtype)
    cov = sum(((x - centre).transpose(-1, -2) @ (x - centre)).double() for x in c.split(chunk, -2)) / n
    return mean, cov


def _check(outputs: Tensor, texts: Tensor, m: int) -> None:
    if outputs.ndim not in (2, 3) or texts.ndim != 2:
        raise InputError(
            f"textspan takes outputs [N, d] (or [heads, N, d]) and texts [T, d]; got {tuple(outputs.shape)} and {tuple(texts.shape)}."
        )
    if outputs.shape[-1] != texts.shape[-1]:
        raise InputError(f"outputs have width {outputs.shape[-1]} but texts have {texts.shape[-1]}; embed both in the same space.")
    if outputs.shape[-2] < 2:
        raise InputError(f"textspan needs at least 2 images to measure variance, got {outputs.shape[-2]}.")
    if not 1 <= m <= texts.shape[0]:
        raise InputError(f"m must lie in 1..{texts.shape[0]} (the number of texts), got {m}.")
    for name, t in (("outputs", outputs), ("texts", texts)):
        if not torch.isfinite(t).all():
            raise InputError(f"{name} contain NaN or inf values; check the collected store / text embeddings.")


@torch.no_grad()
def textspan(
    outputs: Float[Tensor, "*head n d"],
    texts: Float[Tensor, "t d"],
    m: int,
    rank: Optional[int] = None,
) -> Span:
    """Run TEXTSPAN on one head's outputs ``[N, d]`` or a batch of heads ``[H, N, d]``.

    Args:
        outputs: the head's direct contributions to the image embedding, one row per image.
        texts: text embeddings ``[T, d]`` (normally unit norm; they are never re-normalised, so a
            text that the earlier picks have partly explained scores lower).
        m: number of texts to pick.
        rank: project texts on the top-``rank`` singular directions of the outputs first (the
            reference uses about the head dimension); None: the outputs' numerical rank, i.e.
            texts are restricted to the subspace the head can write to.

    Returns:
        A `Span` (fields batched over heads when ``outputs`` is 3-D).
    """
    _check(outputs, texts, m)
    single = outputs.ndim == 2
    c = outputs.unsqueeze(0) if single else outputs
    d = c.shape[-1]
    mean, cov = _moments(c)
    total = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    gram = cov + mean.unsqueeze(-1) * mean.unsqueeze(-2)  # uncentred second moment [H, d, d]
    values, vectors = torch.linalg.eigh(gram)
    if rank is None:  # the outputs' numerical rank (largest over the heads of a batch)
        rank = int((values > values[..., -1:] * 1e-6).sum(-1).max().clamp_min(1))  # above float32 noise
    elif not 1 <= rank <= d:
        raise InputError(f"rank must lie in 1..{d}, got {rank}.")
    frame = vectors[..., -rank:]  # [H, d, k]: top singular directions of the uncentred outputs
    cov = frame.transpose(-1, -2) @ cov @ frame  # [H, k, k]
    rt = texts.to(cov.dtype) @ frame  # [H, T, k]: texts in the frame's coordinates
    heads = torch.arange(c.shape[0])
    picked, explained, basis, chosen = [], [], [], []
    taken = torch.zeros(rt.shape[:2], dtype=torch.bool)
    for _ in range(m):
        score = ((rt @ cov) * rt).sum(-1)  # variance of the outputs along each (deflated) text
        j = score.masked_fill(taken, float("-inf")).argmax(-1)  # no text twice, even once nothing is left
        taken[heads, j] = True
        u = rt[heads, j]  # [H, k]
        scale = u.norm(dim=-1, keepdim=True)
        for v in chosen:  # re-orthogonalise: deflated texts are orthogonal only up to rounding
            u = u - (u * v).sum(-1, keepdim=True) * v
        norm = u.norm(dim=-1, keepdim=True)
        # a text with nothing left once the span is exhausted adds no direction (and no variance)
        u = torch.where(norm > 1e-9 * scale.clamp_min(1e-30), u / norm.clamp_min(1e-30), torch.zeros_like(u))
        chosen.append(u)
        before = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
        project = torch.eye(u.shape[-1], dtype=cov.dtype) - u.unsqueeze(-1) * u.unsqueeze(-2)
        cov = project @ cov @ project
        rt = rt - (rt @ u.unsqueeze(-1)) * u.unsqueeze(-2)
        picked.append(j)
        explained.append((before - cov.diagonal(dim1=-2, dim2=-1).sum(-1)) / total.clamp_min(1e-30))
        basis.append((frame @ u.unsqueeze(-1)).squeeze(-1))
    span = Span(
        indices=torch.stack(picked, -1),
        explained_variance=torch.stack(explained, -1).to(outputs.dtype),
        basis=torch.stack(basis, -2).to(outputs.dtype),
        mean=mean.to(outputs.dtype),
        total_variance=total.to(outputs.dtype),
    )
    if single:
        span = span.head(0)
    return span
