"""The result of a neighbour search: store rows and scores of each query's top-k images."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Union

import numpy as np
import torch
from jaxtyping import Float, Int, UInt8
from torch import Tensor

from clip_lens.results import JSONResult
from clip_lens.errors import InputError
from clip_lens.figures import plain

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ImageLoader = Callable[[list[int]], UInt8[np.ndarray, "n H W 3"]]
"""Store rows → their images, e.g. ``lambda rows: np.stack([world.scene(i).image for i in rows])``."""


def _query_label(text: str, width: int = 18, lines: int = 6) -> str:
    """A query text for its thumbnail-sized cell: wrapped at ``width`` characters (long words broken:
    matplotlib's own wrapping cannot break them, and one long word collapsed the figure's layout),
    at most ``lines`` lines, each drawn literally (`plain`)."""
    wrapped = textwrap.wrap(text[: width * lines + 1], width, max_lines=lines, placeholder=" …")
    return "\n".join(plain(line) for line in wrapped)


@dataclass
class NeighborsResult(JSONResult):
    """The ``k`` nearest store images of each query, best first."""

    model: str
    heads: Optional[list[str]]
    """The heads whose summed terms represent the images (``"L{l}H{h}"``); None: the whole unit embedding."""
    indices: Int[Tensor, "q k"]
    """Store rows of the neighbours (``store.ids()[row]`` names the image)."""
    scores: Float[Tensor, "q k"]
    metric: str
    property: Optional[str] = None
    """The property the heads were chosen by (None: heads given directly)."""
    texts: Optional[list[str]] = None
    """The query texts (None: image queries)."""
    search_texts: Optional[list[str]] = None
    """The texts whose span the representations were projected onto, or whose distribution
    ``metric="concepts"`` compared (None: neither)."""

    def to_dict(self) -> dict:
        return {"model": self.model, "heads": self.heads, "indices": self.indices.tolist(), "scores": self.scores.tolist(),
                "metric": self.metric, "property": self.property, "texts": self.texts, "search_texts": self.search_texts}

    @classmethod
    def from_dict(cls, data: dict) -> "NeighborsResult":
        try:
            return cls(
                model=data["model"], heads=None if data["heads"] is None else list(data["heads"]), indices=torch.tensor(data["indices"], dtype=torch.long),
                scores=torch.tensor(data["scores"], dtype=torch.float32), metric=data["metric"],
                property=data.get("property"), texts=data.get("texts"), search_texts=data.get("search_texts"),
            )
        except (KeyError, TypeError) as exc:
            raise InputError(f"not a neighbours result ({exc}); expected the JSON written by NeighborsResult.save.") from exc

    def plot(
        self,
        images: Union[ImageLoader, UInt8[np.ndarray, "n H W 3"]],
        queries: Optional[UInt8[np.ndarray, "q H W 3"]] = None,
    ) -> "Figure":
        """One row per query: the query (its image from ``queries``, or its text), then its
        neighbours' thumbnails titled with row and score.

        Args:
            images: the store's images, as an `ImageLoader` or an array indexed by store row.
            queries: the query images (image queries); text queries are written out instead.

        Returns:
            A ``matplotlib.figure.Figure`` (no pyplot: nothing global; ``fig.savefig(path)``).
        """
        from matplotlib.figure import Figure

        n_queries, k = self.indices.shape
        rows = self.indices.flatten().tolist()
        thumbnails = np.asarray(images(rows) if callable(images) else np.asarray(images)[rows])
        if thumbnails.ndim != 4 or len(thumbnails) != len(rows):
            raise InputError(f"images must give {len(rows)} images [n, H, W, 3], got shape {thumbnails.shape}.")
        thumbnails = thumbnails.reshape(n_queries, k, *thumbnails.shape[1:])
        fig = Figure(figsize=(1.3 * (k + 1), 1.5 * n_queries), layout="constrained")
        axes = fig.subplots(n_queries, k + 1, squeeze=False)
        for q in range(n_queries):
            query_ax = axes[q, 0]
            if self.texts is not None:
                query_ax.text(0.5, 0.5, _query_label(self.texts[q]), ha="center", va="center", fontsize=8)
            elif queries is not None:
                query_ax.imshow(queries[q])
            query_ax.set_title(f"query {q}", fontsize=8)
            for j in range(k):
                axes[q, j + 1].imshow(thumbnails[q, j])
                axes[q, j + 1].set_title(f"#{self.indices[q, j]} {self.scores[q, j]:.2f}", fontsize=7)
        for ax in axes.flat:
            ax.set_axis_off()
        by = self.property or ("+".join(self.heads) if self.heads is not None else "the whole embedding")
        subspace = ""
        if self.search_texts is not None:
            subspace = f" over {len(self.search_texts)} texts" if self.metric == "concepts" else f", in the span of {len(self.search_texts)} texts"
        fig.suptitle(plain(f"Nearest images by {by} ({self.metric}{subspace}), {self.model}", limit=200), fontsize="medium")
        return fig
