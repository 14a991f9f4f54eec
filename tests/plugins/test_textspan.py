"""TEXTSPAN: agreement with the plain algorithm, planted ground truth, reconstruction, bad input."""

import pytest
import torch

from clip_lens.errors import InputError
from clip_lens_plugins.textspan import textspan


def plain_textspan(outputs, texts, m, rank):
    """The algorithm as written in the paper notes: deflate outputs and texts explicitly."""
    c, r = outputs.double(), texts.double()
    _, _, vh = torch.linalg.svd(c, full_matrices=False)
    r = r @ vh[:rank].T @ vh[:rank]
    c = c - c.mean(0)
    total = c.var(0, unbiased=False).sum()
    picked, explained = [], []
    for _ in range(m):
        j = int((c @ r.T).std(0).argmax())
        u = r[j].clone()
        before = c.var(0, unbiased=False).sum()
        c = c - torch.outer(c @ u / u.dot(u), u)
        r = r - torch.outer(r @ u / u.dot(u), u)
        picked.append(j)
        explained.append(float((before - c.var(0, unbiased=False).sum()) / total))
    return picked, explained


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def low_rank_outputs(n=400, d=48, rank=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=g))[0].T
    scales = torch.linspace(3, 0.2, rank)
    return (torch.randn(n, rank, generator=g) * scales) @ basis + torch.randn(d, generator=g), g


def test_textspan_matches_the_plain_algorithm():
    outputs, g = low_rank_outputs()
    texts = unit(torch.randn(300, 48, generator=g))
    span = textspan(outputs, texts, m=8, rank=12)
    picked, explained = plain_textspan(outputs, texts, 8, rank=12)
    assert span.indices.tolist() == picked
    torch.testing.assert_close(span.explained_variance.double(), torch.tensor(explained, dtype=torch.float64), atol=1e-5, rtol=1e-4)


def test_textspan_recovers_planted_texts_in_order_of_variance():
    g = torch.Generator().manual_seed(1)
    d, n = 64, 2000
    texts = unit(torch.randn(500, d, generator=g))
    planted = [17, 203, 321, 9]
    stds = torch.tensor([4.0, 2.5, 1.5, 1.0])
    mix = torch.randn(n, 4, generator=g) * stds
    outputs = mix @ texts[planted] + 0.1 * torch.randn(n, d, generator=g) + 0.5
    span = textspan(outputs, texts, m=6, rank=d)
    assert span.indices[:4].tolist() == planted
    assert span.explained_variance[:4].sum() > 0.9
    assert (span.explained_variance[:4].diff() < 0).all()


def test_reconstruction_with_the_full_span_is_exact_and_errors_shrink_with_m():
    outputs, g = low_rank_outputs(rank=6)  # plus the mean: the uncentred outputs have rank 7
    texts = unit(torch.randn(200, 48, generator=g))
    span = textspan(outputs, texts, m=7)
    assert span.cumulative[-1] == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(span.reconstruct(outputs), outputs, atol=1e-4, rtol=1e-4)
    errors = [(span.reconstruct(outputs, m=k) - outputs).norm() for k in range(1, 8)]
    assert all(a >= b for a, b in zip(errors, errors[1:]))
    basis = span.basis.double()
    torch.testing.assert_close(basis @ basis.T, torch.eye(7, dtype=torch.float64), atol=1e-5, rtol=0)


def test_batched_heads_equal_one_head_at_a_time():
    heads = [low_rank_outputs(seed=s)[0] for s in range(3)]
    texts = unit(torch.randn(100, 48, generator=torch.Generator().manual_seed(5)))
    batched = textspan(torch.stack(heads), texts, m=5, rank=12)
    for h, outputs in enumerate(heads):
        one = textspan(outputs, texts, m=5, rank=12)
        assert batched.indices[h].tolist() == one.indices.tolist()
        torch.testing.assert_close(batched.explained_variance[h], one.explained_variance)


@pytest.mark.parametrize(
    "outputs, texts, m, match",
    [
        (torch.randn(10, 8), torch.randn(5, 9), 2, "width"),
        (torch.randn(10, 8), torch.randn(5, 8), 6, "m must lie"),
        (torch.randn(1, 8), torch.randn(5, 8), 2, "at least 2 images"),
        (torch.full((10, 8), float("nan")), torch.randn(5, 8), 2, "NaN"),
        (torch.randn(10), torch.randn(5, 8), 2, r"\[N, d\]"),
    ],
)
def test_textspan_rejects_bad_input_with_a_clear_error(outputs, texts, m, match):
    with pytest.raises(InputError, match=match):
        textspan(outputs, texts, m)
