"""The ``ablation`` analysis: how much zero-shot accuracy each component's direct effect carries.

Mean ablation on stored terms: a component's contribution to the (unit) image embedding is replaced
by its mean over the images, the embedding is re-normalised and classified again. Only the direct
path is removed (later layers still see the component), as in Gandelsman et al.'s ablations.

Two experiments in one run: each head in turn, and the paper's layer curves —

* ``keep_last``: everything (embedding term, every MLP, attention of the earlier layers) ablated
  except the attention of the last ``k`` layers, for ``k = 0 … L``;
* ``attention_upto``: attention of layers ``0 … ℓ`` ablated cumulatively, MLPs intact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from clip_lens.results import JSONResult
from clip_lens.collect import Store
from clip_lens.errors import InputError


@dataclass
class ZeroShotTask:
    """A classification task: class text embeddings and the true class of every store image."""

    classifier: Float[Tensor, "classes d"]
    labels: Int[Tensor, "n"]

    def accuracy(self, embedding: Float[Tensor, "n d"]) -> float:
        logits = torch.nn.functional.normalize(embedding, dim=-1) @ self.classifier.T
        return float((logits.argmax(-1) == self.labels).float().mean())

    def margin(self, embedding: Float[Tensor, "n d"]) -> float:
        """Mean over images of (true class cosine − best other class cosine): a graded accuracy,
        so that heads whose ablation flips no prediction can still be ranked."""
        return float(self.margins(embedding).mean())

    def margins(self, embedding: Float[Tensor, "n d"]) -> Float[Tensor, "n"]:
        """Per image: true class cosine − best other class cosine."""
        logits = torch.nn.functional.normalize(embedding, dim=-1) @ self.classifier.T
        true = logits.gather(1, self.labels[:, None]).squeeze(1)
        other = logits.scatter(1, self.labels[:, None], float("-inf")).max(1).values
        return true - other


def mean_ablate_layers(
    terms: Mapping[str, Tensor],
    attn_layers: Sequence[int] = (),
    mlp_layers: Sequence[int] = (),
    embed: bool = False,
) -> Float[Tensor, "n d"]:
    """Unit image embeddings with whole layers' attention / MLP terms (and the embedding term)
    mean-ablated. ``terms``: a store's ``embedding``, ``embed``, ``attn`` ``[N, L, D]``, ``mlp``."""
    embedding = terms["embedding"].clone()
    for name, layers in (("attn", attn_layers), ("mlp", mlp_layers)):
        for layer in layers:
            part = terms[name][:, layer]
            embedding += part.mean(0) - part
    if embed:
        embedding += terms["embed"].mean(0) - terms["embed"]
    return embedding


def mean_ablate_heads(
    embedding: Float[Tensor, "n d"],
    terms: Float[Tensor, "n head_layer head d"],
    head_layers: Sequence[int],
    heads: Sequence[str],
) -> Float[Tensor, "n d"]:
    """Unit image embeddings with the direct effect of ``heads`` ("L{l}H{h}") mean-ablated.

    ``embedding``, ``terms`` and ``head_layers`` are a store's ``embedding``, ``heads`` and
    ``head_layers``.
    """
    for key in heads:
        layer, head = (int(x) for x in key[1:].split("H"))
        if layer not in head_layers or not 0 <= head < terms.shape[2]:
            raise InputError(f"head {key} is not in the store (layers {list(head_layers)}, {terms.shape[2]} heads).")
        outputs = terms[:, head_layers.index(layer), head]
        embedding = embedding - outputs + outputs.mean(0)
    return embedding


