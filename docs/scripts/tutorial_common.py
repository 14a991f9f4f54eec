"""What every ``*_tutorial.py`` script shares: its command line and how it writes figures.

A tutorial script runs as ``python docs/scripts/<name>_tutorial.py [--out DIR] [--threads N]`` (its
folder is then on ``sys.path``, so ``from tutorial_common import setup, save`` works).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

FIGURES = Path(__file__).resolve().parents[1] / "figures"


def setup(doc: str, extra=None) -> tuple[argparse.Namespace, float]:
    """Parse ``--out`` (default ``docs/figures``) and ``--threads`` (default 1: the scripts' forwards
    are small), plus what ``extra(parser)`` adds; create the folder, set torch's threads.

    Returns ``(args, start time)``.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=FIGURES)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    return args, time.perf_counter()


def save(fig, path: Path) -> None:
    """Write ``fig`` as a PNG and close it."""
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"  wrote {path}")
