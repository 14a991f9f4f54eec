"""The analysis registry against real installed distributions: throwaway third-party plugins are
built and pip-installed (offline, into a temporary folder) and found through their entry points."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import clip_lens.analyses
from clip_lens.analyses import GROUP, Analysis, PluginImportError, Result, UnknownAnalysisError
from clip_lens.errors import ClipLensError, InputError

BUILTINS = ("ablation", "contrastive_segmentation", "head_labels", "interp_metrics", "mutual_knowledge", "neighbors",
            "neurons", "segmentation", "segmentation_eval", "splice", "textspan")

GOOD = '''
"""A third-party analysis: counts the values it is given."""
from dataclasses import dataclass

from clip_lens.analyses import JSONResult


@dataclass
class CountResult(JSONResult):
    counts: dict

    def to_dict(self):
        return {"counts": self.counts}

    def plot(self):
        from matplotlib.figure import Figure

        fig = Figure()
        fig.add_subplot().bar(list(self.counts), list(self.counts.values()))
        return fig


class CountValues:
    name = "demo_count"
    description = "Counts how often each value occurs."
    parameters = {"values": "the values to count"}
    needs = ()

    def __init__(self, model=None):
        self.model = model

    def run(self, values):
        counts = {}
        for value in values:
            counts[str(value)] = counts.get(str(value), 0) + 1
        return CountResult(counts)


class NotAnAnalysis:
    """Has a name but no run: registered by mistake."""
    name = "demo_not_analysis"
'''

BROKEN = '''
import clip_lens_demo_missing_dependency  # not installed: this module fails at import
'''


def _project(root: Path, dist: str, module: str, source: str, entry_points: dict[str, str]) -> Path:
    """A one-module setuptools project registering ``entry_points`` in the clip_lens.analyses group."""
    root.mkdir()
    eps = "\n".join(f'{name} = "{target}"' for name, target in entry_points.items())
    (root / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "0.1.0"

        [project.entry-points."{GROUP}"]
        """) + eps + f'\n\n[tool.setuptools]\npy-modules = ["{module}"]\n')
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    return root


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder with two throwaway distributions pip-installed into it (one pip run, offline)."""
    base = tmp_path_factory.mktemp("plugins")
    good = _project(base / "good", "clip-lens-demo-plugin", "clip_lens_demo_plugin", GOOD, {
        "demo_count": "clip_lens_demo_plugin:CountValues",
        "demo_not_analysis": "clip_lens_demo_plugin:NotAnAnalysis",
    })
    broken = _project(base / "broken", "clip-lens-broken-plugin", "clip_lens_broken_plugin", BROKEN, {
        "demo_broken": "clip_lens_broken_plugin:Broken",
    })
    target = base / "site"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
               "--target", str(target), str(good), str(broken)]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    return target


@pytest.fixture
def installed(site, monkeypatch):
    """The throwaway distributions on sys.path for one test; their modules are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield site
    for module in ("clip_lens_demo_plugin", "clip_lens_broken_plugin"):
        sys.modules.pop(module, None)
    importlib.invalidate_caches()


def _infos() -> dict[str, clip_lens.analyses.AnalysisInfo]:
    return {info.name: info for info in clip_lens.analyses.list()}


class TestInstalledPlugin:
    def test_is_listed_with_its_distribution(self, installed):
        info = _infos()["demo_count"]
        assert info.ok and info.error is None
        assert info.distribution == "clip-lens-demo-plugin"
        assert info.target == "clip_lens_demo_plugin:CountValues"
        assert info.description == "Counts how often each value occurs."

    def test_get_returns_its_class_and_it_runs(self, installed, tmp_path):
        cls = clip_lens.analyses.get("demo_count")
        assert cls.__module__ == "clip_lens_demo_plugin" and cls.__name__ == "CountValues"
        assert Path(sys.modules[cls.__module__].__file__).is_relative_to(installed)
        assert isinstance(cls, Analysis)
        result = cls().run(["a", "b", "a"])
        assert isinstance(result, Result)
        assert result.to_dict() == {"counts": {"a": 2, "b": 1}}
        saved = result.save(tmp_path / "counts.json")
        assert json.loads(saved.read_text()) == {"counts": {"a": 2, "b": 1}}
        assert len(result.plot().axes) == 1

    def test_not_listed_once_uninstalled(self):
        importlib.invalidate_caches()
        assert "demo_count" not in _infos()
        with pytest.raises(UnknownAnalysisError):
            clip_lens.analyses.get("demo_count")


class TestBrokenPlugin:
    def test_is_listed_with_its_error(self, installed):
        info = _infos()["demo_broken"]
        assert not info.ok
        assert info.distribution == "clip-lens-broken-plugin"
        assert "demo_broken" in info.error and "clip_lens_demo_missing_dependency" in info.error
        assert info.description == ""

    def test_get_raises_plugin_import_error_naming_plugin_and_cause(self, installed):
        with pytest.raises(PluginImportError) as caught:
            clip_lens.analyses.get("demo_broken")
        message = str(caught.value)
        assert "'demo_broken'" in message and "clip_lens_broken_plugin:Broken" in message
        assert "ModuleNotFoundError" in message and "clip_lens_demo_missing_dependency" in message
        assert isinstance(caught.value, (ClipLensError, ImportError))
        assert isinstance(caught.value.__cause__, ImportError)

    def test_builtins_and_other_plugins_still_load(self, installed):
        infos = _infos()
        for name in BUILTINS:
            assert infos[name].ok, infos[name].error
            assert infos[name].distribution == "clip-lens"
            cls = clip_lens.analyses.get(name)
            assert cls.name == name and isinstance(cls, Analysis)
        assert infos["demo_count"].ok


class TestUnknownName:
    def test_suggests_a_close_match_and_lists_the_installed(self):
        with pytest.raises(UnknownAnalysisError) as caught:
            clip_lens.analyses.get("textspn")
        message = str(caught.value)
        assert "Did you mean: textspan" in message
        assert "Installed: " + ", ".join(BUILTINS) in message
        assert GROUP in message
        assert isinstance(caught.value, InputError) and isinstance(caught.value, KeyError)

    def test_installed_list_includes_third_party_plugins(self, installed):
        with pytest.raises(UnknownAnalysisError, match=r"Did you mean: demo_count\b") as caught:
            clip_lens.analyses.get("demo_cont")
        assert "demo_broken" in str(caught.value) and "textspan" in str(caught.value)


class TestNotAnAnalysis:
    def test_entry_point_without_run_raises_plugin_import_error(self, installed):
        with pytest.raises(PluginImportError, match=r"'demo_not_analysis' .* is not an analysis: it lacks run"):
            clip_lens.analyses.get("demo_not_analysis")

    def test_is_listed_as_broken(self, installed):
        info = _infos()["demo_not_analysis"]
        assert not info.ok and "lacks run" in info.error
