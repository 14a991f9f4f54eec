"""Mutual knowledge: the paper's MI, the bank MI, dynamics and AUC."""

import math

import pytest
import torch

from clip_lens.errors import InputError
from clip_lens_plugins.mutual_knowledge.information import (
    MI_VARIANTS, auc, mean_curve, mi_bank, mi_dynamics, mi_paper, order_by_image,
)


def test_mi_paper_is_log_of_the_product():
    for lv, lt, m in [(1, 1, 1), (15, 50, 1), (15, 50, 7), (15, 50, 15), (3, 8, 2)]:
        assert mi_paper(lv, lt, m) == pytest.approx(math.log(lv * lt * m), abs=1e-12)
    assert mi_paper(15, 50, 0) == 0.0 and mi_paper(0, 50, 0) == 0.0
    batched = mi_paper(torch.tensor([15, 15, 3]), torch.tensor([50, 50, 8]), torch.tensor([0, 7, 2]))
    assert torch.allclose(batched, torch.tensor([0.0, math.log(15 * 50 * 7), math.log(48)], dtype=torch.float64))
    with pytest.raises(InputError, match="exceeds the smaller set"):
        mi_paper(3, 8, 4)


def test_mi_bank_zero_at_chance_and_by_hand():
    assert mi_bank(4, 5, 1, 20) == pytest.approx(0.0, abs=1e-12)  # chance overlap 4*5/20 = 1
    # N = 10, L_v = 4, L_T = 5, m = 3: table 3, 1, 2, 4 over 10; margins (0.4, 0.6) x (0.5, 0.5)
    by_hand = (0.3 * math.log(0.3 / 0.2) + 0.1 * math.log(0.1 / 0.2)
               + 0.2 * math.log(0.2 / 0.3) + 0.4 * math.log(0.4 / 0.3))
    assert mi_bank(4, 5, 3, 10) == pytest.approx(by_hand, abs=1e-12)
    # below chance (4*5/10 = 2): dependent too; signed by default
    below = 0.0 * 0 + 0.4 * math.log(0.4 / 0.2) + 0.5 * math.log(0.5 / 0.3) + 0.1 * math.log(0.1 / 0.3)
    assert mi_bank(4, 5, 0, 10, signed=False) == pytest.approx(below, abs=1e-12)
    assert mi_bank(4, 5, 0, 10) == pytest.approx(-below, abs=1e-12)
    batched = mi_bank(torch.tensor([4, 4, 4]), 5, torch.tensor([0, 2, 3]), 10)
    assert torch.allclose(batched, torch.tensor([-below, 0.0, by_hand], dtype=torch.float64))
    with pytest.raises(InputError, match="bank has only"):
        mi_bank(8, 8, 2, 10)


def test_dynamics_paper_variant():
    visual, textual = [5, 1, 9, 2, 7], {1, 2, 7, 30}
    curve = mi_dynamics(visual, textual)
    assert len(curve) == len(visual) + 1 and curve[-1] == 0.0
    assert all(a >= b for a, b in zip(curve, curve[1:]))
    assert curve[0] == pytest.approx(math.log(5 * 4 * 3)) and curve[2] == pytest.approx(math.log(5 * 4 * 2))
    assert mi_dynamics([], textual) == [0.0]
    assert set(MI_VARIANTS) == {"paper", "bank"}


def test_dynamics_bank_variant_and_errors():
    curve = mi_dynamics([5, 1, 9, 2, 7], {1, 2, 7, 30}, variant="bank", n_bank=40)
    assert len(curve) == 6 and all(a >= b for a, b in zip(curve, curve[1:]))  # signed: monotone in m
    assert curve[0] > 0 > curve[-1]
    with pytest.raises(InputError, match="needs n_bank"):
        mi_dynamics([1], [1], variant="bank")
    with pytest.raises(InputError, match="Did you mean: paper"):
        mi_dynamics([1], [1], variant="papr")
    with pytest.raises(InputError, match="distinct"):
        mi_dynamics([1, 1], [1])


def test_order_auc_and_mean_curve():
    desc = torch.eye(4)
    image = torch.tensor([0.1, 0.9, 0.5, 0.0])
    assert order_by_image([0, 2, 1], image, desc) == [1, 2, 0]
    with pytest.raises(InputError, match="outside the bank"):
        order_by_image([7], image, desc)
    assert auc([3.0, 2.0, 1.0, 0.0]) == 1.5
    assert mean_curve([[2.0, 2.0, 2.0], [4.0]]) == [3.0, 1.0, 1.0]
