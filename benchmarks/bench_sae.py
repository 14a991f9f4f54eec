#!/usr/bin/env python
"""Throughput and memory of SAE activation streaming and training.

For each model (the bundled ``toy-shapes`` and a random-init ``ViT-B-32`` by default) one run measures:

  (a) forward     ``model.encode_image(x)`` over ``--images`` images in batches of ``--batch``
  (b) streaming   iterating an :class:`~clip_lens.sae.ActivationSource` on the last block's
                  ``hook_resid_post`` (all tokens, shuffled buffer) over the same images, drained to
                  the end: run_with_cache with ``stop_at_layer``, the NaN check, buffer writes,
                  permutations and batch gathers included
  (b') streaming at the middle block (``stop_at_layer`` skips the second half of the tower)

and prints images/s and the ratio streaming / forward (target >= 0.7 for the last block). Timing
is paired like ``bench_decompose.py``: ``--repeats`` rounds, each runs (a), (b), (b') back to back
(order rotated); the ratio is the median of the per-round ratios.

Training: tokens/s of ``train_sae`` (topk, ``d_sae = --expansion × d_in``, k = 32, ``--train-steps``
steps of 4096 tokens, middle block) end to end from the stream (a 16k-row buffer, its first fill
included), and of the SAE update alone (the same step on a fixed batch already in memory).

Memory: for each ``--buffers`` size (rows) a fresh subprocess builds the model, runs one forward
batch (warm-up), returns freed memory to the OS (``malloc_trim``), resets the peak RSS
(``/proc/self/clear_refs``), then consumes ``2 × buffer`` rows from an endless source and reports
``VmHWM - VmRSS(before)``: the peak resident growth of streaming, against the buffer's own size
``rows × d_in × 4 B`` and the peak growth of one plain forward batch (measured the same way first).

Examples:
  python benchmarks/bench_sae.py                          # CPU: toy-shapes and ViT-B-32
  python benchmarks/bench_sae.py --models toy-shapes --repeats 5
  python benchmarks/bench_sae.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
from peak_memory import malloc_trim, proc_status_kb, reset_peak_rss

TARGET = 0.7
SETTINGS = {  # per model on CPU: images per round, forward batch, buffer rows
    "toy-shapes": {"images": 1024, "batch": 128, "buffer": 2**16},
    "ViT-B-32": {"images": 96, "batch": 32, "buffer": 2**14},
}
GPU_SETTINGS = {
    "toy-shapes": {"images": 8192, "batch": 512, "buffer": 2**18},
    "ViT-B-32": {"images": 2048, "batch": 256, "buffer": 2**19},
}


def build(name: str, device: str):
    from clip_lens import HookedCLIP

    return HookedCLIP.from_pretrained(name, device=device)


def random_images(model, n: int, seed: int = 0) -> torch.Tensor:
    h, w = model.cfg.image_size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_fn(model, images: torch.Tensor, batch: int, device: str) -> Callable[[], int]:
    def run() -> int:
        with torch.inference_mode():
            for start in range(0, len(images), batch):
                model.encode_image(images[start:start + batch].to(device))
        sync(device)
        return len(images)

    return run


def stream_fn(model, images: torch.Tensor, hook: str, batch: int, buffer: int, device: str) -> Callable[[], int]:
    from clip_lens.sae.activations import ActivationSource

    def run() -> int:
        source = ActivationSource(model, images, hook, batch_size=batch, buffer_size=buffer, token_batch=4096,
                                  epochs=1, device=device)
        for _ in source:
            pass
        sync(device)
        return len(images)

    return run


def timed(fn: Callable[[], int]) -> float:
    start = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - start)


def throughput(model, name: str, settings: dict, repeats: int, device: str) -> dict:
    images = random_images(model, settings["images"])
    n_layers = model.cfg.n_layers
    configs = {
        "forward": forward_fn(model, images, settings["batch"], device),
        "stream last": stream_fn(model, images, f"blocks.{n_layers - 1}.hook_resid_post", settings["batch"],
                                 settings["buffer"], device),
        "stream middle": stream_fn(model, images, f"blocks.{n_layers // 2 - 1}.hook_resid_post", settings["batch"],
                                   settings["buffer"], device),
    }
    for fn in configs.values():  # warm-up
        fn()
    rates = {key: [] for key in configs}
    order = list(configs)
    for r in range(repeats):
        for key in order[r % len(order):] + order[: r % len(order)]:
            rates[key].append(timed(configs[key]))
    ratios = {key: statistics.median(a / b for a, b in zip(rates[key], rates["forward"])) for key in configs if key != "forward"}
    return {"img_s": {key: statistics.median(v) for key, v in rates.items()}, "ratio": ratios}


def training(model, settings: dict, steps: int, expansion: int, device: str) -> dict:
    from clip_lens.sae.activations import ActivationSource
    from clip_lens.sae.train import _TrainingSAE, _train_step, train_sae

    n = max(settings["batch"] * 4, settings["images"])
    images = random_images(model, n, seed=1)
    hook = f"blocks.{model.cfg.n_layers // 2 - 1}.hook_resid_post"
    buffer = max(4 * 4096, 2 * settings["batch"] * model.cfg.n_ctx)  # small: the first fill is not amortised here
    source = ActivationSource(model, images, hook, batch_size=settings["batch"], buffer_size=buffer,
                              token_batch=4096, device=device)
    d_in = source.d_in
    d_sae = expansion * d_in
    start = time.perf_counter()
    train_sae(source, d_sae, architecture="topk", k=32, steps=steps, progress=False, device=device)
    sync(device)
    end_to_end = steps * 4096 / (time.perf_counter() - start)

    generator = torch.Generator().manual_seed(0)
    sae = _TrainingSAE(d_in, d_sae, "topk", 32, generator).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = next(iter(source)).to(device, torch.float32)
    _train_step(sae, optimizer, x, "topk", None, 1 / 32, 10**9, generator, 0)  # warm-up
    sync(device)
    start = time.perf_counter()
    for step in range(steps):
        _train_step(sae, optimizer, x, "topk", None, 1 / 32, 10**9, generator, step)
    sync(device)
    step_only = steps * 4096 / (time.perf_counter() - start)
    return {"d_in": d_in, "d_sae": d_sae, "end_to_end_tok_s": end_to_end, "step_only_tok_s": step_only}


# --- memory (child processes) ------------------------------------------------------------------
def rss_child(name: str, buffer: int, batch: int, device: str) -> None:
    from clip_lens.sae.activations import ActivationSource

    model = build(name, device)
    images = random_images(model, max(batch * 2, 64))
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    source = ActivationSource(model, images, hook, batch_size=batch, buffer_size=buffer, token_batch=4096, device=device)
    source._rows(0, batch)  # warm-up: one forward batch through the hook
    with torch.inference_mode():  # reference: the peak growth of one plain forward batch
        malloc_trim()
        reset = reset_peak_rss()
        before = proc_status_kb("VmRSS") if reset else proc_status_kb("VmHWM")
        model.encode_image(images[:batch])
        forward_mb = (proc_status_kb("VmHWM") - before) / 1024
    malloc_trim()
    reset = reset_peak_rss()
    before = proc_status_kb("VmRSS") if reset else proc_status_kb("VmHWM")
    consumed = 0
    while consumed < 2 * buffer:
        consumed += len(next(source))
    peak = proc_status_kb("VmHWM")
    print("@@RSS " + json.dumps({
        "peak_growth_mb": (peak - before) / 1024, "forward_mb": forward_mb, "batch": batch, "buffer_mb": buffer * source.d_in * 4 / 2**20,
        "rows_peak": source.peak_rows, "reset": reset,
    }))


def peak_rss(name: str, buffer: int, batch: int, device: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--_rss", name, str(buffer), str(batch), device],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    for line in out.stdout.splitlines():
        if line.startswith("@@RSS "):
            return json.loads(line[6:])
    return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="toy-shapes,ViT-B-32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=None, help="default: 40 (toy), 5 (ViT-B-32) on CPU; 200 on GPU")
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--buffers", default=None, help="comma list of buffer rows for the memory runs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--_rss", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._rss:
        name, buffer, batch, device = args._rss
        rss_child(name, int(buffer), int(batch), device)
        return
    gpu = args.device.startswith("cuda")
    table = GPU_SETTINGS if gpu else SETTINGS
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}")
    results = {}
    for name in args.models.split(","):
        settings = table.get(name, table["ViT-B-32"])
        model = build(name, args.device)
        print(f"\n== {name}: {settings['images']} images, batch {settings['batch']}, buffer {settings['buffer']} rows, "
              f"d_model {model.cfg.d_model}, {model.cfg.n_ctx} tokens/image")
        tp = throughput(model, name, settings, args.repeats, args.device)
        for key, rate in tp["img_s"].items():
            ratio = tp["ratio"].get(key)
            note = "" if ratio is None else f"  ratio {ratio:.2f}" + (
                f"  (target >= {TARGET}: {'ok' if ratio >= TARGET else 'MISSED'})" if key == "stream last" else "")
            print(f"  {key:14s} {rate:9.1f} img/s  ({rate * model.cfg.n_ctx:10.0f} tokens/s){note}")
        steps = args.train_steps or (200 if gpu else (40 if name == "toy-shapes" else 5))
        tr = training(model, settings, steps, args.expansion, args.device)
        print(f"  train topk d_sae {tr['d_sae']} (k 32, 4096 tokens/step, {steps} steps): "
              f"{tr['end_to_end_tok_s']:.0f} tokens/s end to end, {tr['step_only_tok_s']:.0f} tokens/s SAE step only")
        n_ctx = model.cfg.n_ctx
        del model
        buffers = [int(b) for b in args.buffers.split(",")] if args.buffers else (
            [2**14, 2**16, 2**18] if name == "toy-shapes" else [2**14, 2**16])
        memory = []
        for buffer in buffers:
            batch = max(1, min(settings["batch"], buffer // (2 * n_ctx)))  # two forward batches fit the buffer
            m = peak_rss(name, buffer, batch, args.device)
            memory.append({"buffer_rows": buffer, **m})
            if "error" in m:
                print(f"  memory, buffer {buffer:7d} rows: failed: {m['error']}")
            else:
                print(f"  memory, buffer {buffer:7d} rows ({m['buffer_mb']:7.1f} MB of rows): streaming peak RSS growth "
                      f"{m['peak_growth_mb']:7.1f} MB (one plain forward of {m['batch']} images: {m['forward_mb']:.1f} MB), "
                      f"buffer held at most {m['rows_peak']} rows")
        results[name] = {"settings": settings, "throughput": tp, "training": tr, "memory": memory}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
