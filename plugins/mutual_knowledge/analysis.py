"""The ``mutual_knowledge`` analysis: what the image and text encoders agree on for a prediction.

Per image (Sammani & Deligiannis, NeurIPS 2024):

1. the zero-shot prediction ŷ;
2. the prominent region (GDC) of the last layer's patch features, computed jointly over the images
   predicted as the same class (co-segmentation, up to ``group_size`` at a time, as the paper's
   per-class batches), split into ``n_parts`` visual concepts by PCA or K-means;
3. each concept region embedded by visual prompting and matched to descriptors by Sinkhorn
   optimal transport → the visual side D_v (≤ 3 descriptors per region);
4. the textual side D_ŷ: the ``u`` descriptors nearest to the predicted class's text embedding;
5. their mutual information (the paper's log count, or the proper ``bank`` variant), the MI
   dynamics (D_v removed in order of image similarity) and its AUC;
6. a control: the same with the textual concepts of a random other class.

Optionally in the same run: Deletion / Insertion / AccDrop / AccInc of the concept regions
against baselines (random regions of equal area, feature-map channels) and CorLoc of the GDC and
PCA foregrounds on tokens and keys against a random-box baseline.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from clip_lens.results import JSONResult
from clip_lens.errors import InputError
from clip_lens_plugins.mutual_knowledge import descriptors as desc
from clip_lens_plugins.mutual_knowledge import evaluation, information, regions
from clip_lens_plugins.mutual_knowledge.data import ConceptData

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from clip_lens import HookedCLIP

METHODS = ("pca", "kmeans")
FEATURES = ("tokens", "keys")


@dataclass
class ImageConcepts:
    """One image's concepts and mutual information (descriptor ids index ``result.descriptors``)."""

    id: str
    predicted: int
    label: Optional[int]
    parts: list[list[int]]
    """Patch grid ``[gh][gw]`` of concept ids (−1 outside the prominent region)."""
    region_descriptors: list[list[int]]
    """Per concept region, its assigned descriptors (Sinkhorn top-k); empty for an empty region."""
    visual: list[int]
    """D_v, ordered by similarity to the whole image (descending)."""
    textual: list[int]
    """D_ŷ, the predicted class's top-u descriptors."""
    mi: float
    curve: list[float]
    auc: float
    control_curve: list[float]
    """The MI dynamics with a random other class's textual concepts (the control)."""
    control_auc: float

    @property
    def shared(self) -> list[int]:
        textual = set(self.textual)
        return [d for d in self.visual if d in textual]


@dataclass
class MethodRun:
    """Everything one part method (PCA or K-means) produced."""

    images: list[ImageConcepts]
    mean_mi: float
    mean_auc: float
    mean_curve: list[float]
    control_mi: float
    control_auc: float
    control_curve: list[float]

    @classmethod
    def from_images(cls, images: list[ImageConcepts]) -> "MethodRun":
        def mean(values: list[float]) -> float:
            return float(torch.tensor(values, dtype=torch.float64).mean())

        return cls(images, mean([i.mi for i in images]), mean([i.auc for i in images]),
                   information.mean_curve([i.curve for i in images]),
                   mean([i.control_curve[0] for i in images]), mean([i.control_auc for i in images]),
                   information.mean_curve([i.control_curve for i in images]))


