"""The ``splice`` analysis: sparse non-negative concept decompositions of image embeddings (SpLiCE,
Bhalla et al., NeurIPS 2024).

It lives with the neuron analysis because both are sparse codes over an embedded text bank and share
the bank handling, the coder (`clip_lens.sparse_coding`) and the shapes-world phrase matching
(`naming.world_names`); it is registered as its own analysis because it needs no neurons at all.

As in the paper, both modalities are mean-centred before coding: the concept texts over the bank
(then normalised: `centered_dictionary`), the images by the mean image embedding μ (of the coded
images unless ``image_mean`` is given), ẑ = normalise(z − μ). The code is the non-negative lasso
``argmin_{w ≥ 0} ½‖wC − ẑ‖² + λ‖w‖₁`` and the reconstruction SpLiCE's recomposition
ž = normalise(normalise(wC) + μ). Measured for each λ of a grid: the mean number of concepts (L0)
and cos(ž, z); and at one λ the zero-shot accuracy of ž next to the original embedding and two
baselines with the same L0 per image: *random concepts* (a random support, non-negative least squares
on it) and *most similar concepts* (the L0 concepts most cosine-similar to ẑ, same fit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from clip_lens.results import JSONResult
from clip_lens.banks import TextBank
from clip_lens.errors import InputError
from clip_lens.sparse_coding import centered_dictionary, nonnegative_sparse_code
from clip_lens.stats import bootstrap_ci
from clip_lens_plugins.neurons.checks import check_tasks

if TYPE_CHECKING:
    from clip_lens import HookedCLIP

DEFAULT_GRID = (0.02, 0.05, 0.1, 0.2, 0.3)
SPLICE, RANDOM, SIMILAR, ORIGINAL = "SpLiCE", "random concepts (same L0)", "most similar concepts (same L0)", "original"


@dataclass
class SpliceResult(JSONResult):
    """Cosine-vs-L0 curve, concepts of the first images, and the accuracy and truth checks asked for."""

    model: str
    bank: str
    n_images: int
    l1: float
    curve: list[dict]
    """Per λ of the grid: ``l1``, ``l0`` and ``cosine`` (means over images) with ``l0_ci95``, ``cosine_ci95``."""
    concepts: list[list[tuple[str, float]]]
    """The first images' concepts at ``l1``, by decreasing weight."""
    accuracy: dict = field(default_factory=dict)
    """Row (original, SpLiCE, random concepts, most similar concepts) → task → ``{"accuracy", "ci95"}``."""
    truth: dict = field(default_factory=dict)
    """Shapes world: row → ``precision``, ``recall`` (+ ``_ci95``) of the concepts against the scene's attributes."""
    weights: Optional[Tensor] = field(default=None, repr=False)
    """``[image, concept]`` codes at ``l1`` (not saved)."""

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("weights")
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SpliceResult":
        return cls(**data)

    def plot(self):
        """Cosine of the reconstruction against the number of concepts (the λ grid)."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(4, 3), layout="constrained")
        ax = fig.subplots()
        ax.errorbar([p["l0"] for p in self.curve], [p["cosine"] for p in self.curve],
                    yerr=np.abs(np.array([[p["cosine"] - p["cosine_ci95"][0], p["cosine_ci95"][1] - p["cosine"]] for p in self.curve]).T),
                    marker="o", capsize=2)
        ax.set_xlabel("concepts per image (L0)")
        ax.set_ylabel("cos(reconstruction, embedding)")
        ax.set_title(f"SpLiCE, {self.bank}", fontsize=9)
        return fig


def recompose(weights: Float[Tensor, "image concept"], dictionary: Float[Tensor, "concept d"], image_mean: Float[Tensor, "d"]) -> Float[Tensor, "image d"]:
    """SpLiCE's reconstruction normalise(normalise(wC) + μ) (an empty code gives normalise(μ))."""
    return F.normalize(F.normalize(weights @ dictionary, dim=-1) + image_mean, dim=-1)


def same_size_codes(centred: Tensor, dictionary: Tensor, l0: Tensor, similar: bool, seed: int) -> Tensor:
    """Non-negative least squares of each image on ``l0[i]`` concepts: random ones, or the most similar."""
    n, n_concepts = len(centred), len(dictionary)
    if similar:
        order = (centred @ dictionary.T).argsort(-1, descending=True)
    else:
        generator = torch.Generator().manual_seed(seed)
        order = torch.stack([torch.randperm(n_concepts, generator=generator) for _ in range(n)])
    allowed = torch.zeros(n, n_concepts, dtype=torch.bool)
    allowed.scatter_(1, order, torch.arange(n_concepts).expand(n, -1) < l0[:, None])
    return nonnegative_sparse_code(centred, dictionary, 0.0, allowed=allowed, max_iter=500)


