"""Exact streamed nearest-neighbour search over a large store, against an in-memory brute force.

Writes a store of ``--n`` images in the collect layout (random per-head terms of the bundled
toy-shapes model's shape: 4 layers x 4 heads x 128; search speed does not depend on the values), then
times, in one run, for each metric (dot, cosine, concepts over the 8 colour prompts):

- **index**: ``HeadIndex.from_store`` (for concepts: one streamed pass for the text statistics);
- **search**: ``index.search`` of ``--queries`` queries, top ``--k``, reading one store chunk at a time;
- **in memory**: the same scores and top-k with the whole summed-term matrix already in RAM
  (``queries @ rows.T`` + ``topk``), and the time to load that matrix from the store.

Prints images scanned per second, the ratio streamed / in-memory, and the peak RSS growth of the
streamed search (measured before the in-memory baseline loads the array).

    python benchmarks/bench_neighbors.py                  # 100,000 images (about 0.8 GB of store on disk)
    python benchmarks/bench_neighbors.py --n 20000 --chunk 1024 --device cuda
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

LAYERS, HEADS, WIDTH = 4, 4, 128
PROPERTY_HEADS = ["L0H0", "L0H3", "L3H0"]


def write_store(path: Path, n: int, chunk: int) -> None:
    """A store with only the ``heads`` array, every chunk finished, written one chunk at a time."""
    import zarr

    from clip_lens.collect import FORMAT

    group = zarr.open_group(str(path), mode="w")
    group.attrs.update({"format": FORMAT, "model": "toy-shapes", "n_images": n, "chunk_size": chunk,
                        "head_layers": list(range(LAYERS)), "token_layers": [], "arrays": ["heads"]})
    array = group.create_array("heads", shape=(n, LAYERS, HEADS, WIDTH), chunks=(chunk, LAYERS, HEADS, WIDTH),
                               dtype="float32", fill_value=0)
    rng = np.random.default_rng(0)
    (path / "done").mkdir()
    for c, start in enumerate(range(0, n, chunk)):
        stop = min(n, start + chunk)
        array[start:stop] = rng.standard_normal((stop - start, LAYERS, HEADS, WIDTH), dtype=np.float32) / WIDTH**0.5
        (path / "done" / f"{c:06d}").touch()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="store images")
    parser.add_argument("--chunk", type=int, default=4096, help="store chunk size (rows)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from clip_lens import HookedCLIP
    from clip_lens.collect import Store
    from clip_lens_plugins.neighbors import HeadIndex, world_prompts

    model = HookedCLIP.from_pretrained("toy-shapes")
    queries = torch.randn(args.queries, WIDTH, generator=torch.Generator().manual_seed(1)) / WIDTH**0.5
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        write_store(Path(tmp) / "store", args.n, args.chunk)
        store = Store.open(Path(tmp) / "store")
        size_mb = args.n * LAYERS * HEADS * WIDTH * 4 / 2**20
        print(f"{args.n:,} images, chunk {args.chunk}, heads array {size_mb:.0f} MB, written in "
              f"{time.perf_counter() - started:.1f} s; {args.queries} queries, k={args.k}, device {args.device}, "
              f"torch threads {torch.get_num_threads()}")

        streamed = {}
        rss_before = peak_rss_mb()
        for metric in ("dot", "cosine", "concepts"):
            started = time.perf_counter()
            options = dict(texts=world_prompts("colour"), model=model) if metric == "concepts" else {}
            index = HeadIndex.from_store(store, heads=PROPERTY_HEADS, metric=metric, device=args.device, **options)
            built = time.perf_counter() - started
            started = time.perf_counter()
            scores, rows = index.search(queries, args.k)
            streamed[metric] = (index, built, time.perf_counter() - started, rows)
        rss_growth = peak_rss_mb() - rss_before

        started = time.perf_counter()
        terms = torch.cat([t for _, t in HeadIndex.from_store(store, heads=PROPERTY_HEADS, device=args.device).terms()])
        loaded = time.perf_counter() - started
        print(f"| metric | index s | search s | images scanned/s | in-memory search s | streamed / in-memory | same top-k |")
        print("|---|---|---|---|---|---|---|")
        for metric, (index, built, searched, rows) in streamed.items():
            started = time.perf_counter()
            prepared_rows, prepared_queries = index.prepare(terms), index.prepare(queries.to(args.device))
            top = (prepared_queries @ prepared_rows.T).topk(args.k, dim=1).indices
            in_memory = time.perf_counter() - started
            same = bool(torch.equal(top.cpu(), rows.cpu()))
            print(f"| {metric} | {built:.2f} | {searched:.2f} | {args.n * args.queries / searched:,.0f} | "
                  f"{in_memory:.2f} | {searched / in_memory:.2f}x | {same} |")
        print(f"loading the summed terms for the in-memory search: {loaded:.2f} s; "
              f"peak RSS growth of the streamed searches: {rss_growth:.0f} MB (whole heads array {size_mb:.0f} MB)")


if __name__ == "__main__":
    main()
