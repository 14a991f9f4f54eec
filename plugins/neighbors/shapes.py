"""Neighbour searches measured on the shapes world, where every image's attributes are known.

A property's heads should retrieve images that share the query's value of that property and are
indifferent to the others: top-k neighbours by "colour" share the query's colour, and its shape
only at chance. Whether the *heads* are what does it is a separate question: the same scoring on the
whole image embedding, or on random heads, may do as well. `property_search_truth` answers both in
one run: the head search, the whole-embedding baseline and a random-head control, each as the share
of the top-``k`` neighbours that share the query's value of every attribute, with bootstrap 95%
intervals over the query scenes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from clip_lens.results import JSONResult
from clip_lens.collect import Store
from clip_lens.errors import InputError, close_matches
from clip_lens.stats import bootstrap_ci
from clip_lens.toy.evaluate import shapes_world_version
from clip_lens.toy.world import COLOURS, ShapesWorld, attribute_prompt, batch_images
from clip_lens_plugins.head_labels import HeadLabelsResult
from clip_lens_plugins.neighbors.analysis import Neighbors
from clip_lens_plugins.neighbors.index import HeadIndex, _array, heads_for_property, sum_heads
from clip_lens_plugins.neighbors.result import ImageLoader

if TYPE_CHECKING:
    from clip_lens import HookedCLIP


def shapes_world_loader(seed: int, image_size: int = 64, version: int = 1) -> ImageLoader:
    """Scene indices → ``uint8 [n, H, W, 3]`` images of the world ``seed`` (for ``plot``).

    Scene indices are the store rows of a store collected from `clip_lens.collect.shapes_world_images`,
    which renders every scene and so never skips one; for any other store (one that may have skipped
    images) use `clip_lens.collect.store_thumbnails`, which maps rows through ``store.ids()``."""
    world = ShapesWorld(seed=seed, image_size=image_size, version=version)
    return lambda rows: np.stack([world.scene(i).image for i in rows])


def world_prompts(attribute: str, version: int = 1) -> list[str]:
    """The single-attribute prompts of ``attribute`` in world ``version``, one per value ("a red shape", …)."""
    world = ShapesWorld(version=version)
    if attribute not in world.values:
        names = world.attributes
        raise InputError(f"unknown attribute '{attribute}'.{close_matches(attribute, names)} Attributes: {', '.join(names)}.")
    return [attribute_prompt(attribute, value) for value in world.values[attribute]]


@dataclass
class SearchShares:
    """One search's same-value shares: per attribute, the share of each query's top-``k`` neighbours
    whose value equals the query's, averaged over the queries."""

    heads: Optional[list[list[str]]]
    """The head sets searched ("L{l}H{h}"; one per random draw); None: the whole unit embedding."""
    share: dict[str, float]
    interval: dict[str, list[float]]
    """Bootstrap 95% interval ``[low, high]`` of ``share`` over the query scenes."""
    per_query: dict[str, list[float]]
    """Per attribute, per query ``[q]``: its neighbours' share (random heads: averaged over the draws)."""
    per_draw: Optional[list[dict[str, float]]] = None
    """Random heads only: ``share`` of each draw, to show how much the choice of heads moves it."""


