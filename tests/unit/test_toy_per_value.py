"""Per-value reporting of the shapes-world evaluation: accuracy per true value, the confusion rows, and
the words for an accuracy against chance, which follow its interval."""

from __future__ import annotations

import numpy as np
import pytest

from clip_lens.stats import bootstrap_ci
from clip_lens.toy.evaluate import BindingResult, _per_value, versus_chance


def test_per_value_accuracy_and_confusion_count_each_true_value_on_its_own_scenes():
    values = ["one", "two", "three", "four"]
    # three-object scenes (index 2) called "four" 3 times in 4; "two" never shown
    truths = [0, 0, 2, 2, 2, 2, 3]
    predictions = [0, 1, 3, 3, 3, 2, 3]
    accuracy, interval, confusion = _per_value(values, truths, predictions)
    assert accuracy == {"one": 0.5, "three": 0.25, "four": 1.0}  # no row for a value no scene showed
    assert confusion["three"] == {"one": 0.0, "two": 0.0, "three": 0.25, "four": 0.75}
    assert interval["three"] == bootstrap_ci([0.0, 0.0, 0.0, 1.0])
    assert all(sum(row.values()) == pytest.approx(1.0) for row in confusion.values())


def test_overall_accuracy_is_the_scene_weighted_mean_of_the_per_value_ones():
    rng = np.random.default_rng(3)
    truths = rng.integers(0, 4, 500).tolist()
    predictions = [t if rng.random() < 0.6 else int(rng.integers(0, 4)) for t in truths]
    accuracy, _, _ = _per_value(list("abcd"), truths, predictions)
    counts = np.bincount(truths, minlength=4)
    overall = np.mean(np.asarray(truths) == np.asarray(predictions))
    assert sum(accuracy[v] * counts[i] for i, v in enumerate("abcd")) / counts.sum() == pytest.approx(overall)


@pytest.mark.parametrize("accuracy, interval, words", [
    (0.498, (0.476, 0.520), "at chance (0.498 [0.476, 0.520]; chance 0.5)"),
    (0.529, (0.508, 0.550), "above chance by 3 points (0.529 [0.508, 0.550]; chance 0.5)"),
    (0.522, (0.500, 0.544), "at chance (0.522 [0.500, 0.544]; chance 0.5)"),  # an interval touching chance holds it
    (0.41, (0.38, 0.44), "below chance by 9 points (0.410 [0.380, 0.440]; chance 0.5)"),
])
def test_words_against_chance_follow_the_interval_not_the_point(accuracy, interval, words):
    assert versus_chance(accuracy, interval, 0.5) == words


def test_binding_verdicts_word_every_test():
    result = BindingResult(accuracy={"colour_shape": 0.498, "relation_colours": 0.529},
                           interval={"colour_shape": (0.476, 0.52), "relation_colours": (0.508, 0.55)},
                           chance=0.5, n_scenes=2000, seed=1)
    verdicts = result.verdicts()
    assert verdicts["colour_shape"].startswith("at chance") and verdicts["relation_colours"].startswith("above chance by 3 points")
