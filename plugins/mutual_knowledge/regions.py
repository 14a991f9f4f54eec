"""Visual concepts of an image: prominent region, part concepts, visual prompts, CorLoc.

Step 1 of Sammani & Deligiannis (NeurIPS 2024), implemented from our notes
(``shared/papers/mutual_knowledge.md`` §1 and §5):

1. `patch_features`: last-block patch features of the image tower, either the residual
   stream (``"tokens"``, before ``ln_post``) or the attention keys without their bias (``"keys"``),
   CLS dropped.
2. `prominent_region`: graph decomposition (GDC). The second left singular vector of the
   L2-row-normalised features (= the second eigenvector of the affinity ``A = f fᵀ``; no Laplacian,
   no threshold), sign-fixed so that the foreground is the minority, ``> 0``, then the largest
   4-connected component (plus the second if it has ``>= min_second`` patches).
   `pca_foreground` is the PCA alternative of the CorLoc ablation. The dense-CRF refinement
   of the reference code is left out (the paper reports it changes accuracy by < 0.13).
3. `concept_parts`: ``L`` part concepts over the foreground patches of the whole batch (PCA
   with min-max scaled components and an argmax, or K-means on L2-normalised features).
4. `visual_prompts` / `region_embeddings`: a red ellipse around each part (fitted from
   the part's second moments), alone, with the outside greyscaled, and with the outside blurred;
   each prompt is encoded, L2-normalised, and the three are averaged.
5. CorLoc (`mask_box`, `box_iou`, `corloc`, `random_boxes_like`,
   `folder_boxes`): box around the prominent mask, a hit is IoU > 0.5 with any ground-truth box.

CorLoc on the bundled ``toy-shapes`` model (200 held-out one-object scenes, world seed 1000; the
objects cover ~7% of the image, ~4 patches of 64): the paper's GDC (second vector) localises
poorly: per image tokens 0.010 / keys 0.060, jointly 0.020 / 0.145 (the joint keys figure depends on
the world, 0.000–0.145 on five: the stacked matrix's 2nd and 3rd singular values tie within 1–5 %).
The toy's object and background patch features are anti-correlated (keys: mean cosine −0.23, 81% negative
affinities; tokens ≈ 0), so the affinity matrix is not positive and the *first* singular vector
already splits object from background: ``prominent_region(..., vector=0)`` gives tokens 0.370 /
keys 0.570 per image (0.475 / 0.685 jointly). PCA (centred, first component): tokens 0.115 /
keys 0.170. Random boxes of the predicted sizes: ≤ 0.015.

Conventions: patches are in the tower's row-major grid order; pixel ``(row i, column j)`` covers the
continuous square ``[j, j+1] x [i, i+1]`` (its centre is ``(j + 0.5, i + 0.5)``); boxes are
``(x0, y0, x1, y1)`` in these continuous coordinates, so a mask's box is
``(min col, min row, max col + 1, max row + 1)``.
"""

from __future__ import annotations

import contextlib

import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple, Optional, Sequence, Union

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from clip_lens.errors import InputError
from clip_lens.files import read_json

if TYPE_CHECKING:
    from clip_lens import HookedCLIP

SOURCES = ("tokens", "keys")
PROMPT_KINDS = ("ellipse", "grey", "blur")
PART_METHODS = ("pca", "kmeans")
AUTO_MIXED_SHARE = 0.05  # vector="auto": the first singular vector splits patches when its minority sign holds this share
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
RED = (1.0, 0.0, 0.0)
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L") and OpenCV's RGB2GRAY


# --- features ----------------------------------------------------------------------------------
def grid_size(model: "HookedCLIP") -> tuple[int, int]:
    """``(grid_h, grid_w)``: the image tower's patch grid, or a convolutional tower's last feature map
    (from its config, else a ViT's conv1 stride)."""
    grid = getattr(model.cfg, "grid_size", None)
    if grid:
        return int(grid[0]), int(grid[1])
    (h, w), (ph, pw) = model.cfg.image_size, model.visual.conv1.stride
    return h // ph, w // pw


def feature_sources(model: "HookedCLIP") -> tuple[str, ...]:
    """The ``source`` values `patch_features` takes for this model: ``"keys"`` needs a ViT's last
    attention layer; every tower has ``"tokens"`` (a convolutional tower's last feature map)."""
    return SOURCES if getattr(model.visual, "family", "vit") == "vit" else ("tokens",)


