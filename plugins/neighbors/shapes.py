"""Neighbour searches measured on the shapes world, where every image's attributes are known.

A property's heads should retrieve images that share the query's value of that property and are
indifferent to the others: top-k neighbours by "colour" share the query's colour, and its shape
only at chance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from clip_lens.collect import Store
from clip_lens.errors import InputError, close_matches
from clip_lens.toy.world import ATTRIBUTES, VALUES, ShapesWorld, attribute_prompt, batch_images
from clip_lens_plugins.head_labels import HeadLabelsResult
from clip_lens_plugins.neighbors.analysis import Neighbors
from clip_lens_plugins.neighbors.result import ImageLoader

if TYPE_CHECKING:
    from clip_lens import HookedCLIP


def shapes_world_loader(seed: int, image_size: int = 64) -> ImageLoader:
    """Scene indices → ``uint8 [n, H, W, 3]`` images of the world ``seed`` (for ``plot``)."""
    world = ShapesWorld(seed=seed, image_size=image_size)
    return lambda rows: np.stack([world.scene(i).image for i in rows])


def world_prompts(attribute: str) -> list[str]:
    """The world's single-attribute prompts of ``attribute``, one per value ("a red shape", …)."""
    if attribute not in VALUES:
        raise InputError(
            f"unknown attribute '{attribute}'.{close_matches(attribute, ATTRIBUTES)} Attributes: {', '.join(ATTRIBUTES)}."
        )
    return [attribute_prompt(attribute, value) for value in VALUES[attribute]]


def property_neighbor_agreement(
    model: "HookedCLIP",
    store: Store,
    world_seed: int,
    labels: Optional[HeadLabelsResult] = None,
    property: Optional[str] = None,
    *,
    heads: Optional[Sequence[str]] = None,
    k: int = 10,
    n_queries: int = 200,
    query_seed: Optional[int] = None,
    metric: str = "dot",
    subspace: Optional[str] = None,
    texts: Optional[Sequence[str]] = None,
) -> dict[str, float]:
    """For every world attribute, the share of the top-``k`` neighbours that share the query's value.

    Args:
        model: the model the store was collected with.
        store: a store of shapes-world scenes of seed ``world_seed`` (its ``ids`` are scene indices,
            as `clip_lens.collect.shapes_world_images` writes them).
        labels, property: search by the heads labelled ``property`` …
        heads: … or by these heads.
        n_queries: held-out query scenes, from ``query_seed`` (default ``world_seed + 1``), so that
            no query is in the store.
        subspace, texts: search in the span of the property's text directions (see
            [`Neighbors.run`][clip_lens_plugins.neighbors.Neighbors.run]), e.g.
            ``texts=world_prompts("colour")``.

    Returns:
        attribute (``colour``, ``shape``, ``size``, ``position``, ``background``) → share over all
        query-neighbour pairs. Chance is about 1 / (number of values): 1/8 colour, 1/6 shape, 1/2 size,
        1/9 position, 1/4 background.
    """
    query_seed = world_seed + 1 if query_seed is None else query_seed
    if query_seed == world_seed:
        raise InputError(f"query_seed must differ from the store's world seed {world_seed}: queries are held out.")
    world = ShapesWorld(seed=world_seed, image_size=model.cfg.image_size[0])
    queries = [ShapesWorld(seed=query_seed, image_size=model.cfg.image_size[0]).scene(i) for i in range(n_queries)]
    result = Neighbors(model).run(store, query_images=batch_images(queries), property=property, labels=labels,
                                  heads=heads, k=k, metric=metric, subspace=subspace, texts=texts)
    ids = store.ids()
    scene_of_row = [int(i) for i in ids] if ids is not None else range(store.n_images)
    rows = sorted(set(result.indices.flatten().tolist()))
    values = {row: world.scene(scene_of_row[row]) for row in rows}
    return {
        attribute: float(np.mean([
            values[row].value(attribute) == query.value(attribute)
            for query, neighbours in zip(queries, result.indices.tolist()) for row in neighbours
        ]))
        for attribute in ATTRIBUTES
    }
