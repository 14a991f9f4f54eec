"""Baselines of the segmentation evaluation, and their intervals: each checked against a value computed here
independently of the plugin (from the masks, from hand-made images, from ``clip_lens.stats.bootstrap_ci``)."""

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from clip_lens import HookedCLIP
from clip_lens.errors import InputError
from clip_lens.stats import bootstrap_ci
from clip_lens_plugins.segmentation import SegmentationData, SegmentationEval, SegmentationEvalResult, shapes_world_segmentation
from clip_lens_plugins.segmentation.baselines import chroma_map, contrast_map
from clip_lens_plugins.segmentation.evaluation import BASELINES, METRICS
from clip_lens_plugins.segmentation.heads import parse_heads, random_head_sets, random_per_layer_sets
from clip_lens_plugins.segmentation.metrics import (
    SegmentationScore, average_precision, average_precisions, foreground_scores, image_intervals, threshold_at_mean,
)

RANDOM_ROW = "random 4 heads"
ALL_LAYER_ROW = "random 16 heads drawn per layer (4/4/4/4)"


@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def evaluated(toy):
    """The default evaluation on 16 and on 64 held-out scenes: {n: (dataset, result)}."""
    runs = {}
    for n in (16, 64):
        data = shapes_world_segmentation(n)
        runs[n] = data, SegmentationEval(toy).run(data, batch_size=32)
    return runs


def masks_of(data: SegmentationData) -> np.ndarray:
    return data.load(0, len(data))[1].numpy()


class TestTrivialBaselines:
    def test_all_background_scores_the_background_share(self, evaluated):
        data, result = evaluated[64]
        masks = masks_of(data)
        background = (~masks).sum() / masks.size
        row = result.table["all background"]
        assert row["pixel_accuracy"] == pytest.approx(background, abs=1e-12)
        assert row["object_iou"] == 0.0
        assert row["mean_iou"] == pytest.approx(background / 2, abs=1e-12)  # background IoU = its share, object 0
        assert row["mean_ap"] == pytest.approx(np.mean([m.mean() for m in masks]), abs=1e-12)  # a constant score
        assert 0.9 < background < 1  # the shapes world's objects are small: the trivial map is 90%+ right

    def test_uniform_map_ap_is_the_foreground_share(self, evaluated):
        data, result = evaluated[64]
        masks = masks_of(data)
        shares = [m.sum() / m.size for m in masks]  # per image: AP of a constant map ranks every pixel alike
        row = result.table["uniform"]
        assert row["mean_ap"] == pytest.approx(np.mean(shares), abs=1e-12)
        assert row["pixel_accuracy"] == pytest.approx(masks.sum() / masks.size, abs=1e-12)  # all foreground
        assert row["object_iou"] == pytest.approx(masks.sum() / masks.size, abs=1e-12)

    def test_mean_iou_is_carried_by_the_background(self, evaluated):
        """The reason object IoU is reported: all-background has no object pixel right, yet an mIoU near 50."""
        row = evaluated[64][1].table["all background"]
        assert row["object_iou"] == 0 and row["mean_iou"] > 0.45


def square_scene(background, square, size=64, low=16, high=32, noise=0.0, seed=0):
    """A [3, size, size] image in [0, 1]: ``background`` (an RGB colour or a [3, size, size] array) with
    a ``square``-coloured square at rows and columns ``low:high``, and its mask."""
    background = torch.as_tensor(np.asarray(background, np.float32))
    pixels = background.view(3, 1, 1).expand(3, size, size).clone() if background.ndim == 1 else background.clone()
    pixels[:, low:high, low:high] = torch.tensor(square).view(3, 1, 1)
    pixels += noise * torch.randn(pixels.shape, generator=torch.Generator().manual_seed(seed))
    mask = np.zeros((size, size), bool)
    mask[low:high, low:high] = True
    return pixels.clamp(0, 1), mask