def patch_features(
    model: "HookedCLIP", images: Float[Tensor, "batch 3 H W"], source: str = "tokens"
) -> Float[Tensor, "batch n_patches C"]:
    """Last-block patch features, CLS dropped, patches in row-major grid order (one forward).

    Args:
        model: the hooked model.
        images: preprocessed images at the model's size.
        source: ``"tokens"``: the spatial tokens ``model.spatial_hook`` names — a ViT's last
            ``hook_resid_post`` (before ``ln_post``), a ResNet's, ConvNeXt's or FastViT's last feature
            map — ``C = d_model``; ``"keys"`` (ViTs): the last attention layer's keys without the
            bias (``ln_1(x) W_K``), heads concatenated, ``C = n_heads * d_head``.

    Raises:
        InputError: an unknown ``source`` (or ``"keys"`` on a convolutional tower), or images of the
            wrong type, shape or size.
    """
    sources = feature_sources(model)
    if source not in sources:
        tower = "" if source not in SOURCES else f" for a {model.visual.family} image tower"
        raise InputError(f"source must be one of {', '.join(sources)}{tower}, got {source!r}.")
    images = model.check_images(images)
    layer = model.cfg.n_layers - 1
    name = model.spatial_hook if source == "tokens" else f"blocks.{layer}.attn.hook_k"
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter=[name])
    acts = cache[name]
    if source == "keys":
        attn = model.blocks[layer].attn
        bias = attn.mha.in_proj_bias
        if bias is not None:  # in_proj_bias = [b_Q; b_K; b_V]
            b_k = einops.rearrange(bias.chunk(3)[1], "(h d) -> h d", h=attn.n_heads)
            acts = acts - b_k
        acts = einops.rearrange(acts, "b n h d -> b n (h d)")
    gh, gw = grid_size(model)
    return acts[:, acts.shape[1] - gh * gw :].detach()


def _check_features(features: Tensor, grid: tuple[int, int]) -> tuple[int, int]:
    if not isinstance(features, Tensor) or features.ndim != 3 or not features.is_floating_point():
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise InputError(f"features must be a float tensor [batch, n_patches, C], got {shape}; use patch_features.")
    gh, gw = int(grid[0]), int(grid[1])
    if features.shape[1] != gh * gw:
        raise InputError(
            f"features have {features.shape[1]} patches but the grid {gh}x{gw} has {gh * gw}; "
            "pass grid=grid_size(model) of the model that made them."
        )
    return gh, gw


# --- connected components ----------------------------------------------------------------------
def connected_components(mask: Bool[Tensor, "batch H W"]) -> Int[Tensor, "batch H W"]:
    """4-connected components of each mask: 0 on background, else ``1 +`` the row-major index of
    the component's first pixel (so ids are unique per image but not consecutive).

    Batched min-label propagation with root hooking and pointer jumping (converges in a few
    rounds for compact blobs; exact for any shape).
    """
    b, h, w = mask.shape
    mask = mask.bool()
    n = b * h * w
    own = torch.arange(n, device=mask.device).view(b, h, w)
    labels = own.clone().view(-1)  # a forest of pointers to smaller pixel indices; roots point to themselves
    fg = mask.reshape(-1)
    while True:
        padded = F.pad(torch.where(mask, labels.view(b, h, w), n), (1, 1, 1, 1), value=n)
        neighbours = padded[:, 1:-1, 1:-1].clone()
        for shifted in (padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]):
            torch.minimum(neighbours, shifted, out=neighbours)
        neighbours = torch.where(mask, neighbours, own).view(-1)
        new = torch.minimum(labels, neighbours)
        new = new.scatter_reduce(0, labels[fg], neighbours[fg], reduce="amin")  # hook the roots too
        while True:  # pointer jumping: every pixel points to its root
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, labels):
            break
        labels = new
    local = labels.view(b, h * w) - own.view(b, h * w)[:, :1]
    return torch.where(mask, local.view(b, h, w) + 1, 0)


def keep_largest_components(
    mask: Bool[Tensor, "batch H W"], min_second: Optional[int] = None
) -> Bool[Tensor, "batch H W"]:
    """Keep each mask's largest 4-connected component, plus the second largest when it has at
    least ``min_second`` pixels (``None``: only the largest). Ties go to the earlier component."""
    b, h, w = mask.shape
    labels = connected_components(mask).view(b, h * w)
    sizes = torch.zeros(b, h * w + 1, dtype=torch.long, device=mask.device)
    sizes.scatter_add_(1, labels, torch.ones_like(labels))
    sizes[:, 0] = 0
    order = torch.sort(sizes, dim=1, descending=True, stable=True)
    top, top_size = order.indices[:, :2], order.values[:, :2]
    keep = (labels == top[:, :1]) & (top_size[:, :1] > 0)
    if min_second is not None:
        keep |= (labels == top[:, 1:2]) & (top_size[:, 1:2] >= max(int(min_second), 1))
    return keep.view(b, h, w)


