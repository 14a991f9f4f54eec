"""The ``neurons`` analysis: second-order effects of MLP neurons, named with sparse text codes and checked.

One `Neurons.run` computes ψ for every neuron of the chosen layers (`clip_lens.second_order`), then per
neuron its mean effect, share of significant images, rank-1 direction and explained variance
(`directions`), its sparse text code over a bank (`naming`, OMP from `clip_lens.sparse_coding`), and,
when given tasks or a segmentation dataset, the paper's checks next to their baselines (`checks`,
`segment`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from clip_lens.results import JSONResult
from clip_lens.banks import TextBank, encode_bank, load_bank
from clip_lens.errors import InputError
from clip_lens_plugins.neurons.checks import check_tasks, replacement_accuracy
from clip_lens_plugins.neurons.directions import DEFAULT_THRESHOLD, RankOne, rank_one
from clip_lens_plugins.neurons.naming import DEFAULT_NAMES, TextCodes, named_neurons, text_codes

if TYPE_CHECKING:
    from clip_lens import HookedCLIP
    from clip_lens.second_order import SecondOrder
    from clip_lens_plugins.segmentation import SegmentationData


@dataclass
class NeuronRow:
    """One neuron's summary (effects un-normalised, in embedding units)."""

    layer: int
    neuron: int
    mean_norm: float
    """‖ψ̄_n‖: the norm of its mean second-order effect."""
    effect_norm: float
    """Mean over images of ‖ψ_n(i)‖."""
    significant: float
    """Share of images where its centred effect is ≥ ``threshold`` of ‖z(i)‖."""
    explained: float
    """Variance of its top images' centred effects along its rank-1 direction."""
    texts: list[str]
    """Its sparse text code, by decreasing |coefficient|."""
    coefficients: list[float]
    code_cosine: float
    """cos(rank-1 direction, its text reconstruction)."""


