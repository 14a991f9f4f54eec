"""Deletion / insertion evaluation of concept explanations (Sammani & Deligiannis 2024, App. E).

An explanation of an image is a list of ``S`` ordered concept regions (most important first; they
may overlap or be empty). Two perturbation curves of ``S + 1`` points each measure how much the
classifier relies on them:

* **Deletion** (positive perturbation): at step ``s`` the union of regions ``1..s`` is replaced by a
  Gaussian-blurred copy of the image (blur, not zeros, so the input stays close to the data). Step 0
  is the unperturbed image. A good explanation makes the score fall fast: *lower* AUC is better.
* **Insertion**: start from a heavily blurred image and restore the union of regions ``1..s`` from the
  original. If the regions cover the whole image the last point is the original image. A good
  explanation makes the score rise fast: *higher* AUC is better.

At every point we track the **score** = softmax probability (over the given classes, logits
``exp(logit_scale) · cosine``) of the class predicted on the *original* image, and, when labels are
given, whether the argmax on the perturbed image equals the label. The paper tracks the raw CLIP
similarity ×2.5 instead of a probability; its blur kernel and area normalisation are not stated.

Areas (all over ``x = step / S`` in ``[0, 1]``, trapezoid rule, so every value lies in ``[0, 1]``;
this is not the scale of the paper's Table 1, whose normalisation is unknown):

* **Deletion / Insertion AUC**: mean over images of the per-image score AUC.
* **AccDrop**: area under the *accuracy curve of deletion* (accuracy over images at each step, as
  the most important regions are removed) — Chefer et al.'s positive perturbation test with
  accuracy instead of the score. Lower = better explanation.
* **AccInc**: area under the accuracy curve of insertion. Higher = better explanation.

Blur: `gaussian_blur`, a separable Gaussian with
OpenCV's kernel → sigma rule ``σ = 0.3·((k − 1)/2 − 1) + 0.8`` and reflect padding (OpenCV's
default border). Because the blur is linear with weights summing to one and the padding is per
channel, blurring a normalised image equals normalising the blurred raw image, so images are
blurred in model-input space. Default kernel: 11 at 224 px (the paper's 11×11) scaled to the
image's shorter side, rounded to an odd size ≥ 3 (``regions.default_blur_kernel``: 3 at 64 px,
σ 0.8 — weak on the toy's ~13-px shapes; pass ``blur_kernel=7`` for a clearer signal there).
Default insertion kernel: the odd size ≥ 4× the deletion kernel (13 at 64 px, 45 at 224 px) —
one pass of a wide kernel, not repeated passes.

Every perturbed image of every step is scored in batches of at most ``batch_size`` images that are
built on the fly from (image, step) indices: besides one blurred copy of the images and the
``[B, S + 1, H, W]`` bool unions, memory stays ``O(batch_size)`` images. Points whose
image *is* the original (deletion step 0, or an insertion step whose regions cover everything)
reuse the original image's scores instead of another forward pass, so they are exactly equal to
`class_scores` of the original images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Union

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from clip_lens.results import JSONResult
from clip_lens.errors import InputError
from clip_lens_plugins.mutual_knowledge.regions import default_blur_kernel, gaussian_blur

if TYPE_CHECKING:
    from clip_lens import HookedCLIP

MODES = ("deletion", "insertion")
INSERTION_FACTOR = 4
"""Default insertion kernel = the odd size ≥ this × the deletion kernel."""
MAX_BATCH = 512
COLUMNS = {"deletion": "Deletion ↓", "insertion": "Insertion ↑", "acc_drop": "AccDrop ↓", "acc_inc": "AccInc ↑"}


# --- blur ---------------------------------------------------------------------------------------
def default_insertion_kernel(blur_kernel: int) -> int:
    """The insertion kernel: the odd size ≥ ``INSERTION_FACTOR`` × the deletion kernel."""
    kernel = INSERTION_FACTOR * blur_kernel
    return kernel + 1 - kernel % 2


def _checked_kernel(kernel, image_size: tuple[int, int], name: str) -> int:
    limit = 2 * min(image_size) - 1  # reflect padding needs kernel // 2 < side
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 3 or kernel % 2 == 0 or kernel > limit:
        raise InputError(
            f"{name} must be an odd integer kernel size in [3, {limit}] for {image_size[0]}x{image_size[1]} "
            f"images, got {kernel!r}; leave it None for the default."
        )
    return kernel


# --- validation ------------------------------------------------------------------------------
def _checked_images(model: "HookedCLIP", images) -> Float[Tensor, "batch 3 H W"]:
    images = model.check_images(images)  # names the expected size on a mismatch
    if len(images) == 0:
        raise InputError("images is empty: give at least one preprocessed image [batch, 3, H, W].")
    return images


def _unit_classes(model: "HookedCLIP", class_emb) -> Float[Tensor, "classes d_embed"]:
    d_embed = model.cfg.d_embed
    if not isinstance(class_emb, Tensor) or not class_emb.is_floating_point() or class_emb.ndim != 2:
        found = tuple(class_emb.shape) if isinstance(class_emb, Tensor) else type(class_emb).__name__
        raise InputError(
            f"class_emb must be a float tensor [classes, {d_embed}], got {found}; "
            "use model.encode_text(model.to_tokens(prompts), normalize=True)."
        )
    if class_emb.shape[1] != d_embed or len(class_emb) < 2:
        raise InputError(f"class_emb must be [classes ≥ 2, {d_embed}], got {tuple(class_emb.shape)}.")
    if not torch.isfinite(class_emb).all() or (class_emb.norm(dim=-1) == 0).any():
        raise InputError("class_emb has NaN/inf values or all-zero rows.")
    return F.normalize(class_emb.to(device=model.device, dtype=model.dtype), dim=-1)


def _checked_regions(regions, images: Tensor, name: str = "regions") -> Bool[Tensor, "batch steps H W"]:
    batch, _, height, width = images.shape
    expected = f"[{batch}, steps, {height}, {width}]"
    if not isinstance(regions, Tensor):
        raise InputError(f"{name} must be a bool tensor {expected}, got {type(regions).__name__}.")
    if regions.dtype != torch.bool:
        raise InputError(f"{name} must be boolean masks {expected}, got dtype {regions.dtype}; use {name} > 0.5.")
    if regions.ndim != 4 or regions.shape[0] != batch or tuple(regions.shape[-2:]) != (height, width):
        raise InputError(f"{name} must have shape {expected} (one ordered list of masks per image), got {tuple(regions.shape)}.")
    if regions.shape[1] == 0:
        raise InputError(f"{name} has 0 steps (shape {tuple(regions.shape)}); give at least one concept region per image.")
    return regions.to(images.device)


def _checked_classes(values, batch: int, n_classes: int, name: str) -> Int[Tensor, "batch"]:
    if not isinstance(values, Tensor) or values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        found = values.dtype if isinstance(values, Tensor) else type(values).__name__
        raise InputError(f"{name} must be an integer tensor [{batch}] of class indices, got {found}.")
    if values.ndim != 1 or len(values) != batch:
        raise InputError(f"{name} must have one class index per image: shape [{batch}], got {tuple(values.shape)}.")
    if batch and (int(values.min()) < 0 or int(values.max()) >= n_classes):
        raise InputError(f"{name} must lie in [0, {n_classes}) (indices into class_emb), got [{int(values.min())}, {int(values.max())}].")
    return values.long()


def _checked_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH:
        raise InputError(f"batch_size must be an integer in [1, {MAX_BATCH}], got {batch_size!r}.")
    return batch_size


# --- scoring ---------------------------------------------------------------------------------
def _probabilities(
    model: "HookedCLIP",
    n: int,
    build: Callable[[int, int], Float[Tensor, "chunk 3 H W"]],
    unit_classes: Float[Tensor, "classes d_embed"],
    batch_size: int,
) -> Float[Tensor, "n classes"]:
    """Softmax class probabilities of ``n`` images produced chunk by chunk by ``build(start, stop)``."""
    scale = model.logit_scale.exp()
    out = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            embedding = model.encode_image(build(start, min(n, start + batch_size)), normalize=True)
            out.append((scale * embedding @ unit_classes.T).softmax(-1))
    return torch.cat(out) if out else unit_classes.new_zeros(0, len(unit_classes))


def class_scores(
    model: "HookedCLIP",
    images: Float[Tensor, "batch 3 H W"],
    class_emb: Float[Tensor, "classes d_embed"],
    batch_size: int = MAX_BATCH,
) -> Float[Tensor, "batch classes"]:
    """Softmax probabilities over the classes of ``exp(logit_scale) · cos(image, class)``.

    ``class_emb`` need not be normalised (it is, here). Returned on the model's device.
    """
    images = _checked_images(model, images)
    unit = _unit_classes(model, class_emb)
    batch_size = _checked_batch_size(batch_size)
    return _probabilities(model, len(images), lambda a, b: images[a:b], unit, batch_size)


# --- curves ----------------------------------------------------------------------------------
def _trapezoid(values: Float[Tensor, "*batch points"]) -> Float[Tensor, "*batch"]:
    """Area under ``values`` over ``x = step / S`` in [0, 1] (trapezoid rule)."""
    return torch.trapezoid(values.float(), dx=1.0 / (values.shape[-1] - 1), dim=-1)


@dataclass
class CurveSet:
    """Deletion or insertion curves of a batch of explanations (CPU tensors)."""

    score: Float[Tensor, "batch points"]
    """Probability of the class predicted on the original image, at steps 0..S (points = S + 1)."""
    correct: Optional[Bool[Tensor, "batch points"]]
    """argmax on the perturbed image == label, at steps 0..S; None without labels."""
    mode: str
    """``"deletion"`` or ``"insertion"``."""
    blur_kernel: Optional[int] = None
    """The Gaussian kernel size used (deletion kernel, or the heavy insertion kernel)."""

    @property
    def steps(self) -> int:
        """S, the number of concept regions (points − 1)."""
        return self.score.shape[1] - 1

    @property
    def score_auc(self) -> Float[Tensor, "batch"]:
        """Per-image area under the score curve over ``x = step / S`` in [0, 1] (trapezoid)."""
        return _trapezoid(self.score)

    @property
    def mean_score(self) -> Float[Tensor, "points"]:
        """Score curve averaged over images."""
        return self.score.mean(0)

    @property
    def accuracy_curve(self) -> Optional[Float[Tensor, "points"]]:
        """Share of images classified as their label at each step (None without labels)."""
        return None if self.correct is None else self.correct.float().mean(0)

    @property
    def accuracy_auc(self) -> Optional[float]:
        """Area under `accuracy_curve` (AccDrop for deletion, AccInc for insertion)."""
        curve = self.accuracy_curve
        return None if curve is None else float(_trapezoid(curve))

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "blur_kernel": self.blur_kernel,
            "score": self.score.tolist(),
            "correct": None if self.correct is None else self.correct.tolist(),
        }


def _cumulative(regions: Bool[Tensor, "batch steps H W"]) -> Bool[Tensor, "batch points H W"]:
    """Union of regions ``1..s`` for s = 0..S (step 0 = nothing)."""
    unions = [torch.zeros_like(regions[:, 0])]
    for s in range(regions.shape[1]):
        unions.append(unions[-1] | regions[:, s])
    return torch.stack(unions, 1)


def _curves(
    model: "HookedCLIP",
    images: Float[Tensor, "batch 3 H W"],
    regions: Bool[Tensor, "batch steps H W"],
    unit_classes: Float[Tensor, "classes d_embed"],
    predicted: Int[Tensor, "batch"],
    labels: Optional[Int[Tensor, "batch"]],
    mode: str,
    kernel: int,
    base: Float[Tensor, "batch classes"],
    batch_size: int,
) -> CurveSet:
    """Curves from checked inputs; ``base`` = the original images' probabilities."""
    batch, points = len(images), regions.shape[1] + 1
    blurred = gaussian_blur(images, kernel)
    unions = _cumulative(regions)  # [batch, points, H, W]
    if mode == "deletion":  # inside the union: blurred; outside: original
        inside, outside = blurred, images
        original = ~unions.flatten(2).any(-1)  # nothing removed yet
    else:  # inside the union: original; outside: heavily blurred
        inside, outside = images, blurred
        original = unions.flatten(2).all(-1)  # everything restored
    todo = (~original).flatten().nonzero()[:, 0]  # flat (image, step) indices that need a forward pass

    def build(start: int, stop: int) -> Float[Tensor, "chunk 3 H W"]:
        index = todo[start:stop]
        image, step = index // points, index % points
        return torch.where(unions[image, step][:, None], inside[image], outside[image])

    probabilities = base[:, None].expand(batch, points, -1).clone()  # [batch, points, classes]
    if len(todo):
        flat = probabilities.view(batch * points, -1)
        flat[todo] = _probabilities(model, len(todo), build, unit_classes, batch_size)
    score = probabilities.gather(-1, predicted.to(probabilities.device)[:, None, None].expand(-1, points, 1))[..., 0]
    correct = None
    if labels is not None:
        correct = (probabilities.argmax(-1) == labels.to(probabilities.device)[:, None]).cpu()
    return CurveSet(score.float().cpu(), correct, mode, kernel)