@dataclass
class PropertySearchTruth(JSONResult):
    """A property search on the shapes world next to its baselines, with intervals over query scenes.

    ``searches`` holds ``"heads"`` (the chosen heads; absent when there are none), ``"embedding"`` (the
    same scoring on the whole unit image embedding) and ``"random heads"`` (random head subsets of the
    same size; absent without draws), all with the same ``metric`` and ``texts``. ``gain`` gives, for the searched ``attribute``, the paired
    per-query difference of the head search over each baseline with its interval: what the heads add.
    """

    model: str
    attribute: Optional[str]
    """The world attribute the search is for (its prompts are the default ``texts``)."""
    heads: list[str]
    """The heads searched (empty: none, only the whole embedding was)."""
    metric: str
    texts: Optional[list[str]]
    k: int
    n_queries: int
    n_store: int
    world_seed: int
    query_seed: int
    chance: dict[str, float]
    """Per attribute: the share a random store image would give, i.e. the mean over queries of the
    share of store scenes with the query's value (computed from the scenes' known attributes)."""
    searches: dict[str, SearchShares]
    gain: dict[str, dict[str, object]]
    """``"over embedding"`` / ``"over random heads"`` → ``{"mean": d, "interval": [low, high]}`` of the
    per-query difference in the ``attribute`` share (empty without ``attribute``)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PropertySearchTruth":
        try:
            return cls(**{**data, "searches": {name: SearchShares(**s) for name, s in data["searches"].items()}})
        except (KeyError, TypeError) as exc:
            raise InputError(f"not a property search result ({exc}); expected the JSON written by PropertySearchTruth.save.") from exc

    @property
    def attributes(self) -> list[str]:
        return list(self.chance)

    def to_markdown(self) -> str:
        """One row per search (and chance), one column per attribute: ``share [low, high]``."""
        names = {"heads": f"heads {'+'.join(self.heads)}", "embedding": "whole embedding"}
        if "random heads" in self.searches:
            names["random heads"] = f"random {len(self.heads)} heads ({len(self.searches['random heads'].heads)} draws)"
        header = "| search | " + " | ".join(self.attributes) + " |"
        lines = [header, "|" + "---|" * (len(self.attributes) + 1),
                 "| chance | " + " | ".join(f"{self.chance[a]:.3f}" for a in self.attributes) + " |"]
        for name, search in self.searches.items():
            cells = [f"{search.share[a]:.3f} [{search.interval[a][0]:.3f}, {search.interval[a][1]:.3f}]" for a in self.attributes]
            lines.append(f"| {names[name]} | " + " | ".join(cells) + " |")
        for name, gain in self.gain.items():
            low, high = gain["interval"]
            lines.append(f"\nheads − {name.removeprefix('over ')} on {self.attribute}: {gain['mean']:+.3f} [{low:+.3f}, {high:+.3f}]")
        return "\n".join(lines)


def property_search_truth(
    model: "HookedCLIP",
    store: Store,
    world_seed: int,
    labels: Optional[HeadLabelsResult] = None,
    property: Optional[str] = None,
    *,
    heads: Optional[Sequence[str]] = None,
    attribute: Optional[str] = None,
    k: int = 10,
    n_queries: int = 200,
    query_seed: Optional[int] = None,
    metric: str = "concepts",
    subspace: Optional[str] = None,
    texts: Optional[Sequence[str]] = None,
    temperature: float = 0.3,
    n_random: int = 5,
    seed: int = 0,
    world_version: Optional[int] = None,
) -> PropertySearchTruth:
    """The head search for a property, the whole-embedding baseline and a random-head control on the
    shapes world, measured against the scenes' known attributes.

    Args:
        model: the model the store was collected with.
        store: a store of shapes-world scenes of seed ``world_seed`` (its ``ids`` are scene indices,
            as `clip_lens.collect.shapes_world_images` writes them), collected with per-head terms.
        labels: with ``property``: search by the heads labelled ``property`` …
        property: the label whose heads are searched by (with ``labels``).
        heads: … or by these heads; ``[]`` (a property no head is labelled with) measures only the
            whole-embedding baseline.
        attribute: the world attribute searched for (default: ``property`` when it is one); its
            prompts (`world_prompts`) are the default ``texts`` and ``gain`` is measured on it.
        n_queries: held-out query scenes, from ``query_seed`` (default ``world_seed + 1``), so that
            no query is in the store.
        metric: the scoring, the same for all three searches (see
            [`HeadIndex.from_store`][clip_lens_plugins.neighbors.HeadIndex.from_store]).
        subspace: as for `HeadIndex.from_store`.
        texts: as for `HeadIndex.from_store` (default: the attribute's world prompts).
        temperature: as for `HeadIndex.from_store`.
        n_random: random head subsets of the same size as ``heads`` (distinct, none equal to
            ``heads``), drawn from all the store's heads with ``seed``; 0: no control.
        world_version: the shapes world the store and the queries come from (default: the model's, else 1).

    Raises:
        InputError: queries not held out; not exactly one of ``labels``+``property`` / ``heads``;
            scoring by texts without texts or a world attribute to take them from; and
            `HeadIndex.from_store`'s errors.
    """
    query_seed = world_seed + 1 if query_seed is None else query_seed
    if query_seed == world_seed:
        raise InputError(f"query_seed must differ from the store's world seed {world_seed}: queries are held out.")
    if (heads is None) == (property is None):
        raise InputError("give either heads=['L{l}H{h}', ...] or property='colour' (with labels=...), not both or neither.")
    if property is not None:
        if labels is None:
            raise InputError(f"property='{property}' needs labels=HeadLabelsResult (from the head_labels analysis).")
        heads = heads_for_property(labels, property)
    heads = list(heads)
    size = model.cfg.image_size[0]
    world_version = world_version or shapes_world_version(model) or 1
    world = ShapesWorld(seed=world_seed, image_size=size, version=world_version)
    attributes = world.attributes
    if attribute is None and property in attributes:
        attribute = property
    if attribute is not None and attribute not in attributes:
        raise InputError(f"unknown attribute '{attribute}'.{close_matches(attribute, attributes)} Attributes: {', '.join(attributes)}.")
    if (metric == "concepts" or subspace == "texts") and texts is None:
        if attribute is None:
            raise InputError(f"metric='{metric}', subspace={subspace!r} scores by texts: pass texts=[...] or attribute= "
                             f"(one of {', '.join(attributes)}) to use its prompts.")
        texts = world_prompts(attribute, world_version)
    query_world = ShapesWorld(seed=query_seed, image_size=size, version=world_version)
    queries = [query_world.scene(i) for i in range(n_queries)]

    rows = _finished_rows(store)
    ids = store.ids()
    n_rows = store.n_images if ids is None else len(ids)
    stored = {row: world.scene(int(ids[row]) if ids is not None else source) for row, source in rows.items()}
    store_values = {a: np.array([stored[row].value(a) if row in stored else "" for row in range(n_rows)]) for a in attributes}
    query_values = {a: np.array([q.value(a) for q in queries]) for a in attributes}
    done = np.array(list(rows))
    chance = {a: float(np.mean([(store_values[a][done] == v).mean() for v in query_values[a]])) for a in attributes}

    search = Neighbors(model)
    layers = list(store.head_layers)
    terms, embedding = search.decompose(batch_images(queries), layers)
    options = dict(metric=metric, subspace=subspace, texts=texts, model=model, temperature=temperature, device=search.device)

    def per_query(head_set: Optional[list[str]]) -> dict[str, np.ndarray]:
        """Per attribute, each query's share of same-value neighbours ``[q]``."""
        index = HeadIndex.from_store(store, heads=head_set, embedding=head_set is None, **options)
        represented = embedding if head_set is None else sum_heads(terms, layers, head_set)
        _, indices = index.search(represented, k)
        indices = indices.cpu().numpy()
        return {a: (store_values[a][indices] == query_values[a][:, None]).mean(1) for a in attributes}

    outcomes = {"heads": [per_query(heads)]} if heads else {}
    outcomes["embedding"] = [per_query(None)]
    draws = _random_head_sets(store.head_layers, terms.shape[2], heads, n_random, seed) if heads else []
    if draws:
        outcomes["random heads"] = [per_query(draw) for draw in draws]
    searches = {}
    for name, runs in outcomes.items():
        mean = {a: np.mean([run[a] for run in runs], axis=0) for a in attributes}  # over draws: the unit stays the query
        searches[name] = SearchShares(
            heads=None if name == "embedding" else ([heads] if name == "heads" else draws),
            share={a: float(mean[a].mean()) for a in attributes},
            interval={a: list(bootstrap_ci(mean[a])) for a in attributes},
            per_query={a: mean[a].tolist() for a in attributes},
            per_draw=[{a: float(run[a].mean()) for a in attributes} for run in runs] if name == "random heads" else None,
        )
    gain = {}
    if attribute is not None and heads:
        for name in ("embedding", "random heads"):
            if name in searches:
                difference = np.asarray(searches["heads"].per_query[attribute]) - np.asarray(searches[name].per_query[attribute])
                gain[f"over {name}"] = {"mean": float(difference.mean()), "interval": list(bootstrap_ci(difference))}
    return PropertySearchTruth(
        model=model.model_name or store.meta.get("model", "?"), attribute=attribute, heads=heads, metric=metric,
        texts=None if texts is None else list(texts), k=k, n_queries=n_queries, n_store=len(rows), world_seed=world_seed,
        query_seed=query_seed, chance=chance, searches=searches, gain=gain,
    )


def _finished_rows(store: Store) -> dict[int, int]:
    """Store row → source row of every image in a finished chunk. Store rows are numbered as reads,
    search indices and ``store.ids()`` number them: without the images skipped at collection."""
    skipped = store.skipped()
    rows, dropped = {}, 0
    for start, stop in store.done_rows():
        for source in range(start, stop):
            if source in skipped:
                dropped += 1
            else:
                rows[source - dropped] = source
    return rows


def _random_head_sets(layers: Sequence[int], n_heads: int, avoid: Sequence[str], n: int, seed: int) -> list[list[str]]:
    """``n`` distinct random subsets, of the size of ``avoid``, of the heads of ``layers``, none equal to
    ``avoid``, each in table order (fewer when fewer exist)."""
    every = [f"L{layer}H{head}" for layer in layers for head in range(n_heads)]
    size = len(avoid)
    rng = np.random.default_rng(seed)
    seen, draws = {frozenset(avoid)}, []
    while len(draws) < min(n, math.comb(len(every), size) - 1):
        pick = frozenset(every[i] for i in rng.choice(len(every), size=size, replace=False))
        if pick not in seen:
            seen.add(pick)
            draws.append([h for h in every if h in pick])
    return draws


def complementary_colour(colour: str) -> str:
    """The world colour nearest (in RGB) to ``1 − rgb`` of ``colour``, itself excluded: red → cyan,
    blue → yellow, orange → blue, green → pink (`clip_lens.toy.world.COLOURS`)."""
    if colour not in COLOURS:
        raise InputError(f"unknown colour '{colour}'.{close_matches(colour, list(COLOURS))} Colours: {', '.join(COLOURS)}.")
    opposite = 1 - np.array(COLOURS[colour])
    others = [c for c in COLOURS if c != colour]
    return min(others, key=lambda c: float(((np.array(COLOURS[c]) - opposite) ** 2).sum()))


@dataclass
class TextSearchTruth(JSONResult):
    """Text → head searches for the colour prompts on shapes-world stores, against the scenes' known colours.

    Every search ranks the store images by ``term · t`` (the head's share of the image-text cosine,
    `Neighbors` with ``query_texts``); a unit is one (store, colour prompt) pair. ``same``: the share
    of the top-``k`` images that show the prompt's colour; ``complement``: the share that show its
    `complementary_colour`. ``"embedding"`` ranks by the whole unit image embedding (the model's own
    answer); ``"any head"`` is, per unit, the mean over every head of the store (the expected share of
    a head picked at random).
    """

    model: str
    k: int
    world_seeds: list[int]
    n_store: list[int]
    colours: list[str]
    complements: list[str]
    centred: bool
    """Text queries centred on the mean of the colour prompts' unit embeddings (a centring check)."""
    chance: dict[str, float]
    """``same`` / ``complement``: the share of store scenes showing the colour, averaged over the units."""
    same: dict[str, list[list[float]]]
    """Search (a head, ``"embedding"``, ``"any head"``) → ``[store][colour]`` share."""
    complement: dict[str, list[list[float]]]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TextSearchTruth":
        try:
            return cls(**data)
        except TypeError as exc:
            raise InputError(f"not a text search result ({exc}); expected the JSON written by TextSearchTruth.save.") from exc

    def summary(self, search: str, which: str = "same") -> tuple[float, float, float]:
        """``(mean, low, high)`` of ``same`` or ``complement`` over the (store, colour) units, with a bootstrap 95% interval."""
        values = np.asarray(getattr(self, which)[search], float).ravel()
        return (float(values.mean()), *bootstrap_ci(values))

    def by_colour(self, search: str, which: str = "same") -> dict[str, float]:
        """Per colour prompt: ``same`` or ``complement`` averaged over the stores."""
        values = np.asarray(getattr(self, which)[search], float).mean(0)
        return dict(zip(self.colours, values.tolist()))

    def to_markdown(self, searches: Optional[Sequence[str]] = None) -> str:
        """One row per search: its same-colour and complementary-colour shares with intervals, then
        the per-prompt same-colour shares (and the complementary ones in brackets)."""
        searches = list(self.same) if searches is None else list(searches)
        head = "| search | same colour | complementary colour | " + " | ".join(self.colours) + " |"
        lines = [head, "|" + "---|" * (3 + len(self.colours)),
                 f"| chance | {self.chance['same']:.3f} | {self.chance['complement']:.3f} | " + " | ".join("" for _ in self.colours) + " |"]
        for name in searches:
            cells = []
            for which in ("same", "complement"):
                mean, low, high = self.summary(name, which)
                cells.append(f"{mean:.3f} [{low:.3f}, {high:.3f}]")
            same, other = self.by_colour(name), self.by_colour(name, "complement")
            cells += [f"{same[c]:.2f} ({other[c]:.2f})" for c in self.colours]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def text_search_truth(
    model: "HookedCLIP",
    stores: Sequence[tuple[Store, int]],
    *,
    k: int = 10,
    head_sets: Sequence[Sequence[str]] = (),
    centred: bool = False,
    world_version: Optional[int] = None,
) -> TextSearchTruth:
    """Does a text query find the images of its colour? Every head of the stores, the whole
    embedding and the mean over heads, on the world's colour prompts ("a red shape", …).

    Args:
        model: the model the stores were collected with.
        stores: ``(store, world seed)`` pairs, each a store of shapes-world scenes of that seed
            (`clip_lens.collect.shapes_world_images`) collected with per-head terms.
        k: neighbours per query.
        head_sets: sums of heads searched too (``["L0H3", "L3H0"]`` → the search ``"L0H3+L3H0"``), as
            ``--head L0H3,L3H0`` does.
        centred: score with the prompts' unit embeddings minus their mean (the check of whether the
            prompts' shared component is what ranks the images; the store's own mean term cannot
            change a ranking: it shifts every image's score by the same amount).
        world_version: the stores' shapes world (default: the model's, else 1). A scene shows a
            colour when any of its objects has it.
    """
    if not stores:
        raise InputError("stores is empty; give at least one (store, world seed) pair.")
    world_version = world_version or shapes_world_version(model) or 1
    colours = list(COLOURS)
    complements = [complementary_colour(c) for c in colours]
    prompts = world_prompts("colour", world_version)
    search = Neighbors(model)
    with torch.no_grad():
        texts = model.encode_text(model.to_tokens(prompts), normalize=True).float()
    queries = texts - texts.mean(0)
    same: dict[str, list[list[float]]] = {}
    other: dict[str, list[list[float]]] = {}
    chance_same, chance_other, sizes = [], [], []
    for store, seed in stores:
        rows = _finished_rows(store)
        ids = store.ids()
        world = ShapesWorld(seed=seed, image_size=model.cfg.image_size[0], version=world_version)
        shown = np.zeros((max(rows) + 1, len(colours)), bool)  # [store row, colour]: any object of that colour
        for row, source in rows.items():
            scene = world.scene(int(ids[row]) if ids is not None else source)
            for obj in scene.objects:
                shown[row, colours.index(obj.colour)] = True
        done = np.array(sorted(rows))
        sizes.append(len(done))
        chance_same.append(shown[done].mean(0))
        chance_other.append(shown[done][:, [colours.index(c) for c in complements]].mean(0))
        n_heads = _array_heads(store)
        heads = [f"L{layer}H{h}" for layer in store.head_layers for h in range(n_heads)]
        for name in [*heads, *("+".join(group) for group in head_sets), "embedding"]:
            chosen = dict(heads=None if name == "embedding" else name.split("+"), embedding=name == "embedding")
            if centred:
                _, indices = HeadIndex.from_store(store, device=search.device, **chosen).search(queries.to(search.device), k)
            else:  # the analysis's own text path
                indices = search.run(store, query_texts=prompts, k=k, **chosen).indices
            hits = shown[indices.cpu().numpy()]  # [colour query, k, colour]
            same.setdefault(name, []).append([float(hits[q, :, q].mean()) for q in range(len(colours))])
            other.setdefault(name, []).append([float(hits[q, :, colours.index(complements[q])].mean()) for q in range(len(colours))])
        same.setdefault("any head", []).append(np.mean([same[h][-1] for h in heads], 0).tolist())
        other.setdefault("any head", []).append(np.mean([other[h][-1] for h in heads], 0).tolist())
    return TextSearchTruth(
        model=model.model_name or stores[0][0].meta.get("model", "?"), k=k, world_seeds=[seed for _, seed in stores],
        n_store=sizes, colours=colours, complements=complements, centred=centred,
        chance={"same": float(np.mean(chance_same)), "complement": float(np.mean(chance_other))}, same=same, complement=other,
    )


def _array_heads(store: Store) -> int:
    """Heads per layer of the store's ``heads`` array."""
    if "heads" not in store.arrays:
        raise InputError(f"store {store.path} has no per-head terms (collected with heads=None); collect it with heads='all'.")
    return _array(store, "heads").shape[2]
