"""The shapes world: seeded images of coloured shapes with known attributes and pixel masks.

Every scene is a background texture with one or more objects. Each object has a colour, a shape,
a position (a cell of a 3×3 grid) and a size; the scene has a background. Everything is rendered
with numpy from the attributes, so the masks are exact and the same seed gives the same images.

Version 1 (the bundled ``toy-shapes``) draws grey backgrounds, so colour alone finds the objects.
Version 2 (``ShapesWorld(version=2)``, the bundled ``toy-shapes-v2``) draws the textures in random
colours that keep their distance from the objects' colours, scatters small coloured marks (clutter,
never an object, its own mask) under the objects, lets neighbouring objects overlap, and adds the
scene attribute ``count``; captions can bind attributes ("a red circle above a blue square").
Camouflage (``ShapesWorld(version=2, camouflage=True)``, the bundled ``toy-shapes-camo``) paints
object and background from one two-colour palette in equal shares, so that only texture, outline
and shape tell them apart (`CAMOUFLAGE_PERIOD`, `_camouflage_texture`).

>>> world = ShapesWorld(seed=0)
>>> scene = world.scene(0)
>>> scene.image.shape, scene.caption()   # doctest: +SKIP
((64, 64, 3), 'a small red triangle at the top left on a striped background')
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from clip_lens.errors import InputError
from clip_lens.files import atomic_write

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.75, 0.15),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.10, 0.25, 0.95),
    "purple": (0.60, 0.15, 0.85),
    "pink": (1.00, 0.50, 0.75),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SIZES = {"small": 0.22, "large": 0.34}  # object diameter as a fraction of the image side
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
POSITIONS = tuple(f"{r} {c}" for r in ROWS for c in COLUMNS)
BACKGROUNDS = ("plain", "striped", "checkered", "dotted")
ATTRIBUTES = ("colour", "shape", "size", "position", "background")
VALUES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": POSITIONS,
    "background": BACKGROUNDS,
}

COUNTS = ("one", "two", "three", "four")
V2_ATTRIBUTES = (*ATTRIBUTES, "count")
V2_VALUES: dict[str, tuple[str, ...]] = {**VALUES, "count": COUNTS}
RELATIONS = ("above", "below", "to the left of", "to the right of")
WORLD_VERSIONS = (1, 2)

POSITION_PHRASES = {
    "top left": "at the top left", "top center": "at the top", "top right": "at the top right",
    "middle left": "on the left", "middle center": "in the center", "middle right": "on the right",
    "bottom left": "at the bottom left", "bottom center": "at the bottom", "bottom right": "at the bottom right",
}


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene."""

    colour: str
    shape: str
    size: str
    position: str

    def attributes(self) -> dict[str, str]:
        return asdict(self)

    @property
    def cell(self) -> tuple[int, int]:
        """``(row, column)`` of the object's grid cell."""
        row, column = self.position.split()
        return ROWS.index(row), COLUMNS.index(column)


def phrase(objects: Sequence[dict[str, str]], background: Optional[str] = None) -> str:
    """The caption of (partial) object descriptions: ``{"colour": "red", "shape": "circle"}`` →
    ``"a red circle"``; missing attributes are left out ("a red shape", "a shape on the left")."""
    parts = []
    for obj in objects:
        words = ["a"]
        if "size" in obj:
            words.append(obj["size"])
        if "colour" in obj:
            words.append(obj["colour"])
        words.append(obj.get("shape", "shape"))
        if "position" in obj:
            words.append(POSITION_PHRASES[obj["position"]])
        parts.append(" ".join(words))
    text = " and ".join(parts) if parts else "a scene"
    if background is not None:
        text += f" on a {background} background"
    return text


def attribute_prompt(attribute: str, value: str) -> str:
    """The single-attribute prompt used for zero-shot evaluation (same template as captions)."""
    if attribute == "background":
        return phrase([{}], value)
    if attribute == "count":
        return count_phrase(value)
    return phrase([{attribute: value}])