def _prepare(model, images, class_emb, predicted, labels, batch_size, blur_kernel, insertion_blur_kernel):
    images = _checked_images(model, images)
    unit = _unit_classes(model, class_emb)
    batch_size = _checked_batch_size(batch_size)
    predicted = _checked_classes(predicted, len(images), len(unit), "predicted")
    if labels is not None:
        labels = _checked_classes(labels, len(images), len(unit), "labels")
    size = tuple(images.shape[-2:])
    deletion = default_blur_kernel(min(size)) if blur_kernel is None else _checked_kernel(blur_kernel, size, "blur_kernel")
    insertion = (
        min(default_insertion_kernel(deletion), 2 * min(size) - 1) if insertion_blur_kernel is None
        else _checked_kernel(insertion_blur_kernel, size, "insertion_blur_kernel")
    )
    return images, unit, batch_size, predicted, labels, {"deletion": deletion, "insertion": insertion}


def _checked_mode(mode) -> str:
    if mode not in MODES:
        raise InputError(f"mode must be 'deletion' or 'insertion', got {mode!r}.")
    return mode


def explanation_curves(
    model: "HookedCLIP",
    images: Float[Tensor, "batch 3 H W"],
    regions: Bool[Tensor, "batch steps H W"],
    class_emb: Float[Tensor, "classes d_embed"],
    predicted: Int[Tensor, "batch"],
    labels: Optional[Int[Tensor, "batch"]] = None,
    mode: str = "deletion",
    blur_kernel: Optional[int] = None,
    insertion_blur_kernel: Optional[int] = None,
    batch_size: int = MAX_BATCH,
) -> CurveSet:
    """Deletion or insertion curves (``S + 1`` points) of ordered concept regions.

    Args:
        images: preprocessed images at the model's input size.
        regions: ``regions[b, s]`` = the s-th most important concept region of image b; steps use
            the union of regions ``1..s`` (overlaps and empty regions are fine).
        class_emb: class text embeddings (normalised here).
        predicted: the class predicted on each *original* image; its probability is the score.
        labels: true classes, for the accuracy curve (optional).
        mode: ``"deletion"`` (blur regions away, kernel ``blur_kernel``) or ``"insertion"``
            (restore regions into an image blurred with ``insertion_blur_kernel``).
        blur_kernel / insertion_blur_kernel: odd Gaussian kernel sizes; None = the module defaults
            (3 and 13 at 64 px, 11 and 45 at 224 px).
        batch_size: images per forward pass (≤ 512).
    """
    mode = _checked_mode(mode)
    images, unit, batch_size, predicted, labels, kernels = _prepare(
        model, images, class_emb, predicted, labels, batch_size, blur_kernel, insertion_blur_kernel
    )
    regions = _checked_regions(regions, images)
    base = _probabilities(model, len(images), lambda a, b: images[a:b], unit, batch_size)
    return _curves(model, images, regions, unit, predicted, labels, mode, kernels[mode], base, batch_size)


