#!/usr/bin/env python
"""Time and cost to collect ImageNet train (1,281,167 images) with ``clip-lens collect``, from the
throughput of config (f) in ``bench_decompose.py`` JSON files (or a figure given on the command line).

Every figure printed is labelled:

* **measured**: (f) img/s of the model on a GPU, read from a benchmark JSON;
* **extrapolated**: no GPU figure for the model, so a measured GPU figure of another open_clip ViT is
  scaled by the ratio of their image-tower forward FLOPs (counted from the open_clip configs,
  `vit_forward_flops`); collect's decomposition and write cost do not scale exactly with the
  forward, so this is a rough estimate;
* **assumed**: ``--img-s`` figures, the price ``--gpu-hour-usd``, the data-loading cap
  ``--decode-img-s-per-gpu``, and linear scaling over GPUs (the ranks of ``collect`` under torchrun
  split the chunks; a shared file system's write rate is not modelled).

Per GPU the rate is ``min(collect img/s, decode img/s per GPU)``; the time on G GPUs is
``images / (G * rate)``, the cost ``G * hours * price``. The benchmark times (f) with one chunk per
call, so its figure includes collect's per-call set-up that a real run pays once: the time is
an upper bound in that respect.

Examples:
  python benchmarks/scale_cost.py --json l14.json --json b16.json
  python benchmarks/scale_cost.py --img-s 300 --gpu-hour-usd 3
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

IMAGENET_TRAIN = 1_281_167


def vit_forward_flops(name: str) -> Optional[float]:
    """FLOPs (2 per multiply-add) of one image through an open_clip ViT image tower, from its config:
    patch embedding, per layer q/k/v/out projections (4 N W^2), scores and pattern @ v (2 N^2 W), the
    MLP (2 N W d_mlp), and the final projection. None for a timm tower or an unknown name."""
    from open_clip.factory import get_model_config
    from open_clip.model import CLIPVisionCfg

    config = get_model_config(name)
    if not config or "timm_model_name" in config.get("vision_cfg", {}):
        return None
    cfg = CLIPVisionCfg(**config["vision_cfg"])
    image = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
    patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
    width, layers = cfg.width, cfg.layers
    d_mlp = int(width * cfg.mlp_ratio)
    grid = image // patch
    n = grid * grid + 1
    patch_embed = grid * grid * 3 * patch * patch * width
    per_layer = 4 * n * width * width + 2 * n * n * width + 2 * n * width * d_mlp
    return 2.0 * (patch_embed + layers * per_layer + width * config["embed_dim"])


def store_bytes_per_image(name: str) -> Optional[int]:
    """float32 bytes per image of a ``collect --heads all`` store before compression: heads [L, H, D],
    attn/attn_bias/mlp [L, D], embedding/embed/bias [D], the norm and the label."""
    from open_clip.factory import get_model_config
    from open_clip.model import CLIPVisionCfg

    config = get_model_config(name)
    if not config or "timm_model_name" in config.get("vision_cfg", {}):
        return None
    cfg = CLIPVisionCfg(**config["vision_cfg"])
    heads = cfg.width // cfg.head_width
    return 4 * ((cfg.layers * heads + 3 * cfg.layers + 3) * config["embed_dim"] + 2)


def gpu_figures(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """(GPU figures, CPU figures) of config (f) in benchmark JSON files."""
    gpu, cpu = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = data.get("machine", {})
        for row in data.get("results", []):
            for precision, res in row.get("precisions", {}).items():
                entry = res.get("configs", {}).get("collect", {})
                if "images_per_s" not in entry:
                    continue
                figure = {"model": row["model"], "precision": precision, "img_s": entry["images_per_s"],
                          "batch": entry.get("batch", row["batch"]), "ratio": entry.get("ratio"),
                          "raw_img_s": res["configs"]["raw"].get("images_per_s"),
                          "store_bytes_per_image": entry.get("out_bytes", 0) / max(entry.get("batch", row["batch"]), 1),
                          "where": machine.get("gpu") or machine.get("cpu"), "file": path}
                (gpu if str(row.get("device", "")).startswith("cuda") else cpu).append(figure)
    return gpu, cpu


def fmt_time(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="append", default=[], metavar="FILE", help="bench_decompose.py --json output (repeatable)")
    p.add_argument("--img-s", type=float, action="append", default=[],
                   help="an assumed collect img/s per GPU for --model (repeatable; labelled 'assumed')")
    p.add_argument("--model", default="ViT-L-14", help="model to estimate (default ViT-L-14)")
    p.add_argument("--images", type=int, default=IMAGENET_TRAIN, help=f"images to collect (default {IMAGENET_TRAIN:,}, ImageNet train)")
    p.add_argument("--gpus", default="1,8,64", help="GPU counts (default 1,8,64)")
    p.add_argument("--gpu-hour-usd", type=float, default=2.5, help="assumed price of one GPU hour (default 2.5)")
    p.add_argument("--decode-img-s-per-gpu", type=float, default=2000.0,
                   help="assumed data-loading rate per GPU, JPEG decode + resize on its CPU cores (default 2000)")
    args = p.parse_args(argv)
    gpus = [int(g) for g in args.gpus.split(",")]

    gpu, cpu = gpu_figures(args.json)
    target_flops = vit_forward_flops(args.model)
    rows = []  # (label, img/s per GPU, source)
    for fig in gpu:
        if fig["model"] == args.model:
            rows.append((f"measured {fig['precision']}", fig["img_s"],
                         f"(f) of {fig['model']} batch {fig['batch']} on {fig['where']} ({fig['file']})"))
    if not rows:
        for fig in gpu:
            flops = vit_forward_flops(fig["model"])
            if flops and target_flops:
                ratio = target_flops / flops
                rows.append((f"extrapolated {fig['precision']}", fig["img_s"] / ratio,
                             f"measured (f) of {fig['model']} ({fig['img_s']:.0f} img/s, batch {fig['batch']} on "
                             f"{fig['where']}) / forward-FLOP ratio {args.model}/{fig['model']} = {ratio:.2f}"))
    for value in args.img_s:
        rows.append(("assumed", value, "given with --img-s"))

    print(f"Collecting {args.images:,} images with {args.model} (`clip-lens collect`, per-head terms of all layers)")
    if target_flops:
        print(f"  {args.model} image-tower forward: {target_flops / 1e9:.1f} GFLOP per image (counted from its open_clip config)")
    store = store_bytes_per_image(args.model)
    if store:
        print(f"  store: {store / 1e6:.2f} MB per image in float32 before zstd (computed from the config), "
              f"{store * args.images / 1e12:.2f} TB for all images; random-init terms barely compress")
    print(f"Assumptions: linear scaling over GPUs; ${args.gpu_hour_usd:g} per GPU hour; data loading at most "
          f"{args.decode_img_s_per_gpu:,.0f} img/s per GPU (--decode-img-s-per-gpu); nothing else (start-up, "
          "file-system write rate) is modelled.")
    for fig in gpu:
        if fig["model"] == args.model and fig["store_bytes_per_image"]:
            print(f"  measured store ({fig['precision']}, random-init weights, after zstd): "
                  f"{fig['store_bytes_per_image'] / 1e6:.2f} MB per image")
    if cpu and not rows:
        print("CPU figures found (not used: a CPU rate says nothing about a GPU's): "
              + "; ".join(f"{f['model']} {f['precision']} {f['img_s']:.2f} img/s on {f['where']}" for f in cpu))
    if not rows:
        print(f"No GPU figure for {args.model} or for another open_clip ViT in the JSON given, and no --img-s: "
              "nothing to estimate. Run benchmarks/gpu_check.py on a GPU, or give --img-s.")
        sys.exit(1)

    head = f"{'figure':18s} {'img/s/GPU':>10s} {'bound by':>9s} " + " ".join(f"{f'{g} GPU':>22s}" for g in gpus)
    print(head)
    print("-" * len(head))
    for label, img_s, source in rows:
        rate = min(img_s, args.decode_img_s_per_gpu)
        bound = "collect" if img_s <= args.decode_img_s_per_gpu else "decode"
        cells = []
        for g in gpus:
            hours = args.images / (g * rate) / 3600
            cells.append(f"{fmt_time(hours)}, ${g * hours * args.gpu_hour_usd:,.0f}")
        print(f"{label:18s} {img_s:10.1f} {bound:>9s} " + " ".join(f"{c:>22s}" for c in cells))
        print(f"{'':18s}   source: {source}")
    print("Cost = GPUs x hours x price: the same for any GPU count under linear scaling; only the wall time changes.")


if __name__ == "__main__":
    main()
