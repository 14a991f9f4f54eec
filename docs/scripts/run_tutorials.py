#!/usr/bin/env python
"""Run every tutorial script (``docs/scripts/*_tutorial.py``) and check what it wrote.

Each script runs in its own subprocess with ``--out`` pointing at a fresh folder (a temporary one by
default, so the committed figures in ``docs/figures`` stay untouched). A script passes when it exits
0 and wrote every figure its page (``docs/tutorials/<name>.md``) embeds from ``../figures/``.

  python docs/scripts/run_tutorials.py                      # CI: temp folders, timings
  python docs/scripts/run_tutorials.py --out docs/figures   # regenerate the committed figures
  python docs/scripts/run_tutorials.py decomposition sae    # only these tutorials
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
PAGES = SCRIPTS.parent / "tutorials"
IMAGE = re.compile(r"!\[[^\]]*\]\(\.\./figures/([^)\s]+)\)")


def page_figures(name: str) -> list[str]:
    """The figure file names the tutorial page embeds (``![...](../figures/NAME)``)."""
    page = PAGES / f"{name}.md"
    if not page.exists():
        raise SystemExit(f"error: {SCRIPTS / (name + '_tutorial.py')} has no page {page}.")
    return IMAGE.findall(page.read_text(encoding="utf-8"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="tutorials to run (default: every *_tutorial.py)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write every script's figures here (default: a fresh temporary folder per script)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per script (default 600)")
    args = parser.parse_args()
    available = sorted(p.name[: -len("_tutorial.py")] for p in SCRIPTS.glob("*_tutorial.py"))
    names = args.names or available
    unknown = [n for n in names if n not in available]
    if unknown:
        print(f"error: no script for {unknown}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    failures, timings = [], []
    with tempfile.TemporaryDirectory(prefix="clip_lens_tutorials_") as work:
        for name in names:
            figures = page_figures(name)
            out = args.out.resolve() if args.out else Path(work) / name
            out.mkdir(parents=True, exist_ok=True)
            for figure in figures:                          # a figure must come from this run, not an old one
                if args.out is None and (out / figure).exists():
                    (out / figure).unlink()
            script = SCRIPTS / f"{name}_tutorial.py"
            print(f"--- {name}: {script.name} --out {out}", flush=True)
            started, wall = time.perf_counter(), time.time()
            try:
                run = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True,
                                     timeout=args.timeout)
                code, output = run.returncode, run.stdout + run.stderr
            except subprocess.TimeoutExpired as exc:
                code, output = "timeout", f"{exc.stdout or ''}{exc.stderr or ''}"
            seconds = time.perf_counter() - started
            timings.append((name, seconds))
            problems = []
            if code != 0:
                problems.append(f"exit status {code}")
            missing = [f for f in figures if not (out / f).is_file() or (out / f).stat().st_size == 0
                       or (out / f).stat().st_mtime < wall - 1]          # absent, empty, or left from an earlier run
            if missing:
                problems.append(f"did not write {', '.join(missing)}")
            if problems:
                failures.append(name)
                tail = output if isinstance(output, str) else output.decode(errors="replace")
                print("\n".join(tail.splitlines()[-40:]))
                print(f"FAILED {name} ({seconds:.1f} s): {'; '.join(problems)}", flush=True)
            else:
                print(f"ok     {name} ({seconds:.1f} s, {len(figures)} figures)", flush=True)
    print("\ntimings:")
    for name, seconds in timings:
        print(f"  {name:<20} {seconds:6.1f} s")
    print(f"  {'total':<20} {sum(s for _, s in timings):6.1f} s")
    if failures:
        print(f"tutorials failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    print(f"all {len(names)} tutorials ran and wrote their figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
