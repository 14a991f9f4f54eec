"""Segmentation analyses: topic maps, contrastive maps and zero-shot segmentation on the toy model."""

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import clip_lens.analyses
from clip_lens import HookedCLIP
from clip_lens.errors import InputError
from clip_lens.toy.world import ShapesWorld, batch_images
from clip_lens_plugins.segmentation import (
    ContrastiveResult, ContrastiveSegmentation, HeatmapResult, Segmentation, SegmentationData, SegmentationEval,
    SegmentationEvalResult, average_precision, folder_segmentation, mean_iou, pixel_accuracy, shapes_world_segmentation,
)
from clip_lens_plugins.segmentation.maps import upsample
from clip_lens_plugins.segmentation.metrics import SegmentationScore, foreground_scores, threshold_at_mean
from tests.seeds import TEST_SEEDS


@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def scenes():
    world = ShapesWorld(seed=TEST_SEEDS[6], n_objects=1)  # a test world, held out from the toy's training (seed 0)
    return [world.scene(i) for i in range(480)]


def pick(scenes, keep, n=None):
    chosen = [s for s in scenes if keep(s)][:n]
    return batch_images(chosen), torch.from_numpy(np.stack([s.object_masks[0] for s in chosen]))


class TestTopicMaps:
    @pytest.mark.parametrize("head", ["L3H0", "all", ["L1H2", "L2H0"], [1, -1]])
    def test_patches_and_prefix_sum_to_the_heads_share(self, toy, scenes, head):
        images, _ = pick(scenes, lambda s: True, 6)
        result = Segmentation(toy).run(images, "a red shape", head=head)
        text = toy.encode_text(toy.to_tokens(["a red shape"]), normalize=True)
        heads = toy.decompose(images, heads="all", directions=text).normalized().heads[..., 0]  # [batch, layer, head]
        chosen = torch.zeros(4, 4, dtype=torch.bool)
        for key in result.heads:
            chosen[int(key[1]), int(key[3])] = True
        expected = (heads * chosen).sum((1, 2))
        torch.testing.assert_close(result.grid.sum((1, 2)) + result.prefix, expected, atol=1e-6, rtol=0)
        assert result.grid.shape == (6, 8, 8) and result.raw.shape == (6, 64, 64)
        assert result.maps.min() == 0 and result.maps.amax((1, 2)).eq(1).all()

    def test_head_specs_select_heads(self, toy, scenes):
        images, _ = pick(scenes, lambda s: True, 2)
        segmentation = Segmentation(toy)
        assert segmentation.run(images, "a shape", head="all").heads == [f"L{l}H{h}" for l in range(4) for h in range(4)]
        assert segmentation.run(images, "a shape", head=[-1]).heads == ["L3H0", "L3H1", "L3H2", "L3H3"]
        assert segmentation.run(images, "a shape", head=["L2H1", "L0H3"]).heads == ["L0H3", "L2H1"]

    def test_bilinear_upsampling_is_exact_on_a_ramp(self):
        ramp = torch.arange(8.0).expand(2, 8, 8)  # value = patch column
        pixels = upsample(ramp, (64, 64))
        assert pixels.shape == (2, 64, 64)
        x = torch.arange(4, 60, dtype=torch.float32)  # away from the clamped borders
        torch.testing.assert_close(pixels[:, :, 4:60], ((x + 0.5) / 8 - 0.5).expand(2, 64, -1))
        torch.testing.assert_close(upsample(torch.full((1, 8, 8), 3.0), (64, 48)), torch.full((1, 64, 48), 3.0))

    def test_colour_maps_light_up_the_red_object(self, toy, scenes):
        """Measured on 500 held-out red scenes: all heads 100% inside > outside (0.51 vs 0.05);
        L1H2 100% (0.38 vs 0.01); L3H0 writes 'red' through CLS (0.048 of 0.048), its patch map 0.8%."""
        images, masks = pick(scenes, lambda s: s.objects[0].colour == "red")
        assert len(images) >= 50
        segmentation = Segmentation(toy)
        for head, at_least in [("all", 0.97), ("L1H2", 0.97)]:
            inside, outside = segmentation.run(images, "a red shape", head=head).inside_outside(masks).T
            assert (inside > outside).float().mean() >= at_least
            assert inside.mean() > 5 * outside.mean()
        colour_head = segmentation.run(images, "a red shape", head="L3H0")
        assert colour_head.prefix.mean() > 0.9 * (colour_head.prefix + colour_head.grid.sum((1, 2))).mean()
        inside, outside = colour_head.inside_outside(masks).T
        assert (inside > outside).float().mean() <= 0.05

    def test_texture_head_writes_stripes_from_the_background(self, toy, scenes):
        """Measured on 500 held-out striped scenes: L3H3's share of 'striped' is 0.105, all of it from
        background patches; its map is higher outside the object in 97% of them (0.032 vs 0.003)."""
        images, masks = pick(scenes, lambda s: s.background == "striped")
        result = Segmentation(toy).run(images, "a shape on a striped background", head="L3H3")
        object_patches = torch.nn.functional.avg_pool2d(masks[:, None].float(), 8)[:, 0]
        on_object = (result.grid * object_patches).sum((1, 2))
        total = result.grid.sum((1, 2)) + result.prefix
        assert total.mean() > 0.08 and on_object.abs().mean() < 0.01 * total.mean()
        inside, outside = result.inside_outside(masks).T
        assert (outside > inside).float().mean() >= 0.9