# --- prominent region --------------------------------------------------------------------------
@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed torch ops on one thread: batched SVDs of small per-image matrices are a
    loop of tiny LAPACK calls, ~10x faster without thread hand-offs (0.22 s vs 2.7 s for 200
    images on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fix_sign(vectors: Float[Tensor, "*batch n"]) -> Float[Tensor, "*batch n"]:
    """Negate each vector that is positive on more than 50% (and fewer than 100%) of its entries,
    so that ``> 0`` selects the minority (the prominent object, as in the reference code)."""
    positive = (vectors > 0).float().mean(-1, keepdim=True)
    flip = (positive > 0.5) & (positive < 1.0)
    return torch.where(flip, -vectors, vectors)


def spectral_vector(
    features: Float[Tensor, "batch n_patches C"], index: int = 1, centre: bool = False, joint: bool = False
) -> Float[Tensor, "batch n_patches"]:
    """The ``index``-th left singular vector of the L2-row-normalised features, sign-fixed.

    ``index=1, centre=False`` is GDC: the second eigenvector of the affinity ``A = f fᵀ``.
    ``index=0, centre=True`` is the first principal component's scores (up to scale).
    Per image (batched SVD), or over the stacked ``(batch * n_patches) x C`` matrix with
    ``joint=True`` (co-segmentation; the sign fix is then over all entries).
    """
    f = F.normalize(features.float(), dim=-1)
    b, n, _ = f.shape
    if joint:
        f = einops.rearrange(f, "b n c -> 1 (b n) c")
    if centre:
        f = f - f.mean(dim=1, keepdim=True)
    if index >= min(f.shape[1:]):
        raise InputError(f"singular vector {index} does not exist for a {f.shape[1]}x{f.shape[2]} feature matrix.")
    with one_thread():
        u = torch.linalg.svd(f, full_matrices=False).U[..., index]
    return fix_sign(u).reshape(b, n)


def _foreground(vector: Float[Tensor, "batch n"], grid: tuple[int, int], min_second: int) -> Bool[Tensor, "batch gh gw"]:
    mask = einops.rearrange(vector > 0, "b (gh gw) -> b gh gw", gh=grid[0], gw=grid[1])
    return keep_largest_components(mask, min_second)


def prominent_region(
    features: Float[Tensor, "batch n_patches C"],
    grid: tuple[int, int],
    joint: bool = False,
    min_second: int = 5,
    vector: Union[int, str] = 1,
) -> Bool[Tensor, "batch gh gw"]:
    """GDC foreground: second left singular vector of the L2-normalised patch features, sign-fixed,
    ``> 0``, then per image the largest 4-connected component (and the second largest when it has
    ``>= min_second`` patches). ``joint=True`` decomposes the whole batch at once (co-segmentation,
    as the reference code does over the images of one class).

    ``vector`` picks the singular vector (1, the paper's). The paper skips the first because, when
    all patch affinities are positive (as in CLIP, whose patch features share a large common
    component), Perron–Frobenius makes it single-signed. Where object and background features are
    anti-correlated (negative affinities, e.g. the bundled ``toy-shapes`` model) the first vector
    already splits them and ``vector=0`` localises far better (see the module notes on CorLoc).
    ``vector="auto"`` applies the paper's own reason per image (per batch with ``joint``): the
    first vector when it is not single-signed (its minority sign holds ≥ ``AUTO_MIXED_SHARE`` of the
    patches), else the second.
    """
    grid = _check_features(features, grid)
    if vector == "auto":
        first = spectral_vector(features, index=0, centre=False, joint=joint)
        minority = torch.minimum((first > 0).float().mean(-1), (first < 0).float().mean(-1))
        chosen = torch.where((minority >= AUTO_MIXED_SHARE)[:, None], first,
                             spectral_vector(features, index=1, centre=False, joint=joint))
        return _foreground(chosen, grid, min_second)
    if not isinstance(vector, int) or isinstance(vector, bool):
        raise InputError(f"vector must be a singular vector index (1, the paper's) or 'auto', got {vector!r}.")
    return _foreground(spectral_vector(features, index=vector, centre=False, joint=joint), grid, min_second)


def pca_foreground(
    features: Float[Tensor, "batch n_patches C"], grid: tuple[int, int], joint: bool = False, min_second: int = 5
) -> Bool[Tensor, "batch gh gw"]:
    """PCA foreground (CorLoc ablation): first principal component of the centred L2-normalised
    features, with the same sign fix, ``> 0`` and cleanup as `prominent_region`."""
    grid = _check_features(features, grid)
    return _foreground(spectral_vector(features, index=0, centre=True, joint=joint), grid, min_second)


def upsample_mask(mask: Bool[Tensor, "batch gh gw"], size: Union[int, tuple[int, int]]) -> Bool[Tensor, "batch H W"]:
    """Nearest-neighbour upsampling of patch-grid masks to pixels."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5


# --- part concepts -----------------------------------------------------------------------------
def _kmeans(x: Float[Tensor, "m c"], k: int, iters: int, seed: int) -> Int[Tensor, "m"]:
    """Lloyd's K-means (Euclidean) with seeded k-means++ init; stops when assignments repeat."""
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(len(x), (1,), generator=gen))
    centres = [x[first]]
    d2 = (x - x[first]).pow(2).sum(-1)
    for _ in range(1, k):
        weights = d2.clamp_min(0).cpu()
        pick = torch.multinomial(weights if weights.sum() > 0 else torch.ones_like(weights), 1, generator=gen)
        centres.append(x[int(pick)])
        d2 = torch.minimum(d2, (x - x[int(pick)]).pow(2).sum(-1))
    centres = torch.stack(centres)
    assign = None
    for _ in range(max(int(iters), 1)):
        new = torch.cdist(x, centres).argmin(dim=1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)  # empty: keep
    return assign