@dataclass
class AblationResult(JSONResult):
    """Accuracy per task, originally and with each head mean-ablated."""

    model: str
    original: dict[str, float]
    ablated: dict[str, dict[str, float]]
    """head → task → accuracy with that head mean-ablated."""
    heads: list[str] = field(default_factory=list)
    original_margin: dict[str, float] = field(default_factory=dict)
    ablated_margin: dict[str, dict[str, float]] = field(default_factory=dict)
    """head → task → mean margin (`ZeroShotTask.margin`) with that head mean-ablated."""
    keep_last: dict[int, dict[str, float]] = field(default_factory=dict)
    """k → task → accuracy with everything but the last k layers' attention mean-ablated."""
    attention_upto: dict[int, dict[str, float]] = field(default_factory=dict)
    """ℓ → task → accuracy with the attention of layers 0…ℓ mean-ablated (MLPs intact)."""
    mlps: dict[str, float] = field(default_factory=dict)
    """task → accuracy with every MLP (and the embedding term) mean-ablated."""
    margin_drops: dict[str, Tensor] = field(default_factory=dict, repr=False)
    """task → ``[heads, N]`` margin lost per image when each head is ablated (in memory only, for
    intervals over images: resample the columns)."""

    def drop(self, task: str) -> dict[str, float]:
        """head → accuracy lost on ``task`` when it is ablated."""
        return {h: self.original[task] - self.ablated[h][task] for h in self.heads}

    def margin_drop(self, task: str) -> dict[str, float]:
        """head → mean margin lost on ``task`` when it is ablated."""
        return {h: self.original_margin[task] - self.ablated_margin[h][task] for h in self.heads}

    def top_heads(self, task: str, k: int) -> list[str]:
        """The ``k`` heads whose ablation hurts ``task`` most: by accuracy lost, ties (common: one
        head rarely flips a prediction) broken by margin lost."""
        drops, margins = self.drop(task), self.margin_drop(task)
        return sorted(self.heads, key=lambda h: (-drops[h], -margins[h]))[:k]

    def to_dict(self) -> dict:
        return {"model": self.model, "original": self.original, "ablated": self.ablated, "heads": self.heads,
                "original_margin": self.original_margin, "ablated_margin": self.ablated_margin,
                "keep_last": self.keep_last, "attention_upto": self.attention_upto, "mlps": self.mlps}

    def plot_curves(self):
        """Accuracy per task against how many final attention layers are kept (everything else ablated)."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5.5, 3.2), layout="constrained")
        ax = fig.subplots()
        ks = sorted(self.keep_last)
        for task in self.original:
            ax.plot(ks, [self.keep_last[k][task] for k in ks], marker="o", label=task)
        ax.set_xlabel("last k attention layers kept (all else mean-ablated)")
        ax.set_ylabel("zero-shot accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_xticks(ks)
        ax.legend(fontsize=7)
        return fig

    def plot(self):
        """Layer × head heatmap of the margin drop (graded accuracy), one panel per task."""
        from matplotlib.figure import Figure

        layers = sorted({int(h[1:].split("H")[0]) for h in self.heads})
        n_heads = 1 + max(int(h.split("H")[1]) for h in self.heads)
        tasks = list(self.original)
        fig = Figure(figsize=(2.4 * len(tasks) + 1, 2.6), layout="constrained")
        axes = fig.subplots(1, len(tasks), squeeze=False)[0]
        for ax, task in zip(axes, tasks):
            grid = torch.full((len(layers), n_heads), float("nan"))
            for h, value in self.margin_drop(task).items():
                layer, head = (int(x) for x in h[1:].split("H"))
                grid[layers.index(layer), head] = value
            image = ax.imshow(grid.numpy(), cmap="Reds", vmin=0)
            ax.set_title(f"{task}\n(accuracy {self.original[task]:.2f})", fontsize=9)
            ax.set_yticks(range(len(layers)), [f"L{l}" for l in layers])
            ax.set_xticks(range(n_heads), [f"H{h}" for h in range(n_heads)])
            fig.colorbar(image, ax=ax, shrink=0.8, label="margin drop")
        return fig


class MeanAblation:
    """Mean-ablate each head's direct effect in turn, and whole layers for the layer curves, and
    measure zero-shot accuracy per task."""

    name = "ablation"
    description = "Accuracy lost per zero-shot task when heads, layers or MLPs are mean-ablated (direct effects)."
    parameters = {
        "tasks": "task name → ZeroShotTask or (classifier [classes, D], labels [N]) of the store's images",
        "heads": "head keys 'L{l}H{h}' to ablate (default: every collected head)",
    }
    needs = ("store",)

    def __init__(self, model=None):
        self.model = model

    def run(self, store: Union[Store, str], tasks: Mapping[str, Union[ZeroShotTask, tuple]], heads: Optional[Sequence[str]] = None) -> AblationResult:
        store = store if isinstance(store, Store) else Store.open(store)
        if not tasks:
            raise InputError("give at least one task: {name: ZeroShotTask(classifier, labels)}.")
        tasks = {name: t if isinstance(t, ZeroShotTask) else ZeroShotTask(*t) for name, t in tasks.items()}
        embedding, terms = store.read("embedding"), store.read("heads")
        for name, task in tasks.items():  # one label per row read: images skipped at collection have none
            if len(task.labels) != len(embedding):
                skipped = store.n_images - len(embedding)
                note = f" ({skipped} of {store.n_images} images were skipped when collected: label the rows of store.ids())" if skipped else ""
                raise InputError(f"task '{name}' has {len(task.labels)} labels for {len(embedding)} store images{note}.")
        heads = list(heads) if heads is not None else [f"L{l}H{h}" for l in store.head_layers for h in range(terms.shape[2])]
        original = {name: task.accuracy(embedding) for name, task in tasks.items()}
        original_margin = {name: task.margin(embedding) for name, task in tasks.items()}
        ablated, ablated_margin = {}, {}
        before = {name: task.margins(embedding) for name, task in tasks.items()}
        drops: dict[str, list[Tensor]] = {name: [] for name in tasks}
        for head in heads:
            changed = mean_ablate_heads(embedding, terms, store.head_layers, [head])
            ablated[head] = {name: task.accuracy(changed) for name, task in tasks.items()}
            for name, task in tasks.items():
                drops[name].append(before[name] - task.margins(changed))
            ablated_margin[head] = {name: original_margin[name] - float(drops[name][-1].mean()) for name in tasks}
        result = AblationResult(store.meta.get("model", "?"), original, ablated, heads, original_margin, ablated_margin,
                                margin_drops={name: torch.stack(d) for name, d in drops.items()})
        layer_terms = {"embedding": embedding, **{name: store.read(name) for name in ("embed", "attn", "mlp")}}
        n_layers = layer_terms["attn"].shape[1]

        def accuracies(changed: Tensor) -> dict[str, float]:
            return {name: task.accuracy(changed) for name, task in tasks.items()}

        for k in range(n_layers + 1):
            result.keep_last[k] = accuracies(
                mean_ablate_layers(layer_terms, attn_layers=range(n_layers - k), mlp_layers=range(n_layers), embed=True)
            )
        for last in range(n_layers):
            result.attention_upto[last] = accuracies(mean_ablate_layers(layer_terms, attn_layers=range(last + 1)))
        result.mlps = accuracies(mean_ablate_layers(layer_terms, mlp_layers=range(n_layers), embed=True))
        return result
