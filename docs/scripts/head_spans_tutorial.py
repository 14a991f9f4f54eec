#!/usr/bin/env python
"""Head spans and labels: the script behind ``docs/tutorials/head_spans.md``.

Runs offline on the bundled shapes-world CLIP (``toy-shapes``), writes the tutorial's figures
(``tutorial_head_spans_*.png``) and prints every number the tutorial quotes:

  (a) the installed analyses (``clip_lens.analyses.list``)
  (b) ``collect``: a resumable store of per-head terms of 500 shapes-world scenes
  (c) ``textspan``: each head's span texts and explained variance
  (d) ``head_labels`` and ``interp_metrics``

  python docs/scripts/head_spans_tutorial.py            # figures into docs/figures/
  python docs/scripts/head_spans_tutorial.py --out /tmp/figs
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

import clip_lens  # noqa: E402
import clip_lens.analyses  # noqa: E402
from tutorial_common import save, setup  # noqa: E402
from clip_lens.collect import Store, collect, shapes_world_images  # noqa: E402

N_IMAGES = 500


def main() -> None:
    args, start = setup(__doc__)

    print("(a) installed analyses")
    for info in clip_lens.analyses.list():
        print(f"  {info.name:<26} {'ok' if info.ok else info.error}")

    print(f"(b) collect {N_IMAGES} scenes")
    model = clip_lens.HookedCLIP.from_pretrained("toy-shapes")
    with tempfile.TemporaryDirectory() as work:
        store = collect(model, shapes_world_images(N_IMAGES, seed=2024), Path(work) / "store", progress=False)
        print(f"  {store.n_images} images, head layers {store.head_layers}, heads {tuple(store.read('heads').shape)}")
        again = collect(model, shapes_world_images(N_IMAGES, seed=2024), Path(work) / "store", progress=False)  # resumes: nothing to do
        print(f"  collecting again reuses the finished store: {again.n_images} images")
        store = Store.open(Path(work) / "store")

        print("(c) TextSpan")
        spans = clip_lens.analyses.get("textspan")(model).run(store, bank="shapes-attributes", m=10)
        for key in ("L3H0", "L2H0", "L1H2"):
            head = spans.by_head()[key]
            print(f"  {key}: {head.texts[:5]} (explained variance of 10 texts {head.cumulative[-1]:.2f})")
        save(spans.plot(), args.out / "tutorial_head_spans_variance.png")

        print("(d) head labels and metrics")
        labels = clip_lens.analyses.get("head_labels")(model).run(spans)
        for head in labels.heads:
            print(f"  {head.head}: {head.label or 'none':<11} confidence {head.confidence:.1f}")
        save(labels.plot(), args.out / "tutorial_head_spans_labels.png")
        metrics = clip_lens.analyses.get("interp_metrics")().run(labels)
        print(f"  mean CCS {metrics.mean_ccs:.2f}, association {metrics.association:.2f}, "
              f"entanglement {metrics.entanglement:.2f}, property counts {metrics.property_counts}")
        print(metrics.to_markdown())
        labels.save(Path(work) / "labels.json")
        reloaded = type(labels).load(Path(work) / "labels.json")
        print(f"  labels saved and reloaded: {len(reloaded.heads)} heads")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
