"""The ``segmentation_eval`` analysis: zero-shot segmentation from the decomposition (Gandelsman et al. §4).

For each image the predicted class c* is the argmax of the image embedding against the class text
embeddings. A patch's score is its direct contribution through the chosen heads (default: every
head of the chosen layers), projected on ``class_text[c*] − mean over classes of class_text`` (the
contrast with the other classes; prefix/CLS tokens excluded). Maps are bilinearly upsampled,
clipped below 0, min-max normalised and thresholded at their mean (`metrics`).

Scored in the same run, on the same images and masks, the baselines a method has to beat:

- *random heads*: the method's construction with ``random_draws`` random sets of as many heads as
  the method sums (uniform over all heads of the tower), reported as the mean over the draws; one
  row per head count, shared by the methods of that count. A method that sums every head of the
  tower has no such control (the only set of its size is its own).
- *random all-layer* ("random 16 heads drawn per layer (4/4/4/4)"): for a method with heads in
  every layer, ``random_draws`` multisets with the method's number of heads in each layer, drawn
  per layer with replacement (`heads.random_per_layer_sets`); the all-layer map's own control.
- *raw attention*: the last layer's CLS → patch attention, averaged over heads.
- *chroma* and *colour contrast*: no model, from the pixels (`baselines`).
- *uniform*: a constant map (AP = foreground share; thresholded at its mean it is all foreground).
- *all background*: no object pixel (pixel accuracy = background share, object IoU 0; its constant
  score ranks like the uniform map, AP = foreground share).

Every metric comes with a 95% percentile bootstrap interval over the images (`metrics.image_intervals`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from clip_lens.results import JSONResult
from clip_lens.errors import InputError
from clip_lens_plugins.segmentation.analysis import checked_images, encode_texts
from clip_lens_plugins.segmentation.baselines import chroma_map, contrast_map, pixel_values
from clip_lens_plugins.segmentation.data import SegmentationData
from clip_lens_plugins.segmentation.heads import HeadCounts, HeadSelection, HeadSpec, parse_heads, random_head_sets, random_per_layer_sets
from clip_lens_plugins.segmentation.maps import split_tokens, upsample
from clip_lens_plugins.segmentation.metrics import METRIC_NAMES, SegmentationScore, foreground_scores, image_intervals

if TYPE_CHECKING:
    from clip_lens import HookedCLIP

DEFAULT_LAYERS = {"decomposition (all layers)": "all", "decomposition (last layer)": [-1]}
RAW_ATTENTION, CHROMA, CONTRAST = "raw attention", "chroma (no model)", "colour contrast (no model)"
UNIFORM, ALL_BACKGROUND = "uniform", "all background"
BASELINES = (RAW_ATTENTION, CHROMA, CONTRAST, UNIFORM, ALL_BACKGROUND)
METRICS = {"pixel_accuracy": "pixel acc", "object_iou": "object IoU", "mean_iou": "mIoU", "mean_ap": "mAP"}


def class_contrast_head_maps(
    model: "HookedCLIP",
    images: Float[Tensor, "batch 3 H W"],
    class_text: Float[Tensor, "classes d_embed"],
    predicted: Int[Tensor, "batch"],
    layers: Sequence[int],
) -> Float[Tensor, "batch layer head token"]:
    """Per head of ``layers``, each token's share of the image's cosine with ``class_text[c*] − mean(class_text)``.

    Only the batch's predicted classes are decomposed (not every class), so memory grows with the
    batch, not with the number of classes. A head set's map is the sum of its heads' maps.
    """
    present, which = predicted.unique(return_inverse=True)
    directions = class_text[present] - class_text.mean(0)
    parts = model.decompose(images, heads=None, tokens=list(layers), directions=directions).normalized()
    return parts.tokens[torch.arange(len(images)), ..., which.to(parts.tokens.device)]  # [b, layer, head, token]


def raw_attention(
    model: "HookedCLIP", images: Float[Tensor, "batch 3 H W"]
) -> tuple[Float[Tensor, "batch grid_h grid_w"], Float[Tensor, "batch d_embed"]]:
    """The last layer's CLS → patch attention averaged over heads, and the unit image embeddings."""
    hook = f"blocks.{model.cfg.n_layers - 1}.attn.hook_pattern"
    with torch.no_grad():
        (embedding, *_), cache = model.run_with_cache(images, names_filter=hook)
    cls_row = cache[hook][:, :, 0].mean(1)  # pattern [batch, head, query, key] → [batch, key]
    return split_tokens(cls_row, model.cfg.grid_size)[1], embedding