def concept_parts(
    features: Float[Tensor, "batch n_patches C"],
    foreground: Bool[Tensor, "batch gh gw"],
    n_parts: int = 5,
    method: str = "pca",
    iters: int = 500,
    seed: int = 0,
) -> Int[Tensor, "batch gh gw"]:
    """Part concepts over the foreground patches of the whole batch: ``-1`` on background, else a
    part id in ``0..n_parts-1`` (every foreground patch gets exactly one part; parts may be empty).

    Both methods work on the L2-normalised features of all foreground patches of the batch:

    - ``"pca"``: the ``n_parts`` first principal components (each sign-fixed so that its largest
      absolute score is positive, then min-max scaled to [0, 1]); a patch takes the argmax.
    - ``"kmeans"``: Euclidean K-means (seeded k-means++ init, at most ``iters`` Lloyd steps, early
      stop on convergence); clusters are numbered by decreasing size.

    Raises:
        InputError: ``n_parts < 1``, more parts than foreground patches (or than feature dimensions
            for PCA), an unknown method, or a foreground mask that does not match the features.
    """
    if method not in PART_METHODS:
        raise InputError(f"method must be one of {', '.join(PART_METHODS)}, got {method!r}.")
    if not isinstance(foreground, Tensor) or foreground.ndim != 3:
        raise InputError("foreground must be a bool tensor [batch, grid_h, grid_w]; use prominent_region.")
    gh, gw = _check_features(features, foreground.shape[1:])
    if foreground.shape[0] != features.shape[0]:
        raise InputError(f"foreground has {foreground.shape[0]} images but features have {features.shape[0]}.")
    fg = einops.rearrange(foreground.bool(), "b gh gw -> b (gh gw)")
    n_fg = int(fg.sum())
    if n_parts < 1:
        raise InputError(f"n_parts must be at least 1, got {n_parts}.")
    if n_parts > n_fg:
        raise InputError(
            f"n_parts L={n_parts} is larger than the {n_fg} foreground patches of the batch; use n_parts <= {n_fg} "
            "or pass more images (parts are computed jointly over the batch)."
        )
    x = F.normalize(features[fg].float(), dim=-1)  # [m, c]
    if method == "pca":
        if n_parts > x.shape[1]:
            raise InputError(f"PCA gives at most C={x.shape[1]} components, n_parts={n_parts}; lower n_parts.")
        centred = x - x.mean(0)
        scores = centred @ torch.linalg.svd(centred, full_matrices=False).Vh[:n_parts].T  # [m, L]
        extreme = scores.gather(0, scores.abs().argmax(0, keepdim=True))
        scores = scores * torch.where(extreme < 0, -1.0, 1.0)
        low, high = scores.amin(0), scores.amax(0)
        part = ((scores - low) / (high - low).clamp_min(1e-12)).argmax(1)
    else:
        part = _kmeans(x, n_parts, iters, seed)
        order = torch.sort(torch.bincount(part, minlength=n_parts), descending=True, stable=True).indices
        part = torch.argsort(order)[part]  # rank of each cluster by size
    out = torch.full(fg.shape, -1, dtype=torch.long, device=features.device)
    out[fg] = part.to(out.device)
    return einops.rearrange(out, "b (gh gw) -> b gh gw", gh=gh, gw=gw)


def parts_to_masks(
    parts: Int[Tensor, "batch gh gw"], n_parts: int, size: Union[int, tuple[int, int], None] = None
) -> Bool[Tensor, "batch L H W"]:
    """One mask per part id ``0..n_parts-1`` (nearest-upsampled to ``size`` pixels when given)."""
    masks = parts[:, None] == torch.arange(n_parts, device=parts.device)[None, :, None, None]
    if size is None:
        return masks
    b = masks.shape[0]
    up = upsample_mask(einops.rearrange(masks, "b l gh gw -> (b l) gh gw"), size)
    return einops.rearrange(up, "(b l) h w -> b l h w", b=b)