def count_phrase(count: str, background: Optional[str] = None) -> str:
    """``"two"`` → ``"two shapes"`` (``"one shape"``), optionally ``"... on a striped background"``."""
    text = f"{count} shape" + ("" if count == "one" else "s")
    return text + (f" on a {background} background" if background is not None else "")


def relation_phrase(first: dict[str, str], relation: str, second: dict[str, str]) -> str:
    """``{"colour": "red", "shape": "circle"}, "above", {"shape": "square"}`` → ``"a red circle above a square"``."""
    return f"{phrase([first])} {relation} {phrase([second])}"


def relations(a: "ShapeObject", b: "ShapeObject") -> list[str]:
    """The relations true of ``a`` to ``b`` from their grid cells ("above", "to the left of", …)."""
    (row_a, col_a), (row_b, col_b) = a.cell, b.cell
    out = []
    if row_a != row_b:
        out.append("above" if row_a < row_b else "below")
    if col_a != col_b:
        out.append("to the left of" if col_a < col_b else "to the right of")
    return out


@dataclass
class Scene:
    """A rendered scene: image, exact masks and attributes."""

    image: np.ndarray
    """``uint8 [H, W, 3]``."""
    objects: list[ShapeObject]
    background: str
    object_masks: np.ndarray
    """``bool [n_objects, H, W]``: visible pixels of each object (later objects occlude earlier)."""
    index: int = 0
    extra: dict = field(default_factory=dict)

    def caption(self, keep: Optional[dict[str, bool]] = None) -> str:
        """Full caption, or a partial one keeping the attributes with ``keep[attr]`` true."""
        keep = keep or {a: True for a in ATTRIBUTES}
        objects = [{a: v for a, v in o.attributes().items() if keep.get(a)} for o in self.objects]
        return phrase(objects, self.background if keep.get("background") else None)

    def value(self, attribute: str) -> str:
        """The scene's value of ``attribute``: the background, the count, or the first object's attribute."""
        if attribute == "background":
            return self.background
        if attribute == "count":
            return COUNTS[len(self.objects) - 1]
        return getattr(self.objects[0], attribute)

    def attribute_mask(self, attribute: str, value: str) -> np.ndarray:
        """``bool [H, W]``: pixels showing ``attribute == value`` (background: the uncovered pixels)."""
        if attribute == "background":
            return ~self.object_masks.any(0) if value == self.background else np.zeros(self.image.shape[:2], bool)
        if attribute == "count":
            return self.object_masks.any(0) if value == self.value("count") else np.zeros(self.image.shape[:2], bool)
        mask = np.zeros(self.image.shape[:2], bool)
        for obj, obj_mask in zip(self.objects, self.object_masks):
            if getattr(obj, attribute) == value:
                mask |= obj_mask
        return mask

    def record(self) -> dict:
        return {"index": self.index, "background": self.background, "objects": [o.attributes() for o in self.objects]}


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in the object's unit frame (u right, v down, radius 1)."""
    if shape == "circle":
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":
        return (v <= 0.75) & (v >= -1.0 + 1.75 * np.abs(u))
    if shape == "cross":
        return ((np.abs(u) <= 0.33) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 1.0))
    if shape == "star":
        rho, theta = np.hypot(u, v), np.arctan2(v, u) + np.pi / 2
        return rho <= 0.42 + 0.58 * ((np.cos(5 * theta) + 1) / 2) ** 2
    raise InputError(f"unknown shape '{shape}'; choose from {', '.join(SHAPES)}.")


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Version 1: a grey texture ``float [size, size, 3]``."""
    base, alt = 0.30 + 0.05 * rng.random(), 0.50 + 0.05 * rng.random()
    grey = np.where(_pattern(kind, size, rng), alt, base)
    return np.repeat(grey[..., None], 3, axis=2)


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    """One HSV colour → RGB ``float [3]``."""
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    return value - value * saturation * np.clip(np.minimum(k, 4 - k), 0, 1)


def _coloured_background(kind: str, size: int, rng: np.random.Generator, avoid: Sequence[np.ndarray]) -> np.ndarray:
    """Version 2: the texture in two tones of a random hue, turned (without further draws, so that
    minimal sets share it) to the hue farthest from the objects' colours among six rotations."""
    hue, saturation, value = rng.random(), 0.25 + 0.5 * rng.random(), 0.35 + 0.3 * rng.random()
    pattern = _pattern(kind, size, rng)

    def distance(h: float) -> float:
        tone = _hsv(h, saturation, value)
        return min((float(np.abs(tone - c).sum()) for c in avoid), default=np.inf)

    hue = max(((hue + k / 6) % 1 for k in range(6)), key=distance)
    base, alt = _hsv(hue, saturation, value), _hsv(hue, saturation * 0.7, min(1.0, value + 0.2))
    return np.where(pattern[..., None], alt, base)


