"""The ``neighbors`` analysis: CLIP-InterpreT's nearest-neighbour searches on a collected store.

Three searches, one mechanism ([`HeadIndex`][clip_lens_plugins.neighbors.HeadIndex]):

- **property-based** (``property="colour"``): images are represented by the summed terms of the
  heads labelled with the property; the query image by the same sum;
- **per head, image query** (``head="L3H1"``): the same with one head;
- **per head, text query** (``query_texts=[...]``): the normalised text embedding against each
  image's head term, i.e. the head's additive share of the image-text cosine similarity.

``embedding=True`` searches by the whole unit image embedding instead of heads: the baseline that
shows what choosing heads adds (on the shapes world: ``clip_lens_plugins.neighbors.property_search_truth``).

Any of them can be restricted to a text subspace (``subspace="texts"``): representations and queries
are projected onto the span of the property's text directions before scoring
([`HeadIndex`][clip_lens_plugins.neighbors.HeadIndex]). Image searches can compare images by their
distributions over the property's texts instead (``metric="concepts"``,
`Concepts`): on the shapes world this is the search whose
neighbours share the property and are indifferent to the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from clip_lens.collect import Store
from clip_lens.errors import InputError
from clip_lens_plugins.head_labels import HeadLabelsResult
from clip_lens_plugins.head_labels.result import parse_head
from clip_lens_plugins.neighbors.index import METRICS, HeadIndex, sum_heads
from clip_lens_plugins.neighbors.result import NeighborsResult

if TYPE_CHECKING:
    from clip_lens import HookedCLIP


class Neighbors:
    """Nearest store images of query images or texts, as seen by chosen heads.

    >>> search = Neighbors(model)                                                        # doctest: +SKIP
    >>> search.run(store, query_images=images, property="colour", labels=labels, k=10)  # doctest: +SKIP
    >>> search.run(store, query_images=images, head="L3H1", k=8)                         # doctest: +SKIP
    >>> search.run(store, query_texts=["a red shape"], head="L3H1", k=3)                 # doctest: +SKIP
    >>> search.run(store, query_images=images, property="colour", labels=labels, subspace="texts")  # doctest: +SKIP
    >>> search.run(store, query_images=images, property="colour", labels=labels, metric="concepts",
    ...            texts=["a red shape", "a blue shape", ...])                                   # doctest: +SKIP
    >>> search.run(store, query_images=images, embedding=True, metric="concepts", texts=[...])  # doctest: +SKIP

    Args:
        model: the HookedCLIP the store was collected with (it embeds the queries).
        device: where scores are computed (default: the model's device).
        batch_size: query images per decomposition pass.
    """

    name = "neighbors"
    metrics = METRICS
    """What ``metric=`` accepts."""
    description = "Nearest store images of a query image or text by a property's heads or one head (CLIP-InterpreT)."
    parameters = {
        "query_images": "preprocessed query images [Q, 3, H, W] (or query_texts)",
        "query_texts": "query texts, scored against each image's head terms (or query_images)",
        "property": "search by the heads labels gives this property (needs labels)",
        "labels": "HeadLabelsResult from the head_labels analysis",
        "head": "search by one head 'L{l}H{h}'",
        "heads": "search by the sum of these heads",
        "embedding": "search by the whole unit image embedding (the baseline of a head search)",
        "k": "neighbours per query (default 10)",
        "metric": "'dot' (raw dot product, as CLIP-InterpreT; default), 'cosine', or 'concepts' (image queries: "
                  "compare the distributions over the property's texts)",
        "subspace": "None (default) or 'texts': project onto the span of the property's text directions first",
        "texts": "with subspace='texts' or metric='concepts': the texts (default: the property's fitting span texts)",
        "temperature": "metric='concepts': softmax temperature on the standardised text scores (default 0.3)",
    }
    needs = ("model", "store", "labels")

    def __init__(self, model: "HookedCLIP", device: Optional[Union[str, torch.device]] = None, batch_size: int = 64):
        self.model = model
        self.device = torch.device(device) if device is not None else model.device
        self.batch_size = batch_size

    def run(
        self,
        store: Union[Store, str],
        query_images: Optional[Float[Tensor, "q 3 H W"]] = None,
        query_texts: Optional[Sequence[str]] = None,
        *,
        property: Optional[str] = None,
        labels: Optional[HeadLabelsResult] = None,
        head: Optional[str] = None,
        heads: Optional[Sequence[str]] = None,
        k: int = 10,
        metric: str = "dot",
        subspace: Optional[str] = None,
        texts: Optional[Sequence[str]] = None,
        temperature: float = 0.3,
        embedding: bool = False,
    ) -> NeighborsResult:
        """The ``k`` nearest finished store images of each query (see the class docstring).

        Give one of ``query_images`` / ``query_texts`` and one of ``property`` / ``head`` / ``heads`` /
        ``embedding=True``.
        ``subspace="texts"`` projects every representation onto the span of ``texts`` (default: the
        span texts of the property's heads that fit it) before scoring; see
        [`HeadIndex.from_store`][clip_lens_plugins.neighbors.HeadIndex.from_store].
        ``metric="concepts"`` compares image queries with store images by their distributions over
        ``texts`` (`Concepts`).
        """
        if (query_images is None) == (query_texts is None):
            raise InputError("give either query_images=[Q, 3, H, W] or query_texts=[...], not both or neither.")
        if query_texts is not None and metric == "concepts":
            raise InputError(
                "metric='concepts' compares images by their distributions over the property's texts; a text query has "
                "none. Search by text with metric='dot' (the head's share of the image-text similarity)."
            )
        if head is not None:
            if heads is not None:
                raise InputError("give head='L{l}H{h}' or heads=[...], not both.")
            heads = [head]
        index = HeadIndex.from_store(store, heads=heads, property=property, labels=labels, metric=metric, device=self.device,
                                     subspace=subspace, texts=texts, model=self.model, temperature=temperature,
                                     embedding=embedding)
        if query_texts is not None:
            queries = self.model.encode_text(self.model.to_tokens(list(query_texts)), normalize=True)
        else:
            queries = self.represent(query_images, index.heads)
        scores, indices = index.search(queries, k)
        return NeighborsResult(
            model=self.model.model_name or index.store.meta.get("model", "?"), heads=index.heads,
            indices=indices.cpu(), scores=scores.cpu(), metric=metric, property=property,
            texts=None if query_texts is None else list(query_texts), search_texts=index.search_texts,
        )

    def represent(self, images: Float[Tensor, "q 3 H W"], heads: Optional[Sequence[str]]) -> Float[Tensor, "q d"]:
        """Sum of ``heads``' direct contributions to each image's unit embedding, or the unit embedding
        itself for ``heads=None`` (as in the store's ``heads`` and ``embedding`` arrays)."""
        layers = sorted({parse_head(h)[0] for h in heads}) if heads is not None else []
        terms, embedding = self.decompose(images, layers)
        return embedding if heads is None else sum_heads(terms, layers, heads)

    @torch.no_grad()
    def decompose(
        self, images: Float[Tensor, "q 3 H W"], layers: Sequence[int]
    ) -> tuple[Float[Tensor, "q layer head d"], Float[Tensor, "q d"]]:
        """Every head's direct contribution to each image's unit embedding at ``layers`` (sorted;
        ``[q, 0, head, d]`` for none) and the unit embedding, in batches of ``batch_size``."""
        images = self.model.check_images(images)  # the model's own error for a wrong size or dtype
        if len(images) == 0:
            raise InputError("query_images is empty; give at least one image [Q, 3, H, W].")
        terms, embeddings = [], []
        for start in range(0, len(images), self.batch_size):
            parts = self.model.decompose(images[start : start + self.batch_size], heads=list(layers) or None).normalized()
            embeddings.append(parts.embedding)
            if layers:
                terms.append(parts.heads)
        embedding = torch.cat(embeddings)
        if not layers:
            return embedding.new_zeros((len(embedding), 0, self.model.cfg.n_heads, embedding.shape[1])), embedding
        return torch.cat(terms), embedding
