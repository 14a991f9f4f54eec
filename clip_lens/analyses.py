"""The analysis registry: plugins found through the entry-point group ``clip_lens.analyses``.

An analysis is a class (the entry point's target) built as ``Analysis(model, **parameters)`` whose
``run(...)`` returns a result with ``to_dict()``, ``save(path)`` and ``plot()``. Built-in analyses
(package ``clip_lens_plugins``) register through the same entry points a third-party package uses::

    [project.entry-points."clip_lens.analyses"]
    my_analysis = "my_package.module:MyAnalysis"

>>> import clip_lens.analyses
>>> [info.name for info in clip_lens.analyses.list()]          # doctest: +SKIP
['head_labels', 'interp_metrics', 'textspan']
>>> spans = clip_lens.analyses.get("textspan")(model).run(store, bank="shapes", m=5)  # doctest: +SKIP

A plugin that fails to import is listed with its error and raises [`PluginImportError`][clip_lens.analyses.PluginImportError]
from [`get`][clip_lens.analyses.get]; the other plugins keep working.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Optional, Protocol, runtime_checkable

from clip_lens.errors import ClipLensError, InputError, close_matches
from clip_lens.results import JSONResult, Result  # noqa: F401  (defined low, in clip_lens.results; re-exported for plugins)

GROUP = "clip_lens.analyses"


class UnknownAnalysisError(InputError, KeyError):
    """No analysis of that name is installed."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PluginImportError(ClipLensError, ImportError):
    """An installed analysis plugin failed to import."""


@runtime_checkable
class Analysis(Protocol):
    """An analysis plugin (a class; the registry hands out the class, users build it)."""

    name: ClassVar[str]
    description: ClassVar[str]
    parameters: ClassVar[dict[str, str]]
    """Parameter name → what it means (``run``'s keyword arguments)."""
    needs: ClassVar[tuple[str, ...]]
    """What ``run`` reads: any of ``"model"``, ``"store"``, ``"cache"``, ``"text_bank"``, ``"spans"``, ``"labels"``."""

    def run(self, *args: Any, **kwargs: Any) -> Result: ...


@dataclass(frozen=True)
class AnalysisInfo:
    """One entry of [`list`][clip_lens.analyses.list]."""

    name: str
    target: str
    """``module:attribute`` the entry point names."""
    distribution: Optional[str]
    description: str = ""
    error: Optional[str] = None
    """Why the plugin failed to import (None when it loads)."""

    @property
    def ok(self) -> bool:
        return self.error is None


def _entry_points() -> dict[str, Any]:
    found = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep)  # first installed distribution wins, as for console scripts
    return found


def _load(ep) -> type:
    try:
        target = ep.load()
    except Exception as exc:  # any failure inside a plugin must not break the others
        raise PluginImportError(
            f"analysis plugin '{ep.name}' ({ep.value}) failed to import: {type(exc).__name__}: {exc}. "
            "Fix or reinstall the package that provides it; other analyses still work."
        ) from exc
    missing = [a for a in ("name", "run") if not hasattr(target, a)]
    if missing:
        raise PluginImportError(
            f"analysis plugin '{ep.name}' ({ep.value}) is not an analysis: it lacks {', '.join(missing)}."
        )
    return target


def list() -> builtins.list[AnalysisInfo]:  # noqa: A001 - the public name the issue asks for
    """Every installed analysis, sorted by name (broken plugins included, with their error)."""
    infos = []
    for name, ep in sorted(_entry_points().items()):
        dist = getattr(getattr(ep, "dist", None), "name", None)
        try:
            target = _load(ep)
            infos.append(AnalysisInfo(name, ep.value, dist, getattr(target, "description", "")))
        except PluginImportError as exc:
            infos.append(AnalysisInfo(name, ep.value, dist, error=str(exc)))
    return infos


def get(name: str) -> type:
    """The analysis class registered as ``name``."""
    found = _entry_points()
    if name not in found:
        raise UnknownAnalysisError(
            f"no analysis named '{name}'.{close_matches(name, found)} Installed: {', '.join(sorted(found)) or 'none'} "
            f"(plugins register in the entry-point group '{GROUP}')."
        )
    return _load(found[name])


def plugin_function(analysis: str, name: str):
    """A helper function of the package that provides ``analysis`` (e.g. the segmentation plugin's
    ``shapes_world_segmentation``), reached through the registry: the core never imports plugins by name.

    Raises:
        InputError: the installed package has no such function.
    """
    import importlib

    package = importlib.import_module(get(analysis).__module__.rsplit(".", 1)[0])
    function = getattr(package, name, None)
    if function is None:
        raise InputError(f"the installed {analysis} plugin ({package.__name__}) has no {name}; upgrade or reinstall it.")
    return function