@dataclass
class MutualKnowledgeResult(JSONResult):
    """Per-image concepts and MI for every part method, dataset summaries and the evaluations."""

    parameters: dict[str, Any]
    classes: list[str]
    descriptors: list[str]
    accuracy: Optional[float]
    """Zero-shot accuracy on the labelled images (None without labels)."""
    methods: dict[str, MethodRun]
    evaluation: Optional[dict] = None
    """`ExplanationEval` as a dict."""
    corloc: Optional[dict[str, float]] = None
    """"GDC tokens/keys" (the paper's second vector), "GDC auto tokens/keys", "PCA tokens/keys",
    "random boxes" → CorLoc (foregrounds per image)."""
    seconds: float = 0.0
    images_per_second: float = 0.0

    # --- summaries ---------------------------------------------------------------------------
    @property
    def images(self) -> list[ImageConcepts]:
        return next(iter(self.methods.values())).images

    @property
    def mean_mi(self) -> float:
        """MI averaged over images and part methods (the paper's across-model fit averages PCA and K-means)."""
        return sum(m.mean_mi for m in self.methods.values()) / len(self.methods)

    @property
    def mean_auc(self) -> float:
        return sum(m.mean_auc for m in self.methods.values()) / len(self.methods)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MutualKnowledgeResult":
        methods = {
            name: MethodRun(**{**run, "images": [ImageConcepts(**i) for i in run["images"]]})
            for name, run in data["methods"].items()
        }
        return cls(**{**data, "methods": methods})

    def to_markdown(self) -> str:
        lines = [f"| part method | MI ({self.parameters['mi']}) | AUC | MI, random class | AUC, random class |", "|---|---|---|---|---|"]
        for name, run in self.methods.items():
            lines.append(f"| {name} | {run.mean_mi:.3f} | {run.mean_auc:.3f} | {run.control_mi:.3f} | {run.control_auc:.3f} |")
        head = [f"{len(self.images)} images, model {self.parameters.get('model')}"
                + (f", zero-shot accuracy {100 * self.accuracy:.2f} %" if self.accuracy is not None else "")
                + f", {self.images_per_second:.1f} images/s", ""]
        tail = []
        if self.evaluation is not None:
            tail += ["", evaluation.ExplanationEval.from_dict(self.evaluation).to_markdown()]
        if self.corloc is not None:
            tail += ["", "| foreground | CorLoc |", "|---|---|", *(f"| {k} | {v:.3f} |" for k, v in self.corloc.items())]
        return "\n".join(head + lines + tail)

    # --- plots -------------------------------------------------------------------------------
    def plot(self) -> "Figure":
        """Mean MI dynamics per part method, with the random-class control (dashed)."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.add_subplot()
        for name, run in self.methods.items():
            line, = ax.plot(run.mean_curve, marker="o", label=f"{name} (AUC {run.mean_auc:.2f})")
            ax.plot(run.control_curve, linestyle="--", color=line.get_color(), label=f"{name}, random class (AUC {run.control_auc:.2f})")
        ax.set_xlabel("visual concepts removed (most image-like first)")
        ax.set_ylabel(f"MI ({self.parameters['mi']})")
        ax.set_title("MI dynamics (mean over images)")
        ax.legend(fontsize=8)
        return fig

    def plot_concepts(self, images: Float[Tensor, "n 3 H W"], index: Sequence[int] = (0, 1, 2, 3), method: Optional[str] = None) -> "Figure":
        """Images with their concept regions coloured and each region's descriptors written under it."""
        from clip_lens_plugins.mutual_knowledge.plots import concept_figure

        run = self.methods[method or next(iter(self.methods))]
        return concept_figure(images, [run.images[i] for i in index], self.descriptors, self.classes)

    def plot_venn(self, index: int = 0, method: Optional[str] = None) -> "Figure":
        """Venn diagram of D_v and D_ŷ for one image, the shared descriptors written in the overlap."""
        from clip_lens_plugins.mutual_knowledge.plots import venn_figure

        run = self.methods[method or next(iter(self.methods))]
        return venn_figure(run.images[index], self.descriptors, self.classes, top=self.parameters.get("venn_top", 15))