class SpLiCE:
    """Sparse non-negative concept codes of image embeddings over a text bank (Bhalla et al., NeurIPS 2024).

    >>> result = SpLiCE(model).run(images, bank="general", l1=0.2, tasks={"colour": (classes, labels)})   # doctest: +SKIP
    >>> result.concepts[0][:3]                                                                               # doctest: +SKIP
    """

    name = "splice"
    description = "SpLiCE: sparse non-negative concept decompositions of image embeddings, cosine vs L0, accuracy vs random concepts."
    parameters = {
        "images": "preprocessed images [N, 3, H, W]",
        "bank": "concept bank: 'general', 'shapes-attributes', a file, a list of texts, or (texts, embeddings)",
        "l1": "sparsity penalty λ for the codes and accuracy rows (default 0.1)",
        "grid": "λ values of the cosine-vs-L0 curve (default 0.02, 0.05, 0.1, 0.2, 0.3)",
        "tasks": "{name: (class embeddings [C, D], labels [N])} for zero-shot accuracy of the reconstructions (optional)",
        "image_mean": "mean image embedding [D] to centre with (default: the mean over the images)",
        "seed": "seed of the random-concept baseline (default 0)",
    }
    needs = ("model", "text_bank")

    def __init__(self, model: "HookedCLIP"):
        if model is None:
            raise InputError("the splice analysis needs a model: analyses.get('splice')(HookedCLIP.from_pretrained(...)).")
        self.model = model

    @torch.no_grad()
    def run(
        self,
        images: Float[Tensor, "N 3 H W"],
        bank: Union[str, Sequence[str], TextBank, tuple] = "general",
        l1: float = 0.1,
        grid: Sequence[float] = DEFAULT_GRID,
        tasks: Optional[Mapping[str, Any]] = None,
        image_mean: Optional[Tensor] = None,
        batch_size: int = 64,
        seed: int = 0,
        n_show: int = 8,
        scenes: Optional[Sequence] = None,
    ) -> SpliceResult:
        from clip_lens_plugins.neurons.analysis import _bank_embeddings

        model = self.model
        images = model.check_images(images)
        if len(images) < 2 and image_mean is None:
            raise InputError("give at least 2 images, or an image_mean to centre a single one.")
        texts, text_embeddings = _bank_embeddings(model, bank)
        z = torch.cat([model.encode_image(images[s:s + batch_size], normalize=True) for s in range(0, len(images), batch_size)]).float().cpu()
        mean = z.mean(0) if image_mean is None else torch.as_tensor(image_mean).float().cpu()
        if mean.shape != (model.cfg.d_embed,):
            raise InputError(f"image_mean must be [{model.cfg.d_embed}] (the model's d_embed), got {tuple(mean.shape)}.")
        dictionary, _ = centered_dictionary(text_embeddings)
        centred = F.normalize(z - mean, dim=-1)
        curve = []
        for value in sorted(set([*grid, l1])):
            w = nonnegative_sparse_code(centred, dictionary, float(value))
            l0 = (w > 0).sum(-1).float().numpy()
            cosine = (recompose(w, dictionary, mean) * z).sum(-1).numpy()
            curve.append({"l1": float(value), "l0": float(l0.mean()), "l0_ci95": list(bootstrap_ci(l0)),
                          "cosine": float(cosine.mean()), "cosine_ci95": list(bootstrap_ci(cosine))})
            if value == l1:
                weights = w
        concepts = [sorted(((texts.texts[j], float(w)) for j, w in enumerate(row.tolist()) if w > 0), key=lambda p: -p[1])
                    for row in weights[:n_show]]
        result = SpliceResult(model.model_name or "?", texts.name, len(images), float(l1), curve, concepts, weights=weights)
        l0 = (weights > 0).sum(-1)
        codes = {SPLICE: weights, RANDOM: same_size_codes(centred, dictionary, l0, False, seed),
                 SIMILAR: same_size_codes(centred, dictionary, l0, True, seed)}
        if tasks:
            checked = check_tasks(tasks, len(images), model.cfg.d_embed)
            rows = {ORIGINAL: z, **{name: recompose(w, dictionary, mean) for name, w in codes.items()}}
            result.accuracy = {row: {name: _accuracy(e, task) for name, task in checked.items()} for row, e in rows.items()}
        if scenes is not None:
            if len(scenes) != len(images):
                raise InputError(f"give one scene per image ({len(images)}), got {len(scenes)}.")
            result.truth = {name: concept_truth(w, texts.texts, scenes) for name, w in codes.items()}
        return result


def _accuracy(embedding: Tensor, task) -> dict:
    classifier, labels = task
    correct = ((embedding @ classifier.T).argmax(-1) == labels).float().numpy()
    return {"accuracy": float(correct.mean()), "ci95": list(bootstrap_ci(correct))}


def concept_truth(weights: Tensor, texts: Sequence[str], scenes: Sequence) -> dict:
    """Precision and recall of each image's concepts against its scene's attributes.

    A concept that names world values (`naming.world_names`) is right when every value it names is
    the scene's (the first object's, as the world's prompts describe it); concepts that name no
    value are left out of precision. Recall: the share of the scene's five attributes named rightly
    by at least one concept. Means over images with a bootstrap 95% interval (precision over the
    images with at least one naming concept).
    """
    from clip_lens_plugins.neurons.naming import world_names

    names = [world_names(t) for t in texts]  # count is not matched, so one phrase table serves both versions
    precision, recall = [], []
    for row, scene in zip(weights, scenes):
        truth = {(a, scene.value(a)) for a in ("colour", "shape", "size", "position", "background")}
        used = [names[j] for j in torch.nonzero(row > 0).flatten().tolist() if names[j]]
        if used:
            precision.append(float(np.mean([named <= truth for named in used])))
        found = set().union(*used) & truth if used else set()
        recall.append(len(found) / len(truth))
    out = {"recall": float(np.mean(recall)), "recall_ci95": list(bootstrap_ci(recall))}
    out.update({"precision": float(np.mean(precision)), "precision_ci95": list(bootstrap_ci(precision))} if precision
               else {"precision": None, "precision_ci95": None})
    return out
