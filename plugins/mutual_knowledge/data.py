"""Images for the mutual-knowledge analysis: class names, optional labels and ground-truth boxes.

Two sources. The shapes world (one object per scene; classes are the six shapes; boxes from the
exact object masks) and a folder of real images::

    dataset/
      images/NAME.png | NAME.jpg | NAME.jpeg
      labels.json     # optional: {"NAME.jpg": "class name", ...}  → zero-shot accuracy, AccDrop/AccInc
      boxes.json      # optional: {"NAME.jpg": [[x0, y0, x1, y1], ...]}  (original pixels) → CorLoc

Folder images are preprocessed with the model's ``preprocess``; boxes are mapped into the model's
input coordinates by `folder_boxes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from clip_lens.errors import InputError, close_matches
from clip_lens.files import read_json

SHAPES_WORLD_HELD_OUT_SEED = 1000  # the bundled toy models were trained on seed 0
SHAPES_CLASS_TEMPLATES = ("a {}",)  # the toy text tower's class prompt ("a circle")


@dataclass
class ConceptData:
    """``n`` images (loaded by index with `load`), the class names and what is known about them."""

    n: int
    loader: Callable[[Sequence[int]], Float[Tensor, "batch 3 H W"]]
    classes: list[str]
    """Class names (keys of the descriptor bank)."""
    ids: list[str]
    labels: Optional[Int[Tensor, "n"]] = None
    """True class per image (index into ``classes``), or None."""
    boxes: Optional[list[Float[Tensor, "k 4"]]] = None
    """Ground-truth boxes per image (x0, y0, x1, y1 in input pixels), or None."""
    class_templates: Sequence[str] = ("{}",)
    """Prompt templates of the zero-shot classifier (ensemble-averaged)."""
    description: str = ""

    def __len__(self) -> int:
        return self.n

    def load(self, indices: Sequence[int]) -> Float[Tensor, "batch 3 H W"]:
        return self.loader(list(indices))

    @classmethod
    def from_tensors(
        cls,
        images: Float[Tensor, "n 3 H W"],
        classes: Sequence[str],
        labels: Optional[Int[Tensor, "n"]] = None,
        boxes: Optional[list[Tensor]] = None,
        class_templates: Sequence[str] = ("{}",),
        ids: Optional[Sequence[str]] = None,
        description: str = "",
    ) -> "ConceptData":
        """Data from preprocessed images already at the model's input size."""
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise InputError(f"images must be a tensor [n, 3, H, W], got {shape}.")
        if len(images) == 0:
            raise InputError("no images: give at least one.")
        classes = list(classes)
        if not classes:
            raise InputError("no classes: give the class names of the zero-shot classifier.")
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.shape != (len(images),):
                raise InputError(f"{labels.numel()} labels for {len(images)} images: give one class index per image.")
            if labels.min() < 0 or labels.max() >= len(classes):
                raise InputError(f"labels must index the {len(classes)} classes (0..{len(classes) - 1}).")
        if boxes is not None and len(boxes) != len(images):
            raise InputError(f"{len(boxes)} box lists for {len(images)} images: give one list of boxes per image.")
        return cls(len(images), lambda idx: images[idx], classes, list(ids or map(str, range(len(images)))), labels,
                   boxes, tuple(class_templates), description)


def mask_boxes(masks: np.ndarray) -> list[Tensor]:
    """One box ``[1, 4]`` (x0, y0, x1 exclusive, y1 exclusive) per non-empty boolean mask ``[n, H, W]``."""
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        boxes.append(torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32))
    return boxes


def shapes_world_data(n: int, seed: int = SHAPES_WORLD_HELD_OUT_SEED, image_size: int = 64, version: int = 1) -> ConceptData:
    """``n`` one-object scenes of shapes world ``version``; classes are the shapes, boxes enclose the object's mask."""
    from clip_lens.toy.world import VALUES, ShapesWorld, batch_images

    if n < 1:
        raise InputError(f"n must be at least 1, got {n}.")
    world = ShapesWorld(seed=seed, image_size=image_size, n_objects=1, version=version)
    scenes = [world.scene(i) for i in range(n)]
    classes = list(VALUES["shape"])
    labels = torch.tensor([classes.index(s.value("shape")) for s in scenes])
    boxes = mask_boxes(np.stack([s.object_masks[0] for s in scenes]))
    return ConceptData.from_tensors(batch_images(scenes), classes, labels, boxes, SHAPES_CLASS_TEMPLATES,
                                    description=f"{n} shapes-world{'' if version == 1 else f' v{version}'} scenes (seed {seed}, classes: shape)")


def folder_data(
    folder: str | Path, preprocess: Callable, classes: Optional[Sequence[str]] = None,
    class_templates: Sequence[str] = ("{}",),
) -> ConceptData:
    """A folder in the format of the module docstring. ``classes``: the zero-shot classes (default:
    the sorted class names of ``labels.json``; one of the two is needed). Every image is decoded
    here, before any work: one that cannot be (corrupt, truncated, a decompression bomb …) raises an
    InputError naming it (`clip_lens.files.load_image`)."""
    from clip_lens.files import load_image
    from clip_lens_plugins.mutual_knowledge.regions import IMAGE_SUFFIXES, folder_boxes

    folder = Path(folder)
    paths = sorted(p for p in (folder / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise InputError(f"no images in {folder / 'images'} ({'/'.join(IMAGE_SUFFIXES)}): see the folder format in "
                         "clip_lens_plugins.mutual_knowledge.data.")
    for path in paths:  # fail now, not in the middle of the analysis
        load_image(path, "image")
    names = [p.name for p in paths]
    labels_file = folder / "labels.json"
    named: Optional[dict] = _read_json(labels_file) if labels_file.is_file() else None
    if classes is None:
        if named is None:
            raise InputError(f"{folder} has no labels.json: pass the class names (--classes) of the zero-shot classifier.")
        classes = sorted(set(named.values()))
    classes = list(classes)
    labels = None
    if named is not None:
        missing = [name for name in names if name not in named]
        if missing:
            raise InputError(f"labels.json has no label for {len(missing)} image(s), e.g. {missing[0]}: label every image or remove labels.json.")
        unknown = sorted({c for c in named.values() if c not in classes})
        if unknown:
            raise InputError(f"labels.json names classes that are not in the class list: {', '.join(unknown[:5])}."
                             f"{close_matches(unknown[0], classes)}")
        labels = torch.tensor([classes.index(named[name]) for name in names])
    boxes = None
    if (folder / "boxes.json").is_file():  # folder_boxes holds the boxed images in memory: for CorLoc-sized sets
        found = folder_boxes(folder, preprocess)
        by_name = dict(zip(found.names, found.boxes))
        missing = [name for name in names if name not in by_name]
        if missing:
            raise InputError(f"boxes.json has no boxes for {len(missing)} image(s), e.g. {missing[0]}: box every image or remove boxes.json.")
        boxes = [by_name[name] for name in names]

    def load(indices: Sequence[int]) -> Tensor:
        return torch.stack([preprocess(load_image(paths[i], "image")) for i in indices])

    return ConceptData(len(paths), load, classes, names, labels, boxes, tuple(class_templates), f"{len(paths)} images from {folder}")


def _read_json(path: Path) -> dict:
    data = read_json(path, "labels file", '{"NAME.jpg": "class name", ...}')
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object {{\"NAME.jpg\": value}}, got {type(data).__name__}.")
    return data
