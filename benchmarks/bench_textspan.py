#!/usr/bin/env python
"""Time TEXTSPAN at the issue's scale: 10,000 images × 144 heads × a 3,000-text bank.

The head outputs are synthetic with the shape and rank of ViT-B-16 heads (d_embed 512, each
head writes through a 64-dim value space, plus a mean), so the benchmark needs no model or data.
Heads are processed one layer (12 heads) at a time, as :class:`TextSpan` does over a store.

Prints the wall time of the whole run and per stage, the rate in heads/s, peak resident memory,
and the ratio to the issue's budget (≤ 120 s). A second measurement times the same heads with
the plain algorithm (deflating the ``[N, d]`` outputs and projecting all texts every step) on a
subset of heads and extrapolates, so the speed-up is measured in the same run.

    python benchmarks/bench_textspan.py                    # 10,000 × 144 × 3,000, m = 10
    python benchmarks/bench_textspan.py --images 2000 --m 20
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from clip_lens_plugins.textspan import textspan


def synthetic_heads(layers: int, heads: int, n: int, d: int, rank: int, seed: int) -> torch.Tensor:
    """``[layers, heads, n, d]`` outputs: random rank-``rank`` maps of random activations plus a mean."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(layers, heads, n, d)
    for l in range(layers):
        for h in range(heads):
            scales = torch.logspace(0, -2, rank)
            out[l, h] = (torch.randn(n, rank, generator=g) * scales) @ torch.randn(rank, d, generator=g) / d**0.5
            out[l, h] += 0.1 * torch.randn(d, generator=g)
    return out


def plain_step_seconds(outputs: torch.Tensor, texts: torch.Tensor, m: int) -> float:
    """Seconds for one head with the plain algorithm (outputs deflated explicitly)."""
    start = time.perf_counter()
    c = outputs - outputs.mean(0)
    r = texts.clone()
    for _ in range(m):
        j = int((c @ r.T).std(0).argmax())
        u = r[j] / r[j].norm()
        c = c - torch.outer(c @ u, u)
        r = r - torch.outer(r @ u, u)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--texts", type=int, default=3000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--m", type=int, default=10)
    parser.add_argument("--plain-heads", type=int, default=2, help="heads timed with the plain algorithm")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    outputs = synthetic_heads(args.layers, args.heads, args.images, args.d, args.rank, seed=0)
    texts = torch.nn.functional.normalize(torch.randn(args.texts, args.d, generator=torch.Generator().manual_seed(1)), dim=-1)
    print(f"synthetic data: {outputs.numel() * 4 / 2**30:.2f} GiB of head outputs in {time.perf_counter() - t0:.1f} s")

    start = time.perf_counter()
    for layer in range(args.layers):
        span = textspan(outputs[layer], texts, args.m)
    elapsed = time.perf_counter() - start
    n_heads = args.layers * args.heads
    print(f"TEXTSPAN: {args.images} images x {n_heads} heads x {args.texts} texts, m={args.m}: "
          f"{elapsed:.1f} s ({n_heads / elapsed:.2f} heads/s); budget 120 s -> {elapsed / 120:.2f} of it")
    print(f"last layer: first texts {span.indices[0, :5].tolist()}, explained {span.cumulative[0, -1]:.3f}")

    plain = sum(plain_step_seconds(outputs[0, h], texts, args.m) for h in range(args.plain_heads)) / args.plain_heads
    print(f"plain algorithm: {plain:.2f} s/head -> {plain * n_heads:.0f} s for all heads "
          f"(covariance form is {plain * n_heads / elapsed:.1f}x faster)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak resident memory: {peak:.2f} GiB")


if __name__ == "__main__":
    main()