# --- comparison table ------------------------------------------------------------------------
@dataclass
class ExplanationEval(JSONResult):
    """Deletion / Insertion / AccDrop / AccInc per explanation method, with mean curves."""

    n_images: int
    table: dict[str, dict[str, Optional[float]]]
    """Method → ``deletion`` (mean score AUC, ↓), ``insertion`` (↑), ``acc_drop`` (↓), ``acc_inc`` (↑);
    the accuracy entries are None without labels. All are areas over x ∈ [0, 1]."""
    curves: dict[str, dict[str, Optional[list[float]]]]
    """Method → mean ``deletion`` / ``insertion`` score curves and ``deletion_accuracy`` /
    ``insertion_accuracy`` curves (S + 1 points; accuracy None without labels)."""
    blur_kernel: int
    insertion_blur_kernel: int
    original_accuracy: Optional[float] = None
    """Accuracy on the unperturbed images (None without labels)."""
    notes: list[str] = field(default_factory=lambda: [
        "score = softmax probability of the class predicted on the original image",
        "AUC by the trapezoid rule over x = step / S in [0, 1]",
        "AccDrop = area under the deletion accuracy curve (lower better); AccInc = area under the insertion accuracy curve (higher better)",
    ])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ExplanationEval":
        return cls(**data)

    def to_markdown(self) -> str:
        """The method × metric table (areas in [0, 1], 3 decimals; '–' where labels were missing)."""
        lines = ["| method | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for method, row in self.table.items():
            cells = ["–" if row[key] is None else f"{row[key]:.3f}" for key in COLUMNS]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self):
        """Mean score curves (deletion, insertion) and accuracy curves per method; a matplotlib Figure."""
        from matplotlib.figure import Figure

        panels = [("deletion", "Deletion: p(predicted)"), ("insertion", "Insertion: p(predicted)")]
        if any(c["deletion_accuracy"] is not None for c in self.curves.values()):
            panels += [("deletion_accuracy", "Deletion: accuracy"), ("insertion_accuracy", "Insertion: accuracy")]
        fig = Figure(figsize=(3.2 * len(panels), 3), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (key, title) in zip(axes, panels):
            for method, curves in self.curves.items():
                curve = curves[key]
                if curve is None:
                    continue
                steps = len(curve) - 1
                ax.plot([s / steps for s in range(steps + 1)], curve, marker="o", markersize=3, label=method)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step / S", fontsize=8)
            ax.set_ylim(0, 1.02)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"explanation deletion / insertion, {self.n_images} images", fontsize=9)
        return fig


