"""The segmentation table on the camouflage shapes world (issue 30): prints Markdown, writes JSON.

Camouflage scenes (``ShapesWorld(version=2, camouflage=True)``) paint object and background from one
two-colour palette in equal shares, so pixel colour cannot find the object. On held-out one-object
scenes this measures, with 95 % bootstrap intervals over scenes:

- the zero-shot accuracy of ``toy-shapes-camo`` per attribute on camouflage scenes (shape, size,
  position, background, colour: the colour shows only in the 1-px outline) against chance;
- `SegmentationEval` with position classes (``--attribute shape`` for shape classes, the model
  mostly wrong there): the decomposition maps (all layers, last layer) against
  raw attention, random heads, the random all-layer control (16 heads drawn per layer with
  replacement), chroma, colour contrast, uniform and all-background.

    python docs/scripts/segmentation_camouflage.py --images 2000 --out segmentation_camouflage.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import clip_lens
from clip_lens import analyses
from clip_lens.stats import bootstrap_ci
from clip_lens.toy.world import ShapesWorld, attribute_prompt, batch_images
from clip_lens_plugins.segmentation import shapes_world_segmentation

DOCS_SEED = 1000
"""The held-out seed of the docs' tables (training used world seeds 0 and 0 + 2**31)."""
ATTRIBUTES = ("shape", "size", "position", "background", "colour")


@torch.no_grad()
def camouflage_accuracy(model, n: int, seed: int, batch_size: int = 250) -> dict[str, dict]:
    """Per attribute: zero-shot accuracy on ``n`` one-object camouflage scenes of ``seed``, its 95 %
    bootstrap interval over scenes, and chance (1 / number of values)."""
    world = ShapesWorld(seed=seed, image_size=model.cfg.image_size[0], version=2, camouflage=True)
    prompts = {a: model.encode_text(model.to_tokens([attribute_prompt(a, v) for v in world.values[a]]), normalize=True)
               for a in ATTRIBUTES}
    correct: dict[str, list[float]] = {a: [] for a in ATTRIBUTES}
    for start in range(0, n, batch_size):
        scenes = [world.scene(i) for i in range(start, min(n, start + batch_size))]
        images = model.encode_image(batch_images(scenes), normalize=True)
        for a in ATTRIBUTES:
            truth = torch.tensor([world.values[a].index(s.value(a)) for s in scenes])
            correct[a] += ((images @ prompts[a].T).argmax(-1) == truth).float().tolist()
    return {a: {"accuracy": sum(v) / n, "interval": list(bootstrap_ci(v)), "chance": 1 / len(world.values[a])}
            for a, v in correct.items()}


def measure(model_name: str = "toy-shapes-camo", n: int = 2000, seed: int = DOCS_SEED, attribute: str = "position",
            random_draws: int = 10, n_boot: int = 2000):
    """``(zero-shot accuracies, SegmentationEvalResult)`` on ``n`` camouflage scenes of world ``seed``."""
    model = clip_lens.HookedCLIP.from_pretrained(model_name)
    accuracy = camouflage_accuracy(model, n, seed)
    data = shapes_world_segmentation(n, seed=seed, attribute=attribute, version=2, camouflage=True)
    result = analyses.get("segmentation_eval")(model).run(data, random_draws=random_draws, n_boot=n_boot, seed=0)
    return accuracy, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-shapes-camo")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=DOCS_SEED)
    parser.add_argument("--attribute", default="position", help="the classes: position (the docs' table) or shape")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    accuracy, result = measure(args.model, args.images, args.seed, args.attribute)
    print("| attribute | accuracy | 95% interval | chance |\n|---|---|---|---|")
    for a, row in accuracy.items():
        low, high = row["interval"]
        print(f"| {a} | {100 * row['accuracy']:.1f} | [{100 * low:.1f}, {100 * high:.1f}] | {100 * row['chance']:.1f} |")
    print(f"\n{result.dataset}; zero-shot accuracy of the segmentation's classes: {100 * result.zero_shot_accuracy:.1f}\n")
    print(result.to_markdown())
    if args.out:
        args.out.write_text(json.dumps({"accuracy": accuracy, "segmentation": result.to_dict()}, indent=1))


if __name__ == "__main__":
    main()
