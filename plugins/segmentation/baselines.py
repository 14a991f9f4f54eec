"""No-model segmentation maps computed from the image pixels alone: what a map must beat.

On the shapes world the objects are saturated colours and, in version 1, the backgrounds grey, so
"where the colour is" finds the object without any model. Two maps, both scored by the same
protocol as the model's maps (clip below 0, min-max, threshold at the mean, `metrics`):

- `chroma_map`: HSV chroma, ``max(r, g, b) − min(r, g, b)`` (saturation × value). HSV saturation
  itself, chroma / value, divides the ±0.02 pixel noise by the value of dark grey backgrounds and
  ranks noise above nothing: on 500 v1 scenes it has the same AP (100.0) but a pixel accuracy of
  76.5 against chroma's 90.1 (before the median shift below).
- `contrast_map`: the distance of each pixel's colour from the median colour of the image's border
  pixels (the border is background unless an object touches it). It also finds objects on a
  coloured background, which chroma does not, but fires on grey textures (v1 stripes: 0.30 vs 0.50).

Both are unsigned, while the protocol's clip at 0 expects a signed map whose background sits at or
below 0 (as the model's class contrast does). Each map is therefore shifted by its image median,
which is background whenever the objects cover under half the image; on 500 v1 scenes this raises
chroma's object IoU from 31.0 to 40.9 (pixel acc 90.1 → 93.6). No smoothing: a 3 × 3 box blur would
raise chroma further (object IoU 68.6, pixel acc 98.0), so these rows are a lower bound of what a
no-model map reaches, not a tuned optimum.

Measured on 500 scenes of each world (seed 1000; pixel acc / object IoU / AP, %): v1 chroma
93.6 / 40.9 / 100.0, contrast 82.8 / 20.5 / 99.9; v2 chroma 87.1 / 25.3 / 90.5, contrast
85.9 / 23.7 / 96.1. Coloured v2 textures weaken chroma, but the pixels still rank the object well.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:
    from clip_lens import HookedCLIP

# open_clip's OPENAI_DATASET_MEAN / STD: the fallback when a model's preprocess has no Normalize
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pixel_values(model: "HookedCLIP", images: Float[Tensor, "batch 3 H W"]) -> Float[Tensor, "batch 3 H W"]:
    """Preprocessed images back to RGB in [0, 1], undoing the ``Normalize`` step of ``model.preprocess``
    (CLIP's mean and std when it has none)."""
    mean, std = CLIP_MEAN, CLIP_STD
    for step in getattr(model.preprocess, "transforms", []):
        if type(step).__name__ == "Normalize":
            mean, std = step.mean, step.std
    mean, std = (torch.as_tensor(v, dtype=images.dtype, device=images.device).view(-1, 1, 1) for v in (mean, std))
    return (images * std + mean).clamp(0, 1)


def _minus_median(maps: Float[Tensor, "batch H W"]) -> Float[Tensor, "batch H W"]:
    return maps - maps.flatten(1).median(1).values.view(-1, 1, 1)


def chroma_map(pixels: Float[Tensor, "batch 3 H W"]) -> Float[Tensor, "batch H W"]:
    """HSV chroma (``max − min`` over RGB) minus its image median; ``pixels`` in [0, 1]."""
    return _minus_median(pixels.amax(1) - pixels.amin(1))


def contrast_map(pixels: Float[Tensor, "batch 3 H W"]) -> Float[Tensor, "batch H W"]:
    """Euclidean RGB distance from the median border colour, minus its image median; ``pixels`` in [0, 1]."""
    border = torch.cat([pixels[..., 0, :], pixels[..., -1, :], pixels[..., 1:-1, 0], pixels[..., 1:-1, -1]], -1)
    reference = border.median(-1).values[..., None, None]  # [batch, 3, 1, 1]
    return _minus_median((pixels - reference).norm(dim=1))
