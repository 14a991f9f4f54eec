"""The head label table: what the labelers produce and the interpretability metrics read."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from clip_lens.analyses import JSONResult
from clip_lens.errors import InputError

HEAD_KEY = re.compile(r"^L(\d+)H(\d+)$")


def parse_head(key: str) -> tuple[int, int]:
    """``"L3H1"`` → ``(3, 1)``."""
    match = HEAD_KEY.match(key)
    if match is None:
        raise InputError(f"head key '{key}' is not of the form 'L<layer>H<head>' (e.g. 'L3H1').")
    return int(match.group(1)), int(match.group(2))


@dataclass
class HeadLabel:
    """One head's property label."""

    head: str
    """``"L{layer}H{head}"``."""
    label: Optional[str]
    """The property (e.g. ``"colour"``), or None when the labeler found none."""
    confidence: float
    """0..1: how sure the labeler is (prototype labeler: share of span texts that fit)."""
    texts: list[str]
    """The head's span texts in TextSpan order."""
    fits: list[bool]
    """``fits[i]``: ``texts[i]`` fits ``label`` (all False when ``label`` is None)."""

    def __post_init__(self) -> None:
        parse_head(self.head)
        if len(self.fits) != len(self.texts):
            raise InputError(f"head {self.head}: {len(self.fits)} fit flags for {len(self.texts)} texts; give one per text.")


@dataclass
class HeadLabelsResult(JSONResult):
    """Labels of every analysed head of one model."""

    model: str
    labeler: str
    """``"prototype"`` or ``"llm:<model name>"``."""
    heads: list[HeadLabel]
    properties: list[str] = field(default_factory=list)
    """The property vocabulary the labeler chose from."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HeadLabelsResult":
        try:
            heads = [HeadLabel(**h) for h in data["heads"]]
            return cls(model=data["model"], labeler=data["labeler"], heads=heads, properties=list(data.get("properties", [])))
        except (KeyError, TypeError) as exc:
            raise InputError(f"not a head label table ({exc}); expected the JSON written by HeadLabelsResult.save.") from exc

    @classmethod
    def load(cls, path: str | Path) -> "HeadLabelsResult":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"no head label file at {path}.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON ({exc}).") from exc
        return cls.from_dict(data)

    def by_head(self) -> dict[str, HeadLabel]:
        return {h.head: h for h in self.heads}
