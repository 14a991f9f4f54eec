#!/usr/bin/env python
"""Mutual knowledge between CLIP's image and text concepts: the script behind
``docs/tutorials/mutual_knowledge.md``.

Runs offline on the bundled shapes-world CLIP (``toy-shapes``), writes the tutorial's figures
(``tutorial_mutual_knowledge_*.png``) and prints every number the tutorial quotes: the
``mutual_knowledge`` plugin on 100 held-out one-object scenes (classes: the six shapes).

  python docs/scripts/mutual_knowledge_tutorial.py            # figures into docs/figures/
  python docs/scripts/mutual_knowledge_tutorial.py --out /tmp/figs
"""

from __future__ import annotations

import time

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

import clip_lens  # noqa: E402
import clip_lens.analyses  # noqa: E402
from tutorial_common import save, setup  # noqa: E402
from clip_lens_plugins.mutual_knowledge import shapes_world_data  # noqa: E402

N_IMAGES = 100


def main() -> None:
    args, start = setup(__doc__)

    model = clip_lens.HookedCLIP.from_pretrained("toy-shapes")
    data = shapes_world_data(N_IMAGES)                       # held-out scenes, classes: the six shapes, boxes from masks
    result = clip_lens.analyses.get("mutual_knowledge")(model).run(data, descriptors="shapes", blur_kernel=7, progress=False)
    print(result.to_markdown())
    print(f"  mean MI {result.mean_mi:.3f}, mean AUC {result.mean_auc:.3f}")
    first = result.images[0]
    print(f"  image 0: visual concepts {first.visual[:5]}, textual concepts {first.textual[:5]}")
    print(f"  its textual concepts: {[result.descriptors[i] for i in first.textual[:5]]}")
    save(result.plot(), args.out / "tutorial_mutual_knowledge_dynamics.png")
    save(result.plot_concepts(data.load(range(4))), args.out / "tutorial_mutual_knowledge_concepts.png")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
