"""The head label table: what the labelers produce and the interpretability metrics read."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Optional

from clip_lens.results import JSONResult
from clip_lens.errors import InputError
from clip_lens.figures import plain

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HEAD_KEY = re.compile(r"^L(\d+)H(\d+)$")
ABSTAIN = "none"
"""The name tables give a head the labeler abstains on (its ``label`` is None): one name everywhere."""
ABSTENTIONS = (ABSTAIN, "mixed")


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
    """The property (e.g. ``"colour"``), or None when the labeler abstains (tables show `ABSTAIN`)."""
    confidence: float
    """0..1: how sure the labeler is (prototype labeler: share of span texts that fit)."""
    texts: list[str]
    """The head's span texts in TextSpan order."""
    fits: list[bool]
    """``fits[i]``: ``texts[i]`` fits ``label`` (all False when ``label`` is None)."""
    abstention: Optional[str] = None
    """Why ``label`` is None: ``"none"`` (most texts are about no property), ``"mixed"`` (no property
    is shared by enough of them); None when labelled, or for tables from before abstention was recorded."""

    def __post_init__(self) -> None:
        parse_head(self.head)
        if self.abstention is not None and (self.abstention not in ABSTENTIONS or self.label is not None):
            raise InputError(f"head {self.head}: abstention is one of {ABSTENTIONS} and only without a label, got "
                             f"{self.abstention!r} with label {self.label!r}.")
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
    """The property vocabulary the labeler chose from (abstention, `ABSTAIN`, is not one of them)."""
    threshold: Optional[float] = None
    """Prototype labeler: the calibrated margin over the ``none`` phrases a text needs to fit a property
    (`calibrate`); None: the labeler does not abstain on texts."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HeadLabelsResult":
        try:
            heads = [HeadLabel(**h) for h in data["heads"]]
            return cls(model=data["model"], labeler=data["labeler"], heads=heads, properties=list(data.get("properties", [])),
                       threshold=data.get("threshold"))
        except (KeyError, TypeError) as exc:
            raise InputError(f"not a head label table ({exc}); expected the JSON written by HeadLabelsResult.save.") from exc

    def by_head(self) -> dict[str, HeadLabel]:
        return {h.head: h for h in self.heads}

    def plot(self) -> "Figure":
        """Layer × head grid: each cell coloured by its head's label (legend), its confidence written in it.

        Built on ``matplotlib.figure.Figure`` (no pyplot): nothing global, works headless; save with
        ``fig.savefig(path)``. Colours follow `properties`, so a label keeps its colour across tables.
        """
        import numpy as np
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        where = {h.head: parse_head(h.head) for h in self.heads}
        layers = sorted({layer for layer, _ in where.values()})
        n_heads = 1 + max((head for _, head in where.values()), default=0)
        vocabulary = list(dict.fromkeys([*self.properties, *(h.label for h in self.heads if h.label is not None)]))
        colour = label_colours(vocabulary)

        fig = Figure(figsize=(3.5 + 0.6 * n_heads, 1.5 + 0.5 * len(layers)), layout="constrained")
        ax = fig.add_subplot()
        grid = np.ones((len(layers), n_heads, 4))  # white: head not analysed
        for h in self.heads:
            row, col = layers.index(where[h.head][0]), where[h.head][1]
            grid[row, col] = colour[h.label]
            ax.text(col, row, f"{h.confidence:.2f}", ha="center", va="center", fontsize=8)
        ax.imshow(grid, aspect="auto")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"Head labels: {plain(self.model, 60)}, {plain(self.labeler, 60)}\n(number: confidence)", fontsize="medium")
        shown = [label for label in [*vocabulary, None] if any(h.label == label for h in self.heads)]
        ax.legend(
            handles=[Patch(color=colour[label], label=plain(label or ABSTAIN, 40)) for label in shown],
            loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small",
        )
        return fig


NO_LABEL_COLOUR = (0.85, 0.85, 0.85, 1.0)
"""Grey: a head without a label."""


def label_colours(vocabulary: list[str]) -> dict[Optional[str], tuple[float, float, float, float]]:
    """Label → RGBA, in vocabulary order: the ten distinct hues of ``tab10`` first (tab20's pairs put two
    similar blues on the first two properties, colour and shape), then tab20's light shades; None: grey."""
    from matplotlib import colormaps

    palette = [*colormaps["tab10"].colors, *colormaps["tab20"].colors[1::2]]
    palette = [c for c in palette if max(c) - min(c) > 0.05]  # greys would read as "no label"
    colour: dict[Optional[str], tuple[float, float, float, float]] = {
        label: (*palette[i % len(palette)], 1.0) for i, label in enumerate(vocabulary)}
    colour[None] = NO_LABEL_COLOUR
    return colour