def iou(predicted: np.ndarray, mask: np.ndarray) -> float:
    return (predicted & mask).sum() / (predicted | mask).sum()


class TestColourMaps:
    def test_chroma_finds_a_saturated_square_on_grey_textures(self):
        yy, xx = np.mgrid[0:64, 0:64]
        stripes = np.where((xx + yy) // 4 % 2 == 0, 0.30, 0.50)  # v1-like grey stripes: chroma 0
        # with the worlds' pixel noise (0.02) some grey pixels pass the mean: IoU 0.945
        for noise, at_least in [(0.0, 1.0), (0.02, 0.9)]:
            pixels, mask = square_scene(np.repeat(stripes[None], 3, 0), (0.9, 0.1, 0.1), noise=noise)
            predicted = threshold_at_mean(foreground_scores(chroma_map(pixels[None])))[0].numpy()
            assert iou(predicted, mask) >= at_least

    def test_contrast_finds_a_square_of_another_hue_where_chroma_cannot(self):
        pixels, mask = square_scene((1.0, 0.55, 0.0), (0.1, 0.25, 0.95))  # blue on orange: chroma 0.85 < 1.0
        predicted = {name: threshold_at_mean(foreground_scores(f(pixels[None])))[0].numpy()
                     for name, f in [("chroma", chroma_map), ("contrast", contrast_map)]}
        assert iou(predicted["contrast"], mask) == 1.0
        assert iou(predicted["chroma"], mask) == pytest.approx(mask.mean())  # nothing above the median: all foreground

    def test_the_evaluation_undoes_the_model_normalisation(self, toy):
        grey, mask = square_scene((0.4, 0.4, 0.4), (0.1, 0.75, 0.15))
        images = (grey[None] - 0.5) / 0.5  # toy-shapes' Normalize(mean 0.5, std 0.5)
        data = SegmentationData.from_tensors(images.repeat(2, 1, 1, 1), torch.from_numpy(mask).repeat(2, 1, 1))
        result = SegmentationEval(toy).run(data, classes=["a red shape", "a green shape"], random_draws=2, n_boot=50)
        assert result.table["chroma (no model)"]["object_iou"] == 1.0
        assert result.table["colour contrast (no model)"]["object_iou"] == 1.0


class TestRandomHeads:
    def test_distinct_sets_of_the_right_size_reproducible_by_seed(self):
        draws = random_head_sets(4, 4, 4, 10, seed=3)
        keys = [tuple(d.labels) for d in draws]
        assert len(keys) == 10 and len(set(keys)) == 10
        assert all(d.size == 4 and d.mask.shape == (4, 4) for d in draws)
        assert keys == [tuple(d.labels) for d in random_head_sets(4, 4, 4, 10, seed=3)]
        assert keys != [tuple(d.labels) for d in random_head_sets(4, 4, 4, 10, seed=4)]
        assert len(random_head_sets(2, 2, 3, 10)) == math.comb(4, 3)  # fewer sets exist than asked for
        with pytest.raises(InputError, match="1..16 heads"):
            random_head_sets(4, 4, 17, 1)

    def test_the_evaluation_control(self, toy, evaluated):
        _, result = evaluated[16]
        control = result.random_heads[RANDOM_ROW]
        assert control["methods"] == ["decomposition (last layer)"] and control["size"] == 4 and control["seed"] == 0
        assert len(control["draws"]) == 10 and len({tuple(d) for d in control["draws"]}) == 10
        assert all(len(d) == 4 for d in control["draws"])
        for metric, values in control["per_draw"].items():
            assert result.table[RANDOM_ROW][metric] == pytest.approx(np.mean(values))
        again = SegmentationEval(toy).run(shapes_world_segmentation(16), batch_size=32)
        assert again.random_heads == result.random_heads and again.table == result.table
        other = SegmentationEval(toy).run(shapes_world_segmentation(16), batch_size=32, seed=1, n_boot=50)
        assert other.random_heads[RANDOM_ROW]["draws"] != control["draws"]
        # a method over every head has no random *set* of its size but itself: its control is drawn per layer
        assert list(result.random_heads) == [RANDOM_ROW, ALL_LAYER_ROW]

    def test_the_all_layer_control_keeps_each_layers_head_count_and_draws_with_replacement(self, evaluated):
        everything = parse_heads("all", 4, 4)
        draws = random_per_layer_sets(everything, 200, seed=0)
        counts = torch.stack([d.counts for d in draws]).float()  # [draw, layer, head]
        assert (counts.sum(2) == 4).all()  # four heads in every layer, like the all-layer map
        assert (counts != 1).any((1, 2)).float().mean() > 0.9  # with replacement: almost no draw is the map itself
        assert (counts.mean(0) - 1).abs().max() < 0.25  # each head once on average
        assert [d.labels for d in random_per_layer_sets(everything, 5, seed=0)] == [d.labels for d in draws[:5]]
        assert random_per_layer_sets(parse_heads(["L0H1", "L0H2", "L3H0"], 4, 4), 1)[0].counts.sum(1).tolist() == [2, 0, 0, 1]
        _, result = evaluated[16]
        control = result.random_heads[ALL_LAYER_ROW]
        assert control["methods"] == ["decomposition (all layers)"] and control["size"] == 16
        assert all(len(d) == 16 for d in control["draws"])
        for metric, values in control["per_draw"].items():
            assert result.table[ALL_LAYER_ROW][metric] == pytest.approx(np.mean(values))

    def test_head_keys_as_a_method(self, toy):
        result = SegmentationEval(toy).run(shapes_world_segmentation(8), layers={"L1H2": ["L1H2"]}, random_draws=3, n_boot=50)
        assert result.heads == {"L1H2": ["L1H2"]} and result.layers == {"L1H2": [1]}
        assert list(result.table)[:2] == ["L1H2", "random 1 head"]
        assert [len(d) for d in result.random_heads["random 1 head"]["draws"]] == [1, 1, 1]

    def test_methods_of_one_size_share_a_control(self, toy):
        result = SegmentationEval(toy).run(shapes_world_segmentation(8), layers={"layer 0": [0], "layer 1": [1], "all": "all"},
                                           random_draws=2, n_boot=50)
        assert list(result.random_heads) == ["random 4 heads", ALL_LAYER_ROW]
        assert result.random_heads["random 4 heads"]["methods"] == ["layer 0", "layer 1"]
        with pytest.raises(InputError, match="is a baseline's row name"):
            SegmentationEval(toy).run(shapes_world_segmentation(2), layers={"uniform": [0]})


class TestIntervals:
    def test_intervals_contain_the_estimates_and_shrink_with_more_images(self, evaluated):
        small, large = evaluated[16][1], evaluated[64][1]
        assert set(large.intervals) == set(large.table)
        for result in (small, large):
            for row, metrics in result.table.items():
                for metric, value in metrics.items():
                    low, high = result.intervals[row][metric]
                    assert low - 1e-12 <= value <= high + 1e-12, (row, metric)
        for row in large.table:
            for metric in METRICS:
                width_small = np.subtract(*small.intervals[row][metric][::-1])
                width_large = np.subtract(*large.intervals[row][metric][::-1])
                if width_small > 0.005:
                    assert width_large < width_small, (row, metric)

    def test_one_map_gives_the_interval_of_bootstrap_ci(self):
        generator = torch.Generator().manual_seed(0)
        maps = torch.rand(40, 16, 16, generator=generator)
        masks = torch.rand(40, 16, 16, generator=generator) < maps * 0.3  # brighter pixels more often foreground
        masks[5] = False  # an image without foreground: left out of AP, kept in the pooled counts
        score = SegmentationScore()
        score.update(maps, masks)
        intervals = image_intervals([score], n_boot=300, seed=7)
        predicted = threshold_at_mean(maps)

        def accuracy(picked):
            i = picked.astype(int)
            return int((predicted[i] == masks[i]).sum()) / masks[i].numel()

        assert intervals["pixel_accuracy"] == pytest.approx(list(bootstrap_ci(np.arange(40), accuracy, 300, seed=7)), abs=1e-12)
        precisions = np.array([average_precision(m, t) for m, t in zip(maps, masks)])
        with_foreground = precisions[~np.isnan(precisions)]
        assert len(with_foreground) == 39
        assert intervals["mean_ap"] == pytest.approx(list(bootstrap_ci(with_foreground, np.mean, 300, seed=7)), abs=1e-12)

    def test_identical_draws_add_no_width(self):
        generator = torch.Generator().manual_seed(1)
        maps, masks = torch.rand(30, 8, 8, generator=generator), torch.rand(30, 8, 8, generator=generator) < 0.2
        scores = [SegmentationScore() for _ in range(3)]
        for score in scores:
            score.update(maps, masks)
        one, three = image_intervals(scores[:1], n_boot=200), image_intervals(scores, n_boot=200)
        for metric in one:
            assert three[metric] == pytest.approx(one[metric], abs=1e-12)

    def test_batched_ap_equals_the_per_image_definition(self):
        generator = torch.Generator().manual_seed(2)
        maps = (torch.rand(12, 16, 16, generator=generator) * 6).floor()  # many ties
        masks = torch.rand(12, 16, 16, generator=generator) < 0.15
        masks[0] = False
        expected = [average_precision(m, t) for m, t in zip(maps, masks)]
        np.testing.assert_allclose(average_precisions(maps, masks).numpy(), expected, rtol=0, atol=1e-12)


class TestResult:
    def test_markdown_round_trip_and_plot(self, evaluated, tmp_path):
        result = evaluated[16][1]
        markdown = result.to_markdown()
        rows = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line][1:]
        assert [r.split("|")[1].strip() for r in rows] == list(result.table)
        assert result.baselines == [RANDOM_ROW, ALL_LAYER_ROW, *BASELINES]
        low, high = result.intervals["raw attention"]["object_iou"]
        assert f"{100 * result.table['raw attention']['object_iou']:.1f} [{100 * low:.1f}, {100 * high:.1f}]" in markdown
        assert "| method | pixel acc | object IoU | mIoU | mAP |" in markdown
        assert SegmentationEvalResult.load(result.save(tmp_path / "eval.json")) == result
        assert isinstance(result.plot(), Figure)

    def test_a_result_saved_before_the_baselines_still_loads(self):
        old = {"model": "toy-shapes", "dataset": "4 shapes-world scenes", "n_images": 4, "classes": ["a", "b"],
               "layers": {"decomposition": [3]}, "zero_shot_accuracy": None,
               "table": {"decomposition": {"pixel_accuracy": 0.9, "mean_iou": 0.6, "mean_ap": 0.7}}}
        result = SegmentationEvalResult.from_dict(old)
        assert "| decomposition | 90.0 | – | 60.0 | 70.0 |" in result.to_markdown()
        assert result.intervals == {} and isinstance(result.plot(), Figure)


def test_world_versions_differ_in_background_colour():
    """The docstring's claim: v1 backgrounds are grey (only the object is saturated), v2 textures are coloured."""
    chroma = {}
    for version in (1, 2):
        data = shapes_world_segmentation(16, version=version)
        images, masks = data.load(0, 16)
        pixels = (images + 1) / 2
        background_chroma = (pixels.amax(1) - pixels.amin(1))[~masks]
        chroma[version] = float(background_chroma.mean())
        assert data.classes[0] == "a red shape" and masks.any((1, 2)).all()
    assert chroma[1] < 0.05 < 0.15 < chroma[2]
    assert "v2" in shapes_world_segmentation(1, version=2).description
    with pytest.raises(InputError, match="version"):
        shapes_world_segmentation(1, version=3)
