"""Mutual knowledge along training: MI, AUC and zero-shot accuracy at every kept checkpoint of a
shapes-world training run, and their correlation across checkpoints with bootstrap intervals.

The checkpoints are the run's ``steps/model-<step>.safetensors`` (``python -m clip_lens.toy.train
--keep-every N …`` writes them). Every checkpoint is measured on the same held-out scenes, so the
correlation's interval resamples scenes (``compare_results``).

One command regenerates the figure of docs/concepts/mutual_knowledge.md from the bundled weights: with
``--regenerate`` the script first runs the bundled ``toy-shapes-v2`` fine-tuning command (from
``toy-shapes``, the same 1,200-step schedule) stopped at step 300, keeping every 25th step (12
checkpoints; training is deterministic in ``(seed, step)``), then measures them:

    python docs/scripts/mi_dynamics.py --regenerate --run mi_dynamics_run --scenes 1000 --out mi_dynamics.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from clip_lens import HookedCLIP, analyses
from clip_lens.files import atomic_write
from clip_lens.toy.evaluate import HELD_OUT_SEED, shapes_world_version


# the bundled toy-shapes-v2 run (its json's provenance command), stopped early with a checkpoint every 25 steps
REGENERATE = ["--steps", "1200", "--seed", "0", "--lr", "0.0005", "--warmup", "50", "--world-version", "2",
              "--init-from", "toy-shapes", "--keep-every", "25", "--stop-at", "300", "--eval-every", "100000",
              "--checkpoint-every", "100", "--max-minutes", "100000"]


def regenerate(run: Path) -> float:
    """Train the checkpoints into ``run`` (resumes an interrupted run); returns the CPU seconds it took."""
    before = os.times()
    subprocess.run([sys.executable, "-m", "clip_lens.toy.train", "--out", str(run), *REGENERATE], check=True)
    after = os.times()
    return (after.children_user + after.children_system) - (before.children_user + before.children_system)


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """``(step, file)`` of the run's kept weights, by step."""
    found = [(int(re.search(r"model-(\d+)", p.name).group(1)), p) for p in (run / "steps").glob("model-*.safetensors")]
    if not found:
        sys.exit(f"error: no steps/model-*.safetensors in {run}; train with --keep-every 250 to keep checkpoints.")
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="training run folder (with steps/).")
    parser.add_argument("--model", default="toy-shapes-v2", help="bundled architecture the run trained.")
    parser.add_argument("--scenes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--regenerate", action="store_true",
                        help="first train the 12 checkpoints into --run (the bundled toy-shapes-v2 command to step 300).")
    args = parser.parse_args()

    from clip_lens_plugins.mutual_knowledge import compare_results, shapes_world_data

    train_cpu = regenerate(args.run) if args.regenerate else None
    results, started, measure_cpu = {}, time.perf_counter(), time.process_time()
    for step, path in checkpoints(args.run):
        model = HookedCLIP.from_pretrained(args.model, path)
        data = shapes_world_data(args.scenes, seed=args.seed, image_size=model.cfg.image_size[0],
                                 version=shapes_world_version(args.model) or 1)
        result = analyses.get("mutual_knowledge")(model).run(data, evaluate=False, corloc=False, progress=False)
        results[f"step {step}"] = result
        print(f"step {step}: accuracy {result.accuracy:.3f}, MI {result.mean_mi:.3f}, AUC {result.mean_auc:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    table = compare_results(results)
    print(table.to_markdown())
    cpu = {"train": None if train_cpu is None else round(train_cpu / 60, 1), "measure": round((time.process_time() - measure_cpu) / 60, 1)}
    print(f"CPU minutes: {cpu}")
    payload = {"run": str(args.run), "model": args.model, "scenes": args.scenes, "seed": args.seed,
               "seconds": round(time.perf_counter() - started, 1), "cpu_minutes": cpu, "comparison": table.to_dict()}
    atomic_write(args.out, json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
