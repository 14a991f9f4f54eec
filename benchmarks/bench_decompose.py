#!/usr/bin/env python
"""Throughput and memory of HookedCLIP and decompose() against raw open_clip.

One run measures, on the same weights and the same input batch:

  (a) raw        open_clip ``model.encode_image(x)``
  (b) hooked     ``HookedCLIP.from_open_clip(model, name).encode_image(x)``
  (c) heads      ``decompose(hooked, x, heads="all")``
  (d) tokens+D   ``decompose(hooked, x, heads="all", tokens=<last 4 layers>, directions=D)``,
                 D = 1000 random unit directions ``[1000, d_embed]``

all under ``torch.inference_mode()``, and prints images/s, the ratios b/a, c/a, d/a against
the targets (>= 0.9x, >= 0.8x, >= 0.5x), peak memory and the sum-check error of the
decompositions (``result.relative_error().max()``).

Timing: every config is warmed up, an iteration count is calibrated so that one measurement
lasts about ``--min-time`` seconds, then ``--repeats`` rounds are run with the configs
interleaved (order rotated each round). Throughput is the median over rounds; a ratio is the
median over rounds of the paired ratio (config / raw in the same round), which cancels slow
drift from other load on the machine.

Memory:
  * CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` around one call, after
    ``reset_peak_memory_stats()`` (the extra device memory one call needs, output included;
    model weights and the input are excluded).
  * CPU: each config runs once more in a fresh subprocess (same model, dtype, batch): after a
    batch-1 warm-up (lazy library initialisation) and ``malloc_trim(0)`` (memory freed so far goes
    back to the OS, so the measured call cannot hide in it) the peak RSS is reset (``/proc/self/clear_refs``;
    if that is refused the high-water mark so far is used as baseline), one full-batch call is
    made, and ``VmHWM - VmRSS(before the call)`` is reported: the process's peak resident-memory
    growth during that call, output included, weights and input excluded. A fresh process keeps
    memory freed (and cached by malloc) in earlier configs from hiding the cost.
  * ``out MB`` is the size of the tensors each call returns (exact, allocator-independent).

Only the image tower is benchmarked, so by default the text tower is built with one layer and a
64-token vocabulary (``--full-text-tower`` builds it as configured): the image tower, its weights
and its random initialisation are unchanged (it is built first), but building is faster and the
process holds ~100M fewer parameters (SigLIP's text tower alone is 110M). A Hugging Face text tower
is built as configured. No tokenizer is used: the directions are random unit vectors.

Everything model-specific comes from the hooked tower (``cfg.d_embed``, ``cfg.n_prefix_tokens``,
``visual.output_affine()``), so open_clip's own ViT and timm towers (SigLIP's MAP pooler, EVA02's
rotary embeddings and SwiGLU) run the same code.

Examples:
  python benchmarks/bench_decompose.py                     # CPU: ViT-B-32, ViT-B-16-SigLIP, EVA02-B-16; batch 8, fp32
  python benchmarks/bench_decompose.py --device cuda       # ViT-B-16 b256, ViT-L-14 b128; fp32+bf16
  python benchmarks/bench_decompose.py --models ViT-B-16 --batch 4 --repeats 7 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Optional

import torch
from peak_memory import malloc_trim, proc_status_kb, reset_peak_rss

CONFIGS = ["raw", "hooked", "heads", "tokens+D"]
LABELS = {
    "raw": "(a) open_clip encode_image",
    "hooked": "(b) HookedCLIP.encode_image",
    "heads": "(c) decompose heads=all",
    "tokens+D": "(d) decompose +tokens(last4) +D",
}
TARGETS = {"hooked": 0.9, "heads": 0.8, "tokens+D": 0.5}
N_DIRECTIONS = 1000
N_TOKEN_LAYERS = 4
SUM_CHECK_TOL = {torch.float32: 1e-4}  # DESIGN §4; lower precisions are reported only
CPU_DEFAULT_MODELS = "ViT-B-32,ViT-B-16-SigLIP,EVA02-B-16"
GPU_DEFAULT_MODELS = "ViT-B-16,ViT-L-14"
GPU_DEFAULT_BATCH = {"ViT-B-16": 256, "ViT-L-14": 128}
SMALL_TEXT_TOWER = {"layers": 1, "vocab_size": 64}  # the image benchmark never runs the text tower
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- machine --------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    import open_clip

    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import clip_lens

        info["clip_lens"] = clip_lens.__version__
    except Exception:  # pragma: no cover
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# --- setup ----------------------------------------------------------------------------------
def text_tower_kwargs(name: str, full_text_tower: bool) -> dict:
    """``create_model`` kwargs that shrink the text tower (unused here) to one layer and a tiny vocabulary.

    open_clip builds the image tower before the text tower, so the image weights (and their
    random initialisation under the same seed) do not change. ``{}`` for a Hugging Face text
    tower or when ``full_text_tower`` is set.
    """
    import copy

    from open_clip.factory import get_model_config

    config = None if full_text_tower else get_model_config(name)
    text_cfg = (config or {}).get("text_cfg")
    if not text_cfg or text_cfg.get("hf_model_name"):
        return {}
    text_cfg = copy.deepcopy(text_cfg)  # create_model's kwargs replace text_cfg as a whole
    text_cfg.update(SMALL_TEXT_TOWER)
    return {"text_cfg": text_cfg}


def build(name: str, device: torch.device, dtype: torch.dtype, batch: int, seed: int = 0,
          full_text_tower: bool = False):
    """open_clip model, HookedCLIP sharing its weights, an input batch and the directions."""
    import open_clip

    from clip_lens import HookedCLIP

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # "No pretrained weights loaded": random init is intended
        try:
            model = open_clip.create_model(name, pretrained=None, **text_tower_kwargs(name, full_text_tower))
        finally:
            logging.disable(logging.NOTSET)
    model = model.to(device=device, dtype=dtype).eval()
    hooked = HookedCLIP.from_open_clip(model, name)
    size = hooked.cfg.image_size
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(batch, 3, *size, generator=gen).to(device=device, dtype=dtype)
    # the width of the embedding decompose() works in: every tower's (timm head +) projection
    d_embed = hooked.visual.output_affine()[0].shape[1]
    assert hooked.cfg.d_embed in (None, d_embed), (hooked.cfg.d_embed, d_embed)
    directions = torch.randn(N_DIRECTIONS, d_embed, generator=gen)
    directions = (directions / directions.norm(dim=-1, keepdim=True)).to(device=device, dtype=dtype)
    return model, hooked, images, directions


def make_fns(model, hooked, directions) -> dict[str, Callable]:
    from clip_lens import decompose

    token_layers = list(range(hooked.cfg.n_layers - N_TOKEN_LAYERS, hooked.cfg.n_layers))
    return {
        "raw": lambda x: model.encode_image(x),
        "hooked": lambda x: hooked.encode_image(x),
        "heads": lambda x: decompose(hooked, x, heads="all"),
        "tokens+D": lambda x: decompose(hooked, x, heads="all", tokens=token_layers, directions=directions),
    }


def output_bytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    total = 0
    for value in vars(out).values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- memory ---------------------------------------------------------------------------------
def cpu_peak_child(args: argparse.Namespace) -> None:
    """Subprocess entry: peak RSS growth of one call of one config (printed as JSON)."""
    device = torch.device("cpu")
    dtype = DTYPES[args.dtype]
    model, hooked, images, directions = build(args.models, device, dtype, args.batch,
                                              full_text_tower=args.full_text_tower)
    fn = make_fns(model, hooked, directions)[args.memory_child]
    with torch.inference_mode():
        fn(images[:1])  # lazy initialisation (thread pools, kernels) outside the measurement
        trimmed = malloc_trim()
        reset = reset_peak_rss()
        before = proc_status_kb("VmRSS")
        baseline = before if reset else proc_status_kb("VmHWM")
        out = fn(images)
        peak = proc_status_kb("VmHWM")
    result = {
        "peak_mb": None if None in (peak, baseline) else max(peak - baseline, 0) / 1024,
        "method": ("VmHWM-VmRSS after clear_refs" if reset else "VmHWM growth (no reset)")
        + (" and malloc_trim" if trimmed else ""),
        "out_bytes": output_bytes(out),
    }
    print("@@MEM " + json.dumps(result))


def cpu_peak_memory(name: str, dtype: str, batch: int, config: str, full_text_tower: bool = False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--models", name, "--dtype", dtype,
           "--batch", str(batch), "--device", "cpu", "--memory-child", config,
           "--threads", str(torch.get_num_threads())] + (["--full-text-tower"] if full_text_tower else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("@@MEM "):
            return json.loads(line[len("@@MEM "):])
    return {"peak_mb": None, "method": f"subprocess failed: {proc.stderr.strip()[-300:]}"}


def cuda_peak_memory(fn: Callable, images: torch.Tensor, device: torch.device) -> dict:
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn(images)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    result = {"peak_mb": (peak - base) / 2**20, "method": "cuda max_memory_allocated - allocated",
              "out_bytes": output_bytes(out)}
    del out
    return result


# --- timing ---------------------------------------------------------------------------------
def time_calls(fn: Callable, images: torch.Tensor, iters: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn(images)  # result dropped at once: no two outputs alive together
    sync(device)
    return time.perf_counter() - start


def bench_one(name: str, dtype_name: str, batch: int, device: torch.device, args) -> dict:
    dtype = DTYPES[dtype_name]
    model, hooked, images, directions = build(name, device, dtype, batch, full_text_tower=args.full_text_tower)
    fns = make_fns(model, hooked, directions)
    tcfg = hooked.cfg
    tower = f"timm {tcfg.extra.get('timm_model')}" if "timm_model" in (tcfg.extra or {}) else "open_clip ViT"
    d_embed = directions.shape[1]
    row: dict = {"model": name, "dtype": dtype_name, "batch": batch, "device": str(device), "tower": tower,
                 "n_layers": tcfg.n_layers, "n_heads": tcfg.n_heads, "n_ctx": tcfg.n_ctx,
                 "n_prefix_tokens": tcfg.n_prefix_tokens, "pool_type": tcfg.pool_type, "d_embed": d_embed,
                 "text_tower": "as configured" if args.full_text_tower or not text_tower_kwargs(name, False)
                 else f"shrunk {SMALL_TEXT_TOWER}", "configs": {}}
    print(f"\n== {name}  {dtype_name}  batch {batch}  on {device} "
          f"({tower}: {tcfg.n_layers} layers x {tcfg.n_heads} heads, {tcfg.n_ctx} tokens of which "
          f"{tcfg.n_prefix_tokens} prefix, pool {tcfg.pool_type}, d_embed {d_embed}; tokens= last "
          f"{N_TOKEN_LAYERS} layers, D = [{N_DIRECTIONS}, {d_embed}])", flush=True)

    with torch.inference_mode():
        # correctness: the decompositions are exact and describe the same forward as open_clip
        reference = fns["raw"](images).float()
        hooked_out = fns["hooked"](images).float()
        res_c = fns["heads"](images)
        res_d = fns["tokens+D"](images)
        ref_norm = reference.norm(dim=-1)
        checks = {
            "hooked_vs_raw": ((hooked_out - reference).norm(dim=-1) / ref_norm).max().item(),
            "heads_sum_check": res_c.relative_error().float().max().item(),
            "heads_embedding_vs_raw": ((res_c.embedding.float() - reference).norm(dim=-1) / ref_norm).max().item(),
            "tokens_sum_check": res_d.relative_error().float().max().item(),
            "tokens_embedding_vs_raw": (
                (res_d.embedding.float() - reference @ directions.float().T).norm(dim=-1)
                / (reference @ directions.float().T).norm(dim=-1)
            ).max().item(),
            "tokens_shape": list(res_d.tokens.shape),
        }
        # tokens summed over source tokens must reproduce the per-head terms of those layers
        tl = res_d.token_layers
        heads_d = res_d.heads[:, [res_d.head_layers.index(l) for l in tl]].float()
        checks["tokens_vs_heads"] = ((res_d.tokens.float().sum(3) - heads_d).norm() / heads_d.norm()).item()
        del reference, hooked_out, res_c, res_d, heads_d

        # warm-up + calibration of the iteration count per config
        iters = {}
        for cfg in CONFIGS:
            for _ in range(args.warmup):
                time_calls(fns[cfg], images, 1, device)
            t = time_calls(fns[cfg], images, 1, device)
            iters[cfg] = max(1, round(args.min_time / max(t, 1e-6)))

        # interleaved repeats
        per_round = {cfg: [] for cfg in CONFIGS}
        for r in range(args.repeats):
            order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
            for cfg in order:
                elapsed = time_calls(fns[cfg], images, iters[cfg], device)
                per_round[cfg].append(batch * iters[cfg] / elapsed)
            print(f"  round {r + 1}/{args.repeats}: "
                  + "  ".join(f"{cfg} {per_round[cfg][-1]:.1f}" for cfg in CONFIGS) + " img/s", flush=True)

        for cfg in CONFIGS:
            thr = per_round[cfg]
            entry = {"images_per_s": statistics.median(thr), "per_round": thr, "iters_per_round": iters[cfg],
                     "ms_per_batch": 1000 * batch / statistics.median(thr)}
            if cfg != "raw":
                ratios = [x / a for x, a in zip(thr, per_round["raw"])]
                entry["ratio"] = statistics.median(ratios)
                entry["ratio_range"] = [min(ratios), max(ratios)]
                entry["target"] = TARGETS[cfg]
                entry["pass"] = entry["ratio"] >= TARGETS[cfg]
            row["configs"][cfg] = entry

        if not args.no_memory and device.type == "cuda":
            for cfg in CONFIGS:
                row["configs"][cfg]["memory"] = cuda_peak_memory(fns[cfg], images, device)

    if not args.no_memory and device.type == "cpu":
        del model, hooked, fns, images, directions  # let the children have the RAM
        for cfg in CONFIGS:
            row["configs"][cfg]["memory"] = cpu_peak_memory(name, dtype_name, batch, cfg, args.full_text_tower)

    tol = SUM_CHECK_TOL.get(dtype)
    checks["sum_check_tol"] = tol
    checks["sum_check_pass"] = None if tol is None else max(checks["heads_sum_check"], checks["tokens_sum_check"]) <= tol
    row["checks"] = checks
    print_row(row)
    return row


# --- report ---------------------------------------------------------------------------------
def fmt_mb(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:,.1f}"


def print_row(row: dict) -> None:
    c = row["checks"]
    print(f"-- {row['model']} {row['dtype']} batch {row['batch']} ({row['tower']}, text tower {row['text_tower']})")
    print(f"   {'config':34s} {'img/s':>9s} {'ms/batch':>9s} {'ratio':>7s} {'(range)':>13s} {'target':>7s} {'':5s} "
          f"{'peak MB':>9s} {'out MB':>8s}")
    for cfg in CONFIGS:
        e = row["configs"][cfg]
        mem = e.get("memory", {})
        out_mb = mem.get("out_bytes")
        ratio = "" if cfg == "raw" else f"{e['ratio']:.3f}"
        spread = "" if cfg == "raw" else f"[{e['ratio_range'][0]:.2f}-{e['ratio_range'][1]:.2f}]"
        target = "" if cfg == "raw" else f">={e['target']:.1f}"
        verdict = "" if cfg == "raw" else ("PASS" if e["pass"] else "MISS")
        print(f"   {LABELS[cfg]:34s} {e['images_per_s']:9.2f} {e['ms_per_batch']:9.1f} {ratio:>7s} {spread:>13s} {target:>7s} "
              f"{verdict:5s} {fmt_mb(mem.get('peak_mb')):>9s} "
              f"{'n/a' if out_mb is None else f'{out_mb / 2**20:,.1f}':>8s}")
    tol = c["sum_check_tol"]
    verdict = "" if tol is None else (" PASS" if c["sum_check_pass"] else " MISS") + f" (tol {tol:g})"
    print(f"   sum-check relative_error().max(): heads {c['heads_sum_check']:.2e}, "
          f"tokens+D {c['tokens_sum_check']:.2e}{verdict}")
    print(f"   vs open_clip: hooked {c['hooked_vs_raw']:.2e}, decompose embedding {c['heads_embedding_vs_raw']:.2e}, "
          f"projected embedding {c['tokens_embedding_vs_raw']:.2e}; tokens.sum(token) vs heads "
          f"{c['tokens_vs_heads']:.2e}; tokens shape {tuple(c['tokens_shape'])}", flush=True)


def print_summary(info: dict, rows: list[dict], args) -> None:
    print("\n" + "=" * 100)
    print(f"Machine: {info['cpu']} ({info['cpu_count']} logical CPUs), torch {info['torch']} "
          f"({info['torch_threads']} threads), open_clip {info['open_clip']}, python {info['python']}"
          + (f", GPU {info['gpu']} (CUDA {info['cuda']})" if "gpu" in info else ""))
    if info.get("loadavg_start") is not None:
        print(f"Load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in info['loadavg_start'])}, "
              f"at end {'/'.join(f'{x:.2f}' for x in info['loadavg_end'])} (other processes share these CPUs)")
    print(f"Device {info['device']}; torch.inference_mode(); {args.repeats} interleaved rounds, "
          f"~{args.min_time:g}s per measurement, {args.warmup} warm-up calls; img/s = median over rounds, "
          f"ratio = median of per-round paired ratios vs (a)")
    mem_note = ("CUDA max_memory_allocated growth during one call" if info["device"].startswith("cuda")
                else "peak RSS growth during one call in a fresh subprocess (weights+input excluded)")
    print(f"peak MB = {mem_note}; out MB = size of the returned tensors")
    header = (f"{'model':16s} {'dtype':5s} {'batch':>5s} | {'raw img/s':>9s} | {'hooked':>13s} | "
              f"{'heads':>13s} | {'tokens+D':>13s} | {'peak MB a/b/c/d':>27s} | {'sum-check c/d':>17s}")
    print(header)
    print("-" * len(header))
    for row in rows:
        cfgs, c = row["configs"], row["checks"]

        def cell(cfg):
            e = cfgs[cfg]
            return f"{e['ratio']:.2f}x {'PASS' if e['pass'] else 'MISS'}"

        mems = "/".join(fmt_mb(cfgs[k].get("memory", {}).get("peak_mb")) for k in CONFIGS)
        print(f"{row['model']:16s} {row['dtype']:5s} {row['batch']:5d} | {cfgs['raw']['images_per_s']:9.2f} | "
              f"{cell('hooked'):>13s} | {cell('heads'):>13s} | {cell('tokens+D'):>13s} | {mems:>27s} | "
              f"{c['heads_sum_check']:.1e}/{c['tokens_sum_check']:.1e}")
    print("targets: hooked >= 0.9x, heads >= 0.8x, tokens+D >= 0.5x of raw open_clip throughput")


# --- main -----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help=f"comma-separated open_clip names (default: {CPU_DEFAULT_MODELS} on CPU; "
                        f"{GPU_DEFAULT_MODELS} on CUDA)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size for every model (default: 8 on CPU; 256 for ViT-B-16, 128 for ViT-L-14 on CUDA)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--dtype", default=None, help="comma-separated from fp32,bf16,fp16 (default: fp32 on CPU, "
                                                 "fp32,bf16 on CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) (default: leave torch's default, %d here)" % torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls per config before timing")
    p.add_argument("--min-time", type=float, default=None,
                   help="target seconds per measurement; sets iterations per round (default 1.0 CPU, 0.5 CUDA)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--full-text-tower", action="store_true",
                   help="build the text tower as configured (default: 1 layer, 64-token vocabulary; unused here)")
    p.add_argument("--json", metavar="OUT", help="write all results to this JSON file")
    p.add_argument("--memory-child", choices=CONFIGS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        args.dtype = args.dtype or "fp32"
        cpu_peak_child(args)
        return

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but torch.cuda.is_available() is False")
    on_gpu = device.type == "cuda"
    models = (args.models or (GPU_DEFAULT_MODELS if on_gpu else CPU_DEFAULT_MODELS)).split(",")
    dtypes = (args.dtype or ("fp32,bf16" if on_gpu else "fp32")).split(",")
    for d in dtypes:
        if d not in DTYPES:
            sys.exit(f"unknown --dtype {d!r}; choose from {', '.join(DTYPES)}")
    if args.min_time is None:
        args.min_time = 0.5 if on_gpu else 1.0

    info = machine_info(device)
    print(f"bench_decompose: {info}", flush=True)
    rows = []
    for name in models:
        batch = args.batch or (GPU_DEFAULT_BATCH.get(name, 128) if on_gpu else 8)
        for d in dtypes:
            rows.append(bench_one(name, d, batch, device, args))
            if on_gpu:
                torch.cuda.empty_cache()

    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = list(os.getloadavg())
    print_summary(info, rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "targets": TARGETS, "results": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
