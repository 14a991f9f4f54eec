"""Results: what an analysis returns, and the JSON save/load every result class shares.

Low level on purpose (the standard library, `clip_lens.errors`, `clip_lens.files`): core modules such as
`clip_lens.patching` and every plugin derive their results from [`JSONResult`][clip_lens.results.JSONResult]
without importing the plugin registry (`clip_lens.analyses`, which re-exports both names).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from clip_lens.errors import InputError
from clip_lens.files import atomic_write, read_json


@runtime_checkable
class Result(Protocol):
    """What every analysis returns."""

    def to_dict(self) -> dict: ...

    def save(self, path: str | Path) -> Path: ...

    def plot(self) -> Any: ...


class JSONResult:
    """Mixin for results: ``save`` writes ``to_dict()`` as JSON, atomically; ``load`` reads it back
    through the result's ``from_dict``."""

    def to_dict(self) -> dict:  # pragma: no cover - every result defines it
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".json":
            path = path / f"{type(self).__name__}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise InputError(f"no {cls.__name__} file at {path}.")
        data = read_json(path, f"{cls.__name__} file", "what its save() wrote")  # FIFOs, deep nesting refused
        return cls.from_dict(data)