class MutualKnowledge:
    """Mutual knowledge between the visual and textual concepts of zero-shot predictions."""

    name = "mutual_knowledge"
    description = "Visual vs textual concepts of each prediction: mutual information, MI dynamics/AUC, Deletion/Insertion, CorLoc."
    parameters = {
        "data": "ConceptData (shapes_world_data(n) or folder_data(path, model.preprocess))",
        "descriptors": "'shapes', a JSON file {class: [descriptors]}, a dict or a DescriptorBank",
        "methods": "part methods, any of 'pca', 'kmeans' (default both)",
        "features": "'tokens' (last block output) or 'keys' (last layer's keys) for GDC and the parts",
        "gdc_vector": "singular vector of the prominent region: 1 (the paper's) or 'auto' (the first when it splits the patches)",
        "n_parts": "visual concepts per group (default 5; a group with fewer foreground patches gets one per patch)",
        "u": "textual concepts: the predicted class's top-u descriptors (default 50)",
        "mi": "'paper' (log count of shared concepts, as the paper's code) or 'bank' (MI of bank indicators)",
        "evaluate": "also run Deletion/Insertion/AccDrop/AccInc (default True)",
        "blur_kernel": "Deletion's Gaussian kernel (default 11 px at 224, scaled to the image size)",
        "corloc": "also measure CorLoc when the data has boxes (default True)",
    }
    needs = ("model",)

    def __init__(self, model: "HookedCLIP"):
        if model is None:
            raise InputError("mutual_knowledge needs a model: analyses.get('mutual_knowledge')(HookedCLIP.from_pretrained(...)).")
        self.model = model

    def run(
        self,
        data: ConceptData,
        descriptors: Union[str, dict, "desc.DescriptorBank"] = "shapes",
        methods: Sequence[str] = METHODS,
        features: str = "tokens",
        gdc_vector: Union[int, str] = "auto",
        n_parts: int = 5,
        u: int = 50,
        mi: str = "paper",
        group_size: int = 50,
        top_k: int = 500,
        margin: float = 0.02,
        per_region: int = 3,
        prompts: Sequence[str] = ("ellipse", "grey", "blur"),
        evaluate: bool = True,
        blur_kernel: Optional[int] = None,
        corloc: bool = True,
        batch_size: int = 256,
        seed: int = 0,
        progress: bool = True,
    ) -> MutualKnowledgeResult:
        started = time.perf_counter()
        model = self.model
        methods = _check_choices(methods, METHODS, "methods")
        if features not in regions.feature_sources(model):
            tower = "" if features not in FEATURES else f" for a {model.visual.family} image tower"
            raise InputError(f"features must be one of {', '.join(regions.feature_sources(model))}{tower}, got '{features}'.")
        if mi not in information.MI_VARIANTS:
            raise InputError(f"mi must be one of {', '.join(information.MI_VARIANTS)}, got '{mi}'.")
        if not isinstance(data, ConceptData):
            raise InputError(f"data must be a ConceptData (shapes_world_data(n) or folder_data(path, preprocess)), got {type(data).__name__}.")
        for label, value in (("n_parts", n_parts), ("u", u), ("group_size", group_size), ("per_region", per_region)):
            if value < 1:
                raise InputError(f"{label} must be at least 1, got {value}.")
        bank = (descriptors if isinstance(descriptors, desc.DescriptorBank) else desc.load_descriptors(descriptors)).for_classes(data.classes)
        with torch.no_grad():
            desc_emb = desc.encode_descriptors(model, bank)
            class_emb = desc.class_embeddings(model, data.classes, data.class_templates)
            predicted, image_emb = _predict(model, data, class_emb, batch_size, progress)
        generator = torch.Generator().manual_seed(seed)
        control = (predicted + torch.randint(1, max(2, len(data.classes)), predicted.shape, generator=generator)) % len(data.classes)
        textual = desc.textual_concepts(class_emb, desc_emb, predicted, u)
        control_textual = desc.textual_concepts(class_emb, desc_emb, control, u)
        groups = _groups(predicted, group_size)
        per_method: dict[str, list[Optional[ImageConcepts]]] = {m: [None] * len(data) for m in methods}
        eval_regions: dict[str, list[Tensor]] = {f"concepts ({m})": [] for m in methods}
        eval_order: list[Tensor] = []
        bar = tqdm(total=len(data), desc="mutual knowledge", unit="img", disable=not progress)
        for group in groups:
            with torch.no_grad():
                images = model.check_images(data.load(group.tolist()))
                feats = regions.patch_features(model, images, features)
                grid = regions.grid_size(model)
                foreground = regions.prominent_region(feats, grid, joint=True, vector=gdc_vector)
                # a small group (one image of a rarely predicted class) can have fewer foreground
                # patches than n_parts: it gets one part per patch, the other regions stay empty
                group_parts = max(1, min(n_parts, int(foreground.sum())))
                for method in methods:
                    parts = regions.concept_parts(feats, foreground, group_parts, method=method, seed=seed)
                    masks = regions.parts_to_masks(parts, n_parts, tuple(images.shape[-2:]))
                    region_emb, valid = regions.region_embeddings(model, images, masks, kinds=tuple(prompts), batch_size=batch_size)
                    visual, per_region_ids = desc.visual_concepts(
                        region_emb, valid, image_emb[group], desc_emb, top_k=top_k, margin=margin, per_region=per_region,
                        return_regions=True)
                    for j, index in enumerate(group.tolist()):
                        per_method[method][index] = _image_record(
                            data, index, int(predicted[index]), parts[j], per_region_ids[j], visual[j],
                            textual[index], control_textual[index], image_emb[index], desc_emb, mi, len(bank.descriptors))
                    if evaluate:
                        order = _concept_order(region_emb, valid, image_emb[group], desc_emb, per_region_ids)
                        eval_regions[f"concepts ({method})"].append(
                            torch.stack([masks[j, order[j]] for j in range(len(group))]).cpu())
            eval_order.append(group)
            bar.update(len(group))
        bar.close()
        order = torch.cat(eval_order)
        result_eval = None
        if evaluate:
            result_eval = _evaluate(model, data, order, eval_regions, class_emb, predicted, seed, n_parts, batch_size,
                                    blur_kernel, progress).to_dict()
        result_corloc = _corloc(model, data, seed, batch_size, progress) if corloc and data.boxes is not None else None
        labelled = data.labels
        accuracy = None if labelled is None else float((predicted == labelled).float().mean())
        seconds = time.perf_counter() - started
        parameters = {
            "model": getattr(model, "model_name", None), "pretrained": _describe(getattr(model, "pretrained", None)),
            "data": data.description, "descriptors": bank.name, "features": features, "gdc_vector": gdc_vector, "n_parts": n_parts, "u": u, "mi": mi,
            "group_size": group_size, "top_k": top_k, "margin": margin, "per_region": per_region, "prompts": list(prompts),
            "seed": seed, "blur_kernel": blur_kernel, "class_templates": list(data.class_templates),
        }
        return MutualKnowledgeResult(
            parameters, list(data.classes), list(bank.descriptors), accuracy,
            {m: MethodRun.from_images(per_method[m]) for m in methods}, result_eval, result_corloc,
            seconds, len(data) / seconds,
        )


