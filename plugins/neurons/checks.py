"""The paper's accuracy checks, each next to its baseline in the same run (bootstrap 95% intervals over images).

The embedding z(i) is the sum of exact terms, so replacing a set of neurons' effects is a sum:
``z'(i) = z(i) − Σ_n ψ_n(i) + Σ_n ψ'_n(i)``. Rows (``n`` over every analysed neuron):

- ``original``: z itself.
- ``L{l} second-order mean-ablated``: ψ'_n = ψ̄_n for the neurons of layer l; ``L{l} first-order
  mean-ablated``: the same for their direct effects (the paper: the second-order rows cost more).
- ``rank-1``: ψ'_n = ψ̄_n + s_n(i) r_n (`directions.RankOne`).
- ``sparse text``: ψ'_n = ψ̄_n + s_n(i) r̂_n, r̂_n the neuron's normalised OMP text reconstruction.
- ``random directions``: ψ'_n = ψ̄_n + s_n(i) u_n with u_n a random unit vector (seeded): the same
  norm as the rank-1 term, in a direction that carries nothing. ``all mean-ablated``: ψ'_n = ψ̄_n.

Zero-shot prediction: the argmax of cos(z', class text) over a task's classes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from clip_lens.errors import InputError
from clip_lens.stats import bootstrap_ci

Task = tuple[Float[Tensor, "classes d_embed"], Int[Tensor, "batch"]]


def check_tasks(tasks: Mapping[str, Task], n_images: int, d_embed: int) -> dict[str, Task]:
    """Tasks as ``(unit class embeddings on the CPU, labels)``, validated."""
    checked = {}
    for name, task in tasks.items():
        if not isinstance(task, (tuple, list)) or len(task) != 2:
            raise InputError(f"task '{name}' must be (class embeddings [classes, {d_embed}], labels [{n_images}]).")
        classifier, labels = torch.as_tensor(task[0]).float().cpu(), torch.as_tensor(task[1]).long().cpu()
        if classifier.ndim != 2 or classifier.shape[1] != d_embed:
            raise InputError(f"task '{name}': class embeddings must be [classes, {d_embed}], got {tuple(classifier.shape)}.")
        if labels.shape != (n_images,) or labels.min() < 0 or labels.max() >= len(classifier):
            raise InputError(f"task '{name}': give one label in 0..{len(classifier) - 1} per image ({n_images}), "
                             f"got shape {tuple(labels.shape)}.")
        checked[name] = (F.normalize(classifier, dim=-1), labels)
    return checked


def _score(embedding: Tensor, task: Task) -> dict:
    classifier, labels = task
    correct = ((F.normalize(embedding, dim=-1) @ classifier.T).argmax(-1) == labels).float().numpy()
    return {"accuracy": float(correct.mean()), "ci95": list(bootstrap_ci(correct))}


@torch.no_grad()
def replacement_accuracy(
    embedding: Float[Tensor, "batch d_embed"],
    effects: Float[Tensor, "batch layer neuron d_embed"],
    first_order: Float[Tensor, "batch layer neuron d_embed"],
    mean: Float[Tensor, "layer neuron d_embed"],
    direction: Float[Tensor, "layer neuron d_embed"],
    scores: Float[Tensor, "batch layer neuron"],
    text_direction: Float[Tensor, "layer neuron d_embed"],
    layers: Sequence[int],
    tasks: Mapping[str, Task],
    seed: int = 0,
) -> dict[str, dict[str, dict]]:
    """``{row: {task: {"accuracy", "ci95"}}}`` for the rows of the module docstring."""
    embedding = embedding.float().cpu()
    total = effects.float().sum(2).cpu()  # [batch, layer, out]
    mean_total = mean.float().sum(1).cpu()  # [layer, out]
    scores = scores.float().cpu()
    generator = torch.Generator().manual_seed(seed)
    random = F.normalize(torch.randn(direction.shape, generator=generator), dim=-1)
    rows: dict[str, Tensor] = {"original": embedding}
    first_total, first_mean = first_order.float().sum(2).cpu(), first_order.float().mean(0).sum(1).cpu()
    for i, layer in enumerate(layers):
        rows[f"L{layer} second-order mean-ablated"] = embedding - total[:, i] + mean_total[i]
        rows[f"L{layer} first-order mean-ablated"] = embedding - first_total[:, i] + first_mean[i]
    rest = embedding - total.sum(1) + mean_total.sum(0)  # every analysed neuron's effect at its mean
    rows["rank-1"] = rest + torch.einsum("bln,lnd->bd", scores, direction.float().cpu())
    rows["sparse text"] = rest + torch.einsum("bln,lnd->bd", scores, text_direction.float().cpu())
    rows["random directions"] = rest + torch.einsum("bln,lnd->bd", scores, random)
    rows["all mean-ablated"] = rest
    return {row: {name: _score(z, task) for name, task in tasks.items()} for row, z in rows.items()}
