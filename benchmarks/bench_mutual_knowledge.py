"""Throughput of the mutual-knowledge pipeline on the bundled shapes-world model.

Times, in one run on the same held-out scenes: (a) the raw open_clip image forward, (b) the MI
pipeline (prediction, GDC, PCA and K-means parts, visual prompting, Sinkhorn, MI dynamics), (c) the
full pipeline (b + Deletion/Insertion/AccDrop/AccInc with baselines + CorLoc). Prints images/s,
the ratio to (a) and the peak RSS.

    python benchmarks/bench_mutual_knowledge.py               # 1,000 scenes (the issue's target: ≤ 5 min on 2 cores)
    python benchmarks/bench_mutual_knowledge.py --n 200 --threads 2
"""

from __future__ import annotations

import argparse
import resource
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="shapes-world scenes")
    parser.add_argument("--model", default="toy-shapes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from clip_lens import HookedCLIP
    from clip_lens_plugins.mutual_knowledge import MutualKnowledge, shapes_world_data

    model = HookedCLIP.from_pretrained(args.model, device=args.device)
    data = shapes_world_data(args.n)
    images = data.load(range(len(data))).to(args.device)
    from clip_lens.loading import load_open_clip

    raw = load_open_clip(args.model).model.visual.to(args.device).eval()  # open_clip's own image tower
    with torch.inference_mode():
        raw(images[:64])
        started = time.perf_counter()
        for chunk in images.split(256):
            raw(chunk)
        forward = len(images) / (time.perf_counter() - started)
    analysis = MutualKnowledge(model)
    mi = analysis.run(data, evaluate=False, corloc=False, progress=False)
    full = analysis.run(data, evaluate=True, corloc=True, blur_kernel=7, progress=False)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.n} scenes, model {args.model}, device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"| pipeline | seconds | images/s | × raw forward |\n|---|---|---|---|")
    print(f"| raw image forward | {len(images) / forward:.2f} | {forward:.1f} | 1 |")
    for name, result in (("MI (PCA + K-means)", mi), ("full (MI + evaluation + CorLoc)", full)):
        print(f"| {name} | {result.seconds:.1f} | {result.images_per_second:.2f} | {result.images_per_second / forward:.4f} |")
    print(f"peak RSS {peak_mb:.0f} MB")
    print(full.to_markdown())


if __name__ == "__main__":
    main()