CAMOUFLAGE_PERIOD = 8
"""Camouflage textures: period in pixels of every pattern (stripes 4 px wide, 8-px checks)."""


def _camouflage_texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Camouflage: ``bool [size, size]``, True on about half the pixels whatever ``kind``, so the two
    tones cover object and background in equal shares. ``"plain"`` is an irregular mix of 2-px
    blocks (no period), dots have radius 0.4 × period (area ≈ 0.50), stripes run "/" (objects: "\\")."""
    yy, xx = np.mgrid[0:size, 0:size]
    period = CAMOUFLAGE_PERIOD
    phase = rng.integers(period)
    if kind == "plain":
        blocks = rng.random((size // 2 + 1, size // 2 + 1)) < 0.5
        return blocks[yy // 2, xx // 2]
    if kind == "striped":
        return ((xx + yy + phase) // (period // 2)) % 2 == 0
    if kind == "object":  # the objects' stripes, at a right angle to the background's
        return ((xx - yy + phase) // (period // 2)) % 2 == 0
    if kind == "checkered":
        return (((xx + phase) // period) + ((yy + phase) // period)) % 2 == 0
    if kind == "dotted":
        return ((xx + phase) % period - period / 2) ** 2 + ((yy + phase) % period - period / 2) ** 2 <= (0.4 * period) ** 2
    raise InputError(f"unknown background '{kind}'; choose from {', '.join(BACKGROUNDS)}.")


def _outline(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``bool [H, W]`` twice: the pixels of ``mask`` with a 4-neighbour outside it (the image edge counts
    as outside), and the pixels outside ``mask`` with a 4-neighbour inside it."""
    padded = np.pad(mask, 1)
    neighbours = (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:])
    eroded, dilated = mask.copy(), mask.copy()
    for neighbour in neighbours:
        eroded &= neighbour
        dilated |= neighbour
    return mask & ~eroded, dilated & ~mask


def _clutter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw 0–6 small marks (dots and short strokes in saturated colours) into ``image``; their mask."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    mask = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(0, 7))):
        colour = _hsv(rng.random(), 0.6 + 0.4 * rng.random(), 0.6 + 0.4 * rng.random())
        x0, y0 = rng.uniform(0, size, 2)
        if rng.random() < 0.5:  # a dot of radius 1–2 px
            mark = (xx - x0) ** 2 + (yy - y0) ** 2 <= rng.uniform(1.0, 2.0) ** 2
        else:  # a stroke 4–10 px long, about 1 px wide
            angle, length = rng.uniform(0, np.pi), rng.uniform(4, 10)
            dx, dy = np.cos(angle), np.sin(angle)
            along = np.clip((xx - x0) * dx + (yy - y0) * dy, 0, length)
            mark = np.hypot(xx - x0 - along * dx, yy - y0 - along * dy) <= 0.7
        image[mark] = colour
        mask |= mark
    return mask


