"""Ground truth for neuron names on the shapes world, where every scene's attributes are known.

Neurons are named on one world seed (`Neurons.run` over its scenes: rank-1 directions and OMP codes
over a bank) and measured on other seeds, so naming and measurement never share a scene. A neuron
names ``(attribute, value)`` when one of its first ``n_names`` texts has a positive coefficient and
uses the world's phrase for it (`naming.world_names`). Two questions, each against a baseline that
could match it:

1. **Selectivity.** For every (named neuron, value) pair: the AUROC of the neuron's effect norm
   ‖ψ_n(i)‖ for scenes with that value against the rest; the baseline is the mean AUROC of
   ``random_neurons`` neurons of the same layer not named for the value, for the same value. Reported per
   attribute: mean AUROC of the named pairs, of their random controls, and the mean paired difference
   with a bootstrap 95% interval over the pairs.
2. **Ablation.** Mean-ablating one neuron's second-order effect (z' = z − ψ_n + ψ̄_n, ψ̄_n from the
   naming seed) lowers each attribute's zero-shot margin (true prompt's cosine minus the best other)
   by some mean amount over the scenes: its cost for that attribute. Per attribute: the AUROC with
   which cost separates the neurons named for that attribute from all the others (0.5: names say
   nothing about cost), with a bootstrap interval over the named neurons, and the share of the 10
   costliest neurons that are named for it, next to the share of all neurons that are (the base rate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clip_lens.results import JSONResult
from clip_lens.errors import InputError
from clip_lens.stats import bootstrap_ci
from clip_lens_plugins.neurons.naming import DEFAULT_NAMES, world_names

if TYPE_CHECKING:
    from clip_lens import HookedCLIP

TRUTH_SEEDS = (32001, 32002, 32003, 32004, 32005)
"""Naming seed first, then the measurement seeds: never used to tune anything in this plugin."""
ATTRIBUTES = ("colour", "shape", "size", "position", "background")
TOP = 10


@dataclass
class NeuronTruthResult(JSONResult):
    """Per attribute: selectivity of named neurons vs random neurons, and ablation cost vs names."""

    model: str
    bank: str
    naming_seed: int
    seeds: list[int]
    n_naming: int
    n_images: int
    layers: list[int]
    rows: dict[str, dict] = field(default_factory=dict)
    """Attribute → ``named_pairs``, ``auroc_named``, ``auroc_random``, ``difference``, ``difference_ci95``,
    ``named_neurons``, ``ablation_auroc``, ``ablation_ci95``, ``top_named_share``, ``base_rate``."""
    overall: dict = field(default_factory=dict)
    """The selectivity columns pooled over every attribute's pairs."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "NeuronTruthResult":
        return cls(**data)

    def to_markdown(self) -> str:
        def interval(low_high) -> str:
            return "–" if low_high is None else f"[{low_high[0]:.3f}, {low_high[1]:.3f}]"

        lines = ["| attribute | named pairs | AUROC named | AUROC random | difference [95% CI] | named neurons | "
                 "ablation AUROC [95% CI] | top-10 named | base rate |", "|---" * 9 + "|"]
        for attribute, r in self.rows.items():
            lines.append(
                f"| {attribute} | {r['named_pairs']} | {_f(r['auroc_named'])} | {_f(r['auroc_random'])} | "
                f"{_f(r['difference'])} {interval(r['difference_ci95'])} | {r['named_neurons']} | "
                f"{_f(r['ablation_auroc'])} {interval(r['ablation_ci95'])} | {_f(r['top_named_share'])} | {_f(r['base_rate'])} |")
        o = self.overall
        lines.append(f"| all | {o['named_pairs']} | {_f(o['auroc_named'])} | {_f(o['auroc_random'])} | "
                     f"{_f(o['difference'])} {interval(o['difference_ci95'])} | | | | |")
        return "\n".join(lines)

    def plot(self):
        """Named vs random AUROC per attribute (bars) with the paired difference's interval."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 3), layout="constrained")
        ax = fig.subplots()
        names = [a for a, r in self.rows.items() if r["named_pairs"]]
        x = np.arange(len(names))
        ax.bar(x - 0.2, [self.rows[a]["auroc_named"] for a in names], 0.4, label="named neurons")
        ax.bar(x + 0.2, [self.rows[a]["auroc_random"] for a in names], 0.4, label="random neurons", hatch="//")
        ax.axhline(0.5, color="grey", lw=0.8)
        ax.set_xticks(x, names)
        ax.set_ylabel("AUROC of effect norm")
        ax.legend(fontsize=7)
        return fig


def _f(value) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def _auroc(scores: torch.Tensor, positive: torch.Tensor) -> np.ndarray:
    """AUROC of each column of ``scores [n, m]`` (or ``[n]``) for ``positive [n]``: Mann–Whitney U from
    average ranks, so tied scores (a silent neuron's zeros) get half credit."""
    from clip_lens.stats import ranks

    values = scores.double().cpu().numpy().reshape(len(positive), -1).T  # [m, n]
    positive = positive.cpu().numpy().astype(bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    rank_sum = ranks(values)[:, positive].sum(-1)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _margins(embedding: torch.Tensor, prompts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """True prompt's cosine minus the best other prompt's, for ``embedding [..., batch, d]``."""
    cos = F.normalize(embedding, dim=-1) @ prompts.T  # [..., batch, values]
    true = cos.gather(-1, labels.expand(*cos.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    others = cos.scatter(-1, labels.expand(*cos.shape[:-1]).unsqueeze(-1), float("-inf"))
    return true - others.amax(-1)


@torch.no_grad()
def shapes_world_truth(
    model: "HookedCLIP",
    bank: str = "shapes-attributes",
    seeds: Sequence[int] = TRUTH_SEEDS,
    n_naming: int = 400,
    n_images: int = 250,
    layers: Optional[Sequence[int]] = None,
    k: int = 8,
    n_names: int = DEFAULT_NAMES,
    random_neurons: int = 20,
    batch_size: int = 50,
    n_boot: int = 2000,
    seed: int = 0,
) -> NeuronTruthResult:
    """Name neurons on ``seeds[0]`` (``n_naming`` scenes), measure on each later seed (``n_images`` scenes each)."""
    from clip_lens.second_order import second_order
    from clip_lens.toy.evaluate import shapes_world_version
    from clip_lens.toy.world import ShapesWorld, attribute_prompt, batch_images
    from clip_lens_plugins.neurons.analysis import Neurons

    version = shapes_world_version(model)
    if version is None:
        raise InputError(f"model '{model.model_name}' is not a shapes-world model; use toy-shapes or toy-shapes-v2.")
    if len(seeds) < 2:
        raise InputError(f"give a naming seed and at least one measurement seed, got {list(seeds)}.")
    size = model.cfg.image_size[0]
    naming_world = ShapesWorld(seed=seeds[0], image_size=size, version=version)
    named_run = Neurons(model).run(batch_images([naming_world.scene(i) for i in range(n_naming)]), bank=bank,
                                   layers=layers, k=k, n_names=n_names, batch_size=batch_size)
    layers = named_run.layers
    n_layers, n_neurons = len(layers), len(named_run.neurons) // len(layers)
    mean = named_run.rank1.mean  # [layer, neuron, d]: ψ̄ from the naming scenes
    names = [set().union(*[world_names(t, version) for t in named_run.codes.positive_names(row, n_names)] or [set()])
             for row in range(n_layers * n_neurons)]
    values = {a: naming_world.values[a] for a in ATTRIBUTES}
    prompts = {a: model.encode_text(model.to_tokens([attribute_prompt(a, v) for v in values[a]]).to(model.device),
                                    normalize=True).float().cpu() for a in ATTRIBUTES}

    norms, truth, costs = [], {a: [] for a in ATTRIBUTES}, {a: torch.zeros(n_layers * n_neurons) for a in ATTRIBUTES}
    total = 0
    for world_seed in seeds[1:]:
        world = ShapesWorld(seed=world_seed, image_size=size, version=version)
        for start in range(0, n_images, batch_size):
            scenes = [world.scene(i) for i in range(start, min(n_images, start + batch_size))]
            images = batch_images(scenes).to(model.device, model.dtype)
            so = second_order(model, images, layers=layers, batch_size=batch_size)
            effects, embedding = so.effects.float().cpu(), so.embedding.float().cpu()  # one forward for both
            norms.append(effects.norm(dim=-1).flatten(1))  # [b, layer·neuron]
            for a in ATTRIBUTES:
                labels = torch.tensor([values[a].index(s.value(a)) for s in scenes])
                truth[a].append(labels)
                base = _margins(embedding, prompts[a], labels)  # [b]
                for i in range(n_layers):
                    ablated = embedding[None] - effects[:, i].transpose(0, 1) + mean[i][:, None]  # [neuron, b, d]
                    costs[a][i * n_neurons:(i + 1) * n_neurons] += (base[None] - _margins(ablated, prompts[a], labels)).sum(1)
            total += len(scenes)
    norms = torch.cat(norms)
    truth = {a: torch.cat(v) for a, v in truth.items()}
    generator = np.random.default_rng(seed)

    result = NeuronTruthResult(model.model_name or "?", named_run.bank, int(seeds[0]), [int(s) for s in seeds[1:]],
                               n_naming, total, layers)
    pooled_named, pooled_random = [], []
    for a in ATTRIBUTES:
        named_rows = [r for r in range(len(names)) if any(attr == a for attr, _ in names[r])]
        auroc_named, auroc_random = [], []
        for row in named_rows:
            for attribute, value in names[row]:
                if attribute != a:
                    continue
                positive = truth[a] == values[a].index(value)
                if positive.all() or not positive.any():
                    continue
                layer = row // n_neurons
                pool = [r for r in range(layer * n_neurons, (layer + 1) * n_neurons) if (a, value) not in names[r]]
                controls = generator.choice(pool, size=min(random_neurons, len(pool)), replace=False)
                auroc_named.append(float(_auroc(norms[:, row], positive)[0]))
                auroc_random.append(float(_auroc(norms[:, controls], positive).mean()))
        pooled_named += auroc_named
        pooled_random += auroc_random
        cost = costs[a] / total
        others = torch.tensor([r for r in range(len(names)) if r not in set(named_rows)])
        row = {"named_pairs": len(auroc_named), "named_neurons": len(named_rows),
               "base_rate": len(named_rows) / len(names)}
        row.update(_selectivity(auroc_named, auroc_random, n_boot, seed))
        if named_rows and len(others):
            # each named neuron's share of the other neurons it out-costs: their mean is the AUROC
            beats = [float(((cost[others] < cost[r]).float() + 0.5 * (cost[others] == cost[r]).float()).mean()) for r in named_rows]
            row["ablation_auroc"] = float(np.mean(beats))
            row["ablation_ci95"] = list(bootstrap_ci(beats, n_boot=n_boot, seed=seed)) if len(beats) > 1 else None
            costliest = cost.topk(TOP).indices.tolist()
            row["top_named_share"] = float(np.mean([r in set(named_rows) for r in costliest]))
        else:
            row.update({"ablation_auroc": None, "ablation_ci95": None, "top_named_share": None})
        result.rows[a] = row
    result.overall = {"named_pairs": len(pooled_named), **_selectivity(pooled_named, pooled_random, n_boot, seed)}
    return result


def _selectivity(named: list[float], random: list[float], n_boot: int, seed: int) -> dict:
    if not named:
        return {"auroc_named": None, "auroc_random": None, "difference": None, "difference_ci95": None}
    difference = np.array(named) - np.array(random)
    return {"auroc_named": float(np.mean(named)), "auroc_random": float(np.mean(random)),
            "difference": float(difference.mean()),
            "difference_ci95": list(bootstrap_ci(difference, n_boot=n_boot, seed=seed)) if len(named) > 1 else None}
