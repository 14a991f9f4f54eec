#!/usr/bin/env python
"""The five CLIP-InterpreT analyses: the script behind ``docs/tutorials/interpret.md``.

Runs offline on the bundled shapes-world CLIP (``toy-shapes``), writes the tutorial's figures
(``tutorial_interpret_*.png``) and prints every number the tutorial quotes:

  (a) a store of 500 scenes, TextSpan and head labels (as in the head-spans tutorial)
  (b) property neighbours: nearest store images by the heads labelled "colour"
  (c) per-head image neighbours
  (d) per-head text neighbours
  (e) topic segmentation: where a head sees "a red shape"
  (f) contrastive segmentation: "a red shape" versus "a blue shape"

  python docs/scripts/interpret_tutorial.py            # figures into docs/figures/
  python docs/scripts/interpret_tutorial.py --out /tmp/figs
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402

import clip_lens  # noqa: E402
import clip_lens.analyses  # noqa: E402
from tutorial_common import save, setup  # noqa: E402
from clip_lens.collect import collect, shapes_world_images  # noqa: E402
from clip_lens.toy.world import ShapesWorld, batch_images  # noqa: E402

N_IMAGES = 500
STORE_SEED = 2024


def share_same(world: ShapesWorld, queries, rows, attribute: str) -> float:
    """Share of the neighbours whose ``attribute`` equals the query's."""
    same = [world.scene(int(r)).value(attribute) == q.value(attribute) for q, row in zip(queries, rows) for r in row]
    return float(np.mean(same))


def main() -> None:
    args, start = setup(__doc__)

    print(f"(a) store of {N_IMAGES} scenes, spans, labels")
    model = clip_lens.HookedCLIP.from_pretrained("toy-shapes")
    with tempfile.TemporaryDirectory() as work:
        store = collect(model, shapes_world_images(N_IMAGES, seed=STORE_SEED), Path(work) / "store", progress=False)
        spans = clip_lens.analyses.get("textspan")(model).run(store, bank="shapes-attributes", m=10)
        labels = clip_lens.analyses.get("head_labels")(model).run(spans)
        print("  colour heads: " + ", ".join(h.head for h in labels.heads if h.label == "colour"))

        from clip_lens_plugins.neighbors import shapes_world_loader

        Neighbors = clip_lens.analyses.get("neighbors")
        query_world = ShapesWorld(seed=7)
        query_scenes = [query_world.scene(i) for i in range(4)]
        queries = batch_images(query_scenes)                                   # [4, 3, 64, 64]
        store_world = ShapesWorld(seed=STORE_SEED)
        loader = shapes_world_loader(STORE_SEED)                               # store row -> image

        print("(b) property neighbours: colour")
        by_colour = Neighbors(model).run(store, query_images=queries, property="colour", labels=labels, k=8)
        print(f"  heads {by_colour.heads}; queries: {[s.caption() for s in query_scenes]}")
        for attribute in ("colour", "shape", "background"):
            print(f"  share of neighbours with the query's {attribute}: {share_same(store_world, query_scenes, by_colour.indices, attribute):.2f}")
        save(by_colour.plot(loader), args.out / "tutorial_interpret_property.png")

        print("(c) per-head image neighbours")
        for head, attribute in (("L3H0", "colour"), ("L2H0", "background"), ("L3H2", "background")):
            result = Neighbors(model).run(store, query_images=queries, head=head, k=8)
            print(f"  {head} (labelled {labels.by_head()[head].label}): share with the query's {attribute} "
                  f"{share_same(store_world, query_scenes, result.indices, attribute):.2f}, "
                  f"colour {share_same(store_world, query_scenes, result.indices, 'colour'):.2f}")
            if head == "L2H0":
                save(result.plot(loader), args.out / "tutorial_interpret_head.png")

        print("(d) per-head text neighbours")
        texts = ["a red shape", "a shape on a striped background"]
        by_text = Neighbors(model).run(store, query_texts=texts, head="L3H0", k=8)
        for text, row in zip(texts, by_text.indices):
            print(f"  L3H0, '{text}': " + ", ".join(store_world.scene(int(r)).caption() for r in row[:4]))
        save(by_text.plot(loader), args.out / "tutorial_interpret_text.png")

        print("(e) topic segmentation")
        seg_scenes = [ShapesWorld(seed=1000, n_objects=2).scene(i) for i in range(4)]
        images = batch_images(seg_scenes)
        print(f"  captions {[s.caption() for s in seg_scenes]}")
        masks = torch.from_numpy(np.stack([s.attribute_mask("colour", "red") for s in seg_scenes]))
        for head in ("L3H0", "all"):
            heat = clip_lens.analyses.get("segmentation")(model).run(images, "a red shape", head=head)
            inside, outside = heat.inside_outside(masks).T.tolist()
            print(f"  head={head}: raw {tuple(heat.raw.shape)}, grid {tuple(heat.grid.shape)}; mean heat inside / outside "
                  "red pixels per image: " + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(inside, outside)))
        save(heat.plot(images), args.out / "tutorial_interpret_topic.png")

        print("(f) contrastive segmentation")
        pair = clip_lens.analyses.get("contrastive_segmentation")(model).run(images, "a red shape", "a blue shape")
        red_minus_blue, blue_minus_red = pair.maps
        print(f"  maps {tuple(red_minus_blue.shape)}, {tuple(blue_minus_red.shape)}")
        save(pair.plot(images), args.out / "tutorial_interpret_contrastive.png")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
