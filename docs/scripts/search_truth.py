"""Property search on the shapes world: labelled heads vs the whole embedding vs random heads (issue 16).

For every attribute of the model's world (but ``count``, always "one" on these one-object scenes), on a
store of ``--store-images`` scenes (seed 2024, the report's) and ``--queries`` held-out query scenes
(seed 2025), the same scoring (``--metric``, default ``concepts`` over the attribute's world prompts)
on three representations:

- **heads**: the sum of the heads the offline labeller gives the attribute (TextSpan on the store,
  ``shapes-attributes`` bank, m = 20), as `clip-lens report` labels them;
- **whole embedding**: the unit image embedding, no head selection;
- **random heads**: ``--random`` random subsets of the same number of heads.

Each is the share of a query's top-``k`` neighbours whose value of the attribute equals the query's,
averaged over the queries, with a bootstrap 95% interval over the query scenes; chance is the share
a random store image would give (from the store scenes' known values); "heads − embedding" and
"heads − random" are paired per-query differences with their intervals. Prints markdown, writes JSON.

The default is 500 queries: 1,000 took 312 s on 2 CPU cores shared with a training run (the
intervals at 1,000 are about 0.7× as wide); pass ``--queries 1000`` on a free machine.

    python docs/scripts/search_truth.py --model toy-shapes --queries 1000 --out search_truth.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from clip_lens import HookedCLIP, analyses
from clip_lens.collect import collect, shapes_world_images
from clip_lens.files import atomic_write
from clip_lens.head_report import REPORT_SEED, report_attributes
from clip_lens.toy.evaluate import shapes_world_version
from clip_lens_plugins.neighbors import PropertySearchTruth, property_search_truth


def interval(value: float, bounds: list[float], signed: bool = False) -> str:
    form = "{:+.3f}" if signed else "{:.3f}"
    return f"{form.format(value)} [{form.format(bounds[0])}, {form.format(bounds[1])}]"


def summary_table(results: dict[str, PropertySearchTruth]) -> str:
    """One row per attribute: the searched attribute's share under each search, and the paired gains."""
    lines = ["| attribute | chance | labelled heads | heads | whole embedding | random heads | heads − embedding | heads − random |",
             "|---|---|---|---|---|---|---|---|"]
    for attribute, result in results.items():
        searches, gain = result.searches, result.gain
        cell = {name: interval(s.share[attribute], s.interval[attribute]) for name, s in searches.items()}
        random = searches.get("random heads")
        lines.append(" | ".join([
            f"| {attribute}", f"{result.chance[attribute]:.3f}", "+".join(result.heads) or "none",
            cell.get("heads", "—"), cell["embedding"],
            f"{cell['random heads']} ({len(random.heads)} draws)" if random else "—",
            interval(gain["over embedding"]["mean"], gain["over embedding"]["interval"], True) if gain else "—",
            interval(gain["over random heads"]["mean"], gain["over random heads"]["interval"], True) if "over random heads" in gain else "—",
        ]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy-shapes")
    parser.add_argument("--store-images", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=500, help="held-out query scenes (default 500; see the docstring)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--random", type=int, default=5, help="random head subsets per attribute (default 5)")
    parser.add_argument("--metric", default="concepts", choices=("concepts", "cosine", "dot"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    model = HookedCLIP.from_pretrained(args.model)
    version = shapes_world_version(model) or 1
    with tempfile.TemporaryDirectory() as tmp:
        source = shapes_world_images(args.store_images, REPORT_SEED, model.cfg.image_size[0], version)
        store = collect(model, source, Path(tmp) / "store", progress=False)
        spans = analyses.get("textspan")(model).run(store, bank="shapes-attributes", m=20)
        labels = analyses.get("head_labels")(model).run(spans)
        results = {}
        for attribute in report_attributes(model):
            heads = [h.head for h in labels.heads if h.label == attribute]
            results[attribute] = property_search_truth(
                model, store, REPORT_SEED, heads=heads, attribute=attribute, k=args.k, n_queries=args.queries,
                metric=args.metric, n_random=args.random, world_version=version,
            )
    seconds = time.perf_counter() - started

    print(f"{args.model}: {args.store_images} stored scenes (seed {REPORT_SEED}), {args.queries} held-out queries "
          f"(seed {REPORT_SEED + 1}), top {args.k}, metric={args.metric}; share of neighbours with the query's value "
          f"[bootstrap 95% over queries]; {seconds:.0f} s\n")
    print(summary_table(results))
    for attribute, result in results.items():
        print(f"\n### {attribute}: every attribute's share\n\n{result.to_markdown()}")
    out = {
        "model": args.model, "world_version": version, "store_images": args.store_images, "queries": args.queries,
        "k": args.k, "metric": args.metric, "seconds": seconds,
        "labels": {h.head: h.label for h in labels.heads}, "results": {a: r.to_dict() for a, r in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