def _method_specs(layers) -> dict[str, HeadSpec]:
    if layers is None:
        return dict(DEFAULT_LAYERS)
    if isinstance(layers, Mapping):
        if not layers:
            raise InputError("layers is an empty mapping; give {name: 'all' | [layer, ...] | ['L3H0', ...]}.")
        return dict(layers)
    return {"decomposition": layers}


def _class_embeddings(model: "HookedCLIP", classes) -> tuple[list[str], Float[Tensor, "classes d_embed"]]:
    """Class names and unit class embeddings, from prompts or from ready embeddings."""
    if isinstance(classes, Tensor):
        if classes.ndim != 2 or classes.shape[1] != model.cfg.d_embed:
            raise InputError(f"class embeddings must be [classes, {model.cfg.d_embed}], got {tuple(classes.shape)}.")
        names = [f"class {i}" for i in range(len(classes))]
        class_text = F.normalize(classes.to(device=model.device, dtype=model.dtype), dim=-1)
    else:
        names, class_text = list(classes), encode_texts(model, list(classes))
    if len(names) < 2:
        raise InputError(f"give at least 2 classes (the map contrasts the predicted class with the mean), got {len(names)}.")
    return names, class_text


def random_control_name(size: int) -> str:
    """The table row of the random-head control of the methods that sum ``size`` heads."""
    return f"random {size} head{'' if size == 1 else 's'}"


def all_layer_control_name(per_layer: Sequence[int]) -> str:
    """The table row of the random all-layer control of the methods with ``per_layer[l]`` heads in layer ``l``."""
    return f"random {sum(per_layer)} heads drawn per layer ({'/'.join(map(str, per_layer))})"


@dataclass
class SegmentationEvalResult(JSONResult):
    """Zero-shot segmentation metrics per method and per baseline (fractions in [0, 1]).

    ``table`` and ``intervals`` hold one row per map, methods first, then their random-head
    controls, then the other baselines (`baselines` names every row that is not a method).
    """

    model: str
    dataset: str
    n_images: int
    classes: list[str]
    layers: dict[str, list[int]]
    """Method → the layers whose heads it sums (those with at least one selected head)."""
    table: dict[str, dict[str, float]]
    """Row → ``pixel_accuracy``, ``object_iou`` (foreground IoU), ``mean_iou`` (mean of the background and
    foreground IoUs), ``mean_ap``. Random-head rows: the mean over the draws."""
    zero_shot_accuracy: Optional[float] = None
    """Share of images whose predicted class is the dataset's label (when the dataset has labels)."""
    intervals: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """Row → metric → ``[low, high]``, the percentile bootstrap interval over images (random heads:
    over images and draws) at ``level``."""
    baselines: list[str] = field(default_factory=list)
    """The rows of ``table`` that are baselines or controls, not methods."""
    heads: dict[str, list[str]] = field(default_factory=dict)
    """Method → ``"L{l}H{h}"`` keys of the heads it sums."""
    random_heads: dict[str, dict] = field(default_factory=dict)
    """Random-head row → ``methods`` (those it controls: the methods that sum ``size`` heads),
    ``size``, ``seed``, ``draws`` (the head keys of each draw) and ``per_draw`` (metric → one value
    per draw, over all images)."""
    level: float = 0.95
    n_boot: int = 2000

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SegmentationEvalResult":
        return cls(**data)

    def _cell(self, row: str, metric: str) -> str:
        value = self.table[row].get(metric)
        if value is None:  # a result saved before the metric existed
            return "–"
        low_high = self.intervals.get(row, {}).get(metric)
        if low_high is None:
            return f"{100 * value:.1f}"
        return f"{100 * value:.1f} [{100 * low_high[0]:.1f}, {100 * low_high[1]:.1f}]"

    def to_markdown(self) -> str:
        """The row × metric table in percent, each value with its interval ``[low, high]``."""
        lines = ["| method | " + " | ".join(METRICS.values()) + " |", "|---" * (len(METRICS) + 1) + "|"]
        for row in self.table:
            lines.append(f"| {row} | " + " | ".join(self._cell(row, m) for m in METRICS) + " |")
        if self.intervals:
            draws = {len(r["draws"]) for r in self.random_heads.values()}
            note = f"; random heads: mean of {'/'.join(map(str, sorted(draws)))} draws, resampled too" if draws else ""
            lines += ["", f"{round(100 * self.level)}% bootstrap intervals over the {self.n_images} images "
                          f"({self.n_boot} resamples{note})."]
        return "\n".join(lines)

    def plot(self):
        """Grouped bars: one group per metric, one bar per row (baselines hatched), interval whiskers when known."""
        from matplotlib.figure import Figure

        rows = list(self.table)
        metrics = [m for m in METRICS if all(m in self.table[r] for r in rows)]
        fig = Figure(figsize=(max(8, 0.3 * len(rows) * len(metrics)), 3.5), layout="constrained")
        ax = fig.subplots()
        width = 0.8 / len(rows)
        for i, row in enumerate(rows):
            positions = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(metrics))]
            values = np.array([100 * self.table[row][m] for m in metrics])
            error = None
            if row in self.intervals:
                bounds = np.array([[100 * b for b in self.intervals[row][m]] for m in metrics])  # [metric, 2]
                error = np.abs(np.stack([values - bounds[:, 0], bounds[:, 1] - values]))
            hatch = "//" if row in self.baselines else None  # baselines and controls hatched, methods plain
            ax.bar(positions, values, width, yerr=error, capsize=1.5, label=row, hatch=hatch)
        ax.set_xticks(range(len(metrics)), [METRICS[m] for m in metrics])
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.set_title(f"zero-shot segmentation, {self.model}, {self.n_images} images", fontsize=9)
        fig.legend(fontsize=7, loc="outside right upper")
        return fig