def _pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """``bool [size, size]``: the texture's second tone."""
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(4, size // 8)
    phase = rng.integers(period)
    if kind == "plain":
        pattern = np.zeros((size, size), bool)
    elif kind == "striped":
        pattern = ((xx + yy + phase) // (period // 2)) % 2 == 0
    elif kind == "checkered":
        pattern = (((xx + phase) // period) + ((yy + phase) // period)) % 2 == 0
    elif kind == "dotted":
        pattern = (((xx + phase) % period - period / 2) ** 2 + ((yy + phase) % period - period / 2) ** 2) <= (period / 4) ** 2
    else:
        raise InputError(f"unknown background '{kind}'; choose from {', '.join(BACKGROUNDS)}.")
    return pattern


MAX_SCENES = 1_000_000
"""The most scenes one request may ask for (`check_scene_count`; ``clip-lens … --shapes``): checked before
anything is allocated. A store of that many 64-pixel scenes is about 15 GB; the world is a toy."""


def check_seed(seed: Any, what: str = "seed") -> int:
    """``seed`` as an int: a non-negative integer (numpy seeds scenes from it), else `InputError` naming ``what``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"{what} must be an integer >= 0, got {seed!r}.")
    return int(seed)


def check_scene_count(n: Any, what: str = "n") -> int:
    """``n`` as an int: a scene count in ``1..MAX_SCENES``, else `InputError` naming ``what`` and the limit."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_SCENES:
        raise InputError(f"{what} must be a number of scenes between 1 and {MAX_SCENES:,}, got {n!r}.")
    return int(n)


class ShapesWorld(Dataset):
    """A seeded, indexable world of scenes (``world[i]`` is always the same scene).

    Args:
        seed: world seed, an integer >= 0; scenes of different seeds are independent.
        image_size: side of the square images in pixels (default 64).
        n_objects: objects per scene, an int or an inclusive ``(min, max)`` range.
        length: nominal dataset length for ``len()`` / iteration.
        transform: optional callable applied to the ``uint8 [H, W, 3]`` image in ``__getitem__``.
        version: 1 (grey textures, the bundled ``toy-shapes``) or 2 (coloured textures, clutter,
            overlapping objects and the ``count`` attribute; ``toy-shapes-v2``).
        camouflage: version 2 only. Each scene draws a palette of two colours: the first object's
            colour and another; every object takes the first object's colour and every texture
            (background and objects) covers half its pixels with each tone, objects in stripes
            at a right angle to the background's pattern and outlined in their colour (1 px inside the
            mask) against a 1-px ring of the other colour outside it. No
            clutter, no per-object colour noise: a pixel's colour says nothing about whether it
            is an object's, only texture, outline and shape do (``toy-shapes-camo``).
    """

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 64,
        n_objects: int | tuple[int, int] = 1,
        length: int = 10_000,
        transform: Optional[Callable[[np.ndarray], Any]] = None,
        version: int = 1,
        camouflage: bool = False,
    ):
        lo, hi = (n_objects, n_objects) if isinstance(n_objects, int) else n_objects
        if image_size < 16:
            raise InputError(f"image_size must be at least 16 pixels, got {image_size}.")
        if not 1 <= lo <= hi <= 4:
            raise InputError(f"n_objects must lie in 1..4, got {n_objects}.")
        if version not in WORLD_VERSIONS:
            raise InputError(f"version must be one of {WORLD_VERSIONS}, got {version!r}.")
        if camouflage and version != 2:
            raise InputError(f"camouflage is an option of world version 2, got version={version!r}; pass version=2.")
        seed = check_seed(seed)
        self.seed, self.image_size, self.n_objects, self.length, self.transform = seed, image_size, (lo, hi), length, transform
        self.version = version
        self.camouflage = bool(camouflage)

    @property
    def attributes(self) -> tuple[str, ...]:
        """The attribute names of this world (version 2 adds ``count``)."""
        return ATTRIBUTES if self.version == 1 else V2_ATTRIBUTES

    @property
    def values(self) -> dict[str, tuple[str, ...]]:
        """Attribute → its values."""
        return VALUES if self.version == 1 else V2_VALUES

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index])

    def sample_attributes(self, rng: np.random.Generator) -> tuple[list[ShapeObject], str]:
        n = int(rng.integers(self.n_objects[0], self.n_objects[1] + 1))
        cells = rng.choice(len(POSITIONS), size=n, replace=False)
        objects = [
            ShapeObject(
                colour=str(rng.choice(VALUES["colour"])),
                shape=str(rng.choice(SHAPES)),
                size=str(rng.choice(VALUES["size"])),
                position=POSITIONS[int(c)],
            )
            for c in cells
        ]
        background = str(rng.choice(BACKGROUNDS))
        if self.camouflage:  # one palette: every object has the first one's colour
            objects = [replace(o, colour=objects[0].colour) for o in objects]
        return objects, background

    def render(self, objects: Sequence[ShapeObject], background: str, rng: np.random.Generator) -> Scene:
        size = self.image_size
        if self.camouflage:
            return self._render_camouflage(objects, background, rng)
        extra = {}
        if self.version == 1:
            image = _background(background, size, rng)
        else:
            image = _coloured_background(background, size, rng, [np.array(COLOURS[o.colour]) for o in objects])
            extra["clutter_mask"] = _clutter(image, rng)
        masks = np.zeros((len(objects), size, size), bool)
        hidden = np.zeros(len(objects), bool)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
        cell = size / 3
        # version 2 lets centres reach their cell's edge, so that large neighbours overlap
        spread = 0.6 if self.version == 1 else 1.0
        for i, obj in enumerate(objects):
            row, col = obj.cell
            radius = SIZES[obj.size] * size / 2 * (1 + 0.08 * rng.standard_normal())
            slack = max(0.0, cell / 2 - radius)
            cx = (col + 0.5) * cell + rng.uniform(-slack, slack) * spread
            cy = (row + 0.5) * cell + rng.uniform(-slack, slack) * spread
            mask = _shape_mask(obj.shape, (xx - cx) / radius, (yy - cy) / radius)
            hidden[:i] |= (masks[:i] & mask).any((1, 2))
            masks[:i] &= ~mask  # occlusion: later objects are drawn on top
            masks[i] = mask
            colour = np.clip(np.array(COLOURS[obj.colour]) + 0.04 * rng.standard_normal(3), 0, 1)
            image[mask] = colour
        image = np.clip(image + 0.02 * rng.standard_normal(image.shape), 0, 1)
        if "clutter_mask" in extra:
            extra["clutter_mask"] &= ~masks.any(0)  # marks under an object are not visible
            extra["occluded"] = hidden  # bool [n_objects]: partly covered by a later object
        return Scene((image * 255).round().astype(np.uint8), list(objects), background, masks, extra=extra)

    def _object_geometry(self, obj: ShapeObject, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        """``bool [H, W]``: the object's shape at a jittered radius and centre inside its cell (version 2's spread)."""
        size, cell = self.image_size, self.image_size / 3
        row, col = obj.cell
        radius = SIZES[obj.size] * size / 2 * (1 + 0.08 * rng.standard_normal())
        slack = max(0.0, cell / 2 - radius)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        return _shape_mask(obj.shape, (xx - cx) / radius, (yy - cy) / radius)

    def _render_camouflage(self, objects: Sequence[ShapeObject], background: str, rng: np.random.Generator) -> Scene:
        """Camouflage rendering: the palette is the objects' colour and a second colour drawn here."""
        size = self.image_size
        names = list(COLOURS)
        first = names.index(objects[0].colour)
        tone = np.array(COLOURS[objects[0].colour])
        other = np.array(COLOURS[names[(first + 1 + int(rng.integers(len(names) - 1))) % len(names)]])
        image = np.where(_camouflage_texture(background, size, rng)[..., None], tone, other)
        stripes = np.where(_camouflage_texture("object", size, rng)[..., None], tone, other)
        masks = np.zeros((len(objects), size, size), bool)
        hidden = np.zeros(len(objects), bool)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
        for i, obj in enumerate(objects):
            mask = self._object_geometry(obj, rng, xx, yy)
            hidden[:i] |= (masks[:i] & mask).any((1, 2))
            masks[:i] &= ~mask
            masks[i] = mask
            image[mask] = stripes[mask]
            inner, outer = _outline(mask)
            image[inner], image[outer] = tone, other  # a two-tone contour: each tone on its side
        image = np.clip(image + 0.02 * rng.standard_normal(image.shape), 0, 1)
        extra = {"clutter_mask": np.zeros((size, size), bool), "occluded": hidden}
        return Scene((image * 255).round().astype(np.uint8), list(objects), background, masks, extra=extra)

    def scene(self, index: int) -> Scene:
        """The scene at ``index`` (deterministic in ``(seed, index)``)."""
        rng = self._rng(index)
        objects, background = self.sample_attributes(rng)
        scene = self.render(objects, background, rng)
        scene.index = index
        return scene

    def variants(self, index: int, attribute: str, n: int) -> list[Scene]:
        """``n`` scenes that differ only in ``attribute`` (of the first object, or the background).

        Minimal sets: every variant shares the other attributes and the same rendering noise, so
        the only visible difference is the attribute. Training batches mix them in so that the
        contrastive loss cannot ignore an attribute the rest of the caption makes redundant.
        """
        if attribute not in VALUES:  # count is not varied: it changes what else is in the scene
            raise InputError(f"unknown attribute '{attribute}'; choose from {', '.join(ATTRIBUTES)}.")
        rng = self._rng(index)
        objects, background = self.sample_attributes(rng)
        taken = {o.position for o in objects[1:]}
        choices = [v for v in VALUES[attribute] if attribute != "position" or v not in taken]
        if not 1 <= n <= len(choices):
            raise InputError(f"n must lie in 1..{len(choices)} for attribute '{attribute}', got {n}.")
        render_seed = int(rng.integers(2**63))
        scenes = []
        for value in rng.choice(choices, size=n, replace=False):
            if attribute == "background":
                varied, back = objects, str(value)
            else:
                varied, back = [replace(objects[0], **{attribute: str(value)}), *objects[1:]], background
                if self.camouflage and attribute == "colour":  # the palette: every object changes colour
                    varied = [replace(o, colour=str(value)) for o in objects]
            scene = self.render(varied, back, np.random.default_rng(render_seed))
            scene.index = index
            scenes.append(scene)
        return scenes

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        image = scene.image if self.transform is None else self.transform(scene.image)
        return {"image": image, "caption": scene.caption(), "record": scene.record()}

    def __iter__(self) -> Iterator[Scene]:
        return (self.scene(i) for i in range(self.length))

    def export(self, folder: str | os.PathLike, n: int, start: int = 0) -> Path:
        """Write ``n`` scenes as ``images/{i}.png``, ``masks/{i}.npz`` and ``scenes.json`` (atomically)."""
        from PIL import Image

        folder = Path(folder)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(start, start + n):
            scene = self.scene(i)
            atomic_write(folder / "images" / f"{i:06d}.png", lambda f: Image.fromarray(scene.image).save(f, format="PNG"))
            atomic_write(folder / "masks" / f"{i:06d}.npz", lambda f: np.savez_compressed(f, objects=scene.object_masks, **scene.extra))
            records.append({**scene.record(), "image": f"images/{i:06d}.png", "masks": f"masks/{i:06d}.npz", "caption": scene.caption()})
        meta = {"seed": self.seed, "version": self.version, "image_size": self.image_size, "n_objects": list(self.n_objects),
                **({"camouflage": True} if self.camouflage else {}), "scenes": records}
        atomic_write(folder / "scenes.json", json.dumps(meta, indent=1))
        return folder


def batch_images(scenes: Sequence[Scene]) -> torch.Tensor:
    """``uint8 [H, W, 3]`` scenes → model input ``[batch, 3, H, W]`` normalised to [-1, 1]."""
    array = np.stack([s.image for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
