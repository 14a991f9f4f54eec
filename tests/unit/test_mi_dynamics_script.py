"""docs/scripts/mi_dynamics.py --regenerate trains the bundled toy-shapes-v2 run, stopped early: the MI-dynamics
figure of docs/concepts/mutual_knowledge.md is regenerated from the bundle, not from a run nobody kept."""

from __future__ import annotations

import ast
import json
import shlex
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# settings that decide what is kept, evaluated or when to stop, never the weights of a step
BOOKKEEPING = {"--keep-every", "--stop-at", "--eval-every", "--checkpoint-every", "--max-minutes", "--eval-images"}


def _options(arguments: list[str]) -> dict[str, str]:
    return dict(zip(arguments[::2], arguments[1::2]))


def test_regeneration_runs_the_bundled_command_with_only_bookkeeping_changed():
    # read from the source: importing the script would load torch and the plugins for one list
    tree = ast.parse((ROOT / "docs/scripts/mi_dynamics.py").read_text(encoding="utf-8"))
    value = next(n.value for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "REGENERATE")
    meta = json.loads(resources.files("clip_lens").joinpath("toy/weights/toy-shapes-v2.json").read_text())
    bundled = _options(shlex.split(meta["provenance"]["command"])[3:])  # after "python -m clip_lens.toy.train"
    regenerated = _options(ast.literal_eval(value))
    assert {k: v for k, v in regenerated.items() if k not in BOOKKEEPING} == {k: v for k, v in bundled.items() if k not in BOOKKEEPING}
    stop, keep = int(regenerated["--stop-at"]), int(regenerated["--keep-every"])
    assert stop // keep == 12 and stop < int(bundled["--steps"])  # 12 checkpoints along the bundled schedule
    page = (ROOT / "docs/concepts/mutual_knowledge.md").read_text(encoding="utf-8")
    assert "python docs/scripts/mi_dynamics.py --regenerate" in page