class SegmentationEval:
    """Zero-shot segmentation from per-patch decomposition maps, against random heads and no-model baselines."""

    name = "segmentation_eval"
    description = ("Zero-shot segmentation (pixel acc, object IoU, mIoU, mAP with bootstrap intervals) of decomposition "
                   "maps vs random heads, raw attention, chroma, colour contrast, uniform and all-background.")
    parameters = {
        "dataset": "SegmentationData (shapes_world_segmentation(n) or folder_segmentation(path, model.preprocess))",
        "classes": "class prompts or unit class embeddings [classes, D] (default: the dataset's classes)",
        "layers": "'all', layer indices, head keys ['L3H0', ...], or {method name: any of those}; "
                  "default all layers and the last layer",
        "batch_size": "images per forward pass (default 64)",
        "random_draws": "random head sets per method for the random-heads control (default 10; 0: none)",
        "n_boot": "bootstrap resamples of the images for the intervals (default 2000)",
        "seed": "seed of the random head sets and of the bootstrap (default 0)",
    }
    needs = ("model",)

    def __init__(self, model: "HookedCLIP"):
        if model is None:
            raise InputError("segmentation_eval needs a model: analyses.get('segmentation_eval')(HookedCLIP.from_pretrained(...)).")
        self.model = model

    def run(
        self,
        dataset: SegmentationData,
        classes: Union[Sequence[str], Float[Tensor, "classes d_embed"], None] = None,
        layers: Union[HeadSpec, Mapping[str, HeadSpec], None] = None,
        batch_size: int = 64,
        random_draws: int = 10,
        n_boot: int = 2000,
        seed: int = 0,
    ) -> SegmentationEvalResult:
        model, cfg = self.model, self.model.cfg
        if not isinstance(dataset, SegmentationData):
            raise InputError(f"dataset must be a SegmentationData (see shapes_world_segmentation / folder_segmentation), got {type(dataset).__name__}.")
        if len(dataset) == 0:
            raise InputError("the segmentation dataset is empty.")
        if classes is None and dataset.classes is None:
            raise InputError("this dataset has no classes: pass classes=[prompt, ...] (e.g. 'a photo of a dog').")
        if random_draws < 0 or n_boot < 1:
            raise InputError(f"random_draws must be ≥ 0 and n_boot ≥ 1, got {random_draws} and {n_boot}.")
        class_names, class_text = _class_embeddings(model, dataset.classes if classes is None else classes)
        methods = {name: parse_heads(spec, cfg.n_layers, cfg.n_heads) for name, spec in _method_specs(layers).items()}
        n_all = cfg.n_layers * cfg.n_heads
        reserved = {*BASELINES, *(random_control_name(k) for k in range(1, n_all + 1))}
        taken = [name for name in methods if name in reserved or (name.startswith("random ") and "drawn per layer" in name)]
        if taken:
            raise InputError(f"method name {taken[0]!r} is a baseline's row name; give your methods other names.")
        controls: dict[str, tuple[list[str], list[HeadSelection | HeadCounts]]] = {}  # row → (its methods, the random sets)
        for name, selection in methods.items():
            if random_draws and math.comb(n_all, selection.size) > 1:
                row = random_control_name(selection.size)  # methods of one size share their control
                draws = random_head_sets(cfg.n_layers, cfg.n_heads, selection.size, random_draws, seed)
                controls.setdefault(row, ([], draws))[0].append(name)
        for name, selection in methods.items():  # the all-layer maps' own controls, after the others
            if random_draws and len(selection.layers) == cfg.n_layers:  # methods with one per-layer count share it
                row = all_layer_control_name(selection.mask.sum(1).tolist())
                controls.setdefault(row, ([], random_per_layer_sets(selection, random_draws, seed)))[0].append(name)
        selections = [*methods.values(), *(s for _, draws in controls.values() for s in draws)]
        used = sorted(set().union(*(s.layers for s in selections)))  # the layers any map needs decomposed

        scores = {name: SegmentationScore() for name in methods}
        draw_scores = {row: [SegmentationScore() for _ in draws] for row, (_, draws) in controls.items()}
        scores.update({name: SegmentationScore() for name in BASELINES})
        predictions = []
        for start in range(0, len(dataset), batch_size):
            images, masks = dataset.load(start, min(len(dataset), start + batch_size))
            images, masks = checked_images(model, images), masks.cpu()
            attention, embedding = raw_attention(model, images)
            predicted = (embedding @ class_text.T).argmax(-1)
            head_maps = class_contrast_head_maps(model, images, class_text, predicted, used).cpu()

            def scored(selection: HeadSelection | HeadCounts) -> Tensor:
                token_map = torch.einsum("blht,lh->bt", head_maps, selection.weights[used].to(head_maps.dtype))
                return foreground_scores(upsample(split_tokens(token_map, cfg.grid_size)[1], cfg.image_size))

            for name, selection in methods.items():
                scores[name].update(scored(selection), masks)
            for row, (_, draws) in controls.items():
                for score, selection in zip(draw_scores[row], draws):
                    score.update(scored(selection), masks)
            pixels = pixel_values(model, images).cpu().float()
            scores[RAW_ATTENTION].update(foreground_scores(upsample(attention.cpu(), cfg.image_size)), masks)
            scores[CHROMA].update(foreground_scores(chroma_map(pixels)), masks)
            scores[CONTRAST].update(foreground_scores(contrast_map(pixels)), masks)
            scores[UNIFORM].update(torch.ones(masks.shape), masks)
            scores[ALL_BACKGROUND].update(torch.zeros(masks.shape), masks, predicted=torch.zeros_like(masks))
            predictions.append(predicted.cpu())

        rows = {name: [scores[name]] for name in methods}
        rows.update(draw_scores)
        rows.update({name: [scores[name]] for name in BASELINES})
        table, intervals = {}, {}
        for row, row_scores in rows.items():
            summaries = [s.summary() for s in row_scores]
            table[row] = {m: float(np.mean([summary[m] for summary in summaries])) for m in METRIC_NAMES}
            intervals[row] = image_intervals(row_scores, n_boot=n_boot, seed=seed)
        random_heads = {
            row: {"methods": names, "size": draws[0].size, "seed": seed, "draws": [s.labels for s in draws],
                  "per_draw": {m: [s.summary()[m] for s in draw_scores[row]] for m in METRIC_NAMES}}
            for row, (names, draws) in controls.items()
        }
        accuracy = None
        if classes is None and dataset.labels is not None:
            accuracy = float((torch.cat(predictions) == dataset.labels).float().mean())
        return SegmentationEvalResult(
            model.model_name or "?", dataset.description, len(dataset), class_names,
            {name: s.layers for name, s in methods.items()}, table, accuracy, intervals,
            [row for row in table if row not in methods], {name: s.labels for name, s in methods.items()},
            random_heads, 0.95, n_boot,
        )
