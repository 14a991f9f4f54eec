"""Exact nearest-neighbour search over a store's images, by the direct contribution of chosen heads.

An image's representation is the sum of the chosen heads' normalised direct contributions (the
store's ``heads`` array), optionally projected onto the span of a property's text directions.
:class:`HeadIndex` scores queries against every finished image one store chunk at a time and keeps a
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

METRICS = ("dot", "cosine")
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


@torch.no_grad()
def text_basis(model: "HookedCLIP", texts: Sequence[str]) -> Float[Tensor, "r d"]:
    """Orthonormal rows spanning the unit text embeddings of ``texts`` (``r`` ≤ number of texts).

    Directions whose singular value is below ``numpy.linalg.matrix_rank``'s float32 tolerance are
    dropped: a repeated (or linearly dependent) text leaves a singular value of rounding size, whose
    direction is arbitrary and would let an unrelated direction into the subspace.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise InputError("texts is empty; give at least one text to span the subspace.")
    embeddings = model.encode_text(model.to_tokens(texts), normalize=True).double()
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
class HeadIndex:
    """Top-k search over a store's finished images, represented by the sum of ``heads``' terms.

    >>> index = HeadIndex.from_store(store, property="colour", labels=labels)  # doctest: +SKIP
    >>> scores, indices = index.search(queries, k=10)                           # doctest: +SKIP
    >>> HeadIndex.from_store(store, property="colour", labels=labels, subspace="texts", model=model)  # doctest: +SKIP

    Build with :meth:`from_store`, which checks the heads against the store.

    With a ``basis``, every representation, store rows and queries alike, is projected onto its span
    before scoring (and before the cosine's normalisation). Why: the heads labelled "colour" also
    carry some shape and size information, which the raw sum lets into the ranking; the span of the
    property's text directions keeps only what the texts say the property is.
    """

    store: Store
    heads: list[str]
    """``"L{l}H{h}"`` keys whose terms are summed."""
    metric: str = "dot"
    """``"dot"``: raw dot product, as CLIP-InterpreT; ``"cosine"``: both sides normalised."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    basis: Optional[Float[Tensor, "r d"]] = None
    """Orthonormal rows spanning the subspace representations are projected onto (None: no projection)."""
    subspace_texts: Optional[list[str]] = None
    """The texts whose embeddings span ``basis``."""

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
    ) -> "HeadIndex":
        """An index of ``store`` over ``heads``, or over the heads ``labels`` gives ``property``.

        Args:
            subspace: None (the representations as they are) or ``"texts"``: project them onto the
                span of ``texts``' unit embeddings (see the class docstring).
            texts: the texts spanning the subspace; default: the span texts of ``property``'s heads
                that fit it (:func:`property_texts`).
            model: the model that embeds ``texts`` (needed for ``subspace="texts"``).

        Raises:
            InputError: neither or both of ``heads``/``property``; a property no head has; a head the
                store lacks; an unknown metric; a store with no finished images or no per-head terms;
                an unknown subspace, ``subspace="texts"`` without a model or without texts (none given,
                none fitting the property), ``texts`` without ``subspace="texts"``.
        """
        store = store if isinstance(store, Store) else Store.open(store)
        if (heads is None) == (property is None):
            raise InputError("give either heads=['L{l}H{h}', ...] or property='colour' (with labels=...), not both or neither.")
        if property is not None:
            if labels is None:
                raise InputError(f"property='{property}' needs labels=HeadLabelsResult (from the head_labels analysis).")
            heads = heads_for_property(labels, property)
        if not heads:
            raise InputError("heads is empty; give at least one head key 'L{l}H{h}'.")
        if metric not in METRICS:
            raise InputError(f"metric must be one of {', '.join(METRICS)}, got '{metric}'.")
        if subspace not in SUBSPACES:
            raise InputError(f"subspace must be None or 'texts', got {subspace!r}.")
        if subspace is None and texts is not None:
            raise InputError("texts=[...] spans the search subspace: pass it with subspace='texts'.")
        if not store.done_chunks():
            raise InputError(f"store {store.path} has no finished images to search; run collect on it first.")
        if "heads" not in store.arrays:
            raise InputError(f"store {store.path} has no per-head terms (collected with heads=None); collect it with heads='all'.")
        n_heads, d = _heads_array(store).shape[2:]
        for key in heads:
            layer, head = parse_head(key)
            if layer not in store.head_layers or not 0 <= head < n_heads:
                raise InputError(
                    f"head {key} is not in the store: it has layers {store.head_layers} with {n_heads} heads each."
                )
        basis = None
        if subspace == "texts":
            if model is None:
                raise InputError("subspace='texts' embeds texts with the model: pass model=HookedCLIP.")
            if texts is None:
                if property is None:
                    raise InputError(
                        "subspace='texts' with heads=[...] needs texts=[...]; only property= has span texts to default to."
                    )
                texts = property_texts(labels, property)
            texts = [texts] if isinstance(texts, str) else list(texts)
            basis = text_basis(model, texts).to(device)
            if basis.shape[1] != d:
                raise InputError(
                    f"the text embeddings have {basis.shape[1]} dimensions but the store's terms have {d}: "
                    f"was the store collected with this model?"
                )
        return cls(store, list(heads), metric, torch.device(device), basis, texts)

    @property
    def n_images(self) -> int:
        """Finished images searched (the others are not yet collected)."""
        return sum(stop - start for start, stop in self._chunk_rows())

    def _chunk_rows(self) -> list[tuple[int, int]]:
        size, n = self.store.chunk_size, self.store.n_images
        return [(c * size, min(n, (c + 1) * size)) for c in self.store.done_chunks()]

    def chunks(self) -> Iterator[tuple[int, Float[Tensor, "chunk d"]]]:
        """``(first row, representations)`` of each finished chunk, read from the Zarr array one chunk
        at a time (the whole ``heads`` array never is), projected and normalised as the queries are."""
        array = _heads_array(self.store)
        for start, stop in self._chunk_rows():
            terms = torch.from_numpy(array[start:stop]).to(self.device, torch.float32)
            yield start, self._prepare(sum_heads(terms, self.store.head_layers, self.heads))

    def _prepare(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        """Projected onto the subspace (if any), then normalised (cosine): the same for rows and queries."""
        if self.basis is not None:
            x = project(x, self.basis)
        return F.normalize(x, dim=-1) if self.metric == "cosine" else x

    @torch.no_grad()
    def search(self, queries: Float[Tensor, "q d"], k: int) -> tuple[Float[Tensor, "q k"], Int[Tensor, "q k"]]:
        """The ``k`` best-scoring store images of every query, best first: ``(scores, indices)``.

        Exact (not approximate). Equal scores are ordered by image index, so the answer does not
        depend on the chunk size or device. ``indices`` are store rows (``store.ids()[i]``). The
        queries are projected and normalised as the store rows are (:meth:`chunks`).
        """
        if queries.ndim != 2:
            raise InputError(f"queries must be [q, d], got shape {tuple(queries.shape)}.")
        n_images = self.n_images
        if not 1 <= k <= n_images:
            raise InputError(f"k must lie in 1..{n_images} (the store's finished images), got {k}.")
        d = _heads_array(self.store).shape[3]
        if queries.shape[1] != d:
            raise InputError(f"queries have {queries.shape[1]} dimensions but the store's terms have {d}.")
        queries = self._prepare(queries.to(self.device, torch.float32))
        best_scores = queries.new_empty((len(queries), 0))
        best_indices = torch.empty((len(queries), 0), dtype=torch.long, device=self.device)
        for start, rows in self.chunks():
            scores = torch.cat([best_scores, queries @ rows.T], 1)
            chunk_indices = torch.arange(start, start + len(rows), device=self.device).expand(len(queries), -1)
            indices = torch.cat([best_indices, chunk_indices], 1)
            # stable sort, not topk: among equal scores the earlier (lower) index wins, as the kept
            # best rows always precede the chunk's
            order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
            best_scores, best_indices = scores.gather(1, order), indices.gather(1, order)
        return best_scores, best_indices


def _heads_array(store: Store):
    """The store's ``heads`` Zarr array, opened lazily (reads nothing until sliced)."""
    import zarr

    return zarr.open_array(str(store.path / "heads"), mode="r")
