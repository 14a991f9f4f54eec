"""The documented CPU install route keeps a CPU build of torch (issue 31, item 4).

The route (README.md, docs/index.md, docs/getting_started.md):

    python3 -m venv .venv
    .venv/bin/pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu
    .venv/bin/pip install -e ".[test]"
    .venv/bin/clip-lens report --out clip_lens_report

It failed when the CPU step installed torch alone: open_clip (and timm) require torchvision, so
`pip install -e` fetched torchvision from PyPI, whose Linux wheels pin a CUDA torch, and the CPU torch was
replaced by about 4 GB of CUDA wheels. pip keeps an installed distribution whenever it satisfies every
requirement on it (its default `--upgrade-strategy only-if-needed`), so the route holds when

1. each page's CPU block installs torch and torchvision in one command from the CPU index, before
   `pip install -e`, and that second command neither upgrades, reinstalls nor names another index;
2. every package of the torch index that the package's dependencies require (walked through the
   installed distributions' metadata) is installed in that first step; and
3. every requirement on torch or torchvision of the package and its dependencies accepts the CPU
   build (`X.Y.Z+cpu`) of the installed version: no exact pin, no CUDA local label, no bound it misses.

The CPU index itself cannot be queried offline (these tests need no network). On a machine that can
reach it, `CLIP_LENS_CHECK_CPU_INDEX=1 pytest -m slow tests/unit/test_install_route.py` runs the route's
first two steps for real in a fresh virtual environment (pip's `--dry-run` for the second) and checks that
pip would install nothing from the torch family.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PAGES = ("README.md", "docs/index.md", "docs/getting_started.md")
# The distributions the PyTorch indexes serve in matched builds (CPU / CUDA variants of one release).
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchtext", "torchdata", "triton", "pytorch-triton"}
CPU_PAIR = {"torch", "torchvision"}


def _bash_blocks(text: str) -> list[list[str]]:
    """The commands of every ```bash block (indented blocks of list items included), ``&&`` split."""
    blocks = []
    for match in re.finditer(r"^( *)```bash\n(.*?)^\1```", text, re.M | re.S):
        commands = []
        for line in match.group(2).splitlines():
            line = line.split(" #", 1)[0].strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
        blocks.append(commands)
    return blocks


def _pip_install(command: str) -> tuple[list[str], list[str]] | None:
    """``(packages, options)`` of a ``pip install`` command (options with their values), else None."""
    words = shlex.split(command)
    if len(words) < 3 or not words[0].endswith("pip") or words[1] != "install":
        return None
    packages, options, rest = [], [], iter(words[2:])
    for word in rest:
        if word.startswith("-"):
            options.append(word)
            if word in ("-e", "--editable"):
                packages.append(next(rest))
            elif word in ("--index-url", "-i", "--extra-index-url", "-f", "--find-links"):
                options.append(next(rest))
        else:
            packages.append(word)
    return packages, options


def _cpu_route(page: str, text: str | None = None) -> list[str]:
    text = (ROOT / page).read_text(encoding="utf-8") if text is None else text
    blocks = [b for b in _bash_blocks(text) if any(CPU_INDEX in c for c in b)]
    assert len(blocks) == 1, f"{page}: expected one bash block with the CPU index, found {len(blocks)}"
    return blocks[0]


def _check_route(page: str, commands: list[str]) -> None:
    installs = [(i, _pip_install(c)) for i, c in enumerate(commands) if _pip_install(c)]
    cpu = [(i, p, o) for i, (p, o) in installs if CPU_INDEX in o]
    assert len(cpu) == 1, f"{page}: one pip command from the CPU index, got {commands}"
    cpu_at, cpu_packages, cpu_options = cpu[0]
    assert CPU_PAIR <= set(cpu_packages), (
        f"{page}: torch and torchvision must come from the CPU index in the same command: {commands[cpu_at]}")
    assert cpu_options[cpu_options.index(CPU_INDEX) - 1] == "--index-url", commands[cpu_at]

    editable = [(i, p, o) for i, (p, o) in installs if "-e" in o or "--editable" in o]
    assert len(editable) == 1, f"{page}: one `pip install -e` in the CPU block, got {commands}"
    at, packages, options = editable[0]
    assert at > cpu_at, f"{page}: the CPU torch must be installed before the package"
    assert packages == [".[test]"], commands[at]
    for option in ("-U", "--upgrade", "--force-reinstall", "--ignore-installed", "-I", "--index-url", "-i",
                   "--extra-index-url", "--upgrade-strategy"):
        assert option not in options, f"{page}: `{option}` in {commands[at]} would replace the CPU build"
    assert all(not (CPU_PAIR & set(p)) for i, (p, _) in installs if i != cpu_at), (
        f"{page}: torch or torchvision installed a second time: {commands}")

    assert commands[0] == "python3 -m venv .venv", commands
    main = [i for i, c in enumerate(commands) if c.startswith(".venv/bin/clip-lens report")]
    assert main and main[0] > at, f"{page}: the CPU block must end with the main job: {commands}"
    assert commands[main[0]] == ".venv/bin/clip-lens report --out clip_lens_report"


@pytest.mark.parametrize("page", PAGES)
def test_cpu_block_installs_torch_and_torchvision_together_before_the_package(page):
    _check_route(page, _cpu_route(page))


def test_the_route_check_fails_on_the_old_route():
    """The route of the issue (torch alone from the CPU index, no main job) and variants are refused."""
    old = ("```bash\npython3 -m venv .venv && .venv/bin/pip install torch --index-url " + CPU_INDEX + "\n"
           '.venv/bin/pip install -e ".[test]"\n.venv/bin/clip-lens report --out clip_lens_report\n```\n')
    with pytest.raises(AssertionError, match="torch and torchvision must come from the CPU index"):
        _check_route("old", _cpu_route("old", old))
    good = _cpu_route("README.md")
    with pytest.raises(AssertionError, match="must end with the main job"):
        _check_route("no main job", [c for c in good if "clip-lens report" not in c])
    upgraded = [c + " --upgrade" if " -e " in c else c for c in good]
    with pytest.raises(AssertionError, match="--upgrade"):
        _check_route("upgrade", upgraded)
    swapped = [good[0], good[2], good[1], *good[3:]]
    with pytest.raises(AssertionError, match="before the package"):
        _check_route("swapped", swapped)


