"""Every ```python block of README.md runs on its own: a fresh interpreter in an empty working folder
(files the example writes land there), exit status 0. Blocks that build full-size models or train are
marked slow (`pytest -m slow`); the default run keeps the fast ones."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"

# The section (## heading) of each block, and whether it is slow. Measured on 2 shared CPU cores, a fresh
# interpreter each (idle machine / loaded by other jobs): Example 7.5 s / 47 s (builds a full-size
# ViT-B-32), Patching 6.3 s / 25 s, Sparse autoencoders 15.7 s / 91 s (trains an SAE), Head spans 7.0 s
# (collects a 256-scene store), Neurons 18 s loaded (200 scenes, 3 layers, text codes). Every block runs in CI's slow step
# (the default suite stays under 5 minutes).
SLOW = {"Example": True, "Patching and the TransformerLens API": True, "Sparse autoencoders": True,
        "Head spans, labels and metrics": True, "Neurons: second-order effects": True}


def _blocks() -> list[tuple[str, str]]:
    """``(section, code)`` of every python block, in README order."""
    blocks, section = [], None
    for match in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S):
        if match.group(1) is not None:
            section = match.group(1).strip()
        else:
            blocks.append((section, match.group(2)))
    return blocks


BLOCKS = _blocks()


def test_every_block_is_known():
    """A new example must be timed and put in SLOW (default run < 20 s in all)."""
    assert BLOCKS and [section for section, _ in BLOCKS] == list(SLOW)


@pytest.mark.parametrize(
    "section,code",
    [pytest.param(section, code, id=section, marks=[pytest.mark.slow] if SLOW.get(section, True) else [])
     for section, code in BLOCKS],
)
def test_block_runs_on_its_own(section, code, tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(README.parent)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, f"README block of '{section}' failed:\n{result.stderr[-3000:]}"


def test_readme_says_how_to_install_the_cpu_build_and_run_each_suite():
    """The CPU route itself (torch + torchvision from the CPU index, then the package, then the main job)
    is checked in tests/unit/test_install_route.py, on this README and the docs' install pages."""
    text = README.read_text(encoding="utf-8")
    assert ".venv/bin/pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in text
    assert "pytest -q  " in text and "pytest -q -m slow" in text
    # the default suite's time is a measured figure, not "minutes"
    assert "minutes on CPU" not in text and "3 min 46 s on 2 idle" in text


def test_readme_builds_the_docs_from_the_venv_in_strict_mode():
    text = README.read_text(encoding="utf-8")
    commands = re.findall(r"`([^`]*mkdocs build[^`]*)`", text)
    assert commands, "the README says how to build the docs site"
    for command in commands:
        assert ".venv/bin/mkdocs build --strict" in command and ".venv/bin/pip install" in command, command


def test_readme_links_into_the_docs_reach_their_anchors():
    """The docs site's strict build checks its own anchors (mkdocs.yml `validation: anchors: warn`); the
    README is not part of it, so its links to docs/…md#anchor are checked here with the same slugs."""
    from markdown.extensions.toc import slugify

    links = re.findall(r"\]\((docs/[^)#\s]+\.md)#([^)\s]+)\)", README.read_text(encoding="utf-8"))
    assert links
    broken = []
    for page, anchor in links:
        headings = re.findall(r"^#+ (.+)$", (README.parent / page).read_text(encoding="utf-8"), re.M)
        slugs = {slugify(re.sub(r"[`*]", "", h).strip(), "-") for h in headings}
        if anchor not in slugs:
            broken.append(f"{page}#{anchor}")
    assert not broken, broken
