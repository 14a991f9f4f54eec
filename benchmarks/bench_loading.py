#!/usr/bin/env python
"""Data loading overlapped with compute: `collect` from JPEG files and from tar shards with 0, 1, 2 … workers.

Writes ``--n`` JPEG images (shapes-world scenes rendered at ``--size`` pixels, quality 90) once as a
folder and once as WebDataset tar shards, then times `clip_lens.collect.collect` (heads of all layers,
fp32) over each source with every ``--workers`` count, in interleaved rounds, and prints images per
second and the speed-up over decoding in the main process (workers 0). Also times decoding alone
(``load_batch`` over the whole source, no model) and the model alone (on pre-decoded tensors), so the
table shows what overlapping can reach: ``1 / max(decode, model)`` instead of ``1 / (decode + model)``.

    python benchmarks/bench_loading.py                          # toy-shapes-v2 and ViT-B-32 (random), 512 images
    python benchmarks/bench_loading.py --models ViT-B-32 --n 1024 --workers 0,1,2,4
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_lens import HookedCLIP  # noqa: E402
from clip_lens.collect import batches, collect, image_source  # noqa: E402
from clip_lens.toy.world import ShapesWorld  # noqa: E402
from tests.helpers import write_shards  # noqa: E402


def write_images(root: Path, n: int, size: int) -> tuple[Path, Path]:
    """``n`` JPEG scenes as ``root/images/*.jpg`` and as ``root/shards/shard-*.tar`` (256 per shard)."""
    world = ShapesWorld(seed=7, image_size=size)
    folder = root / "images"
    folder.mkdir()
    encoded = []
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(world.scene(i).image).save(path, quality=90)
        encoded.append(path.read_bytes())
    write_shards(root / "shards", encoded, per_shard=256, fmt="jpg")
    return folder, root / "shards"


def load_model(name: str) -> HookedCLIP:
    if name.startswith("toy-shapes"):
        return HookedCLIP.from_pretrained(name)
    import open_clip

    return HookedCLIP.from_open_clip(open_clip.create_model(name, pretrained=None), name)  # with open_clip's eval transform


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="toy-shapes-v2,ViT-B-32")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--size", type=int, default=256, help="pixels of the JPEG images (resized by the model's preprocess)")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads); {args.n} JPEGs of "
          f"{args.size} px; batch {args.batch}; median of {args.rounds} interleaved rounds; load {os.getloadavg()[0]:.2f}")
    root = Path(tempfile.mkdtemp(prefix="bench_loading_"))
    try:
        folder, shards = write_images(root, args.n, args.size)
        for name in args.models.split(","):
            model = load_model(name)
            source = image_source(folder, model.preprocess)
            ranges = [(a, min(args.n, a + args.batch)) for a in range(0, args.n, args.batch)]
            pixels = torch.cat([b.pixels for b in batches(source, ranges)])
            times: dict[str, list[float]] = {}
            for r in range(args.rounds):
                times.setdefault("decode only", []).append(seconds(lambda: list(batches(source, ranges))))
                times.setdefault("model only", []).append(seconds(lambda: collect(
                    model, pixels, root / f"t{r}", chunk_size=256, batch_size=args.batch, progress=False)))
                for kind, spec in (("files", folder), ("shards", shards)):
                    for w in counts:
                        out = root / f"{kind}{w}-{r}"
                        times.setdefault(f"{kind}, {w} workers", []).append(seconds(lambda: collect(
                            model, spec, out, chunk_size=256, batch_size=args.batch, workers=w, progress=False)))
                for out in root.glob("t*"):
                    shutil.rmtree(out)
                for out in list(root.glob("files*")) + list(root.glob("shards*-*")):
                    shutil.rmtree(out)
            rate = {key: args.n / statistics.median(value) for key, value in times.items()}
            bound = 1 / max(1 / rate["decode only"], 1 / rate["model only"])
            print(f"\n{name}: decode only {rate['decode only']:.0f} img/s, model only {rate['model only']:.0f} img/s "
                  f"(serial bound {1 / (1 / rate['decode only'] + 1 / rate['model only']):.0f}, overlapped bound {bound:.0f})")
            print("| source | workers | img/s | vs 0 workers |")
            print("|---|---|---|---|")
            for kind in ("files", "shards"):
                for w in counts:
                    r = rate[f"{kind}, {w} workers"]
                    print(f"| {kind} | {w} | {r:.1f} | {r / rate[f'{kind}, 0 workers']:.2f}× |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
