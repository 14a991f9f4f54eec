"""Package a finished training run as the bundled ``toy-shapes`` model.

``python -m clip_lens.toy.bundle RUN_DIR`` copies the run's weights (of `clip_lens.toy.train` or
`clip_lens.toy.distill`) into ``clip_lens/toy/weights``,
measures zero-shot accuracy on 2,000 held-out scenes through [`HookedCLIP`][clip_lens.HookedCLIP], and
writes the config with the tokenizer, preprocessing, provenance and the measured metrics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clip_lens.files import atomic_write

WEIGHTS_DIR = Path(__file__).parent / "weights"
PREPROCESS = {"size": 64, "mode": "RGB", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
              "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


def _command(meta: dict) -> str:
    """The training command that reproduces the run's weights: steps, seed and every setting that is
    not the default (not ``max_minutes``: the step the run ended at is given instead)."""
    from dataclasses import asdict

    from clip_lens.toy.train import TrainConfig

    defaults = asdict(TrainConfig())
    train = meta["train"]
    parts = [f"--steps {train['steps']}", f"--seed {train['seed']}"]
    changed = {k: v for k, v in train.items()
               if k not in ("steps", "seed", "max_minutes", "stop_at", "eval_every", "eval_images", "checkpoint_every")
               and v != defaults.get(k)}
    parts += [f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {v}") for k, v in changed.items()]  # bools are flags
    if meta["steps_done"] < train["steps"]:
        parts.append(f"--stop-at {meta['steps_done']}")
    return "python -m clip_lens.toy.train " + " ".join(parts)


def bundle(run_dir: str | Path, name: str = "toy-shapes", n_eval: int = 2000, half: bool = False) -> dict:
    """Copy the run's weights as ``name`` (``half``: stored in float16, half the bytes; the loader casts
    them to the model's float32), measure it and write its config."""
    from clip_lens import HookedCLIP
    from clip_lens.toy.evaluate import binding_accuracy, zero_shot_accuracy

    run_dir = Path(run_dir)
    meta = json.loads((run_dir / "config.json").read_text())
    version = int(meta["train"].get("world_version", 1))
    WEIGHTS_DIR.mkdir(exist_ok=True)
    if half:
        from safetensors.torch import load_file, save

        state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(run_dir / "model.safetensors").items()}
        atomic_write(WEIGHTS_DIR / f"{name}.safetensors", save(state))
    else:
        atomic_write(WEIGHTS_DIR / f"{name}.safetensors", (run_dir / "model.safetensors").read_bytes())
    preprocess = {**PREPROCESS, "size": meta["model_cfg"]["vision_cfg"]["image_size"]}
    config = {
        "model_cfg": meta["model_cfg"],
        "tokenizer": meta["tokenizer"],
        "preprocess_cfg": preprocess,
        "provenance": {
            # the step the run ended at, not its time budget, so that the command reproduces the weights
            "command": meta.get("command") or _command(meta),  # a distilled run records its own
            "train": meta["train"],
            "steps_done": meta["steps_done"],
            "minutes": round(meta["minutes"], 1),
            **({"stored_dtype": "float16"} if half else {}),
            "history": meta["history"],
        },
    }
    atomic_write(WEIGHTS_DIR / f"{name}.json", json.dumps(config, indent=1))  # from_pretrained reads it
    model = HookedCLIP.from_pretrained(name)
    result = zero_shot_accuracy(model, n_images=n_eval, world_version=version)
    config["metrics"] = result.to_dict()
    if version == 2:
        config["metrics"]["binding"] = binding_accuracy(model, n_scenes=n_eval).to_dict()
    atomic_write(WEIGHTS_DIR / f"{name}.json", json.dumps(config, indent=1))
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--name", default="toy-shapes")
    parser.add_argument("--half", action="store_true", help="store the weights in float16 (half the bytes)")
    args = parser.parse_args()
    config = bundle(args.run_dir, args.name, half=args.half)
    print(json.dumps(config["metrics"], indent=1))


if __name__ == "__main__":
    main()
