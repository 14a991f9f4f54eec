"""Ground-truth evaluation of a CLIP on the shapes world (library code, as SAELens' synthetic evals)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from clip_lens.stats import bootstrap_ci
from clip_lens.toy.world import ShapesWorld, attribute_prompt, batch_images

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
    interval: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per attribute: bootstrap 95% interval over the scenes."""
    per_value: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per attribute and true value: accuracy on that value's scenes (count: ``{"one": 1.0, "three": 0.02, …}``)."""
    per_value_interval: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    """Per attribute and true value: bootstrap 95% interval over that value's scenes."""
    confusion: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """Per attribute, true value and predicted value: share of the true value's scenes given that prediction
    (``confusion["count"]["three"]["four"]``: three-object scenes called "four")."""

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
    world_version: Optional[int] = None,
) -> ZeroShotResult:
    """Zero-shot accuracy on ``n_images`` held-out scenes.

    ``model`` is a [`HookedCLIP`][clip_lens.HookedCLIP] with the world's tokenizer, or any open_clip
    model given ``tokenize`` and ``image_size``. Prompts are the caption templates with one
    attribute ("a red shape", "a shape at the top left", "a shape on a striped background");
    the prediction is the argmax over the attribute's values. The scenes hold one object, except
    for version 2's ``count``, measured on scenes of 1–4 objects ("one shape" … "four shapes").
    ``world_version`` defaults to the model's (`shapes_world_version`), else 1. Besides one accuracy
    per attribute, the result holds it per true value with intervals and the confusion rows
    (``per_value``, ``per_value_interval``, ``confusion``): one number can hide that a model counts
    one and four objects and calls three "four".
    """
    tokenize = tokenize or model.to_tokens
    size = image_size or model.cfg.image_size[0]
    version = world_version or shapes_world_version(model) or 1
    parameter = next(model.parameters())
    world = ShapesWorld(seed=seed, image_size=size, version=version)
    # (scenes, the attributes measured on them): count needs scenes of several objects
    sources = [(world, [a for a in world.attributes if a != "count"])]
    if "count" in world.attributes:
        sources.append((ShapesWorld(seed=seed, image_size=size, n_objects=(1, 4), version=version), ["count"]))
    prompts = {
        a: model.encode_text(tokenize([attribute_prompt(a, v) for v in world.values[a]]).to(parameter.device), normalize=True)
        for a in world.attributes
    }
    correct: dict[str, list[float]] = {a: [] for a in world.attributes}
    truths: dict[str, list[int]] = {a: [] for a in world.attributes}
    predictions: dict[str, list[int]] = {a: [] for a in world.attributes}
    for start in range(0, n_images, batch_size):
        indices = range(start, min(n_images, start + batch_size))
        for source, attributes in sources:
            scenes = [source.scene(i) for i in indices]
            images = model.encode_image(batch_images(scenes).to(parameter.device, parameter.dtype), normalize=True)
            for a in attributes:
                truth = torch.tensor([world.values[a].index(s.value(a)) for s in scenes])
                predicted = (images @ prompts[a].T).argmax(-1).cpu()
                correct[a].extend((predicted == truth).float().tolist())
                truths[a].extend(truth.tolist())
                predictions[a].extend(predicted.tolist())
    per_value, per_value_interval, confusion = {}, {}, {}
    for a in world.attributes:
        per_value[a], per_value_interval[a], confusion[a] = _per_value(world.values[a], truths[a], predictions[a])
    return ZeroShotResult(
        accuracy={a: sum(v) / n_images for a, v in correct.items()},
        chance={a: 1 / len(world.values[a]) for a in world.attributes},
        n_images=n_images,
        seed=seed,
        interval={a: bootstrap_ci(v) for a, v in correct.items()},
        per_value=per_value,
        per_value_interval=per_value_interval,
        confusion=confusion,
    )


def _per_value(values, truths: list[int], predictions: list[int]):
    """Accuracy, its interval and the confusion row of every value that occurs among ``truths`` (indices into ``values``)."""
    truth, predicted = np.asarray(truths), np.asarray(predictions)
    accuracy, interval, confusion = {}, {}, {}
    for index, value in enumerate(values):
        mine = predicted[truth == index]
        if mine.size == 0:  # a value no scene showed: no row rather than a made-up 0
            continue
        hits = (mine == index).astype(float)
        accuracy[value], interval[value] = float(hits.mean()), bootstrap_ci(hits)
        confusion[value] = {other: float((mine == j).mean()) for j, other in enumerate(values)}
    return accuracy, interval, confusion