class TestContrastive:
    def test_maps_are_exact_negatives_and_differences_of_topic_maps(self, toy, scenes):
        images, _ = pick(scenes, lambda s: True, 5)
        result = ContrastiveSegmentation(toy).run(images, "a red shape", "a blue shape", heads="all")
        assert torch.equal(result.b_minus_a, -result.a_minus_b)
        segmentation = Segmentation(toy)
        a, b = (segmentation.run(images, text, head="all").grid for text in ("a red shape", "a blue shape"))
        torch.testing.assert_close(result.a_minus_b, a - b, atol=1e-6, rtol=0)
        a_minus_b, b_minus_a = result.maps  # one min/max for both: -m and m, so they add up to 1
        torch.testing.assert_close(a_minus_b + b_minus_a, torch.ones_like(a_minus_b))

    def test_all_really_aggregates_every_head(self, toy, scenes):
        images, _ = pick(scenes, lambda s: True, 5)
        contrastive = ContrastiveSegmentation(toy)
        everything = contrastive.run(images, "a red shape", "a blue shape")
        last_head = contrastive.run(images, "a red shape", "a blue shape", heads="L3H3")  # what the reference used
        assert not torch.allclose(everything.a_minus_b, last_head.a_minus_b, atol=1e-3)
        per_layer = sum(contrastive.run(images, "a red shape", "a blue shape", heads=[l]).a_minus_b for l in range(4))
        torch.testing.assert_close(everything.a_minus_b, per_layer, atol=1e-6, rtol=0)
        assert len(everything.heads) == 16


class TestMetrics:
    def test_hand_made_masks(self):
        predicted = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
        target = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
        assert pixel_accuracy(predicted, target) == 0.75
        assert mean_iou(predicted, target) == pytest.approx((1 / 3 + 5 / 7) / 2)  # fg 1/3, bg 5/7
        assert mean_iou(target, target) == 1.0

    def test_average_precision(self):
        target = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
        assert average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), target) == pytest.approx(5 / 6)
        assert average_precision(torch.tensor([0.5, 0.5, 0.1, 0.1]), target) == pytest.approx(0.5)  # ties enter together
        assert average_precision(torch.tensor([0.1, 0.0, 0.2, 0.0]), target) == 1.0
        assert average_precision(torch.ones(4), torch.tensor([1, 0, 0, 0], dtype=torch.bool)) == 0.25
        assert math.isnan(average_precision(torch.ones(4), torch.zeros(4, dtype=torch.bool)))

    def test_protocol_clips_normalises_and_thresholds_at_the_mean(self):
        scores = foreground_scores(torch.tensor([[[-1.0, 0.0], [1.0, 3.0]]]))
        torch.testing.assert_close(scores, torch.tensor([[[0.0, 0.0], [1 / 3, 1.0]]]))
        assert threshold_at_mean(scores).tolist() == [[[False, False], [True, True]]]
        assert threshold_at_mean(torch.zeros(1, 2, 2)).all()  # a constant map is all foreground

    def test_uniform_map_scores_the_foreground_share(self):
        target = torch.zeros(2, 4, 4, dtype=torch.bool)
        target[0, :2, :2] = target[1, 0, :2] = True  # shares 4/16 and 2/16
        score = SegmentationScore()
        score.update(torch.ones(2, 4, 4), target)
        assert score.summary() == pytest.approx(
            {"pixel_accuracy": 6 / 32, "object_iou": 6 / 32, "mean_iou": 6 / 32 / 2, "mean_ap": (4 / 16 + 2 / 16) / 2}
        )


