"""Per-neuron statistics of second-order effects: mean, share of significant images, rank-1 direction.

Gandelsman et al. (ICLR 2025) find each neuron's second-order effect ψ_n(i) nearly rank-1 across
images: ψ_n(i) ≈ ψ̄_n + s_n(i) · r_n. We take r_n as the first right-singular vector of the neuron's
mean-centred effects on its ``top_k`` images of largest centred norm, with the sign that makes most
of those images project positively, and s_n(i) = ⟨ψ_n(i) − ψ̄_n, r_n⟩ on every image.

Significance (ours; the paper reports "<2% of images" without a definition we could confirm):
image i is significant for neuron n when the neuron's centred effect is at least ``threshold`` of
the image's embedding norm, ‖ψ_n(i) − ψ̄_n‖ ≥ threshold · ‖z(i)‖ (default 1%). It is what
mean-ablating the neuron would move, relative to the vector the zero-shot scores are read from.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from clip_lens.errors import InputError

DEFAULT_THRESHOLD = 0.01


@dataclass
class RankOne:
    """Rank-1 summaries of every neuron of the analysed layers."""

    mean: Float[Tensor, "layer neuron out"]
    """ψ̄_n: the mean effect over the images."""
    direction: Float[Tensor, "layer neuron out"]
    """r_n: unit first principal direction of the centred effects on the top images (sign fixed)."""
    explained: Float[Tensor, "layer neuron"]
    """Share of the top images' centred variance along r_n (σ₁² / Σσ²)."""
    scores: Float[Tensor, "batch layer neuron"]
    """s_n(i) = ⟨ψ_n(i) − ψ̄_n, r_n⟩ on every image."""
    significant: Float[Tensor, "layer neuron"]
    """Share of images where the neuron's effect is significant (module docstring)."""
    norms: Float[Tensor, "batch layer neuron"]
    """‖ψ_n(i)‖: the uncentred effect norm (0 where the neuron is silent)."""


@torch.no_grad()
def rank_one(
    effects: Float[Tensor, "batch layer neuron out"],
    embedding_norm: Float[Tensor, "batch"],
    top_k: int = 100,
    threshold: float = DEFAULT_THRESHOLD,
) -> RankOne:
    """`RankOne` of every neuron; layers are handled one at a time so memory stays at one layer's copy."""
    n_images = effects.shape[0]
    if not isinstance(top_k, int) or top_k < 2:
        raise InputError(f"top_k must be an integer ≥ 2 (images per neuron for its direction), got {top_k!r}.")
    if not threshold >= 0:
        raise InputError(f"the significance threshold must be ≥ 0 (a share of ‖embedding‖), got {threshold!r}.")
    top_k = min(top_k, n_images)
    means, directions, explained, scores, significant, norms = [], [], [], [], [], []
    for layer in range(effects.shape[1]):
        psi = effects[:, layer].float()  # [batch, neuron, out]
        mean = psi.mean(0)
        centred = psi - mean
        centred_norm = centred.norm(dim=-1)  # [batch, neuron]
        top = centred_norm.topk(top_k, dim=0).indices  # [top_k, neuron]
        picked = torch.take_along_dim(centred, top[..., None], dim=0)  # [top_k, neuron, out]
        picked = einops.rearrange(picked, "k n d -> n k d")
        _, singular, vh = torch.linalg.svd(picked, full_matrices=False)
        direction = vh[:, 0]  # [neuron, out]
        # sign: most of the top images project positively (ties: the sum of projections decides)
        projection = torch.einsum("nkd,nd->nk", picked, direction)
        votes = torch.sign(projection).sum(-1) + 1e-9 * torch.sign(projection.sum(-1))
        direction = direction * torch.where(votes < 0, -1.0, 1.0)[:, None]
        means.append(mean)
        directions.append(direction)
        explained.append(singular[:, 0] ** 2 / (singular**2).sum(-1).clamp_min(torch.finfo(singular.dtype).tiny))
        scores.append(torch.einsum("bnd,nd->bn", centred, direction))
        significant.append((centred_norm >= threshold * embedding_norm.float()[:, None]).float().mean(0))
        norms.append(psi.norm(dim=-1))
    stack = lambda parts, dim=0: torch.stack(parts, dim)  # noqa: E731
    return RankOne(stack(means), stack(directions), stack(explained), stack(scores, 1), stack(significant), stack(norms, 1))
