"""Per-head topic segmentation, contrastive segmentation and zero-shot segmentation evaluation.

CLIP-InterpreT's topic maps (Madasu et al. 2024) and Gandelsman et al.'s zero-shot segmentation,
built on the per-token decomposition (``model.decompose(images, tokens=layers, directions=texts)``).
"""

from clip_lens_plugins.segmentation.analysis import ContrastiveSegmentation, Segmentation
from clip_lens_plugins.segmentation.data import SegmentationData, folder_images, folder_segmentation, mask_transform_for, shapes_world_segmentation
from clip_lens_plugins.segmentation.evaluation import SegmentationEval, SegmentationEvalResult
from clip_lens_plugins.segmentation.heads import HeadSelection, parse_heads
from clip_lens_plugins.segmentation.metrics import average_precision, mean_iou, pixel_accuracy
from clip_lens_plugins.segmentation.results import ContrastiveResult, HeatmapResult

__all__ = [
    "ContrastiveResult", "ContrastiveSegmentation", "HeadSelection", "HeatmapResult", "Segmentation",
    "SegmentationData", "SegmentationEval", "SegmentationEvalResult", "average_precision", "folder_images", "folder_segmentation",
    "mask_transform_for", "mean_iou", "parse_heads", "pixel_accuracy", "shapes_world_segmentation",
]