# --- visual prompts ----------------------------------------------------------------------------
def fit_ellipses(part_masks: Bool[Tensor, "batch L H W"], largest_component: bool = True) -> Float[Tensor, "batch L 5"]:
    """Ellipse ``(cx, cy, a, b, angle)`` per part: the 2-sigma ellipse of the part's pixels.

    Centre and covariance are the exact moments of the union of the part's pixel squares (each
    pixel adds 1/12 variance per axis), restricted to its largest 4-connected component when
    ``largest_component`` (as the reference takes the largest contour). ``a >= b`` are the
    semi-axes (2 standard deviations: the ellipse of a uniformly filled ellipse is itself),
    ``angle`` is the major axis's angle in radians from +x towards +y (image rows go down).
    Empty parts give a row of NaNs.
    """
    b, l, h, w = part_masks.shape
    masks = einops.rearrange(part_masks.bool(), "b l h w -> (b l) h w")
    if largest_component:
        present = masks.flatten(1).any(1)
        masks = masks.clone()
        masks[present] = keep_largest_components(masks[present])
    weights = masks.float()
    count = weights.sum((1, 2))
    ys = torch.arange(h, dtype=torch.float32, device=masks.device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=masks.device) + 0.5
    safe = count.clamp_min(1)
    cx = einops.einsum(weights, xs, "p h w, w -> p") / safe
    cy = einops.einsum(weights, ys, "p h w, h -> p") / safe
    dx, dy = xs[None, None, :] - cx[:, None, None], ys[None, :, None] - cy[:, None, None]
    sxx = (weights * dx * dx).sum((1, 2)) / safe + 1 / 12
    syy = (weights * dy * dy).sum((1, 2)) / safe + 1 / 12
    sxy = (weights * dx * dy).sum((1, 2)) / safe
    mid, radius = (sxx + syy) / 2, torch.sqrt(((sxx - syy) / 2) ** 2 + sxy**2)
    major, minor = 2 * torch.sqrt(mid + radius), 2 * torch.sqrt((mid - radius).clamp_min(1 / 12))
    angle = 0.5 * torch.atan2(2 * sxy, sxx - syy)
    ellipses = torch.stack([cx, cy, major, minor, angle], dim=-1)
    ellipses[count == 0] = float("nan")
    return einops.rearrange(ellipses, "(b l) k -> b l k", b=b)


def _ellipse_regions(
    ellipses: Float[Tensor, "batch L 5"], size: tuple[int, int], thickness: float
) -> tuple[Bool[Tensor, "batch L H W"], Bool[Tensor, "batch L H W"]]:
    """``(outline, outside)`` pixels of each ellipse; NaN ellipses give neither."""
    h, w = size
    ys = torch.arange(h, dtype=torch.float32, device=ellipses.device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=ellipses.device) + 0.5
    cx, cy, a, b, angle = (t[..., None, None] for t in ellipses.float().unbind(-1))
    dx, dy = xs - cx, ys[:, None] - cy
    cos, sin = torch.cos(angle), torch.sin(angle)
    u, v = (dx * cos + dy * sin) / a, (-dx * sin + dy * cos) / b
    implicit = u**2 + v**2 - 1
    gradient = 2 * torch.sqrt((u / a) ** 2 + (v / b) ** 2)
    distance = implicit.abs() / gradient.clamp_min(1e-12)  # first-order (Sampson) distance to the curve
    outline = distance <= thickness / 2
    return outline, (implicit > 0) & ~outline


def default_blur_kernel(height: int) -> int:
    """The blur kernel for an image height: 11 at 224 px, scaled, odd, at least 3."""
    k = max(3, round(11 * height / 224))
    return k if k % 2 else k + 1


def gaussian_blur(images: Float[Tensor, "batch C H W"], kernel: int, sigma: Optional[float] = None) -> Float[Tensor, "batch C H W"]:
    """Separable Gaussian blur with reflect-101 borders (OpenCV's ``GaussianBlur`` default).

    ``sigma=None`` uses OpenCV's rule for ``sigma=0``: ``0.3 * ((kernel - 1) / 2 - 1) + 0.8``
    (2.0 for kernel 11). Works in any per-channel affine space (normalised pixels included).
    """
    kernel = int(kernel)
    if kernel < 1 or kernel % 2 == 0:
        raise InputError(f"the blur kernel must be an odd positive size, got {kernel}.")
    if kernel == 1:
        return images
    sigma = 0.3 * ((kernel - 1) / 2 - 1) + 0.8 if sigma is None else float(sigma)
    taps = torch.arange(kernel, dtype=images.dtype, device=images.device) - kernel // 2
    weights = torch.exp(-(taps**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    b, c, h, w = images.shape
    x = images.reshape(b * c, 1, h, w)
    pad = kernel // 2
    mode = "reflect" if min(h, w) > pad else "replicate"
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode=mode), weights.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode=mode), weights.view(1, 1, -1, 1))
    return x.view(b, c, h, w)


def pixel_normalization(model_or_preprocess) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of the ``Normalize`` step of ``model.preprocess`` (or of a transform);
    open_clip's OpenAI mean/std when there is none."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    preprocess = getattr(model_or_preprocess, "preprocess", model_or_preprocess)
    for step in getattr(preprocess, "transforms", [preprocess]):
        if type(step).__name__ == "Normalize":
            return tuple(float(m) for m in step.mean), tuple(float(s) for s in step.std)
    return tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in PROMPT_KINDS]
    if unknown or not kinds:
        raise InputError(f"kinds must be a non-empty subset of {', '.join(PROMPT_KINDS)}, got {kinds}.")
    return kinds


