"""The ``segmentation_eval`` analysis: zero-shot segmentation from the decomposition (Gandelsman et al. §4).

For each image the predicted class c* is the argmax of the image embedding against the class text
embeddings. A patch's score is its direct contribution through every head of the chosen layers,
projected on ``class_text[c*] − mean over classes of class_text`` (the contrast with the other
classes; prefix/CLS tokens excluded). Maps are bilinearly upsampled, clipped below 0, min-max
normalised and thresholded at their mean (`metrics`).

Baselines in the same run: *raw attention* (the last layer's CLS → patch attention, averaged over
heads) and *uniform* (a constant map: AP = foreground share, thresholded to all foreground).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from clip_lens.analyses import JSONResult
from clip_lens.errors import InputError
from clip_lens_plugins.segmentation.analysis import checked_images, encode_texts
from clip_lens_plugins.segmentation.data import SegmentationData
from clip_lens_plugins.segmentation.heads import HeadSelection, LayerSpec, parse_heads, parse_layers
from clip_lens_plugins.segmentation.maps import head_token_maps, split_tokens, upsample
from clip_lens_plugins.segmentation.metrics import SegmentationScore, foreground_scores

if TYPE_CHECKING:
    from clip_lens import HookedCLIP

DEFAULT_LAYERS = {"decomposition (all layers)": "all", "decomposition (last layer)": [-1]}
RAW_ATTENTION, UNIFORM = "raw attention", "uniform"
METRICS = {"pixel_accuracy": "pixel acc", "mean_iou": "mIoU", "mean_ap": "mAP"}


def class_contrast_maps(
    model: "HookedCLIP",
    images: Float[Tensor, "batch 3 H W"],
    class_text: Float[Tensor, "classes d_embed"],
    predicted: Int[Tensor, "batch"],
    selection: HeadSelection,
) -> Float[Tensor, "batch layer token"]:
    """Per layer of ``selection``, each token's contribution on ``class_text[c*] − mean(class_text)``.

    Only the batch's predicted classes are decomposed (not every class), so memory grows with the
    batch, not with the number of classes.
    """
    present, which = predicted.unique(return_inverse=True)
    directions = class_text[present] - class_text.mean(0)
    per_class = head_token_maps(model, images, directions, selection, batch_size=len(images))  # [b, layer, k, token]
    return per_class[torch.arange(len(images)), :, which.to(per_class.device)]


def raw_attention(
    model: "HookedCLIP", images: Float[Tensor, "batch 3 H W"]
) -> tuple[Float[Tensor, "batch grid_h grid_w"], Float[Tensor, "batch d_embed"]]:
    """The last layer's CLS → patch attention averaged over heads, and the unit image embeddings."""
    hook = f"blocks.{model.cfg.n_layers - 1}.attn.hook_pattern"
    with torch.no_grad():
        (embedding, *_), cache = model.run_with_cache(images, names_filter=hook)
    cls_row = cache[hook][:, :, 0].mean(1)  # pattern [batch, head, query, key] → [batch, key]
    return split_tokens(cls_row, model.cfg.grid_size)[1], embedding


def _layer_configs(layers) -> dict[str, LayerSpec]:
    if layers is None:
        return dict(DEFAULT_LAYERS)
    if isinstance(layers, Mapping):
        if not layers:
            raise InputError("layers is an empty mapping; give {name: 'all' | [layer, ...]}.")
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


