"""Exact nearest-neighbour search over a store's images, by the direct contribution of chosen heads.

An image's representation is the sum of the chosen heads' normalised direct contributions (the
store's ``heads`` array), or, as the baseline a head search has to beat, the whole unit image
embedding (the store's ``embedding`` array), optionally projected onto the span of a property's
text directions.
[`HeadIndex`][clip_lens_plugins.neighbors.HeadIndex] scores queries against every finished image one store chunk at a time and keeps a
running top-k, so memory stays at one chunk whatever the store's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from clip_lens.collect import Store
from clip_lens.errors import InputError, close_matches
from clip_lens_plugins.head_labels import HeadLabelsResult
from clip_lens_plugins.head_labels.result import parse_head

if TYPE_CHECKING:
    from clip_lens import HookedCLIP

METRICS = ("dot", "cosine", "concepts")
SUBSPACES = (None, "texts")


def heads_for_property(labels: HeadLabelsResult, property: str) -> list[str]:
    """The heads ``labels`` gives ``property``, in table order (sorted by layer, head)."""
    heads = [h.head for h in labels.heads if h.label == property]
    if not heads:
        labelled = sorted({h.label for h in labels.heads if h.label is not None})
        raise InputError(
            f"no head is labelled '{property}'.{close_matches(property, labelled)} "
            f"Labelled properties: {', '.join(labelled) or 'none'}; or pass heads=['L{{l}}H{{h}}', ...]."
        )
    return heads


def property_texts(labels: HeadLabelsResult, property: str) -> list[str]:
    """The span texts of the heads ``labels`` gives ``property`` that fit it (``HeadLabel.fits``), in
    table order, each once.

    Raises:
        InputError: no head is labelled ``property``, or none of its texts fits.
    """
    heads = set(heads_for_property(labels, property))
    texts = [t for h in labels.heads if h.head in heads for t, fits in zip(h.texts, h.fits) if fits]
    if not texts:
        raise InputError(
            f"no span text of the heads labelled '{property}' fits '{property}', so there is no text subspace; "
            f"pass texts=[...] (e.g. one prompt per value of the property)."
        )
    return list(dict.fromkeys(texts))


def text_basis(embeddings: Float[Tensor, "n d"]) -> Float[Tensor, "r d"]:
    """Orthonormal rows spanning the rows of ``embeddings`` (``r`` ≤ ``n``), e.g. unit text embeddings.

    Directions whose singular value is below ``numpy.linalg.matrix_rank``'s float32 tolerance are
    dropped: a repeated (or linearly dependent) text leaves a singular value of rounding size, whose
    direction is arbitrary and would let an unrelated direction into the subspace.
    """
    embeddings = embeddings.double()
    # float64 SVD: the kept rows are orthonormal to float64 precision before the cast back
    _, singular, directions = torch.linalg.svd(embeddings, full_matrices=False)
    tolerance = singular[0] * max(embeddings.shape) * torch.finfo(torch.float32).eps
    return directions[singular > tolerance].float()


def project(x: Float[Tensor, "n d"], basis: Float[Tensor, "r d"]) -> Float[Tensor, "n d"]:
    """Orthogonal projection of the rows of ``x`` onto the span of ``basis`` (orthonormal rows)."""
    return (x @ basis.T) @ basis


def sum_heads(
    terms: Float[Tensor, "n head_layer head d"], head_layers: Sequence[int], heads: Sequence[str]
) -> Float[Tensor, "n d"]:
    """Sum of the ``heads`` ("L{l}H{h}") terms of ``terms``, whose axis 1 holds ``head_layers``."""
    layer_positions = torch.tensor([list(head_layers).index(parse_head(h)[0]) for h in heads], device=terms.device)
    head_positions = torch.tensor([parse_head(h)[1] for h in heads], device=terms.device)
    return terms[:, layer_positions, head_positions].sum(1)


@dataclass
class Concepts:
    """An image as a distribution over a property's texts: the ``metric="concepts"`` representation.

    The heads' term ``x`` scores each text by ``x · t``; each text's scores are standardised over the
    store (mean and standard deviation of ``x · t`` over all finished images), and a softmax at
    ``temperature`` turns the standardised scores into ``p(text | image)``. Two images then score
    ``p · p'``: the probability that both are described by the same text.

    Why: cosine or dot product on the raw term rank images by everything the heads carry, and the
    heads labelled "colour" also carry some shape; within one colour the nearest images are then
    those of the same shape too. The distribution over the colour texts keeps which colour the
    heads say, and little else. Standardising each text puts texts the heads write with different
    strength on one footing, as a per-class calibration of zero-shot logits would.
    """

    directions: Float[Tensor, "r d"]
    """Unit text embeddings, one row per text."""
    mean: Float[Tensor, " r"]
    std: Float[Tensor, " r"]
    temperature: float

    def __call__(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n r"]:
        """``p(text | image)`` of each row of ``x``."""
        return (((x @ self.directions.T) - self.mean) / (self.std * self.temperature)).softmax(-1)

    @classmethod
    def fit(
        cls, chunks: Iterator[Float[Tensor, "chunk d"]], directions: Float[Tensor, "r d"], texts: Sequence[str], temperature: float
    ) -> "Concepts":
        """Per-text score mean and standard deviation over all rows of ``chunks`` (float64 sums, one chunk at a time).

        Raises:
            InputError: a text scores every image the same (fewer than two images, or a text the heads do not write).
        """
        count, total, squares = 0, 0.0, 0.0
        for rows in chunks:
            scores = (rows @ directions.T).double()
            count, total, squares = count + len(scores), total + scores.sum(0), squares + (scores**2).sum(0)
        mean = total / count
        std = (squares / count - mean**2).clamp_min(0).sqrt()
        flat = std <= 1e-6 * std.max().clamp_min(1e-30)
        if count < 2 or bool(flat.any()):
            names = ", ".join(repr(t) for t, f in zip(texts, flat.tolist()) if f) if count >= 2 else "all"
            raise InputError(
                f"metric='concepts' standardises each text's scores over the store, but {names} score every one of "
                f"its {count} image(s) the same; search a store of at least two different images, or leave those texts out."
            )
        return cls(directions, mean.float(), std.float(), temperature)


@dataclass
class HeadIndex:
    """Top-k search over a store's finished images, represented by the sum of ``heads``' terms (or by
    the whole unit embedding, ``embedding=True``).

    >>> index = HeadIndex.from_store(store, property="colour", labels=labels)  # doctest: +SKIP
    >>> baseline = HeadIndex.from_store(store, embedding=True, metric="concepts", texts=colours, model=model)  # doctest: +SKIP
    >>> scores, indices = index.search(queries, k=10)                           # doctest: +SKIP
    >>> HeadIndex.from_store(store, property="colour", labels=labels, subspace="texts", model=model)  # doctest: +SKIP

    Build with [`from_store`][clip_lens_plugins.neighbors.HeadIndex.from_store], which checks the heads against the store.

    With a ``basis``, every representation, store rows and queries alike, is projected onto its span
    before scoring (and before the cosine's normalisation). Why: the heads labelled "colour" also
    carry some shape and size information, which the raw sum lets into the ranking; the span of the
    property's text directions keeps only what the texts say the property is. With
    ``metric="concepts"`` every representation becomes its distribution over the property's texts
    (`Concepts`), which keeps less still.
    """

    store: Store
    heads: Optional[list[str]]
    """``"L{l}H{h}"`` keys whose terms are summed; None: the whole unit image embedding."""
    metric: str = "dot"
    """``"dot"``: raw dot product, as CLIP-InterpreT; ``"cosine"``: both sides normalised;
    ``"concepts"``: ``p · p'`` of the distributions over the property's texts (`Concepts`)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    basis: Optional[Float[Tensor, "r d"]] = None
    """Orthonormal rows spanning the subspace representations are projected onto (None: no projection)."""
    search_texts: Optional[list[str]] = None
    """The texts whose embeddings span ``basis`` or define the ``concepts``."""
    concepts: Optional[Concepts] = None
    """The distribution over texts that ``metric="concepts"`` compares (None for the other metrics)."""

    @classmethod
    def from_store(
        cls,
        store: Store | str,
        heads: Optional[Sequence[str]] = None,
        property: Optional[str] = None,
        labels: Optional[HeadLabelsResult] = None,
        metric: str = "dot",
        device: torch.device | str = "cpu",
        *,
        subspace: Optional[str] = None,
        texts: Optional[Sequence[str]] = None,
        model: Optional["HookedCLIP"] = None,
        temperature: float = 0.3,
        embedding: bool = False,
    ) -> "HeadIndex":
        """An index of ``store`` over ``heads``, over the heads ``labels`` gives ``property``, or over
        the whole image embedding (``embedding=True``).

        Args:
            embedding: represent every image by its whole unit embedding instead of a sum of heads:
                the baseline that shows what choosing heads adds (with the same ``metric`` and ``texts``).
            subspace: None (the representations as they are) or ``"texts"``: project them onto the
                span of ``texts``' unit embeddings (see the class docstring).
            texts: the texts spanning the subspace, or the concepts of ``metric="concepts"``; default:
                the span texts of ``property``'s heads that fit it (`property_texts`). One text
                per value of the property ("a red shape", "a blue shape", …) works best.
            model: the model that embeds ``texts`` (needed for ``subspace="texts"`` and ``metric="concepts"``).
            temperature: ``metric="concepts"`` only: softmax temperature on the standardised text
                scores (`Concepts`).

        Raises:
            InputError: not exactly one of ``heads``/``property``/``embedding``; a property no head has; a head the
                store lacks; an unknown metric; a store with no finished images or no per-head terms;
                an unknown subspace, ``subspace="texts"`` or ``metric="concepts"`` without a model or
                without texts (none given, none fitting the property), ``texts`` without either,
                both together, a temperature that is not positive, a text that scores every image the same.
        """
        store = store if isinstance(store, Store) else Store.open(store)
        if (heads is not None) + (property is not None) + bool(embedding) != 1:
            raise InputError("give one of heads=['L{l}H{h}', ...], property='colour' (with labels=...) or embedding=True.")
        if property is not None:
            if labels is None:
                raise InputError(f"property='{property}' needs labels=HeadLabelsResult (from the head_labels analysis).")
            heads = heads_for_property(labels, property)
        if heads is not None and not heads:
            raise InputError("heads is empty; give at least one head key 'L{l}H{h}'.")
        if metric not in METRICS:
            raise InputError(f"metric must be one of {', '.join(METRICS)}, got '{metric}'.")
        if subspace not in SUBSPACES:
            raise InputError(f"subspace must be None or 'texts', got {subspace!r}.")
        if metric == "concepts" and subspace is not None:
            raise InputError("metric='concepts' already scores images by the texts alone; drop subspace='texts'.")
        if not temperature > 0:
            raise InputError(f"temperature must be positive, got {temperature}.")
        with_texts = subspace == "texts" or metric == "concepts"
        if texts is not None and not with_texts:
            raise InputError("texts=[...] spans the search subspace or names the concepts: pass it with subspace='texts' or metric='concepts'.")
        if not store.done_chunks():
            raise InputError(f"store {store.path} has no finished images to search; run collect on it first.")
        if heads is not None:
            if "heads" not in store.arrays:
                raise InputError(f"store {store.path} has no per-head terms (collected with heads=None); collect it with heads='all'.")
            n_heads = _array(store, "heads").shape[2]
            for key in heads:
                layer, head = parse_head(key)
                if layer not in store.head_layers or not 0 <= head < n_heads:
                    raise InputError(
                        f"head {key} is not in the store: it has layers {store.head_layers} with {n_heads} heads each."
                    )
            heads = list(heads)
        d = _array(store, "heads" if heads is not None else "embedding").shape[-1]
        if not with_texts:
            return cls(store, heads, metric, torch.device(device))
        option = "metric='concepts'" if metric == "concepts" else "subspace='texts'"
        if model is None:
            raise InputError(f"{option} embeds texts with the model: pass model=HookedCLIP.")
        if texts is None:
            if property is None:
                raise InputError(f"{option} with heads=[...] or embedding=True needs texts=[...]; only property= has span texts to default to.")
            texts = property_texts(labels, property)
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise InputError("texts is empty; give at least one text.")
        with torch.no_grad():  # a graph here would keep every chunk's rows alive through Concepts.fit
            embeddings = model.encode_text(model.to_tokens(texts), normalize=True).float().to(device)
        if embeddings.shape[1] != d:
            raise InputError(
                f"the text embeddings have {embeddings.shape[1]} dimensions but the store's terms have {d}: "
                f"was the store collected with this model?"
            )
        index = cls(store, heads, metric, torch.device(device), search_texts=texts)
        if metric == "concepts":
            index.concepts = Concepts.fit((rows for _, rows in index.terms()), embeddings, texts, temperature)
        else:
            index.basis = text_basis(embeddings)
        return index

    @property
    def n_images(self) -> int:
        """Finished images searched (the others are not yet collected)."""
        return self.store.n_done

    def terms(self) -> Iterator[tuple[int, Float[Tensor, "chunk d"]]]:
        """``(first row, summed head terms or unit embeddings)`` of each finished chunk, read one checked
        chunk at a time (the whole array never is)."""
        array = "heads" if self.heads is not None else "embedding"
        for start, rows in self.store.iter_chunks(array, partial=True):  # each chunk checked (checksums, missing files)
            terms = torch.from_numpy(rows).to(self.device, torch.float32)
            yield start, terms if self.heads is None else sum_heads(terms, self.store.head_layers, self.heads)

    def chunks(self) -> Iterator[tuple[int, Float[Tensor, "chunk r"]]]:
        """``(first row, representations)`` of each finished chunk ([`terms`][clip_lens_plugins.neighbors.HeadIndex.terms]), prepared as the queries are."""
        for start, rows in self.terms():
            yield start, self.prepare(rows)

    def prepare(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n r"]:
        """The same for rows and queries: projected onto the subspace (if any), then normalised
        (cosine) or turned into the distribution over the texts (concepts)."""
        if self.basis is not None:
            x = project(x, self.basis)
        if self.metric == "cosine":
            return F.normalize(x, dim=-1)
        return self.concepts(x) if self.concepts is not None else x

    @torch.no_grad()
    def search(self, queries: Float[Tensor, "q d"], k: int) -> tuple[Float[Tensor, "q k"], Int[Tensor, "q k"]]:
        """The ``k`` best-scoring store images of every query, best first: ``(scores, indices)``.

        Exact (not approximate). Equal scores are ordered by image index, so the answer does not
        depend on the chunk size or device. ``indices`` are store rows (``store.ids()[i]``). The
        queries are projected and normalised as the store rows are ([`chunks`][clip_lens_plugins.neighbors.HeadIndex.chunks]).
        """
        if queries.ndim != 2:
            raise InputError(f"queries must be [q, d], got shape {tuple(queries.shape)}.")
        n_images = self.n_images
        if not 1 <= k <= n_images:
            raise InputError(f"k must lie in 1..{n_images} (the store's finished images), got {k}.")
        d = _array(self.store, "heads" if self.heads is not None else "embedding").shape[-1]
        if queries.shape[1] != d:
            raise InputError(f"queries have {queries.shape[1]} dimensions but the store's terms have {d}.")
        queries = self.prepare(queries.to(self.device, torch.float32))
        best_scores = queries.new_empty((len(queries), 0))
        best_indices = torch.empty((len(queries), 0), dtype=torch.long, device=self.device)
        for start, rows in self.chunks():
            scores = torch.cat([best_scores, queries @ rows.T], 1)
            chunk_indices = torch.arange(start, start + len(rows), device=self.device).expand(len(queries), -1)
            indices = torch.cat([best_indices, chunk_indices], 1)
            order = _top_k_lowest_index_first(scores, indices, k)
            best_scores, best_indices = scores.gather(1, order), indices.gather(1, order)
        return best_scores, best_indices


def _top_k_lowest_index_first(scores: Float[Tensor, "q n"], indices: Int[Tensor, "q n"], k: int) -> Int[Tensor, "q k'"]:
    """Columns of the ``min(k, n)`` best scores of each row, best first, equal scores by lower ``indices``.

    ``topk`` (10x faster than a full sort on a chunk) picks the best columns but not which of several
    equal scores at the k-th place, nor their order; so: a tie across the k-th place falls back to a
    stable full sort (the columns are in index order), and otherwise the k picked columns are put in
    index order and then stably sorted by score.
    """
    values, picked = scores.topk(min(k, scores.shape[1]), dim=1)
    kth = values[:, -1:]
    if bool(((scores == kth).sum(1) > (values == kth).sum(1)).any()):
        return scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    picked = picked.gather(1, indices.gather(1, picked).argsort(dim=1))
    return picked.gather(1, scores.gather(1, picked).argsort(dim=1, descending=True, stable=True))


def _array(store: Store, name: str):
    """The store's Zarr array ``name``, opened lazily (reads nothing until sliced)."""
    import zarr

    return zarr.open_array(str(store.path / name), mode="r")
