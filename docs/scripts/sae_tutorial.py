#!/usr/bin/env python
"""Training and naming a sparse autoencoder: the script behind ``docs/tutorials/sae.md``.

Runs offline on the bundled shapes-world CLIP (``toy-shapes``), writes the tutorial's figures
(``tutorial_sae_*.png``) and prints every number the tutorial quotes:

  (a) a TopK SAE trained on the class token of ``blocks.3.hook_resid_post`` (1,000 scenes)
  (b) its features named through the frozen read-out (``name_features``)
  (c) the images its features fire on most (``top_activating``), and splicing it into the model

  python docs/scripts/sae_tutorial.py            # figures into docs/figures/
  python docs/scripts/sae_tutorial.py --out /tmp/figs
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

from tutorial_common import save, setup  # noqa: E402
from clip_lens import HookedCLIP  # noqa: E402
from clip_lens.collect import shapes_world_images  # noqa: E402
from clip_lens.sae import ActivationSource, load_sae, train_sae  # noqa: E402
from clip_lens.sae.naming import name_features, top_activating  # noqa: E402
from clip_lens.toy.world import ShapesWorld, batch_images  # noqa: E402


def main() -> None:
    args, start = setup(__doc__)

    print("(a) train")
    model = HookedCLIP.from_pretrained("toy-shapes")
    source = ActivationSource(model, shapes_world_images(1000), "blocks.3.hook_resid_post", positions="cls",
                              buffer_size=1000, token_batch=256, keep=True)   # each scene runs through the model once
    trained = train_sae(source, d_sae=64, architecture="topk", k=8, steps=400, lr=3e-3, progress=False)
    sae = trained.sae
    final = trained.final
    print(f"  {sae.cfg.d_sae} features on {sae.cfg.hook_name}: explained variance {final['explained_variance']:.3f}, "
          f"L0 {final['l0']:.1f}, dead {final['dead_fraction']:.2f}")

    print("(b) names")
    names = name_features(model, sae, "shapes-attributes")                  # decoder rows through the frozen read-out
    print("(c) top images")
    top = top_activating(model, sae, shapes_world_images(300, seed=1000), k=8, names=names)
    order = top.frequency.argsort(descending=True).tolist()
    alive = [f for f in order if top.frequency[f] > 0]
    print(f"  {len(alive)} of {sae.cfg.d_sae} features fire on the 300 held-out scenes")
    selective = [f for f in alive if top.frequency[f] < 0.3][:5]
    for f in selective:
        print(f"  feature {f}: fires on {top.frequency[f].item():.2f} of the images; named {names.name(f)!r} "
              f"(top texts {[t for t, _ in names.top(f)[:3]]})")
    save(top.plot(selective[0]), args.out / "tutorial_sae_top_images.png")

    with tempfile.TemporaryDirectory() as work:
        sae.save(Path(work) / "my_sae")                                    # SAELens' folder format
        images = batch_images([ShapesWorld(seed=3).scene(i) for i in range(4)])
        with model.saes([load_sae(Path(work) / "my_sae")]):               # spliced in, SAELens' hook names
            _, cache = model.run_with_cache(images, return_type="image_features")
        features = cache["blocks.3.hook_resid_post.hook_sae_acts_post"]
        print(f"  spliced: features {tuple(features.shape)}, active per class token {(features[:, 0] > 0).sum(-1).tolist()}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
