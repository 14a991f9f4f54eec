"""The structure docs/architecture.md describes is the structure of the code.

- every module of ``clip_lens/`` and ``plugins/`` has its line in the page's code map, and every line
  names a module that exists;
- every import follows the page's layer table (a module imports only from the layers its layer may
  import);
- the import graph has no circles.

The import graph is read with the standard library's ``ast`` (not import-linter: no extra dependency,
and the rules stay data on the page). Imports inside functions count; imports under
``if TYPE_CHECKING:`` do not (they never run). ``from package import name`` counts as importing the
submodule ``package.name`` when there is one, else the package; a parent package's ``__init__`` is not
counted as imported by its submodules (as grimp/import-linter do). Names a package hands out lazily
(PEP 562 ``_LAZY`` tables of ``clip_lens`` and ``clip_lens.sae``) count as imports of the module that
defines them, so a lazy name cannot hide a dependency.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "architecture.md"
SOURCES = {"clip_lens": ROOT / "clip_lens", "clip_lens_plugins": ROOT / "plugins"}


def module_name(path: Path) -> str:
    """``clip_lens/sae/io.py`` → ``clip_lens.sae.io``; ``plugins/x/__init__.py`` → ``clip_lens_plugins.x``."""
    for package, folder in SOURCES.items():
        if folder in path.parents:
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(path)


@cache
def modules() -> dict[str, Path]:
    found = {}
    for folder in SOURCES.values():
        for path in sorted(folder.rglob("*.py")):
            if "static" not in path.parts:
                found[module_name(path)] = path
    return found


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _lazy_table(package: str) -> dict[str, str]:
    """A package's PEP 562 ``_LAZY = {name: module}`` table (empty when it has none)."""
    tree = ast.parse(modules()[package].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


@cache
def lazy_names() -> dict[str, dict[str, str]]:
    return {package: _lazy_table(package) for package in ("clip_lens", "clip_lens.sae") if package in modules()}


def _resolve(target: str) -> str | None:
    """The longest known module that ``target`` (a dotted name) is or lies in; None outside the project."""
    parts = target.split(".")
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in modules():
            return candidate
    return None


def imports_of(name: str) -> set[str]:
    """The project modules ``name`` imports (at run time: TYPE_CHECKING blocks left out)."""
    path = modules()[name]
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking(node.test):
            skipped.update(id(inner) for child in node.body for inner in ast.walk(child))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                lazy = lazy_names().get(base, {})
                if f"{base}.{alias.name}" in modules():
                    targets.add(f"{base}.{alias.name}")
                elif alias.name in lazy:
                    targets.add(lazy[alias.name])
                else:
                    targets.add(base)
    return {found for found in map(_resolve, targets) if found is not None and found != name}


@cache
def graph() -> dict[str, set[str]]:
    return {name: imports_of(name) for name in modules()}


# --- the page ---------------------------------------------------------------------------------------
def _table(heading: str) -> list[list[str]]:
    """The rows (cells without backticks) of the first Markdown table after ``## heading``."""
    text = PAGE.read_text()
    start = text.index(f"\n## {heading}\n")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if line.startswith("## "):
            break
        if line.startswith("|") and not re.match(r"^\|\s*-", line):
            rows.append([cell.strip().replace("`", "") for cell in line.strip().strip("|").split("|")])
    return rows[1:]  # without the header row


def _dotted(path: str) -> str:
    """A code-map path (``clip_lens/sae/io.py``, ``plugins/neurons/__init__.py``) as a module name."""
    return module_name(ROOT / path)


@cache
def code_map() -> dict[str, str]:
    """module → layer, from the page's code map."""
    rows = _table("Code map")
    assert rows, "docs/architecture.md has no code map table"
    mapped = {}
    for row in rows:
        name = _dotted(row[0])
        assert name not in mapped, f"{row[0]} has two lines in the code map"
        mapped[name] = row[1]
    return mapped


@cache
def layers() -> dict[str, set[str]]:
    """layer → the layers it may import (itself included), from the page's layer table."""
    rows = _table("Layers")
    assert rows, "docs/architecture.md has no layer table"
    allowed = {}
    for row in rows:
        allowed[row[0]] = {row[0], *(layer.strip() for layer in row[1].split(",") if layer.strip() and layer.strip() != "—")}
    return allowed


# --- the tests --------------------------------------------------------------------------------------
def test_every_module_has_a_line_in_the_code_map():
    missing = sorted(set(modules()) - set(code_map()))
    assert not missing, f"add a line to the code map of docs/architecture.md for: {missing}"


def test_every_code_map_line_names_a_module_that_exists():
    stale = sorted(set(code_map()) - set(modules()))
    assert not stale, f"the code map of docs/architecture.md names modules that do not exist: {stale}"


def test_every_module_is_in_a_layer_of_the_layer_table():
    unknown = {name: layer for name, layer in code_map().items() if layer not in layers()}
    assert not unknown, f"code-map layers missing from the layer table: {unknown}"
    for layer, allowed in layers().items():
        assert allowed <= set(layers()), f"layer {layer} may import unknown layers {allowed - set(layers())}"


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    mapped, allowed = code_map(), layers()
    return [
        f"{name} ({mapped[name]}) imports {target} ({mapped[target]})"
        for name, targets in sorted(edges.items()) if name in mapped
        for target in sorted(targets) if target in mapped and mapped[target] not in allowed[mapped[name]]
    ]


def test_imports_follow_the_layer_rules():
    problems = layer_violations(graph())
    assert not problems, "imports that break the layer rules of docs/architecture.md:\n" + "\n".join(problems)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_import_graph_has_no_circles():
    circles = cycles(graph())
    assert not circles, f"import circles (imports inside functions count): {circles}"


def test_the_core_never_imports_a_plugin():
    offenders = sorted(f"{name} imports {target}" for name, targets in graph().items() if name.startswith("clip_lens.")
                       or name == "clip_lens" for target in targets if target.startswith("clip_lens_plugins"))
    assert not offenders, offenders


def test_no_module_of_clip_lens_is_over_800_lines():
    long = {name: n for name, path in modules().items() if name.split(".")[0] == "clip_lens"
            and (n := len(path.read_text().splitlines())) > 800}
    assert not long, f"split these modules (one job per module): {long}"


# --- the checker itself -------------------------------------------------------------------------------
def test_the_checker_finds_a_circle_a_layer_break_and_a_function_level_import(tmp_path, monkeypatch):
    """The rules can fail: a circle through an import inside a function is found, a TYPE_CHECKING
    import is not an edge, and an import of a higher layer is reported."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    package = tmp_path / "clip_lens"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from clip_lens import high\n"
                                      "def f():\n    from clip_lens.high import g\n")
    (package / "high.py").write_text("import clip_lens.low\n")
    monkeypatch.setitem(SOURCES, "clip_lens", package)
    monkeypatch.setitem(SOURCES, "clip_lens_plugins", tmp_path / "none")
    for cached in (modules, lazy_names, graph):
        cached.cache_clear()
    try:
        assert graph() == {"clip_lens": set(), "clip_lens.low": {"clip_lens.high"}, "clip_lens.high": {"clip_lens.low"}}
        assert cycles(graph()) == [["clip_lens.high", "clip_lens.low"]]
        (package / "low.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from clip_lens import high\n")
        graph.cache_clear()
        assert graph()["clip_lens.low"] == set() and cycles(graph()) == []
    finally:
        for cached in (modules, lazy_names, graph):
            cached.cache_clear()


def test_a_layer_break_is_reported():
    """An import from a layer the table does not allow is a violation naming both modules and layers."""
    edges = {**graph(), "clip_lens.errors": graph()["clip_lens.errors"] | {"clip_lens.cli"}}
    assert layer_violations(edges) == ["clip_lens.errors (foundation) imports clip_lens.cli (cli)"]


def test_bundled_models_name_their_tokenizer_as_data():
    """``loading`` (layer model) builds a bundled model's tokenizer from the class its registry entry
    names, so it never imports the shapes world; a name that does not resolve is refused with the fix."""
    from clip_lens.errors import CorruptCheckpointError
    from clip_lens.loading import bundled_models, bundled_tokenizer
    from clip_lens.toy.tokenizer import WordTokenizer

    assert not any(target.startswith("clip_lens.toy") for target in graph()["clip_lens.loading"])
    for name, entry in bundled_models().items():
        assert bundled_tokenizer(name, entry) is WordTokenizer, name
    for bad in ("clip_lens.toy.tokenizer", "clip_lens.toy.tokenizer:NoSuchClass", "no_such_module:Tokenizer", None):
        with pytest.raises(CorruptCheckpointError, match=r"bundled model 'x' \(pretrained.json\) names the tokenizer .*'module:Class'"):
            bundled_tokenizer("x", {"tokenizer": bad})