class TestEvaluation:
    def test_shapes_world_table(self, toy, tmp_path):
        """Measured on 1,000 scenes (colour classes), mAP: all layers 80.2, last layer 38.0, raw attention
        22.8, uniform 4.5 (= foreground share); pixel acc 92.3 / 81.6 / 85.5 / 4.5."""
        data = shapes_world_segmentation(120)
        result = SegmentationEval(toy).run(data, batch_size=50)
        table = result.table
        assert result.zero_shot_accuracy == 1.0 and result.n_images == 120
        assert list(table) == ["decomposition (all layers)", "decomposition (last layer)",
                               "random 4 heads", "random 16 heads drawn per layer (4/4/4/4)", "raw attention", "chroma (no model)",
                               "colour contrast (no model)", "uniform", "all background"]
        assert result.baselines == list(table)[2:]
        assert result.layers == {"decomposition (all layers)": [0, 1, 2, 3], "decomposition (last layer)": [3]}
        assert result.heads["decomposition (last layer)"] == ["L3H0", "L3H1", "L3H2", "L3H3"]
        share = float(torch.cat([data.load(0, 120)[1]]).float().mean())
        assert table["uniform"] == pytest.approx({"pixel_accuracy": share, "object_iou": share, "mean_iou": share / 2,
                                                  "mean_ap": share})
        assert table["decomposition (all layers)"]["mean_ap"] > 0.7
        assert table["decomposition (all layers)"]["mean_ap"] > table["decomposition (last layer)"]["mean_ap"] + 0.2
        assert table["decomposition (last layer)"]["mean_ap"] > table["raw attention"]["mean_ap"] + 0.05
        assert table["decomposition (all layers)"]["pixel_accuracy"] > table["raw attention"]["pixel_accuracy"] > 0.8
        assert "| raw attention |" in result.to_markdown()
        assert isinstance(result.plot(), Figure)
        assert SegmentationEvalResult.load(result.save(tmp_path / "eval.json")) == result

    def test_shape_classes_and_custom_layers(self, toy):
        """Measured on 500 scenes with shape classes: all-layer mAP 48.0, layer-1 alone 52.1."""
        data = shapes_world_segmentation(60, attribute="shape")
        assert data.classes[:2] == ["a circle", "a square"]
        result = SegmentationEval(toy).run(data, layers=[1])
        assert list(result.table) == ["decomposition", "random 4 heads", "raw attention",
                                      "chroma (no model)", "colour contrast (no model)", "uniform", "all background"]
        assert result.table["decomposition"]["mean_ap"] > 0.4 and result.zero_shot_accuracy > 0.9

    def test_class_embeddings_and_errors(self, toy):
        data = shapes_world_segmentation(4)
        classes = toy.encode_text(toy.to_tokens(data.classes))
        result = SegmentationEval(toy).run(data, classes=classes)
        assert result.zero_shot_accuracy is None and result.classes[0] == "class 0"
        with pytest.raises(InputError, match="at least 2 classes"):
            SegmentationEval(toy).run(data, classes=["a red shape"])
        with pytest.raises(InputError, match="must be a SegmentationData"):
            SegmentationEval(toy).run(torch.zeros(2, 3, 64, 64))
        with pytest.raises(InputError, match="layer 4 .* out of range"):
            SegmentationEval(toy).run(data, layers=[4])


def write_folder(root, images: dict, masks: dict):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name, array in images.items():
        Image.fromarray(array).save(root / "images" / name)
    for name, array in masks.items():
        Image.fromarray(array).save(root / "masks" / name)
    return root