def versus_chance(accuracy: float, interval: tuple[float, float], chance: float) -> str:
    """Words for an accuracy that follow its interval: "at chance (0.498 [0.476, 0.520]; chance 0.5)" when
    the interval holds chance, else "above chance by 3 points (0.529 [0.508, 0.550]; chance 0.5)"."""
    low, high = interval
    figures = f"{accuracy:.3f} [{low:.3f}, {high:.3f}]; chance {chance:g}"
    if low <= chance <= high:
        return f"at chance ({figures})"
    side = "above" if low > chance else "below"
    return f"{side} chance by {abs(accuracy - chance) * 100:.0f} points ({figures})"


def shapes_world_version(model) -> Optional[int]:
    """The shapes-world version a bundled model (or model name) was trained on: its registry
    entry's ``world_version`` (``toy-shapes``: 1, ``toy-shapes-v2``: 2); None for other models."""
    from clip_lens.loading import bundled_world

    return bundled_world(model)[0]



def shapes_world_camouflage(model) -> bool:
    """Whether a bundled model was trained on camouflage scenes (its registry entry's ``camouflage``:
    ``toy-shapes-camo``); its shapes-world scenes are then drawn with ``camouflage=True``."""
    from clip_lens.loading import bundled_world

    return bundled_world(model)[1]

@dataclass
class BindingResult:
    """Two-object scenes: does the model prefer the true caption to the same words wrongly bound?

    Each test is a choice between two captions, so chance is 0.5; ``interval`` holds bootstrap 95%
    intervals over scenes. ``colour_shape``: "a red circle" (present) against "a blue circle" (the
    other object's colour on this object's shape). ``relation``: "a red circle above a blue square"
    against "a blue square above a red circle". ``relation_colours``: against "a blue circle above a
    red square" (the colours swapped).
    """

    accuracy: dict[str, float]
    interval: dict[str, tuple[float, float]]
    chance: float
    n_scenes: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)

    def verdicts(self) -> dict[str, str]:
        """Per test, its accuracy worded by its interval against chance (`versus_chance`)."""
        return {test: versus_chance(a, self.interval[test], self.chance) for test, a in self.accuracy.items()}


@torch.no_grad()
def binding_accuracy(model, n_scenes: int = 2000, seed: int = HELD_OUT_SEED, batch_size: int = 250) -> BindingResult:
    """Binding tests on two-object scenes of the version-2 world whose objects differ in colour and shape."""
    from clip_lens.toy.world import relation_phrase, relations

    world = ShapesWorld(seed=seed, image_size=model.cfg.image_size[0], n_objects=2, version=2)
    parameter = next(model.parameters())
    outcomes: dict[str, list[float]] = {"colour_shape": [], "relation": [], "relation_colours": []}
    index = 0
    while len(outcomes["relation"]) < n_scenes:
        scenes = []
        while len(scenes) < batch_size and len(outcomes["relation"]) + len(scenes) < n_scenes:
            scene = world.scene(index)
            index += 1
            a, b = scene.objects
            if a.colour != b.colour and a.shape != b.shape:
                scenes.append(scene)
        images = model.encode_image(batch_images(scenes).to(parameter.device, parameter.dtype), normalize=True)
        pairs = {name: [] for name in outcomes}
        for scene in scenes:
            a, b = scene.objects
            relation = relations(a, b)[0]
            pa, pb = {"colour": a.colour, "shape": a.shape}, {"colour": b.colour, "shape": b.shape}
            pairs["colour_shape"].append((f"a {a.colour} {a.shape}", f"a {b.colour} {a.shape}"))
            pairs["relation"].append((relation_phrase(pa, relation, pb), relation_phrase(pb, relation, pa)))
            swapped_a, swapped_b = {**pa, "colour": b.colour}, {**pb, "colour": a.colour}
            pairs["relation_colours"].append((relation_phrase(pa, relation, pb), relation_phrase(swapped_a, relation, swapped_b)))
        for name, texts in pairs.items():
            true = model.encode_text(model.to_tokens([t for t, _ in texts]).to(parameter.device), normalize=True)
            false = model.encode_text(model.to_tokens([f for _, f in texts]).to(parameter.device), normalize=True)
            wins = ((images * true).sum(-1) > (images * false).sum(-1)).float().cpu().tolist()
            outcomes[name].extend(wins)
    return BindingResult(
        accuracy={k: float(sum(v) / len(v)) for k, v in outcomes.items()},
        interval={k: bootstrap_ci(v) for k, v in outcomes.items()},
        chance=0.5,
        n_scenes=n_scenes,
        seed=seed,
    )