def _draw_prompts(
    images: Float[Tensor, "batch 3 H W"],
    ellipses: Float[Tensor, "batch L 5"],
    mean: Sequence[float],
    std: Sequence[float],
    kinds: tuple[str, ...],
    blur_kernel: Optional[int],
) -> Float[Tensor, "batch L kind 3 H W"]:
    h, w = images.shape[-2:]
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(3, 1, 1)
    red = (torch.tensor(RED, dtype=images.dtype, device=images.device).view(3, 1, 1) - mean_t) / std_t
    outline, outside = _ellipse_regions(ellipses, (h, w), thickness=max(1, round(h / 224)))
    outline, outside = outline[:, :, None], outside[:, :, None]  # [b, L, 1, H, W] against channels
    base = images[:, None]  # [b, 1, 3, H, W]
    prompts = []
    for kind in kinds:
        if kind == "ellipse":
            surround = base
        elif kind == "grey":
            luma = einops.einsum(images * std_t + mean_t, torch.tensor(LUMA, dtype=images.dtype, device=images.device), "b c h w, c -> b h w")
            surround = ((luma[:, None] - mean_t) / std_t)[:, None]
        else:
            surround = gaussian_blur(images, blur_kernel or default_blur_kernel(h))[:, None]
        prompt = torch.where(outside, surround, base)
        prompts.append(torch.where(outline, red, prompt))
    prompts = torch.stack(prompts, dim=2)  # [b, L, kind, 3, H, W]
    invalid = torch.isnan(ellipses[..., 0])
    return torch.where(invalid[:, :, None, None, None, None], images[:, None, None], prompts)


def _check_part_masks(part_masks: Tensor, images: Tensor) -> Tensor:
    if not isinstance(part_masks, Tensor) or part_masks.ndim != 4:
        raise InputError("part_masks must be a bool tensor [batch, L, H, W]; use parts_to_masks(parts, L, size).")
    if part_masks.shape[0] != images.shape[0] or part_masks.shape[-2:] != images.shape[-2:]:
        raise InputError(
            f"part_masks {tuple(part_masks.shape)} do not match images {tuple(images.shape)}: need "
            "[batch, L, H, W] with the images' batch and size (upsample patch masks with parts_to_masks(..., size=H))."
        )
    return part_masks.bool().to(images.device)


def visual_prompts(
    images: Float[Tensor, "batch 3 H W"],
    part_masks: Bool[Tensor, "batch L H W"],
    mean: Sequence[float],
    std: Sequence[float],
    kinds: Sequence[str] = PROMPT_KINDS,
    blur_kernel: Optional[int] = None,
) -> Float[Tensor, "batch L kind 3 H W"]:
    """Red-ellipse visual prompts of each part, in the images' normalised pixel space.

    The ellipse (`fit_ellipses`) is drawn as a red outline ``max(1, round(H / 224))`` px
    thick. ``"ellipse"``: the outline only; ``"grey"``: plus everything outside the ellipse
    greyscaled (BT.601 luma); ``"blur"``: plus the outside Gaussian-blurred (``blur_kernel``,
    default `default_blur_kernel`). ``mean``/``std`` are the preprocessing's
    (`pixel_normalization`). Empty parts give the unchanged image.
    """
    kinds = _check_kinds(kinds)
    part_masks = _check_part_masks(part_masks, images)
    return _draw_prompts(images, fit_ellipses(part_masks), mean, std, kinds, blur_kernel)


