"""What the app needs for the bundled model, built offline: a store of shapes-world scenes, head
labels and a thumbnail loader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import numpy as np
from jaxtyping import UInt8

from clip_lens import analyses
from clip_lens.collect import Store, collect, shapes_world_images, store_thumbnails
from clip_lens.errors import InputError

if TYPE_CHECKING:
    from clip_lens import HookedCLIP

DEMO_SEED = 2024
"""World seed of the demo store: neither the training world (seed 0) nor the held-out query scenes (1000)."""


@dataclass
class Workspace:
    """A store, its head labels and its thumbnails: the arguments of :func:`~clip_lens.app.make_server`."""

    store: Store
    labels: Any
    """``HeadLabelsResult`` of the store's heads (from the head_labels analysis)."""
    thumbnails: Callable[[Sequence[int]], UInt8[np.ndarray, "n H W 3"]]
    """Store rows → their images, for the neighbour figures and the page's image picker."""


def demo_workspace(
    model: "HookedCLIP", directory: Union[str, Path], n_scenes: int = 300, seed: int = DEMO_SEED
) -> Workspace:
    """Collect ``n_scenes`` shapes-world scenes into ``directory/store`` (resumed if already there),
    run TextSpan (shapes-attributes bank, 20 texts per head) and label the heads (saved as
    ``directory/labels.json``).

    Takes a few seconds on CPU for the bundled ``toy-shapes`` model and 300 scenes.

    Raises:
        InputError: the model has no fixed image size (scenes cannot be rendered for it).
    """
    if model.cfg.image_size is None:
        raise InputError("the demo workspace renders shapes-world scenes, which needs a model with a fixed image size.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    size = model.cfg.image_size[0]
    store = collect(model, shapes_world_images(n_scenes, seed=seed, image_size=size), directory / "store", progress=False)
    spans = analyses.get("textspan")(model).run(store, bank="shapes-attributes", m=20)
    labels = analyses.get("head_labels")(model).run(spans)
    labels.save(directory / "labels.json")
    return Workspace(store, labels, store_thumbnails(store, size))