@dataclass
class LocalisationResult:
    """Does a text direction's per-position decomposition point at the object? (held-out scenes)

    For each scene (one object) and ``attribute``, the map is the decomposition's ``positions``
    terms projected on the true value's prompt embedding minus the mean of all values' prompts (so
    it scores "this value rather than the others"). A hit: the map's largest cell is the cell that
    holds most of the object's pixels. Baselines that could beat it use no text: the spatial
    tokens' norm (the object is salient on a plain background), and the attention pool's pattern
    (ResNet) where the tower has one; ``chance`` is ``1 / cells``.
    """

    hit_rate: dict[str, float]
    """Per map (``"decomposition"``, ``"wrong value"``, ``"feature norm"``, ``"pool attention"``): share of hits."""
    interval: dict[str, tuple[float, float]]
    """Per map: bootstrap 95% interval over the scenes."""
    object_share: dict[str, float]
    """Per map: mean share of the map's positive mass that lies on the object's cell."""
    chance: float
    n_images: int
    seed: int
    attribute: str

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def localisation(
    model, attribute: str = "colour", n_images: int = 500, seed: int = HELD_OUT_SEED, batch_size: int = 100,
) -> LocalisationResult:
    """Measure how often ``model.decompose(..., tokens="all")``'s per-position terms of an attribute's
    text direction peak on the object's cell (see [`LocalisationResult`][clip_lens.toy.evaluate.LocalisationResult]).

    Needs a tower whose decomposition has ``positions`` (ResNet, ConvNeXt, FastViT) and a
    shapes-world tokenizer; scenes come from ``ShapesWorld(seed)`` at the model's image size.
    """
    from clip_lens.errors import UnsupportedArchitectureError

    size = model.cfg.image_size[0]
    grid_h, grid_w = model.cfg.grid_size
    world = ShapesWorld(seed=seed, image_size=size, version=shapes_world_version(model) or 1)
    values = world.values[attribute]
    prompts = model.encode_text(model.to_tokens([attribute_prompt(attribute, v) for v in values]), normalize=True)
    directions = prompts - prompts.mean(0, keepdim=True)  # value vs the attribute's other values
    hits: dict[str, list[float]] = {}
    shares: dict[str, list[float]] = {}
    pool_pattern = "attn_pool.attn.hook_pattern" if "attn_pool.attn.hook_pattern" in model.hook_dict else None
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n_images, batch_size):
        scenes = [world.scene(i) for i in range(start, min(n_images, start + batch_size))]
        images = batch_images(scenes).to(model.device, model.dtype)
        names = [model.spatial_hook] + ([pool_pattern] if pool_pattern else [])
        _, cache = model.run_with_cache(images, names_filter=names, return_type=None)
        parts = model.decompose(images, tokens="all", directions=directions)
        if parts.positions is None:
            raise UnsupportedArchitectureError("localisation needs per-position terms (a ResNet, ConvNeXt or FastViT tower).")
        truth = torch.tensor([values.index(s.value(attribute)) for s in scenes], device=images.device)
        wrong = (truth + torch.randint(1, len(values), truth.shape, generator=generator).to(truth.device)) % len(values)
        index = torch.arange(len(scenes), device=images.device)
        maps = {
            "decomposition": parts.positions[index, :, truth],
            "wrong value": parts.positions[index, :, wrong],
            "feature norm": cache[model.spatial_hook][:, -grid_h * grid_w:].norm(dim=-1),
        }
        if pool_pattern:
            maps["pool attention"] = cache[pool_pattern][:, :, 0, -grid_h * grid_w:].mean(1)
        cells = torch.stack([_object_cell(s.object_masks[0], grid_h, grid_w) for s in scenes]).to(images.device)
        maps["random cell"] = torch.rand(len(scenes), grid_h * grid_w, generator=generator).to(images.device)
        for name, scores in maps.items():
            hits.setdefault(name, []).extend((scores.argmax(-1) == cells).float().tolist())
            positive = scores.clamp_min(0)
            share = positive[index, cells] / positive.sum(-1).clamp_min(1e-12)
            shares.setdefault(name, []).extend(share.tolist())
    return LocalisationResult(
        hit_rate={k: sum(v) / len(v) for k, v in hits.items()},
        interval={k: bootstrap_ci(v) for k, v in hits.items()},
        object_share={k: sum(v) / len(v) for k, v in shares.items()},
        chance=1 / (grid_h * grid_w), n_images=n_images, seed=seed, attribute=attribute,
    )


def _object_cell(mask, grid_h: int, grid_w: int) -> torch.Tensor:
    """Row-major index of the grid cell holding most of ``mask``'s pixels (``[H, W]`` bool)."""
    pixels = torch.from_numpy(mask).float()
    h, w = pixels.shape
    per_cell = pixels.reshape(grid_h, h // grid_h, grid_w, w // grid_w).sum((1, 3))
    return per_cell.flatten().argmax()
