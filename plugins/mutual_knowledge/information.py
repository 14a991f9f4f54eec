"""Mutual information between visual and textual concepts, its dynamics and AUC.

D_v (visual concepts, L_v descriptors) and D_ŷ (textual concepts, L_T descriptors) are sets of
descriptor indices; they share m. Two measures of how much they share:

* ``"paper"`` (`mi_paper`): the quantity the paper's code computes, ``log(L_v · L_T · m)``
  (0 when m = 0). It is a log count, not a mutual information: see `mi_paper`.
* ``"bank"`` (`mi_bank`): a proper mutual information, between "d ∈ D_v" and "d ∈ D_ŷ" for a
  descriptor d drawn uniformly from the bank of N descriptors. It is 0 exactly when the overlap is
  what chance gives (``L_v · L_T / N``), and signed by default so that less overlap than chance
  reads negative.

Dynamics (`mi_dynamics`): D_v's items, most similar to the image first, are replaced one at
a time by a dummy outside D_ŷ, so L_v stays fixed and m falls; the curve has L_v + 1 points and its
mean (`auc`) is the paper's "strength of shared knowledge". Curves of different lengths are
averaged after zero-padding (`mean_curve`), as in the paper's code.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from clip_lens.errors import InputError, close_matches

Count = Union[int, Tensor]


def _is_batched(*values: object) -> bool:
    return any(isinstance(v, Tensor) for v in values)


def _check_counts(n_visual: int, n_textual: int, n_shared: int, n_bank: Optional[int] = None) -> None:
    for name, value in (("n_visual", n_visual), ("n_textual", n_textual), ("n_shared", n_shared), ("n_bank", n_bank)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise InputError(f"{name} must be a non-negative integer; got {value!r}.")
    if n_shared > min(n_visual, n_textual):
        raise InputError(
            f"n_shared={n_shared} exceeds the smaller set (n_visual={n_visual}, n_textual={n_textual}); "
            "the sets cannot share more items than either holds."
        )
    if n_bank is not None and n_visual + n_textual - n_shared > n_bank:
        raise InputError(
            f"the two sets cover {n_visual + n_textual - n_shared} descriptors (n_visual + n_textual - n_shared) "
            f"but the bank has only n_bank={n_bank}; pass the size of the bank the descriptors come from."
        )


def _check_tensor_counts(
    n_visual: Tensor, n_textual: Tensor, n_shared: Tensor, n_bank: Optional[Tensor] = None
) -> None:
    if (n_visual < 0).any() or (n_textual < 0).any() or (n_shared < 0).any():
        raise InputError("counts must be non-negative.")
    if (n_shared > torch.minimum(n_visual, n_textual)).any():
        raise InputError("n_shared exceeds min(n_visual, n_textual) for some entries.")
    if n_bank is not None and (n_visual + n_textual - n_shared > n_bank).any():
        raise InputError("n_visual + n_textual - n_shared exceeds n_bank for some entries.")


def _entropy(p: Tensor) -> float:
    """Shannon entropy (nats) of the probabilities ``p``, with 0 · log 0 = 0."""
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def mi_paper(n_visual: Count, n_textual: Count, n_shared: Count) -> Union[float, Float[Tensor, "..."]]:
    """The paper's "mutual information" of D_v and D_ŷ, computed as its code does.

    X takes the L_v visual items uniformly, Y the L_T textual items uniformly, so H(X) = log L_v
    and H(Y) = log L_T. The joint is the contingency table ``T_ij = 1[X_i = Y_j]`` normalised: the
    m matching pairs, 1/m each, so H(X, Y) = log m. The paper's Eq. 1 writes
    ``I = H(X) + H(Y) − H(X, Y)``, but its Eq. 9 and code **add** the joint entropy, so the result
    is ``log(L_v · L_T · m)``: a log count of the shared concepts (scaled by the set sizes), not a
    mutual information. With m = 0 the table sums to 0 and the code's normalisation gives NaN;
    we return 0 (as the curves treat it).

    Integers are evaluated literally from the tables above; tensors (broadcast together) with the
    closed form ``log(L_v · L_T · m)``, for batches.
    """
    if _is_batched(n_visual, n_textual, n_shared):
        lv, lt, m = (torch.as_tensor(x, dtype=torch.float64) for x in (n_visual, n_textual, n_shared))
        _check_tensor_counts(lv, lt, m)
        value = torch.log(lv * lt * m.clamp(min=1))
        return torch.where(m > 0, value, torch.zeros_like(value))
    _check_counts(n_visual, n_textual, n_shared)
    if n_shared == 0:
        return 0.0
    # item ids: the m shared items are 0..m-1 in both sets, the others distinct
    x = torch.arange(n_visual)
    y = torch.cat([torch.arange(n_shared), torch.arange(n_visual, n_visual + n_textual - n_shared)])
    h_x = _entropy(torch.full((n_visual,), 1.0 / n_visual, dtype=torch.float64))
    h_y = _entropy(torch.full((n_textual,), 1.0 / n_textual, dtype=torch.float64))
    table = (x[:, None] == y[None, :]).to(torch.float64)
    h_xy = _entropy(table.flatten() / table.sum())
    return h_x + h_y + h_xy


def mi_bank(
    n_visual: Count, n_textual: Count, n_shared: Count, n_bank: Count, signed: bool = True
) -> Union[float, Float[Tensor, "..."]]:
    """Mutual information (nats) between ``X = 1[d ∈ D_v]`` and ``Y = 1[d ∈ D_ŷ]``, d uniform in the bank.

    The 2×2 table of N = ``n_bank`` descriptors: n11 = m, n10 = L_v − m, n01 = L_T − m,
    n00 = N − L_v − L_T + m; ``I = Σ p_ij log(p_ij / (p_i· p_·j))`` with 0 · log 0 = 0. It is 0
    exactly when the overlap is what independent draws give, m = L_v · L_T / N, and grows as m
    moves away from it **in either direction**: sets that share less than chance are dependent too
    (anti-correlated). With ``signed=True`` (default) the MI is returned negated when
    m < L_v · L_T / N, so "less shared than chance" reads negative and the value is monotone in m.

    Integers give a float; tensors (broadcast together) give a tensor.
    """
    batched = _is_batched(n_visual, n_textual, n_shared, n_bank)
    lv, lt, m, n = (torch.as_tensor(x, dtype=torch.float64) for x in (n_visual, n_textual, n_shared, n_bank))
    if batched:
        _check_tensor_counts(lv, lt, m, n)
        if (n <= 0).any():
            raise InputError("n_bank must be positive.")
    else:
        _check_counts(n_visual, n_textual, n_shared, n_bank)
        if n_bank == 0:
            raise InputError("n_bank must be positive (the number of descriptors in the bank).")
    lv, lt, m, n = torch.broadcast_tensors(lv, lt, m, n)
    p = torch.stack([m, lv - m, lt - m, n - lv - lt + m], dim=-1) / n[..., None]  # n11 n10 n01 n00, over N
    p_x = torch.stack([p[..., 0] + p[..., 1], p[..., 0] + p[..., 1], p[..., 2] + p[..., 3], p[..., 2] + p[..., 3]], -1)
    p_y = torch.stack([p[..., 0] + p[..., 2], p[..., 1] + p[..., 3], p[..., 0] + p[..., 2], p[..., 1] + p[..., 3]], -1)
    terms = torch.where(p > 0, p * torch.log(p.clamp(min=1e-300) / (p_x * p_y).clamp(min=1e-300)), torch.zeros_like(p))
    mi = terms.sum(-1).clamp(min=0.0)
    if signed:
        below = m * n < lv * lt  # m < L_v L_T / N, exactly in integers
        mi = torch.where(below, -mi, mi)
    return mi if batched else float(mi)


MI_VARIANTS: dict[str, Callable[..., Union[float, Tensor]]] = {"paper": mi_paper, "bank": mi_bank}
"""Name → MI function; ``"bank"`` needs ``n_bank``."""


def order_by_image(
    visual: Sequence[int], image_emb: Float[Tensor, "E"], desc_emb: Float[Tensor, "D E"]
) -> list[int]:
    """``visual`` sorted by each descriptor's similarity to the whole image, most similar first
    (ties keep the given order) — the order `mi_dynamics` removes them in."""
    visual = [int(v) for v in visual]
    if not visual:
        return []
    D = desc_emb.shape[0]
    bad = [v for v in visual if not 0 <= v < D]
    if bad:
        raise InputError(f"descriptor indices {bad[:5]} are outside the bank of {D} descriptors.")
    sims = desc_emb[torch.tensor(visual, device=desc_emb.device)] @ image_emb.reshape(-1).to(desc_emb)
    order = torch.sort(sims, descending=True, stable=True).indices.tolist()
    return [visual[i] for i in order]


def mi_dynamics(
    visual: Sequence[int],
    textual: Iterable[int],
    variant: str = "paper",
    n_bank: Optional[int] = None,
    signed: bool = True,
) -> list[float]:
    """MI as D_v's items are removed one at a time, in the given order (`order_by_image`).

    At step s = 0 … L_v the first s items of ``visual`` are replaced by a dummy descriptor outside
    D_ŷ: L_v stays fixed and m counts the shared items among ``visual[s:]``. Returns the L_v + 1
    values of ``MI_VARIANTS[variant]``; an empty D_v gives ``[0.0]``.

    Args:
        visual: D_v, distinct descriptor indices, most similar to the image first.
        textual: D_ŷ (its distinct items count).
        variant: ``"paper"`` or ``"bank"`` (which needs ``n_bank``, the bank size; ``signed`` as in
            `mi_bank`).
    """
    if variant not in MI_VARIANTS:
        raise InputError(f"unknown MI variant {variant!r}; choose one of {', '.join(MI_VARIANTS)}."
                         + close_matches(str(variant), MI_VARIANTS))
    visual = [int(v) for v in visual]
    if len(set(visual)) != len(visual):
        raise InputError("visual concepts must be distinct descriptor indices; deduplicate them first.")
    textual_set = {int(t) for t in textual}
    if variant == "bank" and n_bank is None:
        raise InputError("the 'bank' MI variant needs n_bank, the number of descriptors in the bank.")
    if not visual:
        return [0.0]
    shared = [v in textual_set for v in visual]
    remaining = [sum(shared[s:]) for s in range(len(visual) + 1)]
    lv, lt = len(visual), len(textual_set)
    if variant == "paper":
        return [float(mi_paper(lv, lt, m)) for m in remaining]
    return [float(mi_bank(lv, lt, m, n_bank, signed=signed)) for m in remaining]


def auc(curve: Sequence[float]) -> float:
    """The paper's area under an MI curve: the mean of its points."""
    values = [float(v) for v in curve]
    if not values:
        raise InputError("auc needs a curve with at least one point.")
    return sum(values) / len(values)


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    """Pointwise mean of curves zero-padded at the end to the longest length (as the paper's code)."""
    if not curves:
        raise InputError("mean_curve needs at least one curve.")
    length = max(len(c) for c in curves)
    padded = torch.zeros(len(curves), length, dtype=torch.float64)
    for i, curve in enumerate(curves):
        if len(curve):
            padded[i, : len(curve)] = torch.as_tensor([float(v) for v in curve], dtype=torch.float64)
    return padded.mean(0).tolist()


__all__ = ["MI_VARIANTS", "auc", "mean_curve", "mi_bank", "mi_dynamics", "mi_paper", "order_by_image"]