def evaluate_explanations(
    model: "HookedCLIP",
    images: Float[Tensor, "batch 3 H W"],
    regions_by_method: Mapping[str, Bool[Tensor, "batch steps H W"]],
    class_emb: Float[Tensor, "classes d_embed"],
    predicted: Int[Tensor, "batch"],
    labels: Optional[Int[Tensor, "batch"]] = None,
    blur_kernel: Optional[int] = None,
    insertion_blur_kernel: Optional[int] = None,
    batch_size: int = MAX_BATCH,
    progress: bool = False,
) -> ExplanationEval:
    """Deletion and insertion of every method's regions (methods may have different step counts).

    The original images are scored once and shared by all methods and both modes. ``progress``: a
    tqdm bar on stderr, advanced per curve (method × deletion/insertion).
    """
    from tqdm.auto import tqdm

    if not isinstance(regions_by_method, Mapping) or not regions_by_method:
        raise InputError("regions_by_method must be a non-empty dict {method name: Bool[batch, steps, H, W]}.")
    images, unit, batch_size, predicted, labels, kernels = _prepare(
        model, images, class_emb, predicted, labels, batch_size, blur_kernel, insertion_blur_kernel
    )
    checked = {str(name): _checked_regions(r, images, f"regions_by_method[{name!r}]") for name, r in regions_by_method.items()}
    bar = tqdm(total=1 + len(MODES) * len(checked), desc="explanations: deletion/insertion", unit="curve", disable=not progress)
    base = _probabilities(model, len(images), lambda a, b: images[a:b], unit, batch_size)
    bar.update(1)
    table, curves = {}, {}
    for name, regions in checked.items():
        found = []
        for mode in MODES:
            bar.set_postfix_str(f"{name}, {mode}")
            found.append(_curves(model, images, regions, unit, predicted, labels, mode, kernels[mode], base, batch_size))
            bar.update(1)
        deletion, insertion = found
        table[name] = {
            "deletion": float(deletion.score_auc.mean()),
            "insertion": float(insertion.score_auc.mean()),
            "acc_drop": deletion.accuracy_auc,
            "acc_inc": insertion.accuracy_auc,
        }
        accuracy = {mode: c.accuracy_curve for mode, c in zip(MODES, (deletion, insertion))}
        curves[name] = {
            "deletion": deletion.mean_score.tolist(),
            "insertion": insertion.mean_score.tolist(),
            "deletion_accuracy": None if accuracy["deletion"] is None else accuracy["deletion"].tolist(),
            "insertion_accuracy": None if accuracy["insertion"] is None else accuracy["insertion"].tolist(),
        }
    bar.close()
    original_accuracy = None if labels is None else float((base.argmax(-1) == labels.to(base.device)).float().mean())
    return ExplanationEval(len(images), table, curves, kernels["deletion"], kernels["insertion"], original_accuracy)


