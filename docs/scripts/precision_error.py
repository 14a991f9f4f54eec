#!/usr/bin/env python
"""Error of mixed precision (torch.autocast bf16 / fp16) against fp32, for docs: Concepts → Scale.

For each model, the same images run in fp32 and under autocast; printed are relative L2 errors
against fp32 of the image embedding (open_clip's own forward and the hooked one), of the per-head
terms, of the token terms on 100 directions (last layer), and the sum check of the mixed-precision
decomposition (its terms against its own embedding).

    python docs/scripts/precision_error.py                          # CPU, the models below, 8 images
    python docs/scripts/precision_error.py --device cuda --models ViT-B-16,ViT-L-14 --batch 32
"""

from __future__ import annotations

import argparse

import open_clip
import torch

from clip_lens import HookedCLIP
from clip_lens.precision import PRECISIONS, autocast


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def images_for(name: str, hooked: HookedCLIP, batch: int) -> torch.Tensor:
    if name.startswith("toy-shapes"):
        from clip_lens.collect import shapes_world_images
        from clip_lens.toy.evaluate import shapes_world_version

        return shapes_world_images(batch, seed=3, version=shapes_world_version(hooked) or 1).load(0, batch)[0]
    size = hooked.cfg.image_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))


def measure(name: str, device: str, batch: int, precisions: list[str]) -> list[dict]:
    if name.startswith("toy-shapes"):
        hooked, raw = HookedCLIP.from_pretrained(name, device=device), None
    else:
        raw = open_clip.create_model(name, pretrained=None).to(device).eval()
        hooked = HookedCLIP.from_open_clip(raw, name)
    x = images_for(name, hooked, batch).to(device)
    last = hooked.cfg.n_layers - 1
    directions = torch.nn.functional.normalize(torch.randn(100, hooked.cfg.d_embed, generator=torch.Generator().manual_seed(1)), dim=-1).to(device)
    with torch.no_grad():
        ref = hooked.decompose(x, heads="all", tokens=[last], directions=directions)
        ref_raw = raw.encode_image(x) if raw is not None else None
        rows = []
        for precision in precisions:
            with autocast(device, precision):
                parts = hooked.decompose(x, heads="all", tokens=[last], directions=directions)
                low_raw = raw.encode_image(x) if raw is not None else None
            rows.append({
                "model": name, "precision": precision,
                "open_clip embedding": None if raw is None else relative(low_raw, ref_raw),
                "embedding": relative(parts.embedding, ref.embedding),
                "heads": relative(parts.heads, ref.heads),
                "tokens": relative(parts.tokens, ref.tokens),
                "sum check": float(parts.relative_error().max()),
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="toy-shapes-v2,ViT-B-32,ViT-B-16-SigLIP,EVA02-B-16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precisions", default="bf16,fp16")
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    for p in precisions:
        if p not in PRECISIONS or p == "fp32":
            parser.error(f"--precisions takes bf16 and/or fp16, got {p!r}")
    columns = ["open_clip embedding", "embedding", "heads", "tokens", "sum check"]
    print(f"device {args.device}, batch {args.batch}, torch {torch.__version__}; relative L2 error against fp32")
    print("| model | precision | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name in args.models.split(","):
        for row in measure(name, args.device, args.batch, precisions):
            cells = ["—" if row[c] is None else f"{row[c]:.1e}" for c in columns]
            print(f"| {row['model']} | {row['precision']} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
