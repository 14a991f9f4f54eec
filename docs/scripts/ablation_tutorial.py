#!/usr/bin/env python
"""Mean ablation: the script behind ``docs/tutorials/ablation.md``.

Runs offline on the bundled shapes-world CLIP (``toy-shapes``), writes the tutorial's figures
(``tutorial_ablation_*.png``) and prints every number the tutorial quotes:

  (a) a store of 500 scenes and one zero-shot task per shapes-world attribute
  (b) the ``ablation`` plugin: each head's direct effect mean-ablated in turn
  (c) the layer curves (``keep_last``, ``attention_upto``, ``mlps``)

  python docs/scripts/ablation_tutorial.py            # figures into docs/figures/
  python docs/scripts/ablation_tutorial.py --out /tmp/figs
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
from clip_lens.collect import collect, shapes_world_images  # noqa: E402
from clip_lens.toy.world import ATTRIBUTES, VALUES, ShapesWorld, attribute_prompt  # noqa: E402

N_IMAGES = 500
SEED = 2024


def main() -> None:
    args, start = setup(__doc__)

    print(f"(a) store of {N_IMAGES} scenes and the tasks")
    model = clip_lens.HookedCLIP.from_pretrained("toy-shapes")
    scenes = [ShapesWorld(seed=SEED).scene(i) for i in range(N_IMAGES)]     # the store's images, for the labels
    tasks = {}
    with torch.no_grad():
        for attribute in ATTRIBUTES:
            prompts = [attribute_prompt(attribute, v) for v in VALUES[attribute]]      # "a red shape", ...
            classifier = model.encode_text(model.to_tokens(prompts), normalize=True)  # [values, d_embed]
            truth = torch.tensor([VALUES[attribute].index(s.value(attribute)) for s in scenes])
            tasks[attribute] = (classifier, truth)
    with tempfile.TemporaryDirectory() as work:
        store = collect(model, shapes_world_images(N_IMAGES, seed=SEED), Path(work) / "store", progress=False)

        print("(b) each head mean-ablated")
        result = clip_lens.analyses.get("ablation")().run(store, tasks)
        print("  accuracy, nothing ablated: " + ", ".join(f"{t} {a:.3f}" for t, a in result.original.items()))
        for task in ATTRIBUTES:
            top = result.top_heads(task, 2)
            drops, margins = result.drop(task), result.margin_drop(task)
            print(f"  {task:<10} heads that hurt most: " + ", ".join(f"{h} (accuracy -{drops[h]:.3f}, margin -{margins[h]:.3f})" for h in top))
        save(result.plot(), args.out / "tutorial_ablation_heads.png")

        print("(c) layer curves")
        n = model.cfg.n_layers
        for k, accuracy in sorted(result.keep_last.items(), reverse=True):
            print(f"  keep the last {k} attention layers: " + ", ".join(f"{t} {a:.3f}" for t, a in accuracy.items()))
        for last, accuracy in sorted(result.attention_upto.items()):
            print(f"  attention of layers 0-{last} ablated: " + ", ".join(f"{t} {a:.3f}" for t, a in accuracy.items()))
        print("  every MLP + embedding ablated: " + ", ".join(f"{t} {a:.3f}" for t, a in result.mlps.items()))
        assert sorted(result.keep_last) == list(range(n + 1))
        save(result.plot_curves(), args.out / "tutorial_ablation_curves.png")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
