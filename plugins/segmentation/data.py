"""Segmentation datasets: preprocessed images with binary foreground masks at the model's image size.

Two sources: the shapes world (exact object masks) and a folder of real images::

    dataset/
      images/NAME.png | NAME.jpg | NAME.jpeg
      masks/NAME.png          # same width × height as the image; nonzero = foreground

Masks go through the same geometry as their image: the resize and crop steps of the model's
``preprocess`` are replayed on the mask with nearest-neighbour interpolation (pixel-value steps
such as ``ToTensor``/``Normalize`` are skipped). A centre-cropped non-square image therefore gets
a centre-cropped mask, not a mask squashed to the square image size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from clip_lens.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
OBJECT_ATTRIBUTES = ("shape", "colour", "size", "position")
SHAPES_WORLD_HELD_OUT_SEED = 1000  # the bundled toy model was trained on seed 0

Batch = tuple[Float[Tensor, "batch 3 H W"], Bool[Tensor, "batch H W"]]


@dataclass
class SegmentationData:
    """Images and their foreground masks, loaded in batches with `load`."""

    n: int
    loader: Callable[[int, int], Batch]
    ids: list[str]
    classes: Optional[list[str]] = None
    """Class prompts for the zero-shot prediction (None: pass ``classes`` to the evaluation)."""
    labels: Optional[Int[Tensor, "n"]] = None
    """True class index per image (into ``classes``), for the zero-shot accuracy; None if unknown."""
    description: str = ""

    def __len__(self) -> int:
        return self.n

    def load(self, start: int, stop: int) -> Batch:
        """Images ``start:stop`` (preprocessed) and their masks."""
        return self.loader(start, stop)

    @classmethod
    def from_tensors(
        cls,
        images: Float[Tensor, "n 3 H W"],
        masks: Bool[Tensor, "n H W"],
        classes: Optional[Sequence[str]] = None,
        labels: Optional[Int[Tensor, "n"]] = None,
        description: str = "",
    ) -> "SegmentationData":
        """A dataset from preprocessed images and masks already at the same size."""
        if not isinstance(images, Tensor) or images.ndim != 4:
            raise InputError(f"images must be a tensor [n, 3, H, W], got {_shape(images)}.")
        if not isinstance(masks, Tensor) or masks.ndim != 3:
            raise InputError(f"masks must be a tensor [n, H, W] (nonzero = foreground), got {_shape(masks)}.")
        if len(images) == 0:
            raise InputError("the segmentation dataset is empty: give at least one image and mask.")
        if masks.shape != (images.shape[0], *images.shape[-2:]):
            raise InputError(
                f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}: "
                "give one mask per image, at the image's height and width."
            )
        if labels is not None and len(labels) != len(images):
            raise InputError(f"{len(labels)} labels for {len(images)} images.")
        masks = masks != 0
        return cls(
            len(images), lambda a, b: (images[a:b], masks[a:b]), [str(i) for i in range(len(images))],
            list(classes) if classes is not None else None, labels, description or f"{len(images)} images",
        )


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def shapes_world_segmentation(
    n: int,
    seed: int = SHAPES_WORLD_HELD_OUT_SEED,
    image_size: int = 64,
    attribute: str = "colour",
    version: int = 1,
    camouflage: bool = False,
) -> SegmentationData:
    """``n`` one-object shapes-world scenes with the object's exact mask as foreground.

    Classes are the prompts of one object attribute and ``labels`` the scene's true value. The
    default is colour ("a red shape", …): the object's colour shows at exactly the mask's pixels, so
    "where the evidence for the predicted class is" and the ground truth coincide. ``"shape"`` ("a
    circle", …) is the closer analogue of an object category, but its evidence is the outline: the
    inside of a large object looks the same for every shape.

    ``version`` is the world's (`clip_lens.toy.world.ShapesWorld`). In version 1 the background
    textures are grey, so the only saturated pixels are the object's and a no-model colour map
    finds it (the evaluation's chroma baseline). In version 2 the textures are coloured (hues kept
    away from the object's) and small coloured marks (clutter, background in the mask) are drawn
    under the objects, so saturation alone separates them less well, though still far from chance
    (500 scenes, AP of the no-model maps: chroma 100.0 in v1, 90.5 in v2; distance from the border
    colour 99.9 and 96.1). Evaluate a model on the version it was trained on (``toy-shapes``: 1,
    ``toy-shapes-v2``: 2).

    ``camouflage=True`` (version 2 only) draws object and background from one two-colour palette in
    equal shares (`ShapesWorld`'s ``camouflage``): pixel colour no longer tells object from
    background, and the no-model maps score the object's pixel share (docs/concepts/segmentation.md).
    Its object colour shows only in the 1-px outline; use ``attribute="shape"`` or ``"position"``
    there (``toy-shapes-camo``).
    """
    from clip_lens.toy.world import ShapesWorld, attribute_prompt, batch_images

    if attribute not in OBJECT_ATTRIBUTES:
        raise InputError(f"attribute must be an object attribute ({', '.join(OBJECT_ATTRIBUTES)}), got '{attribute}'.")
    if n < 1:
        raise InputError(f"n must be at least 1, got {n}.")
    world = ShapesWorld(seed=seed, image_size=image_size, n_objects=1, version=version, camouflage=camouflage)
    scenes = [world.scene(i) for i in range(n)]
    masks = torch.from_numpy(np.stack([s.object_masks[0] for s in scenes]))
    values = world.values[attribute]
    labels = torch.tensor([values.index(s.value(attribute)) for s in scenes])
    classes = [attribute_prompt(attribute, value) for value in values]
    world_name = "shapes-world" if version == 1 else f"shapes-world v{version}" + (" camouflage" if camouflage else "")
    return SegmentationData.from_tensors(
        batch_images(scenes), masks, classes, labels, f"{n} {world_name} scenes (seed {seed}, classes: {attribute})"
    )


def mask_transform_for(preprocess: Callable) -> Callable:
    """The resize/crop steps of an image ``preprocess`` (a torchvision/open_clip ``Compose``),
    replayed on a PIL mask with nearest-neighbour interpolation; padding fills background.

    Raises:
        InputError: for a step whose geometry is unknown; pass your own ``mask_transform`` then.
    """
    from open_clip.transform import CenterCropOrPad, MaybeConvertMode, ResizeKeepRatio
    from torchvision import transforms

    value_only = (transforms.ToTensor, transforms.PILToTensor, transforms.Normalize, transforms.ConvertImageDtype, MaybeConvertMode)
    steps = []
    for step in getattr(preprocess, "transforms", [preprocess]):
        if isinstance(step, value_only):
            continue
        if isinstance(step, (transforms.Resize, ResizeKeepRatio)):
            step = copy.copy(step)
            step.interpolation = transforms.InterpolationMode.NEAREST
        elif isinstance(step, CenterCropOrPad):
            step = copy.copy(step)
            step.fill = 0
        elif not isinstance(step, transforms.CenterCrop):
            raise InputError(
                f"cannot align masks with the preprocess step {step!r}: pass mask_transform=, a callable "
                "that maps a PIL mask to the preprocessed image's geometry."
            )
        steps.append(step)
    return transforms.Compose(steps)


def _foreground(mask) -> np.ndarray:
    """``bool [h, w]`` of a PIL mask: nonzero value, palette index or colour (alpha ignored)."""
    if mask.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr", "HSV"):
        return np.asarray(mask.convert("RGB")).any(-1)
    values = np.asarray(mask)
    return (values[..., 0] if values.ndim == 3 else values) != 0  # PA and other two-band modes: the value band


def folder_segmentation(
    path: str | Path, preprocess: Optional[Callable], mask_transform: Optional[Callable] = None
) -> SegmentationData:
    """A dataset from ``path/images/NAME.{png,jpg,jpeg}`` and ``path/masks/NAME.png``.

    Args:
        path: the dataset folder.
        preprocess: the image transform (usually ``model.preprocess``).
        mask_transform: PIL mask → PIL mask at the preprocessed geometry; default
            the resize/crop steps (`mask_transform_for`) of ``preprocess``.

    Raises:
        InputError: no such folder, no images, images without a mask, a mask whose size differs
            from its image, or an image or mask that cannot be decoded (missing, corrupt, truncated,
            a decompression bomb …: `clip_lens.files.load_image`); every file is decoded here,
            before any work.
    """
    from clip_lens.files import load_image

    folder = Path(path)
    image_dir, mask_dir = folder / "images", folder / "masks"
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise InputError(f"{folder} needs the sub-folders images/ and masks/ (images/NAME.png|jpg, masks/NAME.png).")
    if preprocess is None:
        raise InputError("folder_segmentation needs a preprocess transform (e.g. model.preprocess).")
    image_paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not image_paths:
        raise InputError(f"the segmentation dataset is empty: no {'/'.join(IMAGE_SUFFIXES)} images in {image_dir}.")
    mask_paths = [mask_dir / f"{p.stem}.png" for p in image_paths]
    missing = [m.name for m in mask_paths if not m.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (", …" if len(missing) > 5 else "")
        raise InputError(f"{len(missing)} images have no mask in {mask_dir} (expected {shown}).")
    for image_path, mask_path in zip(image_paths, mask_paths):  # decoded completely: a bad file fails now, not mid-run
        image, mask = load_image(image_path, "image"), load_image(mask_path, "mask", mode=None)
        if image.size != mask.size:
            raise InputError(
                f"mask {mask_path.name} is {mask.size[0]}x{mask.size[1]} but image {image_path.name} is "
                f"{image.size[0]}x{image.size[1]}; masks must have their image's size."
            )
    align = mask_transform or mask_transform_for(preprocess)

    def load(start: int, stop: int) -> Batch:
        from PIL import Image

        images, masks = [], []
        for image_path, mask_path in zip(image_paths[start:stop], mask_paths[start:stop]):
            pixels = preprocess(load_image(image_path, "image"))
            foreground = Image.fromarray(_foreground(load_image(mask_path, "mask", mode=None)).astype(np.uint8) * 255)
            aligned = torch.from_numpy(np.asarray(align(foreground)) > 127)
            if aligned.shape != pixels.shape[-2:]:
                raise InputError(
                    f"the aligned mask of {image_path.name} is {tuple(aligned.shape)} but the image is "
                    f"{tuple(pixels.shape[-2:])}; pass mask_transform= matching the preprocess."
                )
            images.append(pixels)
            masks.append(aligned)
        return torch.stack(images), torch.stack(masks)

    return SegmentationData(len(image_paths), load, [p.stem for p in image_paths], description=f"{len(image_paths)} images in {folder}")


def folder_images(path: str | Path, preprocess: Optional[Callable], limit: Optional[int] = None) -> tuple[Tensor, list[str]]:
    """``(pixels [n, 3, H, W], names)``: the images of a plain folder of photos (no masks needed), for
    topic maps (``clip-lens segment --images``). ``path`` is a folder of images (searched recursively; a
    segmentation dataset's ``images/`` sub-folder is used when there is one) or one image file; the first
    ``limit`` images in name order are read and preprocessed.

    Raises:
        InputError: no such path, no images, or an image that cannot be decoded (`clip_lens.files.load_image`).
    """
    from clip_lens.collect import IMAGE_SUFFIXES as PHOTO_SUFFIXES
    from clip_lens.files import load_image

    folder = Path(path)
    if preprocess is None:
        raise InputError("folder_images needs a preprocess transform (e.g. model.preprocess).")
    if folder.is_file():
        paths = [folder]
    elif folder.is_dir():
        root = folder / "images" if (folder / "images").is_dir() else folder
        paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
        if not paths:
            raise InputError(f"no images ({', '.join(sorted(PHOTO_SUFFIXES))}) in {root} (searched recursively).")
    else:
        raise InputError(f"{folder} does not exist; give a folder of images or one image file.")
    paths = paths[:limit] if limit is not None else paths
    pixels = torch.stack([preprocess(load_image(p, "image")) for p in paths])
    return pixels, [p.stem for p in paths]
