"""Texts of the shapes world: the vocabulary, a text bank and per-class descriptors.

The text bank holds every single-attribute phrase, combinations of attributes and distractor
phrases about things that never appear in the world; analyses (TextSpan, head labels) choose among
them. Descriptors describe each shape class by its visual parts, for the mutual-knowledge analysis.
"""

from __future__ import annotations

import itertools

from clip_lens.toy.world import ATTRIBUTES, POSITION_PHRASES, RELATIONS, V2_ATTRIBUTES, VALUES, attribute_prompt, phrase

DESCRIPTORS: dict[str, list[str]] = {
    "circle": ["round", "no corners", "a curved edge", "a smooth outline", "the same width everywhere"],
    "square": ["four corners", "four equal sides", "straight edges", "right angles", "a flat top"],
    "triangle": ["three corners", "a pointed top", "three sides", "a flat bottom", "slanted sides"],
    "star": ["five points", "pointed tips", "a spiky outline", "thin arms", "a small center"],
    "diamond": ["four corners", "a pointed top", "a pointed bottom", "slanted sides", "a tilted square"],
    "cross": ["four arms", "a plus sign", "twelve corners", "straight edges", "a thick center"],
}

DISTRACTORS: list[str] = [
    "a photo of a dog", "a cat sleeping on a sofa", "a red car on the street", "a tall tree in a park",
    "a house with a garden", "a person riding a bicycle", "a bowl of soup", "a mountain at sunset",
    "a boat on the water", "a plate of food", "a city skyline at night", "a bird on a branch",
    "a wooden table", "an old book", "a cup of coffee", "a field of grass", "a snowy forest",
    "a crowd of people", "a blurry picture", "a black and white photo", "a close up of a face",
    "a painting of flowers", "a cartoon drawing", "text on a sign", "a map of the world",
]

WORLD_WORDS = ["a", "shape", "and", "on", "background", "scene", "at", "the", "in", "of", "something", "with"]


V2_WORDS = ["one", "two", "three", "four", "shapes", *" ".join(RELATIONS).split()]
"""Version 2 adds counts and relations; its words come after version 1's, whose ids stay as they were."""


def vocabulary(version: int = 1) -> list[str]:
    """Every word the toy tokenizer of world ``version`` knows (world phrases, descriptors, distractors)."""
    words: list[str] = list(WORLD_WORDS)
    for values in VALUES.values():
        for value in values:
            words.extend(value.split())
    for text in [*POSITION_PHRASES.values(), *itertools.chain(*DESCRIPTORS.values()), *DISTRACTORS]:
        words.extend(text.replace(",", " ").split())
    if version == 2:
        words.extend(V2_WORDS)
    return list(dict.fromkeys(w.lower() for w in words))


def attribute_bank() -> list[str]:
    """The texts of `text_bank` that name a single attribute (plus descriptors and distractors).

    A head's property can be read off these directly; a text such as "a pink star" names two, and
    the text tower puts it nearer to "a star", so a colour head spanned by such texts looks like a
    shape head to a labeler.
    """
    bank = [attribute_prompt(a, v) for a in ATTRIBUTES for v in VALUES[a]]
    bank.extend(f"something with {d}" for d in dict.fromkeys(itertools.chain(*DESCRIPTORS.values())))
    bank.extend(DISTRACTORS)
    return list(dict.fromkeys(bank))


def text_bank() -> list[str]:
    """The shapes-world text bank: single attributes, pairs, full descriptions and distractors."""
    bank = [attribute_prompt(a, v) for a in ATTRIBUTES for v in VALUES[a]]
    for a, b in itertools.combinations(["size", "colour", "shape", "position"], 2):
        for va, vb in itertools.product(VALUES[a], VALUES[b]):
            bank.append(phrase([{a: va, b: vb}]))
    for colour, shape in itertools.product(VALUES["colour"], VALUES["shape"]):
        for background in VALUES["background"]:
            bank.append(phrase([{"colour": colour, "shape": shape}], background))
    bank.extend(f"something with {d}" for d in dict.fromkeys(itertools.chain(*DESCRIPTORS.values())))
    bank.extend(DISTRACTORS)
    return list(dict.fromkeys(bank))
