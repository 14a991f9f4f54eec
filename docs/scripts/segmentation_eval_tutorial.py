#!/usr/bin/env python
"""Evaluating zero-shot segmentation: the script behind ``docs/tutorials/segmentation_eval.md``.

Runs offline on the bundled shapes-world CLIP (``toy-shapes``), writes the tutorial's figures
(``tutorial_segmentation_eval_*.png``) and prints every number the tutorial quotes: the
``segmentation_eval`` plugin on 200 one-object shapes-world scenes with exact masks, for colour and
shape classes, against its raw-attention and uniform baselines.

  python docs/scripts/segmentation_eval_tutorial.py            # figures into docs/figures/
  python docs/scripts/segmentation_eval_tutorial.py --out /tmp/figs
"""

from __future__ import annotations

import time

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

import clip_lens  # noqa: E402
import clip_lens.analyses  # noqa: E402
from tutorial_common import save, setup  # noqa: E402
from clip_lens_plugins.segmentation import shapes_world_segmentation  # noqa: E402

N_IMAGES = 200


def main() -> None:
    args, start = setup(__doc__)

    model = clip_lens.HookedCLIP.from_pretrained("toy-shapes")
    evaluation = clip_lens.analyses.get("segmentation_eval")(model)
    for attribute in ("colour", "shape"):
        print(f"({attribute}) {N_IMAGES} one-object scenes, classes: the {attribute} prompts")
        data = shapes_world_segmentation(N_IMAGES, attribute=attribute)          # held-out seed 1000, exact masks
        result = evaluation.run(data)
        print(f"  {result.dataset}; zero-shot accuracy {result.zero_shot_accuracy:.3f}; layers per method {result.layers}")
        print(result.to_markdown())
        save(result.plot(), args.out / f"tutorial_segmentation_eval_{attribute}.png")

    print("(layers) which layers' heads to sum")
    data = shapes_world_segmentation(N_IMAGES)
    result = evaluation.run(data, layers={"layer 0": [0], "layer 1": [1], "layer 2": [2], "layer 3": [3], "layers 2-3": [2, 3]})
    print(result.to_markdown())
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