class TestFolder:
    def test_masks_follow_the_image_resize_and_centre_crop(self, toy, tmp_path):
        # 192x128 (w x h): resized to 96x64, centre-cropped to columns 16..80 of the resized image
        image = np.full((128, 192, 3), 60, np.uint8)
        mask = np.zeros((128, 192), np.uint8)
        image[20:60, 40:80] = 250
        mask[20:60, 40:80] = 1  # nonzero = foreground
        small = np.zeros((64, 64, 3), np.uint8)
        root = write_folder(tmp_path / "d", {"wide.png": image, "small.jpg": small},
                            {"wide.png": mask, "small.png": np.zeros((64, 64), np.uint8)})
        data = folder_segmentation(root, toy.preprocess)
        assert len(data) == 2 and data.ids == ["small", "wide"]
        images, masks = data.load(0, 2)
        assert images.shape == (2, 3, 64, 64) and masks.dtype == torch.bool and not masks[0].any()
        expected = torch.zeros(64, 64, dtype=torch.bool)
        expected[10:30, 4:24] = True  # (rows 20:60, cols 40:80) / 2, minus the 16-column crop
        assert torch.equal(masks[1], expected)
        assert torch.equal(images[1].mean(0) > 0.5, expected)  # the bright square sits under the mask
        with pytest.raises(InputError, match="has no classes"):
            SegmentationEval(toy).run(data)
        assert SegmentationEval(toy).run(data, classes=["a red shape", "a blue shape"]).n_images == 2

    def test_folder_errors(self, toy, tmp_path):
        with pytest.raises(InputError, match="needs the sub-folders images/ and masks/"):
            folder_segmentation(tmp_path / "nowhere", toy.preprocess)
        empty = write_folder(tmp_path / "empty", {}, {})
        with pytest.raises(InputError, match="dataset is empty"):
            folder_segmentation(empty, toy.preprocess)
        picture = np.zeros((64, 96, 3), np.uint8)
        missing = write_folder(tmp_path / "missing", {"a.png": picture, "b.jpg": picture}, {"a.png": np.zeros((64, 96), np.uint8)})
        with pytest.raises(InputError, match=r"1 images have no mask .*\(expected b.png\)"):
            folder_segmentation(missing, toy.preprocess)
        wrong = write_folder(tmp_path / "wrong", {"a.png": picture}, {"a.png": np.zeros((32, 32), np.uint8)})
        with pytest.raises(InputError, match="mask a.png is 32x32 but image a.png is 96x64"):
            folder_segmentation(wrong, toy.preprocess)
        with pytest.raises(InputError, match="needs a preprocess"):
            folder_segmentation(missing, None)


class TestBadInput:
    def test_heads(self, toy, scenes):
        images, _ = pick(scenes, lambda s: True, 2)
        segmentation = Segmentation(toy)
        with pytest.raises(InputError, match=r"head L9H0 does not exist: the model has layers 0..3 and heads 0..3"):
            segmentation.run(images, "a shape", head="L9H0")
        with pytest.raises(InputError, match="'layer3' is not a head key"):
            segmentation.run(images, "a shape", head=["layer3"])
        with pytest.raises(InputError, match="layer 7 .* out of range"):
            ContrastiveSegmentation(toy).run(images, "a", "b", heads=[7])
        with pytest.raises(InputError, match="heads must be 'all'"):
            segmentation.run(images, "a shape", head=[])

    def test_images_texts_and_datasets(self, toy, scenes):
        images, masks = pick(scenes, lambda s: True, 2)
        with pytest.raises(InputError, match="images are 32x32 but toy-shapes takes 64x64"):
            Segmentation(toy).run(images[..., :32, :32], "a shape")
        with pytest.raises(InputError, match="images is empty"):
            Segmentation(toy).run(images[:0], "a shape")
        with pytest.raises(InputError, match="non-empty strings"):
            ContrastiveSegmentation(toy).run(images, "a red shape", " ")
        with pytest.raises(InputError, match=r"masks \(2, 32, 32\) do not match images \(2, 3, 64, 64\)"):
            SegmentationData.from_tensors(images, masks[:, :32, :32])
        with pytest.raises(InputError, match="dataset is empty"):
            SegmentationData.from_tensors(images[:0], masks[:0])
        with pytest.raises(InputError, match="needs a model"):
            Segmentation(None)


def test_registry_and_protocol(toy):
    for name, cls in [("segmentation", Segmentation), ("contrastive_segmentation", ContrastiveSegmentation),
                      ("segmentation_eval", SegmentationEval)]:
        assert clip_lens.analyses.get(name) is cls
        assert isinstance(cls(toy), clip_lens.analyses.Analysis) and cls.name == name
    assert {"segmentation", "contrastive_segmentation", "segmentation_eval"} <= {i.name for i in clip_lens.analyses.list() if i.ok}


def test_results_plot_and_round_trip(toy, scenes, tmp_path):
    images, _ = pick(scenes, lambda s: True, 3)
    heatmap = Segmentation(toy).run(images, "a red shape", head="L1H2")
    contrastive = ContrastiveSegmentation(toy).run(images, "a red shape", "a shape on a plain background")
    for result in (heatmap, contrastive):
        assert isinstance(result.plot(images), Figure) and isinstance(result.plot(), Figure)
    loaded = HeatmapResult.load(heatmap.save(tmp_path / "h.json"))
    torch.testing.assert_close(loaded.raw, heatmap.raw)
    assert loaded.heads == ["L1H2"]
    loaded = ContrastiveResult.load(contrastive.save(tmp_path / "c.json"))
    torch.testing.assert_close(loaded.maps[0], contrastive.maps[0])
