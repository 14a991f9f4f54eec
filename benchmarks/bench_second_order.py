#!/usr/bin/env python
"""Second-order neuron effects at scale: ``clip_lens.second_order`` against a plain forward pass and against
the reference algorithm re-implemented from our notes (``/work/shared/papers/second_order.md`` §1, §3; their
code is not used).

Workload (the issue's): ViT-B-32 at random init (``open_clip.create_model('ViT-B-32', pretrained=None)``), every
neuron (3,072) of the last half of the layers (6–11), effects projected on 1,000 random unit directions.
On the same weights and images, under ``torch.inference_mode()``:

  (a) forward     open_clip ``model.encode_image(x)`` at ``--batch``
  (b) ours        ``second_order(hooked, x, maps=maps, batch_size=--batch)``: effects and first-order effects
                  ``[batch, 6, 3072, 1000]`` each; the image-independent maps are built once
                  (``second_order_maps``, timed separately: ``maps s``) and reused, as a caller collecting
                  many batches does
  (c) reference   batch 1, one MLP layer per run (one hooked forward each), and per (later layer, head) the
                  ``[tokens, neurons, d_model]`` tensor ``m_n(t) · w_n`` built as written, centred, scaled by
                  ``γ/σ_{ln_1}(t)``, through ``W_V^h``, summed over tokens with the CLS pattern row, through
                  ``W_O^h``, ``ln_post`` (frozen) and ``proj``, projected on the directions. It runs on
                  ``--reference-images`` images (default 1) and ``--reference-layers`` (default 10, which has 12 later
                  heads; the last layer gives the cost of its hooked forward alone); the other layers are
                  extrapolated from the measured cost per (later layer, head) plus one forward per layer
                  (``all`` measures every layer: ~180 heads × ~1 s per image). Its result is compared with (b) (``check``).

Throughput is images/s over ``--images`` images (after one warm-up batch); the ratios are (b)/(a) (target
≥ 0.25× on CPU) and (b)/(c) (target ≥ 50×). Peak memory: per config, freed memory returned to the OS
(``malloc_trim``), the peak RSS reset (``/proc/self/clear_refs``), then ``VmHWM − VmRSS(before)`` after it
ran: the extra resident memory the config needed, its outputs and (b)'s maps included.

Example (the figures in docs/benchmarks.md):
  OMP_NUM_THREADS=2 python benchmarks/bench_second_order.py --threads 2 --json /tmp/second_order.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import malloc_trim, proc_status_kb, reset_peak_rss  # noqa: E402

from clip_lens import HookedCLIP  # noqa: E402
from clip_lens.second_order import second_order, second_order_maps  # noqa: E402


def measure(function):
    """``(result, seconds, peak_mb)`` of one call; peak = VmHWM − VmRSS before (None where unavailable)."""
    malloc_trim()
    reset = reset_peak_rss()
    before = proc_status_kb("VmRSS")
    start = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - start
    peak = proc_status_kb("VmHWM")
    mb = None if not reset or peak is None or before is None else (peak - before) / 1024
    return result, seconds, mb


def reference_effects(hooked: HookedCLIP, image: torch.Tensor, layer: int, directions: torch.Tensor) -> torch.Tensor:
    """Second-order effects of every neuron of ``layer`` on one image, ``[neurons, n_directions]``, as the
    notes write the reference: one run per layer, per (later layer, head) a ``[tokens, neurons, d_model]`` tensor."""
    store = {}

    def save(activation, hook):
        store[hook.name] = activation[0]

    visual = hooked.visual
    n_layers = visual.cfg.n_layers
    names = [f"blocks.{layer}.mlp.hook_post", "ln_post.hook_scale"]
    for later in range(layer + 1, n_layers):
        names += [f"blocks.{later}.ln1.hook_scale", f"blocks.{later}.attn.hook_pattern"]
    with hooked.hooks(fwd_hooks=[(name, save) for name in names]):
        visual(image[None])
    post = store[f"blocks.{layer}.mlp.hook_post"]  # [tokens, neurons]
    W_out = visual.blocks[layer].mlp.W_out  # [neurons, d_model]
    ln_post = visual.ln_post
    sigma_post = store["ln_post.hook_scale"][0]  # CLS token
    total = post.new_zeros(post.shape[1], directions.shape[0])
    for later in range(layer + 1, n_layers):
        block = visual.blocks[later]
        sigma = store[f"blocks.{later}.ln1.hook_scale"]  # [tokens, 1]
        pattern = store[f"blocks.{later}.attn.hook_pattern"][:, 0]  # [heads, tokens]: the CLS query's row
        W_V, W_O = block.attn.W_V, block.attn.W_O
        for head in range(block.attn.n_heads):
            written = post[:, :, None] * W_out[None]  # [tokens, neurons, d_model]
            normed = (written - written.mean(-1, keepdim=True)) * block.ln1.weight / sigma[:, :, None]
            values = normed @ W_V[head]  # [tokens, neurons, d_head]
            z = torch.einsum("t,tnk->nk", pattern[head], values)
            out = z @ W_O[head]  # [neurons, d_model]
            out = (out - out.mean(-1, keepdim=True)) * ln_post.weight / sigma_post
            total += (out @ visual.proj) @ directions.T
    return total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=32, help="images timed for (a) and (b)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--directions", type=int, default=1000)
    parser.add_argument("--reference-images", type=int, default=1)
    parser.add_argument("--reference-layers", default="10",
                        help="layers the reference runs on ('all' or a comma list); the others are extrapolated from "
                             "the measured per-(later layer, head) cost plus one hooked forward per layer")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).eval()
    hooked = HookedCLIP.from_open_clip(model, args.model)
    cfg = hooked.visual.cfg
    layers = list(range(cfg.n_layers // 2, cfg.n_layers))
    generator = torch.Generator().manual_seed(1)
    directions = torch.nn.functional.normalize(torch.randn(args.directions, cfg.d_embed, generator=generator), dim=-1)
    images = torch.randn(args.images + args.batch, 3, *cfg.image_size, generator=generator)
    warm, timed = images[:args.batch], images[args.batch:]
    report = {"model": args.model, "layers": layers, "neurons": cfg.d_mlp, "directions": args.directions,
              "images": args.images, "batch": args.batch, "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
              "torch": torch.__version__, "open_clip": open_clip.__version__}

    with torch.inference_mode():
        def forward():
            for start in range(0, len(timed), args.batch):
                model.encode_image(timed[start:start + args.batch])

        model.encode_image(warm)
        _, seconds, mb = measure(forward)
        report["forward"] = {"images_per_s": len(timed) / seconds, "peak_mb": mb}

        maps, seconds, mb = measure(lambda: second_order_maps(hooked, layers=layers, directions=directions))
        report["maps"] = {"seconds": seconds, "peak_mb": mb,
                          "mb": sum(u.numel() for u in maps.head_maps) * 4 / 2**20}

        def ours():
            result = None
            for start in range(0, len(timed), args.batch):
                result = second_order(hooked, timed[start:start + args.batch], maps=maps, batch_size=args.batch)
            return result

        second_order(hooked, warm, maps=maps, batch_size=args.batch)
        last_result, seconds, mb = measure(ours)
        report["ours"] = {"images_per_s": len(timed) / seconds, "peak_mb": mb,
                          "out_mb_per_batch": 2 * last_result.effects.numel() * 4 / 2**20}
        report["ratio_to_forward"] = report["ours"]["images_per_s"] / report["forward"]["images_per_s"]

        reference_images = timed[-args.reference_images:]
        measured = layers if args.reference_layers == "all" else [int(x) for x in args.reference_layers.split(",")]
        n_heads, last = cfg.n_heads, cfg.n_layers - 1
        seconds, peaks, checks = {}, [], []
        for layer in sorted(set(measured) | {last}):  # the last layer: no later head, i.e. one hooked forward
            effects, t, mb = measure(lambda: torch.stack(
                [reference_effects(hooked, image, layer, directions) for image in reference_images]))
            seconds[layer] = t / len(reference_images)
            peaks.append(mb)
            if layer in layers:
                ours_effects = last_result.effects[-args.reference_images:, layers.index(layer)]
                if ours_effects.abs().max() > 0:
                    checks.append(((effects - ours_effects).norm() / ours_effects.norm()).item())
        # per (later layer, head) cost, from the measured layers; one hooked forward per layer run
        per_head = max((seconds[l] - seconds[last]) / ((last - l) * n_heads) for l in measured if l < last)
        per_image = sum(seconds[l] if l in seconds else seconds[last] + (last - l) * n_heads * per_head for l in layers)
        report["reference"] = {"measured_layers": measured, "seconds_by_layer": seconds, "seconds_per_head": per_head,
                               "seconds_per_image": per_image, "images_per_s": 1 / per_image,
                               "extrapolated": sorted(measured) != layers,
                               "peak_mb": max((p for p in peaks if p is not None), default=None)}
        error = max(checks)
        report["check_relative_error"] = error
        report["speedup_vs_reference"] = report["ours"]["images_per_s"] / report["reference"]["images_per_s"]

    fmt = lambda v: "n/a" if v is None else f"{v:,.0f}"  # noqa: E731
    print(f"{args.model}: neurons of layers {layers[0]}-{layers[-1]} ({len(layers)} x {cfg.d_mlp}), "
          f"{args.directions} directions, batch {args.batch}, {report['threads']} threads, {report['machine']}")
    print(f"  (a) forward    {report['forward']['images_per_s']:8.2f} img/s   peak {fmt(report['forward']['peak_mb'])} MB")
    print(f"  (b) ours       {report['ours']['images_per_s']:8.2f} img/s   peak {fmt(report['ours']['peak_mb'])} MB   "
          f"ratio to (a) {report['ratio_to_forward']:.2f}x (target >= 0.25x)")
    print(f"      maps       built once in {report['maps']['seconds']:.1f} s, {report['maps']['mb']:,.0f} MB "
          f"(peak {fmt(report['maps']['peak_mb'])} MB)")
    ref = report["reference"]
    print(f"  (c) reference  {ref['images_per_s']:8.4f} img/s   peak {fmt(ref['peak_mb'])} MB   "
          f"(b)/(c) {report['speedup_vs_reference']:.0f}x (target >= 50x)")
    print(f"      measured on layers {ref['measured_layers']} (+ the last layer: one hooked forward, "
          f"{ref['seconds_by_layer'][cfg.n_layers - 1]:.2f} s); {ref['seconds_per_head']:.2f} s per (later layer, head)"
          + ("; the other layers extrapolated" if ref["extrapolated"] else ""))
    print(f"  check: reference vs ours, relative error {error:.1e}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
