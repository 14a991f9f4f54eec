"""A convolutional shapes-world CLIP, distilled from a bundled ViT one (``python -m clip_lens.toy.distill``).

The convolutional towers (ResNet, ConvNeXt, FastViT) need a model whose answers are known, as the
ViT towers have ``toy-shapes``. Training one from scratch costs as long as ``toy-shapes`` did
(an hour on 2 cores); distilling is much cheaper: the student keeps the teacher's text tower (frozen,
so both share one text space and one tokenizer) and trains only a ResNet image tower to match the
teacher's normalised image embedding of the same scene (``1 − cos``). The student sees the scene at
96 px, so that its last feature map is a 3×3 grid: one cell per position of the world's 3×3 layout.

Seeded: batch ``k`` is scenes ``k·batch_size …`` of ``ShapesWorld(seed)``; the run folder holds what
``python -m clip_lens.toy.bundle RUN --name toy-shapes-rn`` packages (``model.safetensors``,
``config.json`` with the reproducing command).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from tqdm import tqdm

from clip_lens.toy.evaluate import zero_shot_accuracy
from clip_lens.toy.world import ShapesWorld, batch_images


@dataclass
class DistillConfig:
    teacher: str = "toy-shapes"
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 50
    seed: int = 0
    image_size: int = 96
    """The student's input size: 96 px gives a ResNet (stride 32) a 3×3 final grid."""
    width: int = 16
    """ModifiedResNet ``width``: channels of the stem (the last feature map has ``32 · width``)."""
    stage_depths: tuple[int, int, int, int] = (1, 1, 1, 1)
    head_width: int = 64
    eval_every: int = 250
    eval_images: int = 512


def student_config(teacher_cfg: dict, config: DistillConfig) -> dict:
    """The student's open_clip config: the teacher's text tower and embedding width, a ResNet image tower."""
    return {
        "embed_dim": teacher_cfg["embed_dim"],
        "vision_cfg": {"image_size": config.image_size, "layers": list(config.stage_depths), "width": config.width,
                       "head_width": config.head_width},
        "text_cfg": teacher_cfg["text_cfg"],
    }


def distill(out: str | Path, config: DistillConfig = DistillConfig(), log=print) -> dict:
    """Train the student into ``out`` (``model.safetensors``, ``config.json``); returns the run's metadata."""
    from safetensors.torch import save_file

    from clip_lens.loading import bundled_models, load_bundled

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    teacher = load_bundled(config.teacher)
    tokenizer = teacher.tokenizer
    teacher_cfg = json.loads(resources.files("clip_lens").joinpath(bundled_models()[config.teacher]["config"]).read_text())
    spec = student_config(teacher_cfg["model_cfg"], config)
    student = CLIP(**spec)
    # the teacher's text tower and temperature, frozen: the student's image embeddings land in its text space
    text_state = {k: v for k, v in teacher.model.state_dict().items() if not k.startswith("visual.")}
    missing = student.load_state_dict(text_state, strict=False)
    assert not missing.unexpected_keys and all(k.startswith("visual.") for k in missing.missing_keys)
    for name, p in student.named_parameters():
        p.requires_grad = name.startswith("visual.")
    params = [p for p in student.visual.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    teacher_world = ShapesWorld(seed=config.seed, image_size=teacher_cfg["model_cfg"]["vision_cfg"]["image_size"])
    student_world = ShapesWorld(seed=config.seed, image_size=config.image_size)
    teacher_model = teacher.model.eval()

    def lr_at(s: int) -> float:
        if s < config.warmup:
            return config.lr * (s + 1) / config.warmup
        progress = (s - config.warmup) / max(1, config.steps - config.warmup)
        return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    history, losses = [], []
    started = time.time()
    for step in tqdm(range(config.steps), desc="distil a ResNet shapes-world CLIP", unit="step"):
        indices = range(step * config.batch_size, (step + 1) * config.batch_size)
        with torch.no_grad():
            target = F.normalize(teacher_model.encode_image(batch_images([teacher_world.scene(i) for i in indices])), dim=-1)
        student.visual.train()
        predicted = F.normalize(student.encode_image(batch_images([student_world.scene(i) for i in indices])), dim=-1)
        loss = (1 - (predicted * target).sum(-1)).mean()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(round(loss.item(), 5))
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            student.eval()
            acc = zero_shot_accuracy(student, config.eval_images, tokenize=tokenizer, image_size=config.image_size,
                                     world_version=1).accuracy
            history.append({"step": step + 1, "loss": loss.item(), "minutes": (time.time() - started) / 60, **acc})
            log(json.dumps(history[-1]))
    student.eval()
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(out / "model.safetensors"))
    defaults = asdict(DistillConfig())
    settings = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in asdict(config).items()
                        if v != defaults[k] and k not in ("eval_every", "eval_images"))
    meta = {
        "model_cfg": spec, "tokenizer": tokenizer.to_dict(), "train": {**asdict(config), "world_version": 1},
        "steps_done": config.steps, "minutes": (time.time() - started) / 60, "history": history, "losses": losses,
        "command": f"python -m clip_lens.toy.distill {settings}".strip(),
    }
    (out / "config.json").write_text(json.dumps(meta, indent=1))
    return meta


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="toy_shapes_rn_run")
    for name, value in asdict(DistillConfig()).items():
        if isinstance(value, tuple):
            parser.add_argument(f"--{name.replace('_', '-')}", type=int, nargs=len(value), default=value)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    args["stage_depths"] = tuple(args["stage_depths"])
    distill(out, DistillConfig(**args))


if __name__ == "__main__":
    main()
