"""Train a small CLIP on the shapes world (``python -m clip_lens.toy.train``).

The model is an open_clip ``CLIP`` built from a custom config (data, see `model_config`).
Half of each batch is random scenes whose captions keep each attribute with probability
``keep_prob``; the other half is minimal sets ([`ShapesWorld.variants`][clip_lens.toy.ShapesWorld.variants]): scenes identical
but for one attribute, which their captions always name, so the loss cannot ignore an attribute
that the rest of a caption makes redundant (shape, without them). Several captions in a batch can
be true of the same image ("a red shape"), so the loss treats every caption that is true of an
image as a positive (multi-positive InfoNCE); with one positive per row it equals open_clip's
``ClipLoss`` (tested). Training is seeded and resumable: batch ``k`` is a function of
``(seed, k)`` only (`training_batch`), and checkpoints keep model, optimizer and step.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from tqdm import tqdm

from clip_lens.errors import InputError
from clip_lens.files import atomic_write
from clip_lens.toy.claims import count_claim, object_claim, positives, relation_claim
from clip_lens.toy.evaluate import zero_shot_accuracy
from clip_lens.toy.texts import vocabulary
from clip_lens.toy.tokenizer import WordTokenizer
from clip_lens.toy.world import ATTRIBUTES, VALUES, Scene, ShapesWorld, batch_images


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    keep_prob: float = 0.3
    contrast: float = 0.5
    """Share of each batch made of minimal sets ([`ShapesWorld.variants`][clip_lens.toy.ShapesWorld.variants]) that differ in one attribute."""
    group_size: int = 4
    seed: int = 0
    image_size: int = 64
    eval_every: int = 250
    eval_images: int = 512
    checkpoint_every: int = 250
    max_minutes: Optional[float] = None
    stop_at: Optional[int] = None
    """Stop (checkpointed, resumable) after this step, as an interrupted run would; None: run to ``steps``."""
    world_version: int = 1
    """1: the grey world of ``toy-shapes``; 2: coloured textures, clutter, 1–4 objects (``toy-shapes-v2``)."""
    multi: float = 0.25
    """Version 2: share of each batch made of 2–4-object scenes with relation, count or object captions."""
    keep_every: int = 0
    """Keep a copy of the weights every this many steps (``steps/model-<step>.safetensors``; 0: none)."""
    camouflage: float = 0.0
    """Version 2: share of each batch drawn from the camouflage world (``ShapesWorld(camouflage=True)``,
    seeded ``seed + CAMOUFLAGE_SEED_OFFSET``), built as a version-2 batch of its own (`training_batch_mixed`)."""
    freeze_text: bool = False
    """Keep the text tower (and the token embeddings) as initialised: only the image tower and the
    logit scale learn, so the captions' embeddings, and what earlier analyses found in them, stay put."""
    init_from: Optional[str] = None
    """Start from a bundled model's weights (e.g. ``toy-shapes``) instead of random ones; words the new
    vocabulary adds get fresh embeddings, the others keep theirs (`initial_weights`)."""


