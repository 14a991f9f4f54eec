#!/usr/bin/env python
"""Neurons: the script behind ``docs/tutorials/neurons.md``.

Runs offline on the bundled shapes-world CLIP (``toy-shapes-v2``), writes the tutorial's figures
(``tutorial_neurons_*.png``) and prints every number the tutorial quotes:

  (a) second-order effects of every MLP neuron (`clip_lens.second_order`) on 300 held-out scenes
  (b) the ``neurons`` analysis: sparsity, rank-1 directions, text codes, the accuracy checks
  (c) a neuron's dashboard: its top images with its patch activations (`clip_lens.neurons_report`)
  (d) the same from the shell: ``clip-lens collect --neurons`` then ``clip-lens neurons --store``

  python docs/scripts/neurons_tutorial.py            # figures into docs/figures/
  python docs/scripts/neurons_tutorial.py --out /tmp/figs
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
from clip_lens.head_report import attribute_tasks  # noqa: E402
from clip_lens.neurons_report import inspect_neurons  # noqa: E402
from clip_lens.toy.world import ShapesWorld, batch_images  # noqa: E402

N_IMAGES = 300
SEED = 1000  # the held-out world: the bundled models never trained on it


def main() -> None:
    args, start = setup(__doc__)

    print(f"(a) second-order effects on {N_IMAGES} scenes")
    model = clip_lens.HookedCLIP.from_pretrained("toy-shapes-v2")
    images = batch_images([ShapesWorld(seed=SEED, version=2).scene(i) for i in range(N_IMAGES)])
    layers = list(range(model.cfg.n_layers - 1))              # the last layer: no attention layer reads it
    effects = clip_lens.second_order(model, images, layers=layers)
    print(f"  effects {tuple(effects.effects.shape)} = [image, layer, neuron, d_embed]")
    embedding = model.encode_image(images).detach()
    for i, layer in enumerate(layers):
        second = effects.effects[:, i].sum(1).norm(dim=-1) / embedding.norm(dim=-1)
        first = effects.first_order[:, i].sum(1).norm(dim=-1) / embedding.norm(dim=-1)
        print(f"  layer {layer}: all neurons' second-order effect {second.mean():.3f} of ‖z‖, first-order {first.mean():.3f}")

    print("(b) the neurons analysis")
    tasks = attribute_tasks(model, N_IMAGES, SEED)
    result = clip_lens.analyses.get("neurons")(model).run(images, bank="shapes-attributes", layers=layers, k=6, top_k=50,
                                                          tasks={t: tasks[t] for t in ("colour", "shape")}, effects=effects)
    for row in result.top(5):
        code = ", ".join(f"{t} ({c:+.2f})" for t, c in list(zip(row.texts, row.coefficients))[:3])
        print(f"  L{row.layer}N{row.neuron}: mean |effect| {row.effect_norm:.3f}, significant on {row.significant:.0%}, "
              f"rank-1 explains {row.explained:.0%}; code {code} (cos {row.code_cosine:.2f})")
    print(result.checks_markdown())
    save(result.plot(), args.out / "tutorial_neurons_scatter.png")

    print("(c) a dashboard")
    inspection = inspect_neurons(model, images, result, n_neurons=1, n_images=6)
    (args.out / "tutorial_neurons_dashboard.png").write_bytes(next(iter(inspection.dashboards().values())))
    print(f"  wrote {args.out / 'tutorial_neurons_dashboard.png'} ({inspection.to_dict()['shown'][0]['neuron']})")

    print("(d) from the shell")
    from typer.testing import CliRunner

    from clip_lens.cli import app

    with tempfile.TemporaryDirectory() as work:
        store, out = Path(work) / "store", Path(work) / "neurons"
        runner = CliRunner()
        for command in (["collect", "-m", "toy-shapes-v2", "--shapes", "100", "--seed", str(SEED), "--heads", "none",
                         "--neurons", "0,1,2", "--out", str(store)],
                        ["neurons", "--store", str(store), "--top", "3", "--out", str(out)]):
            print("  $ clip-lens " + " ".join(command))
            done = runner.invoke(app, command)
            assert done.exit_code == 0, done.output
            print("    " + "\n    ".join(done.output.strip().splitlines()[-4:]))
        assert (out / "neurons.html").is_file()
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    with torch.no_grad():
        main()
