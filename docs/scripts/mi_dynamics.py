"""Mutual knowledge along training: MI, AUC and zero-shot accuracy at every kept checkpoint of a
shapes-world training run, and their correlation across checkpoints with bootstrap intervals.

The checkpoints are the run's ``steps/model-<step>.safetensors`` (``python -m clip_lens.toy.train
--world-version 2 --keep-every 250 …`` writes them; the run is deterministic, so the bundle's
recorded command regenerates them). Every checkpoint is measured on the same held-out scenes, so
the correlation's interval resamples scenes (``compare_results``).

    python docs/scripts/mi_dynamics.py --run toy_v2_run --scenes 1000 --out docs/figures/mi_dynamics.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from clip_lens import HookedCLIP, analyses
from clip_lens.files import atomic_write
from clip_lens.toy.evaluate import HELD_OUT_SEED, shapes_world_version


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
    args = parser.parse_args()

    from clip_lens_plugins.mutual_knowledge import compare_results, shapes_world_data

    results, started = {}, time.perf_counter()
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
    payload = {"run": str(args.run), "model": args.model, "scenes": args.scenes, "seed": args.seed,
               "seconds": round(time.perf_counter() - started, 1), "comparison": table.to_dict()}
    atomic_write(args.out, json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