def region_embeddings(
    model: "HookedCLIP",
    images: Float[Tensor, "batch 3 H W"],
    part_masks: Bool[Tensor, "batch L H W"],
    kinds: Sequence[str] = PROMPT_KINDS,
    batch_size: int = 256,
    blur_kernel: Optional[int] = None,
) -> tuple[Float[Tensor, "batch L d_embed"], Bool[Tensor, "batch L"]]:
    """Embedding of each part: the mean over ``kinds`` of the L2-normalised image embeddings of its
    visual prompts (`visual_prompts`; the mean is not re-normalised). Parts with no pixel are
    not encoded: their embedding is zero and ``valid`` is False. ``batch_size`` bounds the prompts
    built and encoded at once."""
    kinds = _check_kinds(kinds)
    images = model.check_images(images)
    part_masks = _check_part_masks(part_masks, images)
    mean, std = pixel_normalization(model)
    b, l = part_masks.shape[:2]
    valid = part_masks.flatten(2).any(-1)
    out = torch.zeros(b, l, model.cfg.d_embed or model.cfg.d_model, device=images.device, dtype=images.dtype)
    step = max(1, int(batch_size) // (l * len(kinds)))
    with torch.no_grad():
        for start in range(0, b, step):
            chunk = slice(start, start + step)
            if not valid[chunk].any():
                continue
            prompts = _draw_prompts(images[chunk], fit_ellipses(part_masks[chunk]), mean, std, kinds, blur_kernel)
            keep = valid[chunk]
            flat = einops.rearrange(prompts[keep], "p k c h w -> (p k) c h w")
            embeds = model.encode_image(flat, normalize=True)
            out[chunk][keep] = einops.reduce(embeds, "(p k) e -> p e", "mean", k=len(kinds))
    return out, valid


# --- CorLoc ------------------------------------------------------------------------------------
def mask_box(mask: Bool[Tensor, "batch H W"]) -> Float[Tensor, "batch 4"]:
    """Tight box ``(x0, y0, x1, y1)`` of each mask (``x1``/``y1`` exclusive); NaNs for an empty mask."""
    b, h, w = mask.shape
    rows, cols = mask.any(2), mask.any(1)
    r = torch.arange(h, device=mask.device, dtype=torch.float32)
    c = torch.arange(w, device=mask.device, dtype=torch.float32)
    inf = torch.tensor(float("inf"), device=mask.device)
    x0 = torch.where(cols, c, inf).amin(1)
    x1 = torch.where(cols, c, -inf).amax(1) + 1
    y0 = torch.where(rows, r, inf).amin(1)
    y1 = torch.where(rows, r, -inf).amax(1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=-1)
    return torch.where(mask.flatten(1).any(1)[:, None], boxes, float("nan"))


def box_iou(a: Float[Tensor, "*batch 4"], b: Float[Tensor, "*batch 4"]) -> Float[Tensor, "*batch"]:
    """Intersection over union of paired (broadcast) boxes ``(x0, y0, x1, y1)``; NaN boxes give NaN."""
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_min(0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_min(0)
    inter = iw * ih
    area = lambda x: (x[..., 2] - x[..., 0]).clamp_min(0) * (x[..., 3] - x[..., 1]).clamp_min(0)  # noqa: E731
    union = area(a) + area(b) - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.where(union.isnan(), union, 0.0))


def corloc(
    pred_boxes: Float[Tensor, "batch 4"], gt_boxes: Sequence[Float[Tensor, "k 4"]], threshold: float = 0.5
) -> float:
    """Correct localisation: the fraction of images whose predicted box has IoU ``> threshold``
    with at least one of that image's ground-truth boxes (a NaN prediction is a miss)."""
    if len(gt_boxes) != len(pred_boxes):
        raise InputError(f"{len(pred_boxes)} predicted boxes but ground-truth boxes for {len(gt_boxes)} images.")
    if len(pred_boxes) == 0:
        raise InputError("corloc needs at least one image.")
    gts = [torch.as_tensor(g, dtype=torch.float32).reshape(-1, 4) for g in gt_boxes]
    empty = [i for i, g in enumerate(gts) if len(g) == 0]
    if empty:
        raise InputError(f"images {empty[:5]} have no ground-truth box; CorLoc is defined on images with objects.")
    padded = torch.nn.utils.rnn.pad_sequence(gts, batch_first=True, padding_value=float("nan"))  # [batch, k, 4]
    iou = box_iou(pred_boxes.float().cpu()[:, None], padded)
    return float((iou > threshold).any(1).float().mean())


def random_boxes_like(
    pred_boxes: Float[Tensor, "batch 4"], size: Union[int, tuple[int, int]], generator: Optional[torch.Generator] = None
) -> Float[Tensor, "batch 4"]:
    """The random baseline: boxes of the same width and height as ``pred_boxes`` at a uniformly
    random position inside an image of ``size`` (``H`` or ``(H, W)``); NaN boxes stay NaN."""
    h, w = (size, size) if isinstance(size, int) else size
    widths, heights = pred_boxes[:, 2] - pred_boxes[:, 0], pred_boxes[:, 3] - pred_boxes[:, 1]
    u = torch.rand(len(pred_boxes), 2, generator=generator).to(pred_boxes.device)
    x0 = u[:, 0] * (w - widths).clamp_min(0)
    y0 = u[:, 1] * (h - heights).clamp_min(0)
    return torch.stack([x0, y0, x0 + widths, y0 + heights], dim=-1)


class FolderBoxes(NamedTuple):
    """A box dataset: preprocessed images, per-image boxes in input pixels, and file names."""

    images: Float[Tensor, "batch 3 H W"]
    boxes: list[Float[Tensor, "k 4"]]
    names: list[str]


def _crop_geometry(preprocess: Callable):
    """``(resize, crop)`` of a preprocess: resize is ``("shortest", S)`` or ``("squash", (h, w))``."""
    from torchvision import transforms

    resize, crop = None, None
    value_only = ("ToTensor", "PILToTensor", "Normalize", "ConvertImageDtype", "MaybeConvertMode", "MaybeToTensor", "Lambda")
    for step in getattr(preprocess, "transforms", [preprocess]):
        name = type(step).__name__
        if name in value_only:
            continue
        if isinstance(step, transforms.Resize) and resize is None and crop is None and step.max_size is None:
            size = [step.size] if isinstance(step.size, int) else list(step.size)
            resize = ("shortest", int(size[0])) if len(size) == 1 else ("squash", (int(size[0]), int(size[1])))
        elif name in ("CenterCrop", "CenterCropOrPad") and crop is None:  # both pad a smaller image, then crop
            size = [step.size] if isinstance(step.size, int) else list(step.size)
            crop = (int(size[0]), int(size[-1]))
        else:
            raise InputError(
                f"folder_boxes cannot map boxes through the preprocess step {step!r}: it replays only "
                "Resize (shortest side or fixed size) then CenterCrop; resize the images yourself."
            )
    return resize, crop


def _map_box(boxes: Tensor, original: tuple[int, int], resize, crop) -> Tensor:
    """Replay resize + centre crop on boxes of an image of ``original = (w, h)`` pixels."""
    w0, h0 = original
    if resize is None:
        new_w, new_h = w0, h0
    elif resize[0] == "squash":
        new_h, new_w = resize[1]
    else:  # torchvision: short side -> S, long side -> int(S * long / short)
        s = resize[1]
        new_w, new_h = (s, int(s * h0 / w0)) if w0 <= h0 else (int(s * w0 / h0), s)
    ch, cw = crop if crop is not None else (new_h, new_w)

    def offset(new: int, out: int) -> int:  # torchvision CenterCrop: pad when smaller, then round((new - out) / 2)
        return -((out - new) // 2) if out > new else int(round((new - out) / 2.0))

    left, top = offset(new_w, cw), offset(new_h, ch)
    scale = torch.tensor([new_w / w0, new_h / h0, new_w / w0, new_h / h0])
    shift = torch.tensor([left, top, left, top], dtype=torch.float32)
    mapped = boxes * scale - shift
    limits = torch.tensor([cw, ch, cw, ch], dtype=torch.float32)
    return torch.minimum(mapped.clamp_min(0), limits)


def folder_boxes(
    folder: Union[str, Path], preprocess: Optional[Callable] = None, image_size: Optional[int] = None
) -> FolderBoxes:
    """A CorLoc dataset from ``folder/images/NAME.(png|jpg|jpeg)`` and ``folder/boxes.json``.

    ``boxes.json`` maps file names to lists of boxes in original-image pixels,
    ``{"NAME.png": [[x0, y0, x1, y1], ...]}`` (``x1``/``y1`` exclusive). Images are returned
    preprocessed (sorted by name) and boxes mapped into the preprocessed image's pixels by
    replaying the geometry of ``preprocess``, open_clip's evaluation transform: a resize of the
    shortest side to ``S`` (the long side becomes ``int(S * long / short)``, as torchvision) or a
    fixed-size resize, then a centre crop at offset ``round((resized - crop) / 2)``; boxes are
    scaled by ``resized / original`` per axis, shifted, and clipped to the crop (a box that falls
    outside the crop becomes empty and can never be hit).

    Args:
        folder: the dataset folder.
        preprocess: PIL → tensor transform, usually ``model.preprocess``; default open_clip's
            evaluation transform at ``image_size`` (OpenAI mean/std).
        image_size: the square input size, needed only when ``preprocess`` is None.

    Raises:
        InputError: no ``boxes.json``, unreadable or malformed boxes, a name with no image, a
            preprocess whose geometry cannot be replayed.
    """
    from clip_lens.files import load_image

    folder = Path(folder)
    box_file = folder / "boxes.json"
    if not box_file.is_file():
        raise InputError(
            f"{box_file} is missing: a box dataset needs images/NAME.png|jpg and boxes.json "
            '{"NAME.png": [[x0, y0, x1, y1], ...]} in original-image pixels.'
        )
    table = read_json(box_file, "box file", '{"NAME.png": [[x0, y0, x1, y1], ...]}')
    if not isinstance(table, dict) or not table:
        raise InputError(f"{box_file} must be a non-empty object {{\"NAME.png\": [[x0, y0, x1, y1], ...]}}.")
    if preprocess is None:
        if image_size is None:
            raise InputError("folder_boxes needs preprocess (e.g. model.preprocess) or image_size.")
        from open_clip.transform import image_transform

        preprocess = image_transform(int(image_size), is_train=False)
    resize, crop = _crop_geometry(preprocess)

    images, boxes, names = [], [], []
    for name in sorted(table):
        path = folder / "images" / name
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            raise InputError(
                f"boxes.json names {name!r} but there is no image {path}; keys must be file names of "
                f"images/ ({'/'.join(IMAGE_SUFFIXES)})."
            )
        entry = table[name]
        ok = isinstance(entry, list) and entry and all(
            isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
            for box in entry
        )
        if not ok:
            raise InputError(
                f"boxes of {name!r} must be a non-empty list of [x0, y0, x1, y1] number lists, got {entry!r} "
                "(wrap a single box in a list: [[x0, y0, x1, y1]])."
            )
        image = load_image(path, "image")
        size = image.size
        pixels = preprocess(image)
        box = torch.tensor(entry, dtype=torch.float32)
        bad = (box[:, 0] >= box[:, 2]) | (box[:, 1] >= box[:, 3]) | (box[:, :2] < 0).any(1) | (box[:, 2] > size[0]) | (box[:, 3] > size[1])
        if bad.any():
            raise InputError(
                f"box {entry[int(bad.nonzero()[0])]} of {name!r} is not inside its {size[0]}x{size[1]} image with "
                "x0 < x1, y0 < y1 (pixels, x1/y1 exclusive)."
            )
        images.append(pixels)
        boxes.append(_map_box(box, size, resize, crop))
        names.append(name)
    return FolderBoxes(torch.stack(images), boxes, names)