@dataclass
class SegmentationEvalResult(JSONResult):
    """Zero-shot segmentation metrics per method (fractions in [0, 1])."""

    model: str
    dataset: str
    n_images: int
    classes: list[str]
    layers: dict[str, list[int]]
    """Decomposition method → the layers whose heads it sums."""
    table: dict[str, dict[str, float]]
    """Method → ``pixel_accuracy``, ``mean_iou``, ``mean_ap``."""
    zero_shot_accuracy: Optional[float] = None
    """Share of images whose predicted class is the dataset's label (when the dataset has labels)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SegmentationEvalResult":
        return cls(**data)

    def to_markdown(self) -> str:
        """The method × metric table in percent."""
        lines = ["| method | " + " | ".join(METRICS.values()) + " |", "|---" * (len(METRICS) + 1) + "|"]
        for method, row in self.table.items():
            lines.append(f"| {method} | " + " | ".join(f"{100 * row[m]:.1f}" for m in METRICS) + " |")
        return "\n".join(lines)

    def plot(self):
        """Grouped bars: one group per metric, one bar per method."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 3), layout="constrained")
        ax = fig.subplots()
        width = 0.8 / len(self.table)
        for i, (method, row) in enumerate(self.table.items()):
            positions = [j + (i - (len(self.table) - 1) / 2) * width for j in range(len(METRICS))]
            ax.bar(positions, [100 * row[m] for m in METRICS], width, label=method)
        ax.set_xticks(range(len(METRICS)), list(METRICS.values()))
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.set_title(f"zero-shot segmentation, {self.model}, {self.n_images} images", fontsize=9)
        fig.legend(fontsize=7, loc="outside right upper")
        return fig


class SegmentationEval:
    """Zero-shot segmentation from per-patch decomposition maps, against raw attention and uniform maps."""

    name = "segmentation_eval"
    description = "Zero-shot segmentation (pixel acc, mIoU, mAP) of decomposition maps vs raw attention and uniform."
    parameters = {
        "dataset": "SegmentationData (shapes_world_segmentation(n) or folder_segmentation(path, model.preprocess))",
        "classes": "class prompts or unit class embeddings [classes, D] (default: the dataset's classes)",
        "layers": "'all', layer indices, or {method name: layers}; default all layers and the last layer",
        "batch_size": "images per forward pass (default 64)",
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
        layers: Union[LayerSpec, Mapping[str, LayerSpec], None] = None,
        batch_size: int = 64,
    ) -> SegmentationEvalResult:
        model, cfg = self.model, self.model.cfg
        if not isinstance(dataset, SegmentationData):
            raise InputError(f"dataset must be a SegmentationData (see shapes_world_segmentation / folder_segmentation), got {type(dataset).__name__}.")
        if len(dataset) == 0:
            raise InputError("the segmentation dataset is empty.")
        if classes is None and dataset.classes is None:
            raise InputError("this dataset has no classes: pass classes=[prompt, ...] (e.g. 'a photo of a dog').")
        class_names, class_text = _class_embeddings(model, dataset.classes if classes is None else classes)
        methods = {name: parse_layers(spec, cfg.n_layers) for name, spec in _layer_configs(layers).items()}
        used = sorted(set().union(*methods.values()))
        selection = parse_heads(used, cfg.n_layers, cfg.n_heads)  # every head of the layers any method sums
        scores = {name: SegmentationScore() for name in [*methods, RAW_ATTENTION, UNIFORM]}
        predictions = []
        for start in range(0, len(dataset), batch_size):
            images, masks = dataset.load(start, min(len(dataset), start + batch_size))
            images, masks = checked_images(model, images), masks.cpu()
            attention, embedding = raw_attention(model, images)
            predicted = (embedding @ class_text.T).argmax(-1)
            token_maps = class_contrast_maps(model, images, class_text, predicted, selection).cpu()
            for name, method_layers in methods.items():
                _, grid = split_tokens(token_maps[:, [used.index(l) for l in method_layers]].sum(1), cfg.grid_size)
                scores[name].update(foreground_scores(upsample(grid, cfg.image_size)), masks)
            scores[RAW_ATTENTION].update(foreground_scores(upsample(attention.cpu(), cfg.image_size)), masks)
            scores[UNIFORM].update(torch.ones(masks.shape), masks)
            predictions.append(predicted.cpu())
        accuracy = None
        if classes is None and dataset.labels is not None:
            accuracy = float((torch.cat(predictions) == dataset.labels).float().mean())
        return SegmentationEvalResult(
            model.model_name or "?", dataset.description, len(dataset), class_names, methods,
            {name: score.summary() for name, score in scores.items()}, accuracy,
        )
