#!/usr/bin/env python
"""GPU check of the scale benchmark, for a lent machine (1x H200, this project installed): < 5 min.

Steps (each in its own process, with a time limit, so one that hangs or runs out of memory does
not cost the others; results go to ``$OUT`` when it is set, else to a temporary folder):

1. ``bench_decompose.py --models ViT-L-14 --batch 128 --precision fp32,bf16`` with fewer rounds
   (configs a-g; (d) = tokens of the last 4 layers on 1,000 directions) -> ``bench_vit_l14.json``;
   then PASS/FAIL of "ViT-L-14 at batch 128, tokens of the last 4 layers on 1,000 directions, under
   40 GB": the absolute ``max_memory_allocated`` of one (d) call (weights, input and output included),
   against 40e9 bytes, per precision.
2. the same for ViT-B-16 at batch 256 -> ``bench_vit_b16.json``.
3. ``torch.cuda.set_sync_debug_mode("warn")`` around one short ``collect`` call (ViT-B-16, 2
   batches of 64, after an untimed warm-up call): how many synchronising CUDA operations it
   makes, and where (file:line, most frequent first), in fp32 and under bf16 autocast.
4. ``scale_cost.py`` on the two JSON files: time and cost of ImageNet train with ViT-L-14.

Device-time budget (H200; estimates, not measurements): process start + CUDA init ~15 s per
step; ViT-L-14: build ~10 s, per precision ~35 calls of ~0.3-1.2 s (check, calibration, 3 rounds
of 7 configs, memory; (e) at batch 128 needs ~145 GB in fp32, so it runs out of memory and is
retried at 64) -> ~100 s; ViT-B-16: ~60 s; sync check ~30 s; scale_cost ~5 s: ~3.5 min in all.
Time limits: 150 + 100 + 40 + 20 s = 310 s at the very worst (5.2 min).

CPU fallback (``--device cpu``; no GPU needed, to check that the script runs): one tiny run of
ViT-B-32 at batch 2, fp32 and bf16, one round, no memory measurement; the 40 GB check and the sync
check print why they are skipped.

Usage:
  python benchmarks/gpu_check.py                   # on the GPU machine; writes to $OUT if set
  python benchmarks/gpu_check.py --device cpu      # CPU fallback (~3 min on 2 busy cores)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIMIT_BYTES = 40e9  # "under 40 GB"
COMMON = ["--repeats", "3", "--min-time", "0.25", "--warmup", "1"]
GPU_STEPS = [  # (name, model, batch, time limit in s)
    ("vit_l14", "ViT-L-14", 128, 150),
    ("vit_b16", "ViT-B-16", 256, 100),
]


def run(cmd: list[str], timeout: float) -> int:
    print(f"\n$ {' '.join(cmd)}   (time limit {timeout:.0f} s)", flush=True)
    start = time.time()
    try:
        rc = subprocess.run(cmd, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = 124
        print(f"!! time limit of {timeout:.0f} s reached: stopped (the JSON keeps the precisions that finished)")
    print(f"-> exit {rc} after {time.time() - start:.0f} s", flush=True)
    return rc


def memory_check(path: Path, batch: int) -> list[str]:
    """PASS/FAIL lines of the 40 GB check on (d) tokens+D in a bench_decompose JSON."""
    if not path.exists():
        return [f"40 GB check: FAIL (no result: {path} was not written)"]
    data = json.loads(path.read_text())
    lines = []
    for row in data["results"]:
        for precision, res in row["precisions"].items():
            entry = res["configs"].get("tokens+D", {})
            mem = entry.get("memory", {})
            total = mem.get("peak_total_mb")
            what = f"{row['model']} batch {entry.get('batch', row['batch'])} (d) tokens last 4 layers x 1000 directions, {precision}"
            if total is None:
                lines.append(f"40 GB check: FAIL {what}: no measurement ({entry.get('error') or mem.get('method')})")
                continue
            peak = total * 2**20
            ok = peak < LIMIT_BYTES and entry.get("batch") == batch
            lines.append(f"40 GB check: {'PASS' if ok else 'FAIL'} {what}: peak allocated {peak / 1e9:.1f} GB "
                         f"(of which the call itself {mem['peak_mb'] * 2**20 / 1e9:.1f} GB; reserved by the allocator "
                         f"{mem.get('peak_reserved_mb', 0) * 2**20 / 1e9:.1f} GB) vs {LIMIT_BYTES / 1e9:.0f} GB"
                         + ("" if entry.get("batch") == batch else f"; ran at batch {entry.get('batch')}, not {batch}"))
    return lines


def sync_check() -> None:
    """Child process: count synchronising CUDA operations in one short collect call."""
    import torch

    sys.path.insert(0, str(HERE))
    from bench_decompose import build

    from clip_lens.collect import collect

    device = torch.device("cuda")
    _, hooked, images, _ = build("ViT-B-16", device, 128)
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        context = torch.autocast("cuda", dtype=dtype) if dtype else torch.autocast("cuda", enabled=False)
        with tempfile.TemporaryDirectory() as tmp:
            with context:
                collect(hooked, images[:64], Path(tmp) / "warm", chunk_size=64, batch_size=64, progress=False)
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        collect(hooked, images, Path(tmp) / "store", chunk_size=128, batch_size=64, progress=False)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        where = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
        print(f"sync check {precision}: collect of 128 images (2 batches of 64, 1 chunk) emitted {len(syncs)} "
              f"synchronising-operation warnings ({len(caught) - len(syncs)} other warnings)")
        for place, count in where.most_common(12):
            print(f"    {count:4d}  {place}")
        if syncs:
            print(f"    first message: {str(syncs[0].message).splitlines()[0][:200]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for the fallback")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for the JSON files (default $OUT, else a temp folder)")
    p.add_argument("--sync-check-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.sync_check_child:
        sync_check()
        return 0
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    bench = [sys.executable, str(HERE / "bench_decompose.py")]
    start = time.time()
    summary = []
    if args.device == "cpu":
        path = out / "bench_cpu_fallback.json"
        rc = run(bench + ["--device", "cpu", "--models", "ViT-B-32", "--batch", "2", "--precision", "fp32,bf16",
                          "--repeats", "1", "--min-time", "0.1", "--warmup", "1", "--no-memory", "--json", str(path)], 600)
        summary.append(f"CPU fallback benchmark: exit {rc}")
        summary.append("40 GB check: skipped (needs CUDA: ViT-L-14 batch 128 on the GPU)")
        summary.append("sync check: skipped (CUDA synchronisation only exists on a GPU)")
        rc_cost = run([sys.executable, str(HERE / "scale_cost.py"), "--json", str(path)], 60)
        summary.append(f"scale_cost: exit {rc_cost} (1 = no GPU figure to estimate from, expected on CPU)")
    else:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: run `python benchmarks/gpu_check.py --device cpu` for the CPU fallback")
            return 1
        paths = []
        for name, model, batch, limit in GPU_STEPS:
            path = out / f"bench_{name}.json"
            paths.append(path)
            rc = run(bench + ["--device", "cuda", "--models", model, "--batch", str(batch), "--precision", "fp32,bf16",
                              *COMMON, "--json", str(path)], limit)
            summary.append(f"{model} batch {batch}: exit {rc}")
            if model == "ViT-L-14":
                summary += memory_check(path, batch)
        rc = run([sys.executable, str(Path(__file__).resolve()), "--sync-check-child"], 40)
        summary.append(f"sync check: exit {rc}")
        rc = run([sys.executable, str(HERE / "scale_cost.py")] + [a for p_ in paths if p_.exists() for a in ("--json", str(p_))], 20)
        summary.append(f"scale_cost: exit {rc}")
    print("\n" + "=" * 80)
    for line in summary:
        print(line)
    print(f"gpu_check: {time.time() - start:.0f} s in all; JSON in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
