"""A word-level tokenizer for the shapes world (its whole vocabulary is a few dozen words).

Ids: ``<pad>`` = 0, ``<unk>`` = 1, the words, then ``<sot>`` and ``<eot>``; ``<eot>`` is the
largest id, so open_clip's argmax pooling finds the end of each text as with its BPE tokenizer.
"""

from __future__ import annotations

import re
from typing import Sequence, Union

import torch

from clip_lens.errors import InputError


class WordTokenizer:
    """Lower-cased, whitespace/punctuation split; unknown words map to ``<unk>``."""

    def __init__(self, words: Sequence[str], context_length: int = 32):
        words = list(dict.fromkeys(w.lower() for w in words))
        self.vocab = ["<pad>", "<unk>", *words, "<sot>", "<eot>"]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def words(self, text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    def __call__(self, texts: Union[str, Sequence[str]], context_length: int | None = None) -> torch.Tensor:
        """``[batch, context_length]`` token ids; texts too long for the context are an error."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"texts must be strings, got {type(text).__name__} at position {row}.")
            ids = [self.index["<sot>"], *(self.index.get(w, 1) for w in self.words(text)), self.index["<eot>"]]
            if len(ids) > length:
                shown = text if len(text) <= 80 else text[:79] + "…"  # a 1 MB text must not become a 1 MB error line
                raise InputError(f"text {row} has {len(ids) - 2} words; at most {length - 2} fit the context: {shown!r}")
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def to_dict(self) -> dict:
        return {"words": self.vocab[2:-2], "context_length": self.context_length}

    @classmethod
    def from_dict(cls, data: dict) -> "WordTokenizer":
        return cls(data["words"], data["context_length"])
