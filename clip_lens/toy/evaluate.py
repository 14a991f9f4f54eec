"""Ground-truth evaluation of a CLIP on the shapes world (library code, as SAELens' synthetic evals)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from clip_lens.toy.world import ATTRIBUTES, VALUES, ShapesWorld, attribute_prompt, batch_images

HELD_OUT_SEED = 1000  # training uses seed 0; evaluation scenes come from an independent world


@dataclass
class ZeroShotResult:
    """Single-attribute zero-shot accuracy on held-out shapes-world images."""

    accuracy: dict[str, float]
    """Per attribute: share of images whose true value's prompt scores highest among that attribute's values."""
    chance: dict[str, float]
    """Per attribute: 1 / number of values."""
    n_images: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def zero_shot_accuracy(
    model,
    n_images: int = 2000,
    seed: int = HELD_OUT_SEED,
    batch_size: int = 250,
    tokenize: Optional[Callable] = None,
    image_size: Optional[int] = None,
) -> ZeroShotResult:
    """Zero-shot accuracy on ``n_images`` held-out scenes.

    ``model`` is a [`HookedCLIP`][clip_lens.HookedCLIP] with the world's tokenizer, or any open_clip
    model given ``tokenize`` and ``image_size``. Prompts are the caption templates with one
    attribute ("a red shape", "a shape at the top left", "a shape on a striped background");
    the prediction is the argmax over the attribute's values.
    """
    tokenize = tokenize or model.to_tokens
    size = image_size or model.cfg.image_size[0]
    parameter = next(model.parameters())
    world = ShapesWorld(seed=seed, image_size=size)
    prompts = {
        a: model.encode_text(tokenize([attribute_prompt(a, v) for v in VALUES[a]]).to(parameter.device), normalize=True)
        for a in ATTRIBUTES
    }
    correct = dict.fromkeys(ATTRIBUTES, 0)
    for start in range(0, n_images, batch_size):
        scenes = [world.scene(i) for i in range(start, min(n_images, start + batch_size))]
        images = model.encode_image(batch_images(scenes).to(parameter.device, parameter.dtype), normalize=True)
        for a in ATTRIBUTES:
            truth = torch.tensor([VALUES[a].index(s.value(a)) for s in scenes])
            correct[a] += int(((images @ prompts[a].T).argmax(-1).cpu() == truth).sum())
    return ZeroShotResult(
        accuracy={a: correct[a] / n_images for a in ATTRIBUTES},
        chance={a: 1 / len(VALUES[a]) for a in ATTRIBUTES},
        n_images=n_images,
        seed=seed,
    )
