"""The camouflage option of the version-2 shapes world: objects and background share one palette in
equal shares, so pixel colour cannot find the objects; versions 1 and 2 render as before."""

import hashlib

import numpy as np
import pytest

from clip_lens.errors import InputError
from clip_lens.toy.world import COLOURS, ShapesWorld

# sha256 of 20 scenes (images and masks) and one colour minimal set of world seed 7, rendered by the
# code before the camouflage option existed (commit e576640): the option must not move a pixel.
UNCHANGED = {
    1: "32b639b34d1cdc6acd14a9c1f00715d836a3aa2ae56f718a56066901d3917474",
    2: "7ee3fad40106893ee8559c3cf297e3d9ca06b13b1e974719bd967cea5fc3e9ac",
}


def _digest(world: ShapesWorld) -> str:
    digest = hashlib.sha256()
    for i in range(20):
        scene = world.scene(i)
        digest.update(scene.image.tobytes())
        digest.update(scene.object_masks.tobytes())
    for scene in world.variants(3, "colour", 4):
        digest.update(scene.image.tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("version, n_objects", [(1, 1), (2, (1, 4))])
def test_versions_1_and_2_render_bit_identically(version, n_objects):
    assert _digest(ShapesWorld(seed=7, version=version, n_objects=n_objects)) == UNCHANGED[version]


def _tones(scene) -> np.ndarray:
    """``int [H, W]``: index into COLOURS of each pixel's nearest named colour."""
    palette = np.array(list(COLOURS.values()))  # [8, 3]
    pixels = scene.image.astype(float) / 255
    return np.abs(pixels[..., None, :] - palette).sum(-1).argmin(-1)


def test_objects_are_painted_from_the_background_palette_in_equal_shares():
    world = ShapesWorld(seed=21, n_objects=(1, 3), version=2, camouflage=True)
    names = list(COLOURS)
    inside_share, outside_share = [], []
    for i in range(60):
        scene = world.scene(i)
        tones = _tones(scene)
        objects = scene.object_masks.any(0)
        background_tones = set(np.unique(tones[~objects]))
        assert len(background_tones) == 2, i  # a two-colour palette, noise never flips a tone
        assert set(np.unique(tones[objects])) <= background_tones, i  # every object pixel is a background colour
        assert names.index(scene.objects[0].colour) in background_tones
        assert len({o.colour for o in scene.objects}) == 1  # all objects carry the palette's first colour
        first = names.index(scene.objects[0].colour)
        inside_share.append((tones[objects] == first).mean())
        outside_share.append((tones[~objects] == first).mean())
    # equal shares: stripes inside, a half-and-half pattern outside; the outline adds a little of the first tone
    assert abs(np.mean(outside_share) - 0.5) < 0.05
    assert 0 < np.mean(inside_share) - np.mean(outside_share) < 0.15


def _average_precision(scores: np.ndarray, target: np.ndarray) -> float:
    order = np.argsort(-scores, kind="stable")
    hits = target[order]
    precision = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float((precision * hits).sum() / hits.sum())


def test_pixel_colour_ranks_object_pixels_no_better_than_their_share():
    """Independent of the segmentation plugin: chroma and distance from the border colour, per pixel."""
    world = ShapesWorld(seed=23, version=2, camouflage=True)
    ap, share = {"chroma": [], "contrast": []}, []
    for i in range(80):
        scene = world.scene(i)
        pixels, target = scene.image.astype(float) / 255, scene.object_masks[0]
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        ap["chroma"].append(_average_precision((pixels.max(-1) - pixels.min(-1)).ravel(), target.ravel()))
        ap["contrast"].append(_average_precision(np.linalg.norm(pixels - np.median(border, 0), axis=-1).ravel(), target.ravel()))
        share.append(target.mean())
    for name, values in ap.items():
        assert abs(np.mean(values) - np.mean(share)) < 0.02, name  # v2 without camouflage: 0.90 and 0.96


def test_colour_minimal_sets_repaint_every_object_and_the_palette():
    world = ShapesWorld(seed=4, n_objects=(2, 3), version=2, camouflage=True)
    scenes = world.variants(5, "colour", 3)
    colours = [s.objects[0].colour for s in scenes]
    assert len(set(colours)) == 3
    for scene in scenes:
        assert {o.colour for o in scene.objects} == {scene.objects[0].colour}
        assert np.array_equal(scene.object_masks, scenes[0].object_masks)  # same geometry, other palette


def test_camouflage_is_deterministic_and_has_no_clutter():
    a, b = ShapesWorld(seed=9, version=2, camouflage=True).scene(4), ShapesWorld(seed=9, version=2, camouflage=True).scene(4)
    assert np.array_equal(a.image, b.image) and not a.extra["clutter_mask"].any()
    assert not np.array_equal(a.image, ShapesWorld(seed=9, version=2).scene(4).image)


def test_camouflage_needs_version_2():
    with pytest.raises(InputError, match="camouflage is an option of world version 2"):
        ShapesWorld(version=1, camouflage=True)
