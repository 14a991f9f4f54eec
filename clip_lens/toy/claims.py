"""Captions as claims about a scene, and which claims are true of which scenes (version-2 training).

A claim is a caption with the facts it asserts. A scene's facts are every partial description of
each of its objects ("an object that is red and a circle"), its background and count, and every
relation between two of its objects described by colour and/or shape ("a red object above a
circle"). A claim is true of a scene when all of its facts are among the scene's, so a batch's
``[image, caption]`` positives are subset tests on frozensets.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from clip_lens.toy.world import RELATIONS, Scene, count_phrase, phrase, relation_phrase, relations

OBJECT_ATTRIBUTES = ("colour", "shape", "size", "position")
RELATION_ATTRIBUTES = ("colour", "shape")
"""Relations name each object by colour and/or shape (position would give the relation away)."""


@dataclass(frozen=True)
class Claim:
    text: str
    facts: frozenset[str]


def _object_fact(description: dict[str, str]) -> str:
    return "obj:" + ";".join(f"{a}={description[a]}" for a in OBJECT_ATTRIBUTES if a in description)


def _relation_fact(first: dict[str, str], relation: str, second: dict[str, str]) -> str:
    return f"rel:{_object_fact(first)}|{relation}|{_object_fact(second)}"


def _subsets(attributes: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [c for r in range(1, len(attributes) + 1) for c in itertools.combinations(attributes, r)]


OBJECT_SUBSETS = _subsets(OBJECT_ATTRIBUTES)
RELATION_SUBSETS = _subsets(RELATION_ATTRIBUTES)


def scene_facts(scene: Scene) -> frozenset[str]:
    """Every fact a claim can assert about ``scene``."""
    facts = {f"background={scene.background}", f"count={scene.value('count')}"}
    described = [o.attributes() for o in scene.objects]
    for obj in described:
        facts.update(_object_fact({a: obj[a] for a in subset}) for subset in OBJECT_SUBSETS)
    for (i, a), (j, b) in itertools.permutations(enumerate(scene.objects), 2):
        for relation in relations(a, b):
            for sa, sb in itertools.product(RELATION_SUBSETS, repeat=2):
                first = {k: described[i][k] for k in sa}
                second = {k: described[j][k] for k in sb}
                facts.add(_relation_fact(first, relation, second))
    return frozenset(facts)


def object_claim(scene: Scene, rng: np.random.Generator, keep_prob: float, must: Optional[str] = None) -> Claim:
    """A partial description of one of the scene's objects, sometimes with the background.

    ``must`` names an attribute the claim has to include (the one a minimal set varies).
    """
    obj = scene.objects[int(rng.integers(len(scene.objects)))].attributes()
    while True:
        keep = {a: bool(rng.random() < keep_prob) or a == must for a in (*OBJECT_ATTRIBUTES, "background")}
        if any(keep.values()):
            break
    description = {a: obj[a] for a in OBJECT_ATTRIBUTES if keep[a]}
    background = scene.background if keep["background"] else None
    facts = {f"background={background}"} if background else set()
    if description:  # background only ("a shape on a striped background") claims no object attribute
        facts.add(_object_fact(description))
    return Claim(phrase([description], background), frozenset(facts))


def count_claim(scene: Scene, rng: np.random.Generator) -> Claim:
    """"three shapes" (with the background half of the time)."""
    background = scene.background if rng.random() < 0.5 else None
    count = scene.value("count")
    facts = {f"count={count}"} | ({f"background={background}"} if background else set())
    return Claim(count_phrase(count, background), frozenset(facts))


def relation_claim(scene: Scene, rng: np.random.Generator) -> Claim:
    """"a red circle above a square": two objects named by colour and/or shape and one true relation."""
    order = rng.permutation(len(scene.objects))
    a, b = scene.objects[int(order[0])], scene.objects[int(order[1])]
    options = relations(a, b)
    relation = options[int(rng.integers(len(options)))]
    sa = RELATION_SUBSETS[int(rng.integers(len(RELATION_SUBSETS)))]
    sb = RELATION_SUBSETS[int(rng.integers(len(RELATION_SUBSETS)))]
    first, second = {k: getattr(a, k) for k in sa}, {k: getattr(b, k) for k in sb}
    return Claim(relation_phrase(first, relation, second), frozenset({_relation_fact(first, relation, second)}))


def positives(scenes: list[Scene], claims: list[Claim]) -> torch.Tensor:
    """``bool [n_scenes, n_claims]``: claim ``j`` is true of scene ``i``."""
    facts = [scene_facts(s) for s in scenes]
    return torch.tensor([[c.facts <= f for c in claims] for f in facts])


__all__ = ["Claim", "RELATIONS", "count_claim", "object_claim", "positives", "relation_claim", "scene_facts"]