def test_the_three_pages_give_the_same_cpu_route():
    routes = {page: [c for c in _cpu_route(page) if "pytest" not in c] for page in PAGES}
    assert len({tuple(r) for r in routes.values()}) == 1, routes


def _requirements(distribution: str, extras: tuple[str, ...]) -> list[Requirement]:
    """The requirements of an installed distribution that apply here with these extras."""
    found = []
    for text in metadata.distribution(distribution).requires or []:
        requirement = Requirement(text)
        if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in extras + ("",)):
            found.append(requirement)
    return found


def _closure() -> list[tuple[str, Requirement]]:
    """``(who, requirement)`` for pyproject's dependencies (+ the test extra) and, through the installed
    metadata, their dependencies' — not descending into torch and torchvision, the pair the CPU step
    installs (their own requirements are the index's matched builds)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [("pyproject.toml", Requirement(r)) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    edges, seen, missing = [], set(), []
    while todo:
        who, requirement = todo.pop()
        edges.append((who, requirement))
        name = canonicalize_name(requirement.name)
        key = (name, tuple(sorted(requirement.extras)))
        if name in CPU_PAIR or key in seen:
            continue
        seen.add(key)
        try:
            todo += [(name, r) for r in _requirements(requirement.name, tuple(sorted(requirement.extras)))]
        except metadata.PackageNotFoundError:
            missing.append(f"{requirement} (required by {who})")
    assert not missing, f"not installed, cannot check their requirements: {missing}"
    return edges


def test_the_dependencies_need_nothing_from_the_torch_index_but_the_cpu_pair():
    needed = {canonicalize_name(r.name) for _, r in _closure()} & TORCH_FAMILY
    assert needed == CPU_PAIR, f"the CPU step must install all of {sorted(needed)} from the CPU index"
    # the CUDA libraries come only with torch's CUDA build: nothing else may ask for them
    cuda = [f"{who} -> {r}" for who, r in _closure() if canonicalize_name(r.name).startswith("nvidia-")]
    assert not cuda, cuda


def _cpu_builds() -> dict[str, Version]:
    """The CPU builds of the installed pair's versions (``2.14.1+cu130`` -> ``2.14.1+cpu``)."""
    return {name: Version(Version(metadata.version(name)).base_version + "+cpu") for name in CPU_PAIR}


def _rejecting(edges: list[tuple[str, Requirement]], cpu: dict[str, Version]) -> list[str]:
    return [f"{who} -> {r}" for who, r in edges
            if canonicalize_name(r.name) in cpu and not r.specifier.contains(cpu[canonicalize_name(r.name)],
                                                                              prereleases=True)]


def test_every_requirement_on_torch_accepts_the_cpu_build():
    cpu = _cpu_builds()
    rejected = _rejecting(_closure(), cpu)
    assert not rejected, f"these requirements would make pip replace the CPU build {cpu}: {rejected}"
    # pyproject itself: no exact pins and no build labels on the pair (they would name one index's build)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        requirement = Requirement(text)
        if canonicalize_name(requirement.name) in CPU_PAIR:
            assert all(s.operator not in ("==", "===") and "+" not in s.version for s in requirement.specifier), text


def test_the_requirement_check_fails_on_pins_the_cpu_build_misses():
    cpu = {"torch": Version("2.5.1+cpu"), "torchvision": Version("0.20.1+cpu")}
    edges = [("a", Requirement("torch==2.5.1+cu124")), ("b", Requirement("torch>=2.6")),
             ("c", Requirement("torchvision==0.21.0")), ("d", Requirement("torch>=2.2,<3")),
             ("e", Requirement("torchvision")), ("f", Requirement("torch==2.5.1"))]
    assert _rejecting(edges, cpu) == ["a -> torch==2.5.1+cu124", "b -> torch>=2.6", "c -> torchvision==0.21.0"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CLIP_LENS_CHECK_CPU_INDEX") != "1",
                    reason="needs the CPU index (network): set CLIP_LENS_CHECK_CPU_INDEX=1")
def test_the_route_keeps_the_cpu_build_against_the_real_index(tmp_path):
    """Steps 1–2 of the README's route in a fresh venv, then step 3 as pip's dry run: nothing of the
    torch family would be installed, and the installed torch is a CPU build."""
    commands = _cpu_route("README.md")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    cpu_step = next(c for c in commands if CPU_INDEX in c)
    subprocess.run(pip + shlex.split(cpu_step)[1:], check=True, cwd=ROOT)
    report = tmp_path / "report.json"
    editable = next(c for c in commands if " -e " in c)
    subprocess.run(pip + shlex.split(editable)[1:] + ["--dry-run", "--quiet", "--report", str(report)], check=True,
                   cwd=ROOT)
    would_install = {canonicalize_name(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]}
    assert not would_install & TORCH_FAMILY, would_install
    assert not any(name.startswith("nvidia-") for name in would_install), would_install
    version = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version.endswith("+cpu"), version