def model_config(vocab_size: int, image_size: int = 64, context_length: int = 32) -> dict:
    """The open_clip config of the shapes-world CLIP (4×4-head ViT on 8×8 patches, 3-layer text)."""
    return {
        "embed_dim": 128,
        "vision_cfg": {"image_size": image_size, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": context_length, "vocab_size": vocab_size, "width": 128, "heads": 4, "layers": 3},
    }


def build_model(config: dict) -> CLIP:
    return CLIP(**config)


CONTRAST_WEIGHTS = {"colour": 0.1, "shape": 0.5, "size": 0.2, "position": 0.1, "background": 0.1}
"""Which attribute a minimal set varies: mostly the ones a random batch rarely needs (shape, size)."""
CONTRAST_INDEX = 2**40  # minimal sets come from world indices far from the random scenes'
MULTI_INDEX = 2**41  # and version 2's several-object scenes from others again
CAMOUFLAGE_SEED_OFFSET = 2**31  # the camouflage part of a mixed batch comes from another world seed


def sample_keep(rng: np.random.Generator, keep_prob: float) -> dict[str, bool]:
    """Which attributes a caption mentions (at least one)."""
    while True:
        keep = {a: bool(rng.random() < keep_prob) for a in ATTRIBUTES}
        if any(keep.values()):
            return keep


def caption_batch(scenes: list[Scene], seed: int, step: int, keep_prob: float, varied: Optional[list] = None):
    """Partial captions for a batch and the ``[image, caption]`` matrix of which captions are true.

    ``varied[i]`` names an attribute caption ``i`` must mention (the one its minimal set varies).
    """
    rng = np.random.default_rng([seed, 1, step])
    keeps = [sample_keep(rng, keep_prob) for _ in scenes]
    for keep, attribute in zip(keeps, varied or []):
        if attribute is not None:
            keep[attribute] = True
    captions = [s.caption(k) for s, k in zip(scenes, keeps)]
    facts = [{a: s.value(a) for a in ATTRIBUTES} for s in scenes]
    claims = [{a: f[a] for a in ATTRIBUTES if k[a]} for f, k in zip(facts, keeps)]
    true = torch.tensor([[all(f[a] == v for a, v in c.items()) for c in claims] for f in facts])
    return captions, true


def minimal_sets(world: ShapesWorld, config: TrainConfig, step: int) -> tuple[list[Scene], list[str]]:
    """Batch ``step``'s minimal sets (``contrast`` × batch scenes, groups of ``group_size`` that differ
    in one attribute, drawn with `CONTRAST_WEIGHTS`) and the attribute each scene's group varies."""
    n_groups = int(config.contrast * config.batch_size) // config.group_size
    rng = np.random.default_rng([config.seed, 2, step])
    attributes = rng.choice(list(CONTRAST_WEIGHTS), size=n_groups, p=list(CONTRAST_WEIGHTS.values()))
    grouped, varied = [], []
    for j, attribute in enumerate(map(str, attributes)):
        group = world.variants(CONTRAST_INDEX + step * n_groups + j, attribute, min(config.group_size, len(VALUES[attribute])))
        grouped += group
        varied += [attribute] * len(group)
    return grouped, varied


def training_batch(world: ShapesWorld, config: TrainConfig, step: int):
    """Scenes, captions and positives of batch ``step`` (deterministic in ``(config.seed, step)``):
    random scenes plus minimal sets of ``group_size`` scenes that differ in one attribute."""
    grouped, varied = minimal_sets(world, config, step)
    start = step * config.batch_size
    scenes = [world.scene(i) for i in range(start, start + config.batch_size - len(grouped))] + grouped
    varied = [None] * (config.batch_size - len(grouped)) + varied
    captions, positives = caption_batch(scenes, config.seed, step, config.keep_prob, varied)
    return scenes, captions, positives


def training_batch_v2(world: ShapesWorld, config: TrainConfig, step: int):
    """Version 2's batch ``step``: minimal sets as in version 1, one-object scenes with partial
    captions (a tenth of them counted: "one shape") and ``multi`` × batch scenes of 2–4 objects,
    captioned by a relation between two of them (40 %), their count (20 %) or one object (40 %)."""
    scenes, claims = _scenes_and_claims(world, config, step)
    return scenes, [c.text for c in claims], positives(scenes, claims)


def _scenes_and_claims(world: ShapesWorld, config: TrainConfig, step: int):
    grouped, varied = minimal_sets(world, config, step)
    n_multi = int(config.multi * config.batch_size)
    n_single = config.batch_size - len(grouped) - n_multi
    several = ShapesWorld(seed=config.seed, image_size=config.image_size, n_objects=(2, 4), version=2,
                          camouflage=world.camouflage)
    singles = [world.scene(i) for i in range(step * n_single, (step + 1) * n_single)]
    multis = [several.scene(MULTI_INDEX + i) for i in range(step * n_multi, (step + 1) * n_multi)]
    rng = np.random.default_rng([config.seed, 1, step])
    claims = [count_claim(s, rng) if rng.random() < 0.1 else object_claim(s, rng, config.keep_prob) for s in singles]
    claims += [object_claim(s, rng, config.keep_prob, must=a) for s, a in zip(grouped, varied)]
    for scene in multis:
        kind = rng.random()
        claims.append(relation_claim(scene, rng) if kind < 0.4 else count_claim(scene, rng) if kind < 0.6
                      else object_claim(scene, rng, config.keep_prob))
    return singles + grouped + multis, claims


def training_batch_mixed(world: ShapesWorld, config: TrainConfig, step: int):
    """Batch ``step`` with ``camouflage`` × batch camouflage scenes and the rest version 2's, each part
    built as a `training_batch_v2` of its size (the camouflage part from world seed ``seed +
    CAMOUFLAGE_SEED_OFFSET``, so neither part repeats the other's draws); the positives span both
    parts, since a caption can be true of scenes of either world."""
    from dataclasses import replace

    n_camo = int(round(config.camouflage * config.batch_size))
    parts = []
    for size, camouflage in ((config.batch_size - n_camo, False), (n_camo, True)):
        part = replace(config, batch_size=size, seed=config.seed + CAMOUFLAGE_SEED_OFFSET * camouflage)
        source = world if not camouflage else ShapesWorld(seed=part.seed, image_size=config.image_size, version=2, camouflage=True)
        parts.append(_scenes_and_claims(source, part, step))
    scenes = [s for part_scenes, _ in parts for s in part_scenes]
    claims = [c for _, part_claims in parts for c in part_claims]
    return scenes, [c.text for c in claims], positives(scenes, claims)


def initial_weights(model: CLIP, name: str, tokenizer: WordTokenizer) -> None:
    """Copy bundled model ``name``'s weights into ``model`` (same architecture), mapping token
    embeddings by word: ``tokenizer``'s words that ``name``'s vocabulary lacks keep their fresh rows."""
    from clip_lens.loading import load_bundled

    source = load_bundled(name)
    state = source.model.state_dict()
    target = model.state_dict()
    rows = target["token_embedding.weight"].clone()
    old = source.tokenizer.index
    for word, i in tokenizer.index.items():
        if word in old:
            rows[i] = state["token_embedding.weight"][old[word]]
    state["token_embedding.weight"] = rows
    model.load_state_dict(state)


def text_parameters(model: CLIP) -> list[torch.nn.Parameter]:
    """The text tower's parameters: token and position embeddings, transformer, final LN, projection."""
    skip = {id(p) for p in model.visual.parameters()} | {id(model.logit_scale)}
    return [p for p in model.parameters() if id(p) not in skip]


def multi_positive_loss(image_features, text_features, logit_scale, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every true (image, caption) pair is a positive."""
    logits = logit_scale * image_features @ text_features.T
    masked = logits.masked_fill(~positives, float("-inf"))
    per_image = torch.logsumexp(logits, 1) - torch.logsumexp(masked, 1)
    per_text = torch.logsumexp(logits, 0) - torch.logsumexp(masked, 0)
    return (per_image.mean() + per_text.mean()) / 2


def train(out: str | Path, config: TrainConfig = TrainConfig(), log=print) -> dict:
    """Train (or resume) into ``out``; returns the final metrics. Writes ``checkpoint.pt``,
    ``model.safetensors``, ``config.json`` and ``metrics.json``."""
    from safetensors.torch import save, save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    tokenizer = WordTokenizer(vocabulary(config.world_version), context_length=32)
    spec = model_config(tokenizer.vocab_size, config.image_size)
    model = build_model(spec)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.lr
    )
    if config.init_from:
        initial_weights(model, config.init_from, tokenizer)
    if config.freeze_text:
        for parameter in text_parameters(model):
            parameter.requires_grad_(False)
    ckpt_path = out / "checkpoint.pt"
    step, history, losses, elapsed = 0, [], [], 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        history, losses = json.loads(state["history"]), json.loads(state.get("losses", "[]"))
        log(f"resumed from step {step}")
    world = ShapesWorld(seed=config.seed, image_size=config.image_size, version=config.world_version)
    if config.camouflage and config.world_version != 2:
        raise InputError(f"camouflage scenes are an option of world version 2; pass --world-version 2 (got {config.world_version}).")
    make_batch = training_batch if config.world_version == 1 else training_batch_mixed if config.camouflage else training_batch_v2

    def lr_at(s: int) -> float:
        if s < config.warmup:
            return config.lr * (s + 1) / config.warmup
        progress = (s - config.warmup) / max(1, config.steps - config.warmup)
        return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def checkpoint() -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "elapsed": elapsed, "history": json.dumps(history), "losses": json.dumps(losses)}
        atomic_write(ckpt_path, lambda f: torch.save(state, f))

    bar = tqdm(total=config.steps, initial=step, desc="train shapes-world CLIP", unit="step")
    started = time.time() - elapsed
    while step < config.steps:
        if config.max_minutes is not None and (time.time() - started) / 60 > config.max_minutes:
            log(f"stopping at step {step}: time budget of {config.max_minutes} min reached")
            break
        if config.stop_at is not None and step >= config.stop_at:
            log(f"stopping at step {step} (stop_at); run again to resume")
            break
        model.train()
        scenes, captions, truth = make_batch(world, config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        image_features = F.normalize(model.encode_image(batch_images(scenes)), dim=-1)
        with torch.set_grad_enabled(not config.freeze_text):
            text_features = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
        loss = multi_positive_loss(image_features, text_features, model.logit_scale.exp(), truth)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        losses.append(round(loss.item(), 5))
        elapsed = time.time() - started
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % config.eval_every == 0 or step == config.steps:
            model.eval()
            acc = zero_shot_accuracy(model, config.eval_images, tokenize=tokenizer, image_size=config.image_size,
                                     world_version=config.world_version).accuracy
            history.append({"step": step, "loss": loss.item(), "minutes": elapsed / 60, **acc})
            log(json.dumps(history[-1]))
        if step % config.checkpoint_every == 0:
            checkpoint()
        if config.keep_every and step % config.keep_every == 0:
            (out / "steps").mkdir(exist_ok=True)
            weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            atomic_write(out / "steps" / f"model-{step}.safetensors", save(weights))
    bar.close()
    checkpoint()
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    meta = {"model_cfg": spec, "tokenizer": tokenizer.to_dict(), "train": asdict(config), "steps_done": step,
            "minutes": elapsed / 60, "history": history, "losses": losses}
    (out / "config.json").write_text(json.dumps(meta, indent=1))
    return meta


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="toy_shapes_run")
    for name, value in asdict(TrainConfig()).items():
        kind = float if name in ("lr", "weight_decay", "keep_prob", "contrast", "max_minutes", "multi") else int
        kind = str if name == "init_from" else float if name == "camouflage" else kind
        if name == "freeze_text":
            parser.add_argument("--freeze-text", action="store_true")
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    train(out, TrainConfig(**args))


if __name__ == "__main__":
    main()