# --- baseline regions ------------------------------------------------------------------------
def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise InputError(f"{name} must be a positive int or a pair (rows, columns), got {value!r}; e.g. model.cfg.grid_size.")
    return pair


def random_regions(
    reference: Bool[Tensor, "batch steps H W"],
    generator: Union[torch.Generator, int, None] = None,
    grid_size: Union[int, tuple[int, int]] = (8, 8),
) -> Bool[Tensor, "batch steps H W"]:
    """Random regions with the reference's area per step, at patch granularity.

    The image is cut into a ``grid_size`` grid of equal cells (pass ``model.cfg.grid_size`` so the
    cells are the ViT's patches; the default 8×8 is the toy model's grid). Step ``s`` of image ``b``
    gets ``round(area(reference[b, s]) / cell area)`` random cells (at least one for a non-empty
    region, at most all). Per image the cells are drawn from a single random permutation, step after
    step, so random regions do not overlap until the cells run out (then they wrap around): the
    union area follows the reference's too when its regions are disjoint.

    Args:
        generator: a ``torch.Generator`` (CPU), an int seed, or None (global RNG).
    """
    if not isinstance(reference, Tensor) or reference.dtype != torch.bool or reference.ndim != 4:
        found = f"{tuple(reference.shape)} {reference.dtype}" if isinstance(reference, Tensor) else type(reference).__name__
        raise InputError(f"reference must be boolean regions [batch, steps, H, W], got {found}.")
    grid_h, grid_w = _pair(grid_size, "grid_size")
    batch, steps, height, width = reference.shape
    if height % grid_h or width % grid_w:
        raise InputError(f"{height}x{width} regions do not split into a {grid_h}x{grid_w} grid; pass model.cfg.grid_size.")
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(generator)
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise InputError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}.")
    cells, cell_area = grid_h * grid_w, (height // grid_h) * (width // grid_w)
    area = reference.flatten(2).sum(-1).cpu()  # [batch, steps]
    count = (area.double() / cell_area).round().long()
    count = torch.where(area > 0, count.clamp(1, cells), 0)
    start = count.cumsum(1) - count  # [batch, steps]
    rank = torch.rand(batch, cells, generator=generator).argsort(-1).argsort(-1)  # each cell's place in a permutation
    chosen = (rank[:, None, :] - start[..., None]) % cells < count[..., None]  # [batch, steps, cells]
    chosen = einops.rearrange(chosen, "b s (h w) -> b s h w", h=grid_h)
    chosen = chosen.repeat_interleave(height // grid_h, dim=2).repeat_interleave(width // grid_w, dim=3)
    return chosen.to(reference.device)


@dataclass
class FeatureMaps:
    """The top channels of the last block's patch tokens per image (``feature_map_channels``)."""

    channels: Int[Tensor, "batch n_regions"]
    """Channel indices, by decreasing spatial L2 norm."""
    norms: Float[Tensor, "batch n_regions"]
    """Their spatial L2 norms (decreasing)."""
    maps: Float[Tensor, "batch n_regions grid_h grid_w"]
    """The channel maps min-max normalised to [0, 1] per map (all zeros for a constant map)."""

    def to_dict(self) -> dict:
        return {"channels": self.channels.tolist(), "norms": self.norms.tolist(), "maps": self.maps.tolist()}


def feature_map_channels(
    model: "HookedCLIP", images: Float[Tensor, "batch 3 H W"], n_regions: int = 5, batch_size: int = MAX_BATCH
) -> FeatureMaps:
    """Per image, the ``n_regions`` channels of the spatial tokens (``model.spatial_hook``: a ViT's
    ``blocks.{L-1}.hook_resid_post`` before ``ln_post``, prefix tokens dropped; a convolutional tower's
    last feature map) with the largest spatial L2 norm, as maps on the patch grid."""
    images = _checked_images(model, images)
    batch_size = _checked_batch_size(batch_size)
    cfg = model.cfg
    width = cfg.d_model
    if isinstance(n_regions, bool) or not isinstance(n_regions, int) or not 1 <= n_regions <= width:
        raise InputError(f"n_regions must be an integer in [1, {width}] (the channels of the residual stream), got {n_regions!r}.")
    hook, (grid_h, grid_w) = model.spatial_hook, cfg.grid_size
    channels, norms, maps = [], [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            _, cache = model.run_with_cache(images[start : start + batch_size], names_filter=hook)
            tokens = cache[hook]
            patches = tokens[:, tokens.shape[1] - grid_h * grid_w :]  # drop CLS / prefix tokens
            grid = einops.rearrange(patches, "b (h w) c -> b c h w", h=grid_h, w=grid_w).float()
            top = grid.flatten(2).norm(dim=-1).topk(n_regions, dim=-1, sorted=True)
            chosen = grid[torch.arange(len(grid), device=grid.device)[:, None], top.indices]  # [b, n, h, w]
            low, high = chosen.amin((-2, -1), keepdim=True), chosen.amax((-2, -1), keepdim=True)
            chosen = (chosen - low) / (high - low).clamp_min(torch.finfo(chosen.dtype).tiny)
            channels.append(top.indices.cpu())
            norms.append(top.values.cpu())
            maps.append(chosen.cpu())
    return FeatureMaps(torch.cat(channels), torch.cat(norms), torch.cat(maps))


def feature_map_regions(
    model: "HookedCLIP",
    images: Float[Tensor, "batch 3 H W"],
    n_regions: int = 5,
    threshold: float = 0.9,
    batch_size: int = MAX_BATCH,
) -> Bool[Tensor, "batch n_regions H W"]:
    """The "Feature Maps" baseline for a ViT: top channels of the last block's patch tokens as regions.

    The patch tokens ``[B, N, C]`` are read as C spatial maps on the patch grid; per image the
    ``n_regions`` maps with the largest spatial L2 norm are kept (ordered by norm), min-max
    normalised to [0, 1] per map, thresholded at ``map ≥ threshold`` (so each non-constant map keeps
    at least its peak patch) and upsampled (nearest) to the image size. Returned on the images' device.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise InputError(f"threshold must be a number in [0, 1] (maps are min-max normalised), got {threshold!r}.")
    found = feature_map_channels(model, images, n_regions, batch_size)
    masks = (found.maps >= threshold).float()
    upsampled = F.interpolate(masks.flatten(0, 1)[:, None], size=tuple(images.shape[-2:]), mode="nearest")
    return upsampled.view(*found.maps.shape[:2], *images.shape[-2:]).bool().to(images.device)
