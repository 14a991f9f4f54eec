"""The shapes world renders what its attributes say, deterministically, with exact masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clip_lens import InputError
from clip_lens.toy import ATTRIBUTES, VALUES, ShapesWorld, WordTokenizer, attribute_prompt, batch_images, text_bank, vocabulary
from clip_lens.toy.texts import DESCRIPTORS
from clip_lens.toy.world import COLOURS, COLUMNS, ROWS, SIZES, ShapeObject


def test_same_seed_and_index_give_identical_scenes():
    a, b = ShapesWorld(seed=3).scene(17), ShapesWorld(seed=3).scene(17)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.object_masks, b.object_masks)
    assert a.record() == b.record()
    other = ShapesWorld(seed=4).scene(17)
    assert not np.array_equal(a.image, other.image)


def test_attribute_vocabularies_have_the_required_sizes():
    assert len(VALUES["colour"]) >= 8 and len(VALUES["shape"]) >= 5 and len(VALUES["position"]) == 9
    assert 2 <= len(VALUES["size"]) <= 3 and len(VALUES["background"]) >= 3


def test_object_mask_pixels_have_the_object_colour_and_the_rest_is_grey():
    world = ShapesWorld(seed=1)
    for index in range(40):
        scene = world.scene(index)
        obj, mask = scene.objects[0], scene.object_masks[0]
        pixels = scene.image[mask].astype(float) / 255
        assert np.abs(pixels.mean(0) - np.array(COLOURS[obj.colour])).max() < 0.1
        background = scene.image[~mask].astype(float) / 255
        assert np.abs(background - background.mean(1, keepdims=True)).max() < 0.1  # grey: r ≈ g ≈ b


def test_masks_sit_in_their_grid_cell_and_large_objects_are_larger():
    world = ShapesWorld(seed=2, image_size=96)
    areas = {size: [] for size in SIZES}
    for index in range(60):
        scene = world.scene(index)
        obj, mask = scene.objects[0], scene.object_masks[0]
        ys, xs = np.nonzero(mask)
        row, col = ROWS.index(obj.position.split()[0]), COLUMNS.index(obj.position.split()[1])
        assert int(ys.mean() // 32) == row and int(xs.mean() // 32) == col
        areas[obj.size].append(mask.sum())
    assert np.mean(areas["large"]) > 2 * np.mean(areas["small"])


def test_attribute_masks_are_unions_and_occluded_objects_do_not_overlap():
    world = ShapesWorld(seed=5, n_objects=(2, 3))
    for index in range(20):
        scene = world.scene(index)
        assert scene.object_masks.sum(0).max() <= 1  # later objects occlude earlier ones
        for attribute in ("colour", "shape", "size", "position"):
            for value in {getattr(o, attribute) for o in scene.objects}:
                expected = np.zeros_like(scene.object_masks[0])
                for obj, mask in zip(scene.objects, scene.object_masks):
                    if getattr(obj, attribute) == value:
                        expected |= mask
                assert np.array_equal(scene.attribute_mask(attribute, value), expected)
        assert np.array_equal(scene.attribute_mask("background", scene.background), ~scene.object_masks.any(0))


def test_render_from_chosen_attributes_and_any_image_size():
    world = ShapesWorld(seed=0, image_size=40)
    obj = ShapeObject(colour="blue", shape="triangle", size="large", position="bottom right")
    scene = world.render([obj], "striped", np.random.default_rng(0))
    assert scene.image.shape == (40, 40, 3) and scene.caption() == "a large blue triangle at the bottom right on a striped background"
    with pytest.raises(InputError, match="unknown shape"):
        world.render([ShapeObject("blue", "hexagon", "large", "top left")], "plain", np.random.default_rng(0))
    with pytest.raises(InputError, match="n_objects"):
        ShapesWorld(n_objects=(0, 2))


def test_partial_captions_mention_only_the_kept_attributes():
    scene = ShapesWorld(seed=0).scene(0)
    obj = scene.objects[0]
    assert scene.caption({"colour": True}) == f"a {obj.colour} shape"
    assert scene.caption({"background": True}) == f"a shape on a {scene.background} background"
    full = scene.caption()
    assert all(word in full for word in (obj.colour, obj.shape, obj.size, scene.background))
    assert attribute_prompt("shape", "star") == "a star"


def test_dataset_and_batch_api():
    world = ShapesWorld(seed=0, length=5)
    item = world[2]
    assert item["image"].shape == (64, 64, 3) and item["caption"] == world.scene(2).caption()
    assert len(list(world)) == 5
    batch = batch_images([world.scene(i) for i in range(3)])
    assert batch.shape == (3, 3, 64, 64) and batch.min() >= -1 and batch.max() <= 1


def test_export_writes_images_masks_and_metadata(tmp_path):
    from PIL import Image

    world = ShapesWorld(seed=9, n_objects=(1, 2))
    world.export(tmp_path, n=4)
    meta = json.loads((tmp_path / "scenes.json").read_text())
    assert meta["seed"] == 9 and len(meta["scenes"]) == 4
    for record in meta["scenes"]:
        scene = world.scene(record["index"])
        assert np.array_equal(np.asarray(Image.open(tmp_path / record["image"])), scene.image)
        assert np.array_equal(np.load(tmp_path / record["masks"])["objects"], scene.object_masks)
        assert record["caption"] == scene.caption()
    assert not list(tmp_path.rglob(".*"))  # no temporary files left behind


def test_word_tokenizer_ends_each_text_with_the_largest_id():
    tokenizer = WordTokenizer(vocabulary(), context_length=12)
    tokens = tokenizer(["a red circle", "a zebra"])
    eot = tokenizer.vocab_size - 1
    assert tokens[0, :5].tolist() == [eot - 1, tokenizer.index["a"], tokenizer.index["red"], tokenizer.index["circle"], eot]
    assert tokens[1, 2].item() == 1  # unknown word
    assert (tokens.argmax(-1) == torch.tensor([4, 3])).all()
    assert WordTokenizer.from_dict(tokenizer.to_dict())("a red circle").equal(tokens[:1])
    with pytest.raises(InputError, match="at most 10 fit"):
        tokenizer("a " * 11)


def test_text_bank_and_descriptors_are_covered_by_the_vocabulary():
    bank = text_bank()
    assert len(bank) == len(set(bank)) > 400
    for attribute in ATTRIBUTES:
        for value in VALUES[attribute]:
            assert attribute_prompt(attribute, value) in bank
    assert set(DESCRIPTORS) == set(VALUES["shape"]) and all(len(d) >= 5 for d in DESCRIPTORS.values())
    tokenizer = WordTokenizer(vocabulary())
    assert (tokenizer(bank) == 1).sum().item() == 0  # no unknown words


@pytest.mark.parametrize("attribute", ["colour", "shape", "size", "position", "background"])
def test_variants_differ_only_in_the_varied_attribute(attribute):
    world = ShapesWorld(seed=4)
    scenes = world.variants(17, attribute, 2)
    first, second = scenes
    assert first.value(attribute) != second.value(attribute)
    for other in ("colour", "shape", "size", "position", "background"):
        if other != attribute:
            assert first.value(other) == second.value(other), other
    if attribute == "background":  # same object pixels, only the texture changes
        assert (first.object_masks == second.object_masks).all()
        assert (first.image[first.object_masks[0]] == second.image[second.object_masks[0]]).all()
    else:  # same background texture and noise wherever neither object is drawn
        uncovered = ~(first.object_masks.any(0) | second.object_masks.any(0))
        assert (first.image[uncovered] == second.image[uncovered]).all()
    with pytest.raises(InputError, match="n must lie in 1..2"):
        world.variants(17, "size", 3)
