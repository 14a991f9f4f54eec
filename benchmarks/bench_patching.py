#!/usr/bin/env python
"""Batched activation patching (``clip_lens.patching.activation_patch``) against the naive loop.

One run, same weights, same clean/corrupted pair, a full ``resid_pre`` sweep (every layer ×
every position):

  (a) naive    one full forward of the corrupted image per patch, with a hook that writes the
               clean activation (what TransformerLens' ``get_act_patch_resid_pre`` does)
  (b) batched  ``activation_patch``: each patch starts from the cached corrupted residual at its
               layer (``start_at_layer``) and ``--batch-size`` patches share one forward

It prints both times, their ratio (target: batched >= 2x faster on CPU for ViT-B-32) and the
largest difference between the two results (must be <= 1e-5). Timings are the median of
``--repeats`` interleaved rounds. The clean and corrupted images are random; with real minimal
pairs (one object changed) many layer-0 patches copy identical values and are skipped, so the
speed-up there is larger.

  python benchmarks/bench_patching.py                      # ViT-B-32, random init, CPU
  python benchmarks/bench_patching.py --model toy-shapes --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def naive_sweep(model, clean, corrupted, metric):
    _, cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("hook_resid_pre"))
    values = torch.empty(model.cfg.n_layers, model.cfg.n_ctx)
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.hook_resid_pre"
        for pos in range(model.cfg.n_ctx):
            def patch(act, hook, pos=pos):
                act = act.clone()
                act[:, pos] = cache[name][:, pos]
                return act

            values[layer, pos] = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)],
                                                             return_type="image_features"))
    return values


def main() -> None:
    from clip_lens import HookedCLIP
    from clip_lens.patching import activation_patch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=50, help="patched runs per forward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = HookedCLIP.from_pretrained(args.model, config_overrides={"text_cfg": {"layers": 1}} if args.model != "toy-shapes" else None)
    clean = torch.randn(1, 3, *model.cfg.image_size)
    corrupted = torch.randn(1, 3, *model.cfg.image_size)
    direction = torch.nn.functional.normalize(torch.randn(model.cfg.d_embed), dim=0)

    def metric(features):
        return (features @ direction).mean()

    times = {"naive": [], "batched": []}
    with torch.no_grad():
        for round_ in range(args.repeats):
            start = time.perf_counter()
            naive = naive_sweep(model, clean, corrupted, metric)
            times["naive"].append(time.perf_counter() - start)
            start = time.perf_counter()
            batched = activation_patch(model, clean, corrupted, metric, batch_size=args.batch_size, progress=False)
            times["batched"].append(time.perf_counter() - start)
    naive_s, batched_s = statistics.median(times["naive"]), statistics.median(times["batched"])
    ratios = [n / b for n, b in zip(times["naive"], times["batched"])]
    error = (naive - batched.values).abs().max().item()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"model: {args.model}, sweep resid_pre {model.cfg.n_layers} layers x {model.cfg.n_ctx} positions "
          f"= {model.cfg.n_layers * model.cfg.n_ctx} patches, batch {args.batch_size} patches/forward")
    print(f"naive   (one forward per patch): {naive_s:7.2f} s")
    print(f"batched (activation_patch):      {batched_s:7.2f} s")
    print(f"speed-up: {statistics.median(ratios):.2f}x (median of paired rounds; target >= 2x)")
    print(f"max |naive - batched|: {error:.2e} (must be <= 1e-5)")


if __name__ == "__main__":
    main()
