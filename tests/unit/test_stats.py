"""clip_lens.stats: correlations against independent computations, and bootstrap intervals that cover
a known true value at their nominal rate on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clip_lens.errors import InputError
from clip_lens.stats import bootstrap_ci, bootstrap_correlation, correlation, pearson, ranks, spearman


def ranks_by_counting(values: np.ndarray) -> np.ndarray:
    """Average ranks from their definition: values below, plus the middle of the equal ones (O(n²))."""
    values = np.asarray(values, dtype=float)
    below = (values[None, :] < values[:, None]).sum(1)
    equal = (values[None, :] == values[:, None]).sum(1)
    return below + (equal + 1) / 2


class TestCorrelations:
    def test_pearson_by_hand(self):
        x, y = [1, 2, 3, 4], [2, 4, 5, 9]
        # centred: x (-1.5, -0.5, 0.5, 1.5), y (-3, -1, 0, 4); Σxy = 11, Σx² = 5, Σy² = 26
        assert pearson(x, y) == pytest.approx(11 / math.sqrt(130), abs=1e-12)
        assert pearson(x, [-v for v in y]) == pytest.approx(-11 / math.sqrt(130), abs=1e-12)
        assert math.isnan(pearson([1, 1, 1], [1, 2, 3])) and math.isnan(pearson([0.1] * 3, [1, 2, 3]))
        assert math.isnan(pearson([1, 2, 3], [0, 0, 0]))

    def test_ranks_give_ties_their_average_rank(self):
        assert ranks([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]
        assert ranks([5, 5, 5]).tolist() == [2.0, 2.0, 2.0]
        values = np.random.default_rng(0).integers(0, 6, size=(50, 30)).astype(float)  # many ties
        by_row = ranks(values)
        for row, expected in zip(by_row, values):
            np.testing.assert_array_equal(row, ranks_by_counting(expected))

    def test_spearman_by_hand(self):
        # ranks (1, 2.5, 2.5, 4) vs (1, 3, 2, 4): Σ = 4.5, Σx² = 4.5, Σy² = 5
        assert spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-12)
        assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0, abs=1e-12)  # monotone, not linear
        assert pearson([1, 2, 3, 4], [1, 8, 27, 64]) < 0.99
        rng = np.random.default_rng(1)
        x, y = rng.standard_normal(40), rng.standard_normal(40)
        d = ranks_by_counting(x) - ranks_by_counting(y)  # no ties: the classic 1 − 6 Σd² / (n (n² − 1))
        assert spearman(x, y) == pytest.approx(1 - 6 * (d**2).sum() / (40 * (40**2 - 1)), abs=1e-12)

    def test_vectorised_rows_equal_numpy_corrcoef(self):
        rng = np.random.default_rng(2)
        x, y = rng.standard_normal((20, 15)), rng.integers(0, 4, size=(20, 15)).astype(float)
        expected_p = [np.corrcoef(a, b)[0, 1] for a, b in zip(x, y)]
        expected_s = [np.corrcoef(ranks_by_counting(a), ranks_by_counting(b))[0, 1] for a, b in zip(x, y)]
        np.testing.assert_allclose(correlation(x, y, "pearson"), expected_p, atol=1e-12)
        np.testing.assert_allclose(correlation(x, y, "spearman"), expected_s, atol=1e-12)
        with pytest.raises(InputError, match="method must be one of pearson, spearman, got 'kendall'"):
            correlation(x, y, "kendall")


def bivariate_normal(rng: np.random.Generator, rho: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal(n)
    return x, rho * x + math.sqrt(1 - rho**2) * rng.standard_normal(n)


class TestBootstrapCorrelation:
    @pytest.mark.parametrize("method, truth", [
        ("pearson", 0.5),
        ("spearman", 6 / math.pi * math.asin(0.5 / 2)),  # Spearman's rho of a bivariate normal with ρ = 0.5
    ])
    def test_paired_units_cover_the_true_correlation(self, method, truth):
        """200 samples of 80 pairs from a bivariate normal with ρ = 0.5: the 95% intervals cover the
        population value in at least 90% of them."""
        rng = np.random.default_rng(3)
        covered = []
        for draw in range(200):
            x, y = bivariate_normal(rng, 0.5, 80)
            low, high = bootstrap_correlation(x, y, method, n_boot=400, seed=draw)
            assert low <= correlation(x, y, method) <= high
            covered.append(low <= truth <= high)
        assert np.mean(covered) >= 0.90

    def test_groups_measured_on_shared_units_cover_the_correlation_of_their_true_means(self):
        """Five checkpoints scored on the same 100 scenes: scene effects shared by all checkpoints and
        noise per checkpoint. The interval over scenes covers the correlation of the true means
        (the value infinitely many scenes would give) in at least 90% of 200 samples."""
        rng = np.random.default_rng(4)
        mean_x = np.array([0.0, 0.2, 0.5, 0.6, 1.0])
        mean_y = np.array([0.1, 0.5, 0.3, 0.8, 0.9])
        truth = pearson(mean_x, mean_y)
        covered = []
        for draw in range(200):
            scene = rng.standard_normal(100)  # one scene is hard for every checkpoint: paired units
            x = mean_x[:, None] + 0.5 * scene + 0.6 * rng.standard_normal((5, 100))
            y = mean_y[:, None] + 0.3 * scene + 0.6 * rng.standard_normal((5, 100))
            low, high = bootstrap_correlation(x, y, n_boot=400, seed=draw)
            covered.append(low <= truth <= high)
        assert np.mean(covered) >= 0.90

    def test_groups_without_scene_variation_have_a_point_interval(self):
        # every scene gives each group the same value: no resample can change the correlation
        x = np.repeat(np.array([[1.0], [2.0], [4.0]]), 30, axis=1)
        y = np.repeat(np.array([[3.0], [1.0], [2.0]]), 30, axis=1)
        low, high = bootstrap_correlation(x, y, "pearson")
        assert low == pytest.approx(pearson([1, 2, 4], [3, 1, 2]), abs=1e-12) == pytest.approx(high, abs=1e-12)

    def test_undefined_resamples_are_left_out(self):
        # pairs (0, 0) ×9 and (1, 1): a resample of only the first pair has no correlation; the rest give 1
        x = y = np.array([0.0] * 9 + [1.0])
        assert bootstrap_correlation(x, y) == (1.0, 1.0)
        assert all(math.isnan(v) for v in bootstrap_correlation(np.zeros(5), np.arange(5.0)))

    def test_bad_input(self):
        with pytest.raises(InputError, match=r"both be \[n\] or both be \[groups, n\], got shapes \(3,\) and \(4,\)"):
            bootstrap_correlation([1, 2, 3], [1, 2, 3, 4])
        with pytest.raises(InputError, match="at least two points"):
            bootstrap_correlation([[1.0, 2.0]], [[1.0, 2.0]])
        with pytest.raises(InputError, match="method must be one of"):
            bootstrap_correlation([1, 2, 3], [1, 2, 3], method="kendall")


def test_bootstrap_ci_of_a_rate_covers_the_true_rate():
    """0/1 outcomes with p = 0.3, 200 samples of 100: the interval of the mean covers 0.3 at least 90% of the time."""
    rng = np.random.default_rng(5)
    covered = [low <= 0.3 <= high for low, high in
               (bootstrap_ci((rng.random(100) < 0.3).astype(float), n_boot=400, seed=s) for s in range(200))]
    assert np.mean(covered) >= 0.90