def _describe(value: Any) -> Optional[str]:
    return None if value is None else str(value)


def _check_choices(values: Sequence[str], allowed: Sequence[str], label: str) -> tuple[str, ...]:
    values = (values,) if isinstance(values, str) else tuple(values)
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise InputError(f"{label} must be a non-empty subset of {', '.join(allowed)}, got {', '.join(values) or 'nothing'}.")
    return tuple(dict.fromkeys(values))


def _predict(model, data: ConceptData, class_emb: Tensor, batch_size: int,
             progress: bool = False) -> tuple[Int[Tensor, "n"], Float[Tensor, "n d"]]:
    """Zero-shot predictions and unit image embeddings of every image."""
    predicted, embeddings = [], []
    for start in tqdm(range(0, len(data), batch_size), desc="zero-shot predictions", unit="batch", disable=not progress, leave=False):
        images = model.check_images(data.load(range(start, min(len(data), start + batch_size))))
        emb = model.encode_image(images, normalize=True).float().cpu()
        embeddings.append(emb)
        predicted.append((emb @ class_emb.T).argmax(-1))
    return torch.cat(predicted), torch.cat(embeddings)


def _groups(predicted: Int[Tensor, "n"], group_size: int) -> list[Int[Tensor, "g"]]:
    """Images predicted as the same class, in near-equal chunks of at most ``group_size``."""
    groups = []
    for cls in predicted.unique().tolist():
        members = (predicted == cls).nonzero().squeeze(1)
        n_chunks = -(-len(members) // group_size)
        groups.extend(members.tensor_split(n_chunks))
    return groups


def _image_record(data, index, predicted, parts, region_ids, visual, textual, control_textual, image_emb, desc_emb, mi, n_bank):
    visual = information.order_by_image(visual, image_emb, desc_emb)
    textual = textual.tolist()
    curve = information.mi_dynamics(visual, textual, variant=mi, n_bank=n_bank)
    control_curve = information.mi_dynamics(visual, control_textual.tolist(), variant=mi, n_bank=n_bank)
    label = None if data.labels is None else int(data.labels[index])
    return ImageConcepts(
        data.ids[index], predicted, label, parts.tolist(), [list(r) for r in region_ids], list(visual), textual,
        curve[0], curve, information.auc(curve), control_curve, information.auc(control_curve),
    )


def _concept_order(region_emb, valid, image_emb, desc_emb, region_ids) -> list[list[int]]:
    """Per image, its concept regions ordered by sim(image, region) × sim(image, region's first descriptor)
    (the paper's App. E order); empty regions last."""
    orders = []
    for j in range(len(region_emb)):
        keys = []
        for r in range(region_emb.shape[1]):
            if not valid[j, r] or not region_ids[j][r]:
                keys.append(float("-inf"))
                continue
            keys.append(float(region_emb[j, r] @ image_emb[j]) * float(desc_emb[region_ids[j][r][0]] @ image_emb[j]))
        orders.append(sorted(range(len(keys)), key=lambda r: -keys[r]))
    return orders


def _evaluate(model, data, order, eval_regions, class_emb, predicted, seed, n_parts, batch_size, blur_kernel, progress=False):
    """Deletion / Insertion / AccDrop / AccInc of the concept regions and the baselines."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    methods = {name: torch.cat(chunks)[inverse] for name, chunks in eval_regions.items()}
    reference = next(iter(methods.values()))
    generator = torch.Generator().manual_seed(seed + 1)
    images = torch.cat([model.check_images(data.load(range(s, min(len(data), s + batch_size))))
                        for s in range(0, len(data), batch_size)])
    methods["random regions"] = evaluation.random_regions(reference, generator, grid_size=regions.grid_size(model))
    methods["feature maps"] = evaluation.feature_map_regions(model, images, n_regions=n_parts)
    return evaluation.evaluate_explanations(model, images, methods, class_emb, predicted, data.labels, blur_kernel=blur_kernel,
                                            progress=progress)


def _corloc(model, data: ConceptData, seed: int, batch_size: int, progress: bool = False) -> dict[str, float]:
    """CorLoc of GDC (paper's vector and auto) and PCA foregrounds on tokens and keys (per image) and of random boxes."""
    generator = torch.Generator().manual_seed(seed + 2)
    boxes: dict[str, list[Tensor]] = {}
    size = None
    for start in tqdm(range(0, len(data), batch_size), desc="CorLoc", unit="batch", disable=not progress, leave=False):
        images = model.check_images(data.load(range(start, min(len(data), start + batch_size))))
        size = images.shape[-2:]
        grid = regions.grid_size(model)
        for features in regions.feature_sources(model):
            feats = regions.patch_features(model, images, features)
            for name, vector in (("GDC", 1), ("GDC auto", "auto"), ("PCA", None)):
                found = regions.pca_foreground(feats, grid) if vector is None else regions.prominent_region(feats, grid, vector=vector)
                mask = regions.upsample_mask(found, size)
                boxes.setdefault(f"{name} {features}", []).append(regions.mask_box(mask))
    table = {name: regions.corloc(torch.cat(found), data.boxes) for name, found in boxes.items()}
    gdc = torch.cat(boxes["GDC tokens"])
    table["random boxes"] = regions.corloc(regions.random_boxes_like(gdc, tuple(size), generator), data.boxes)
    return table