@dataclass
class NeuronsResult(JSONResult):
    """Per-neuron table, and the checks that were asked for.

    ``checks``: row → task → ``{"accuracy", "ci95"}`` (`checks.replacement_accuracy`).
    ``segmentation``: a `segmentation_eval`-style table with the neuron rows first (`segment`).
    """

    model: str
    bank: str
    layers: list[int]
    n_images: int
    k: int
    top_k: int
    threshold: float
    neurons: list[NeuronRow]
    checks: dict = field(default_factory=dict)
    segmentation: dict = field(default_factory=dict)
    rank1: Optional[RankOne] = field(default=None, repr=False)
    """Tensors behind the table (not saved in JSON)."""
    codes: Optional[TextCodes] = field(default=None, repr=False)
    """Text codes of the ``[layer · neuron]`` directions, layer-major (not saved in JSON)."""

    def to_dict(self) -> dict:
        return {"model": self.model, "bank": self.bank, "layers": self.layers, "n_images": self.n_images, "k": self.k,
                "top_k": self.top_k, "threshold": self.threshold, "neurons": [asdict(n) for n in self.neurons],
                "checks": self.checks, "segmentation": self.segmentation}

    @classmethod
    def from_dict(cls, data: dict) -> "NeuronsResult":
        try:
            rows = [NeuronRow(**n) for n in data["neurons"]]
            return cls(data["model"], data["bank"], list(data["layers"]), int(data["n_images"]), int(data["k"]),
                       int(data["top_k"]), float(data["threshold"]), rows, data.get("checks", {}), data.get("segmentation", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"not a neurons result ({exc!r}); expected the JSON written by NeuronsResult.save.") from exc

    def top(self, n: int = 10, by: str = "effect_norm") -> list[NeuronRow]:
        """The ``n`` neurons with the largest ``by`` (a numeric field of `NeuronRow`)."""
        if by not in ("mean_norm", "effect_norm", "significant", "explained", "code_cosine"):
            raise InputError(f"by must be a numeric NeuronRow field (effect_norm, mean_norm, significant, explained, code_cosine), got {by!r}.")
        return sorted(self.neurons, key=lambda row: -getattr(row, by))[:n]

    def named(self, phrase: str, n_names: int = DEFAULT_NAMES) -> list[NeuronRow]:
        """Neurons whose first ``n_names`` texts include ``phrase`` with a positive coefficient."""
        from clip_lens_plugins.neurons.naming import names_phrase

        return [row for row in self.neurons
                if any(names_phrase(t, phrase) and c > 0 for t, c in list(zip(row.texts, row.coefficients))[:n_names])]

    def checks_markdown(self) -> str:
        """The accuracy checks as a table: row × task, accuracy in % with its interval."""
        if not self.checks:
            return ""
        tasks = list(next(iter(self.checks.values())))
        lines = ["| replacement | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for row, per_task in self.checks.items():
            cells = [f"{100 * v['accuracy']:.1f} [{100 * v['ci95'][0]:.1f}, {100 * v['ci95'][1]:.1f}]" for v in per_task.values()]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self):
        """Per layer: the share of significant images and the rank-1 explained variance of every neuron."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(3.2 * len(self.layers), 3.0), layout="constrained")
        axes = fig.subplots(1, len(self.layers), sharey=True, squeeze=False)[0]
        for ax, layer in zip(axes, self.layers):
            rows = [r for r in self.neurons if r.layer == layer]
            ax.scatter([r.significant for r in rows], [r.explained for r in rows], s=4)
            ax.set_title(f"layer {layer}")
            ax.set_xlabel("share of significant images")
        axes[0].set_ylabel("rank-1 variance explained")
        return fig


def _layers(model: "HookedCLIP", layers) -> list[int]:
    n_layers = model.cfg.n_layers
    if layers is None:
        return list(range(n_layers - 1))
    picked = []
    for layer in [layers] if isinstance(layers, int) else list(layers):
        if not isinstance(layer, (int, np.integer)) or not -n_layers <= int(layer) < n_layers:
            raise InputError(f"layer {layer!r} does not exist: the image tower has layers 0..{n_layers - 1}.")
        picked.append(int(layer) % n_layers)
    if n_layers - 1 in picked:
        raise InputError(f"layer {n_layers - 1} is the last: no attention layer follows it, so its neurons have no "
                         f"second-order effect; pick layers 0..{n_layers - 2}.")
    if not picked:
        raise InputError("layers selects no layer; pass None (every layer but the last) or a list of indices.")
    return sorted(set(picked))


def _bank_embeddings(model: "HookedCLIP", bank) -> tuple[TextBank, Float[Tensor, "text d_embed"]]:
    """A bank and its unit embeddings: a bank spec (`load_bank`), or ``(texts, [text, d_embed] embeddings)``."""
    if isinstance(bank, tuple) and len(bank) == 2 and isinstance(bank[1], Tensor):
        texts, embeddings = bank
        loaded = texts if isinstance(texts, TextBank) else load_bank(list(texts))
        if embeddings.ndim != 2 or embeddings.shape != (len(loaded), model.cfg.d_embed):
            raise InputError(f"bank embeddings must be [{len(loaded)} texts, {model.cfg.d_embed}] (the model's d_embed), "
                             f"got {tuple(embeddings.shape)}; embed the bank with this model (encode_bank).")
        return loaded, embeddings.float().cpu()
    loaded = bank if isinstance(bank, TextBank) else load_bank(bank)
    return loaded, encode_bank(model, loaded).float().cpu()


class Neurons:
    """Second-order effects of MLP neurons (Gandelsman, Efros & Steinhardt, ICLR 2025), named and checked.

    >>> result = Neurons(model).run(images, bank="general", k=8, tasks={"colour": (classes, labels)})   # doctest: +SKIP
    >>> result.top(5)[0].texts[:3]                                                                         # doctest: +SKIP
    """

    name = "neurons"
    description = ("Second-order effects of every MLP neuron: mean effect, sparsity, rank-1 direction, sparse text "
                   "code (OMP), and accuracy/segmentation checks against baselines.")
    parameters = {
        "images": "preprocessed images [N, 3, H, W]",
        "bank": "text bank: 'general', 'shapes', 'shapes-attributes', a file, a list of texts, or (texts, embeddings)",
        "layers": "MLP layers (default every layer but the last, which no attention layer follows)",
        "neurons": "neuron indices, the same in every layer (default all)",
        "k": "texts per neuron code (OMP atoms, default 8)",
        "top_k": "images per neuron for its rank-1 direction (default 100)",
        "threshold": "an image is significant for a neuron when its centred effect is ≥ threshold · ‖embedding‖ (default 0.01)",
        "tasks": "{name: (class embeddings [C, D], labels [N])} for the zero-shot accuracy checks (optional)",
        "segmentation": "a SegmentationData for neuron-based zero-shot segmentation (optional)",
        "concepts": "one phrase per segmentation class that a neuron's code must name (default: the class prompts)",
        "n_names": "texts of a code that name the neuron (default 3)",
        "batch_size": "images per forward pass (default 32)",
        "seed": "seed of the random baselines and bootstrap (default 0)",
    }
    needs = ("model", "text_bank")

    def __init__(self, model: "HookedCLIP"):
        if model is None:
            raise InputError("the neurons analysis needs a model: analyses.get('neurons')(HookedCLIP.from_pretrained(...)).")
        self.model = model

    def effects(self, images: Tensor, layers=None, neurons=None, batch_size: int = 32) -> "SecondOrder":
        """ψ of the neurons (default all) of ``layers`` on ``images`` (`clip_lens.second_order.second_order`)."""
        from clip_lens.second_order import second_order

        return second_order(self.model, images, layers=_layers(self.model, layers), neurons=neurons, batch_size=batch_size)

    @torch.no_grad()
    def run(
        self,
        images: Float[Tensor, "N 3 H W"],
        bank: Union[str, Sequence[str], TextBank, tuple] = "general",
        layers: Optional[Sequence[int]] = None,
        neurons: Optional[Sequence[int]] = None,
        k: int = 8,
        top_k: int = 100,
        threshold: float = DEFAULT_THRESHOLD,
        tasks: Optional[Mapping[str, Any]] = None,
        segmentation: Optional["SegmentationData"] = None,
        concepts: Optional[Sequence[str]] = None,
        n_names: int = DEFAULT_NAMES,
        batch_size: int = 32,
        seed: int = 0,
        random_draws: int = 5,
        n_boot: int = 2000,
        effects: Optional["SecondOrder"] = None,
    ) -> NeuronsResult:
        model = self.model
        layers = _layers(model, layers)
        images = model.check_images(images)
        if len(images) < 2:
            raise InputError(f"give at least 2 images (effects are centred over them), got {len(images)}.")
        texts, bank_embeddings = _bank_embeddings(model, bank)
        so = effects if effects is not None else self.effects(images, layers, neurons, batch_size)
        if so.effects.shape[-1] != model.cfg.d_embed or so.directions is not None:
            raise InputError("the neurons analysis needs effects in embedding space: compute second_order without directions.")
        if list(so.layers) != layers or so.effects.shape[0] != len(images):
            raise InputError(f"effects cover layers {so.layers} and {so.effects.shape[0]} images; expected {layers} and {len(images)}.")
        if so.embedding is not None:  # the embeddings of second_order's own forward pass
            embedding = so.embedding.float().cpu()
        else:  # effects read from a store
            embedding = torch.cat([model.encode_image(images[s:s + batch_size]) for s in range(0, len(images), batch_size)]).float().cpu()
        one = rank_one(so.effects.cpu(), embedding.norm(dim=-1), top_k, threshold)
        n_layers, n_neurons, d = one.direction.shape
        codes = text_codes(one.direction.reshape(-1, d), bank_embeddings, texts.texts, k)
        effect_norm = one.norms.mean(0)
        rows = []
        for i, layer in enumerate(layers):
            for j, neuron in enumerate(so.neurons.tolist()):
                flat = i * n_neurons + j
                ranked = codes.ranked(flat)
                rows.append(NeuronRow(
                    layer, neuron, float(one.mean[i, j].norm()), float(effect_norm[i, j]), float(one.significant[i, j]),
                    float(one.explained[i, j]), [t for t, _ in ranked], [float(c) for _, c in ranked], float(codes.cosine[flat]),
                ))
        result = NeuronsResult(model.model_name or "?", texts.name, layers, len(images), k, min(top_k, len(images)),
                               threshold, rows, rank1=one, codes=codes)
        if tasks:
            checked = check_tasks(tasks, len(images), model.cfg.d_embed)
            result.checks = replacement_accuracy(
                embedding, so.effects.cpu(), so.first_order.cpu(), one.mean, one.direction, one.scores,
                codes.reconstruction.reshape(n_layers, n_neurons, d), layers, checked, seed,
            )
        if segmentation is not None:
            result.segmentation = self._segmentation(segmentation, layers, so.neurons, codes, concepts, n_names,
                                                     batch_size, seed, random_draws, n_boot)
        return result

    def _segmentation(self, dataset, layers, neurons, codes, concepts, n_names, batch_size, seed, draws, n_boot) -> dict:
        from clip_lens.analyses import get
        from clip_lens_plugins.neurons.segment import NEURON_ROW, RANDOM_ROW, neuron_patch_maps, random_selections
        from clip_lens_plugins.segmentation.analysis import encode_texts
        from clip_lens_plugins.segmentation.maps import upsample
        from clip_lens_plugins.segmentation.metrics import METRIC_NAMES, SegmentationScore, foreground_scores, image_intervals

        model = self.model
        if dataset.classes is None:
            raise InputError("the segmentation dataset has no classes; use one with class prompts (e.g. shapes_world_segmentation).")
        concepts = list(dataset.classes if concepts is None else concepts)
        if len(concepts) != len(dataset.classes):
            raise InputError(f"give one concept per class ({len(dataset.classes)}), got {len(concepts)}.")
        named = named_neurons(codes, concepts, n_names).reshape(len(concepts), len(layers), len(neurons))
        selections = [named, *random_selections(named, draws, seed)]
        class_text = encode_texts(model, dataset.classes)
        scores = [SegmentationScore() for _ in selections]
        for start in range(0, len(dataset), batch_size):
            images, masks = dataset.load(start, min(len(dataset), start + batch_size))
            images = model.check_images(images)
            predicted = (model.encode_image(images, normalize=True) @ class_text.T).argmax(-1)
            for score, grid in zip(scores, neuron_patch_maps(model, images, layers, neurons, selections, predicted)):
                score.update(foreground_scores(upsample(grid, model.cfg.image_size)), masks.cpu())
        evaluation = get("segmentation_eval")(model).run(dataset, batch_size=batch_size, random_draws=draws, n_boot=n_boot, seed=seed)
        table = {NEURON_ROW: scores[0].summary()}
        intervals = {NEURON_ROW: image_intervals(scores[:1], n_boot=n_boot, seed=seed)}
        if draws:
            summaries = [s.summary() for s in scores[1:]]
            table[RANDOM_ROW] = {m: float(np.mean([s[m] for s in summaries])) for m in METRIC_NAMES}
            intervals[RANDOM_ROW] = image_intervals(scores[1:], n_boot=n_boot, seed=seed)
        table.update(evaluation.table)
        intervals.update(evaluation.intervals)
        return {"dataset": evaluation.dataset, "n_images": evaluation.n_images, "classes": evaluation.classes,
                "concepts": concepts, "neurons_per_class": named.flatten(1).sum(1).tolist(), "table": table,
                "intervals": intervals, "baselines": [RANDOM_ROW, *evaluation.table], "zero_shot_accuracy": evaluation.zero_shot_accuracy}
