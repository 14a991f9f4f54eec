"""Sparse coding over text dictionaries: OMP against a float64 brute-force oracle, exact recovery of
planted codes, and the non-negative (SpLiCE) coder's constraints and optimality conditions."""

import itertools

import pytest
import torch

from clip_lens.errors import InputError
from clip_lens.sparse_coding import centered_dictionary, nonnegative_sparse_code, orthogonal_matching_pursuit


def _unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def _least_squares_residual(x: torch.Tensor, atoms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients and residual norm of ``x`` projected on the span of ``atoms`` (rows), in float64."""
    coef = torch.linalg.lstsq(atoms.T, x[:, None]).solution[:, 0]
    return coef, (x - coef @ atoms).norm()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_omp_matches_a_brute_force_oracle_over_supports_of_size_two(seed):
    """Step 1 takes the single atom with the least residual (oracle over all 1-supports); step 2 the
    atom most correlated with that residual (oracle over all 2-supports containing the first); the
    coefficients are the least-squares fit on the support; no 2-support beats OMP by more than the
    greedy gap, and OMP is never better than the best 2-support."""
    dictionary, signals = _unit_rows(7, 5, seed), _unit_rows(6, 5, seed + 100) * 3.0
    one = orthogonal_matching_pursuit(signals, dictionary, k=1)
    two = orthogonal_matching_pursuit(signals, dictionary, k=2)
    for i, x in enumerate(signals):
        residuals = torch.stack([_least_squares_residual(x, dictionary[[j]])[1] for j in range(7)])
        first = int(residuals.argmin())
        assert one.indices[i, 0] == first == two.indices[i, 0]
        r1 = x - _least_squares_residual(x, dictionary[[first]])[0] @ dictionary[[first]]
        # OMP's rule: the most correlated atom; for unit atoms it is also the best orthogonal 2-support
        # in the sense of the largest residual reduction of one step, which the oracle checks directly
        gains = {j: (r1 @ dictionary[j]).abs() for j in range(7) if j != first}
        second = max(gains, key=gains.get)
        assert two.indices[i, 1] == second
        coef, residual = _least_squares_residual(x, dictionary[[first, second]])
        torch.testing.assert_close(two.coefficients[i], coef, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close((x - two.reconstruct(dictionary)[i]).norm(), residual, rtol=1e-10, atol=1e-10)
        best_pair = min(_least_squares_residual(x, dictionary[list(p)])[1] for p in itertools.combinations(range(7), 2))
        assert residual >= best_pair - 1e-12


def _spikes_and_sines(d: int = 64) -> torch.Tensor:
    """Identity ∪ normalised Hadamard basis: coherence 1/√d = 0.125 < 1/(2k − 1) for k = 3, where
    OMP provably recovers every k-sparse code (Tropp 2004)."""
    hadamard = torch.ones(1, 1, dtype=torch.float64)
    while len(hadamard) < d:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)])
    return torch.cat([torch.eye(d, dtype=torch.float64), hadamard / d**0.5])


def test_omp_recovers_planted_sparse_codes_exactly():
    dictionary = _spikes_and_sines()
    g = torch.Generator().manual_seed(4)
    supports = torch.stack([torch.randperm(128, generator=g)[:3] for _ in range(25)])
    values = (torch.rand(25, 3, generator=g, dtype=torch.float64) + 0.5) * torch.where(
        torch.rand(25, 3, generator=g) < 0.5, -1.0, 1.0).double()
    signals = torch.einsum("sk,skd->sd", values, dictionary[supports])
    code = orthogonal_matching_pursuit(signals, dictionary, k=3)
    truth = torch.zeros(25, 128, dtype=torch.float64).scatter_(1, supports, values)
    torch.testing.assert_close(code.dense(), truth, rtol=0, atol=1e-10)
    # asking for more atoms than the signal needs stops at the exact fit: the rest are unused
    more = orthogonal_matching_pursuit(signals, dictionary, k=6)
    torch.testing.assert_close(more.dense(), truth, rtol=0, atol=1e-10)
    assert (more.indices[:, 3:] == -1).all()


def test_omp_codes_every_signal_of_a_batch_as_it_would_alone():
    dictionary, signals = _unit_rows(30, 16, 5).float(), _unit_rows(9, 16, 6).float()
    batched = orthogonal_matching_pursuit(signals, dictionary, k=4)
    for i in range(9):
        alone = orthogonal_matching_pursuit(signals[i : i + 1], dictionary, k=4)
        assert alone.indices[0].tolist() == batched.indices[i].tolist()
        torch.testing.assert_close(alone.coefficients[0], batched.coefficients[i], rtol=1e-4, atol=1e-5)


def test_nonnegative_code_is_nonnegative_and_meets_the_lasso_optimality_conditions():
    """KKT of min ½‖wD − x‖² + λ‖w‖₁, w ≥ 0: on the support the gradient equals −λ, off it ≥ −λ."""
    dictionary, signals = _unit_rows(25, 12, 7), _unit_rows(8, 12, 8)
    l1 = 0.05
    w = nonnegative_sparse_code(signals, dictionary, l1, max_iter=20000, tol=1e-13)
    assert (w >= 0).all()
    gradient = (w @ dictionary - signals) @ dictionary.T  # [n, atom]
    support = w > 1e-9
    assert support.any(1).all() and (~support).any()
    torch.testing.assert_close(gradient[support], torch.full_like(gradient[support], -l1), rtol=0, atol=1e-6)
    assert (gradient[~support] >= -l1 - 1e-6).all()


def test_nonnegative_code_recovers_planted_nonnegative_codes_and_zero_above_the_threshold():
    dictionary = _unit_rows(40, 32, 9)
    g = torch.Generator().manual_seed(10)
    supports = torch.stack([torch.randperm(40, generator=g)[:3] for _ in range(10)])
    values = torch.rand(10, 3, generator=g, dtype=torch.float64) + 0.5
    truth = torch.zeros(10, 40, dtype=torch.float64).scatter_(1, supports, values)
    w = nonnegative_sparse_code(truth @ dictionary, dictionary, l1=1e-7, max_iter=20000, tol=1e-14)
    torch.testing.assert_close(w, truth, rtol=0, atol=1e-4)
    assert (nonnegative_sparse_code(truth @ dictionary, dictionary, l1=100.0) == 0).all()
    allowed = torch.zeros(10, 40, dtype=torch.bool).scatter_(1, supports[:, :2], True)
    restricted = nonnegative_sparse_code(truth @ dictionary, dictionary, l1=0.0, allowed=allowed)
    assert (restricted[~allowed] == 0).all() and (restricted >= 0).all()


def test_centered_dictionary_removes_the_bank_mean_and_normalises():
    embeddings = _unit_rows(10, 6, 11) + torch.tensor([3.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    atoms, mean = centered_dictionary(embeddings)
    torch.testing.assert_close(atoms.norm(dim=-1), torch.ones(10, dtype=torch.float64))
    torch.testing.assert_close(mean, embeddings.mean(0))
    torch.testing.assert_close(atoms * (embeddings - mean).norm(dim=-1, keepdim=True), embeddings - mean)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: orthogonal_matching_pursuit(torch.zeros(3, 5), torch.eye(6), 2), "width 5 but the dictionary's atoms have width 6"),
        (lambda: orthogonal_matching_pursuit(torch.zeros(3, 5), torch.eye(5), 9), "k must be an integer in 1..5"),
        (lambda: orthogonal_matching_pursuit(torch.full((2, 5), float("nan")), torch.eye(5), 1), "NaN or inf"),
        (lambda: nonnegative_sparse_code(torch.zeros(3, 5), torch.eye(4), 0.1), "width 5 but the dictionary's atoms have width 4"),
        (lambda: nonnegative_sparse_code(torch.zeros(3, 5), torch.eye(5), -1.0), "l1 must be a non-negative number"),
        (lambda: centered_dictionary(torch.ones(1, 5)), "at least two"),
    ],
)
def test_bad_input_is_one_line_input_error(call, message):
    with pytest.raises(InputError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
