#!/usr/bin/env python
"""Start-up time of the ``clip-lens`` command line: every ``--help``, each run ``--repeats`` times
in a fresh process (what a user waits for). Prints the median and the worst per command, the load
average, and whether every command stays under the budget (1.5 s on a 2-core machine).

  python benchmarks/bench_cli_startup.py
  python benchmarks/bench_cli_startup.py --repeats 5 --budget 1.5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = ["", "report", "models", "hooks", "train-toy", "collect", "spans", "compare", "analyses", "neighbors",
            "segment", "segment-eval", "mi", "app", "sae", "sae train", "sae inspect"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=1.5, help="seconds")
    args = parser.parse_args()
    executable = shutil.which("clip-lens", path=os.path.dirname(sys.executable)) or shutil.which("clip-lens")
    if executable is None:
        sys.exit("error: the clip-lens command is not installed; run pip install -e . first.")
    print(f"{executable}; load average {os.getloadavg()[0]:.2f}; {args.repeats} runs per command")
    worst_overall = 0.0
    for command in COMMANDS:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run([executable, *command.split(), "--help"], check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
        worst_overall = max(worst_overall, max(times))
        print(f"  clip-lens {command + ' ' if command else ''}--help{'':<{14 - len(command)}} "
              f"median {statistics.median(times):.2f} s, worst {max(times):.2f} s")
    verdict = "ok" if worst_overall < args.budget else "OVER BUDGET"
    print(f"worst {worst_overall:.2f} s (budget {args.budget} s): {verdict}")


if __name__ == "__main__":
    main()
