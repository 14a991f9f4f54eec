"""Naming neurons: sparse text codes of their rank-1 directions, and which concepts a code names.

A bank is embedded, mean-centred over the bank and normalised (`clip_lens.sparse_coding.centered_dictionary`);
each neuron's direction r_n is coded by orthogonal matching pursuit with ``k`` texts. The texts with
the largest |coefficient| name the neuron; a concept counts as named when one of the first
``n_names`` texts has a positive coefficient (the side the neuron's large effects point to) and
contains the concept's phrase as whole words.

On the shapes world a text names a value through the phrase its prompts use ("red", "circle",
"at the top left", "on a striped background"); overlapping phrases go to the longest ("at the top
left" is top left, not top center's "at the top").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from clip_lens.sparse_coding import SparseCode, centered_dictionary, orthogonal_matching_pursuit

DEFAULT_NAMES = 3


@dataclass
class TextCodes:
    """Sparse text codes of a set of directions over one bank."""

    texts: list[str]
    """The bank."""
    code: SparseCode
    """``[direction, k]`` indices into ``texts`` and their coefficients, in OMP's order."""
    reconstruction: Float[Tensor, "direction out"]
    """Each direction rebuilt from its texts, normalised (zero where the code is empty)."""
    cosine: Float[Tensor, "direction"]
    """cos(direction, its reconstruction)."""

    def ranked(self, row: int) -> list[tuple[str, float]]:
        """One direction's ``(text, coefficient)`` pairs by decreasing |coefficient|."""
        pairs = [(self.texts[i], c) for i, c in zip(self.code.indices[row].tolist(), self.code.coefficients[row].tolist()) if i >= 0]
        return sorted(pairs, key=lambda pair: -abs(pair[1]))

    def positive_names(self, row: int, n_names: int = DEFAULT_NAMES) -> list[str]:
        """Texts among the first ``n_names`` by |coefficient| whose coefficient is positive."""
        return [text for text, c in self.ranked(row)[:n_names] if c > 0]


def text_codes(directions: Float[Tensor, "direction out"], bank_embeddings: Float[Tensor, "text out"], texts: Sequence[str], k: int) -> TextCodes:
    """OMP codes (``k`` texts) of unit directions over the centred, normalised bank."""
    dictionary, _ = centered_dictionary(bank_embeddings.float())
    code = orthogonal_matching_pursuit(directions.float(), dictionary, k)
    rebuilt = code.reconstruct(dictionary)
    reconstruction = torch.nn.functional.normalize(rebuilt, dim=-1)
    cosine = torch.nn.functional.cosine_similarity(reconstruction, directions.float(), dim=-1)
    return TextCodes(list(texts), code, reconstruction, cosine)


def _phrase_pattern(phrase: str) -> re.Pattern:
    return re.compile(r"(?<![\w-])" + re.escape(phrase.lower()) + r"(?![\w-])")


def names_phrase(text: str, phrase: str) -> bool:
    """Whether ``text`` contains ``phrase`` as whole words (case-insensitive)."""
    return bool(_phrase_pattern(phrase).search(text.lower()))


@lru_cache(maxsize=4)
def _world_phrases(version: int) -> tuple[tuple[str, str, re.Pattern], ...]:
    from clip_lens.toy.world import ATTRIBUTES, POSITION_PHRASES, V2_VALUES, VALUES

    values = VALUES if version == 1 else V2_VALUES
    phrases = []
    for attribute in ATTRIBUTES:  # count is left out: "one"/"two" name a count only in count prompts
        for value in values[attribute]:
            phrase = {"position": POSITION_PHRASES.get(value, value), "background": f"{value} background"}.get(attribute, value)
            phrases.append((attribute, value, _phrase_pattern(phrase)))
    return tuple(sorted(phrases, key=lambda p: -len(p[2].pattern)))  # longest first


def world_names(text: str, version: int = 1) -> set[tuple[str, str]]:
    """The ``(attribute, value)`` pairs of the shapes world a text names by the world's phrases."""
    lowered, found = text.lower(), set()
    for attribute, value, pattern in _world_phrases(version):
        match = pattern.search(lowered)
        if match:
            found.add((attribute, value))
            lowered = lowered[: match.start()] + " " * (match.end() - match.start()) + lowered[match.end():]  # no reuse
    return found


def named_neurons(codes: TextCodes, concepts: Sequence[str], n_names: int = DEFAULT_NAMES) -> Int[Tensor, "concept direction"]:
    """``[concept, direction]`` 0/1: whether each direction's code names each concept phrase."""
    table = torch.zeros(len(concepts), len(codes.code.indices), dtype=torch.long)
    patterns = [_phrase_pattern(c) for c in concepts]
    for row in range(len(codes.code.indices)):
        names = [t.lower() for t in codes.positive_names(row, n_names)]
        for c, pattern in enumerate(patterns):
            table[c, row] = int(any(pattern.search(t) for t in names))
    return table
