"""The ``neighbors`` analysis: nearest store images by a property's heads, by one head, or to a text
(CLIP-InterpreT's searches), exact and streamed over the store's chunks.

>>> from clip_lens_plugins.neighbors import Neighbors
>>> Neighbors(model).run(store, query_images=images, property="colour", labels=labels, k=10)  # doctest: +SKIP
>>> property_search_truth(model, store, 2024, labels, "colour").to_markdown()  # heads vs whole embedding vs random heads  # doctest: +SKIP
"""

from clip_lens_plugins.neighbors.analysis import Neighbors
from clip_lens_plugins.neighbors.index import HeadIndex, heads_for_property, project, property_texts, sum_heads, text_basis
from clip_lens_plugins.neighbors.result import ImageLoader, NeighborsResult
from clip_lens_plugins.neighbors.shapes import (
    PropertySearchTruth, SearchShares, TextSearchTruth, complementary_colour, property_search_truth, shapes_world_loader,
    text_search_truth, world_prompts,
)

__all__ = [
    "Neighbors", "NeighborsResult", "HeadIndex", "ImageLoader", "heads_for_property", "sum_heads",
    "property_texts", "text_basis", "project", "property_search_truth", "PropertySearchTruth", "SearchShares",
    "shapes_world_loader", "world_prompts",
    "text_search_truth", "TextSearchTruth", "complementary_colour",
]
