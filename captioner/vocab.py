"""Caption tokenization and the word vocabulary saved with each model."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

from nltk.tokenize import TreebankWordTokenizer

from captioner.errors import ModelLoadError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

# Treebank rules are pure regular expressions: no NLTK data download is needed.
_TREEBANK = TreebankWordTokenizer()


def tokenize(text: str) -> list[str]:
    """Lowercased Treebank words, without punctuation-only tokens (captions end in ' .')."""
    return [w for w in _TREEBANK.tokenize(text.lower()) if any(ch.isalnum() for ch in w)]


class Vocabulary:
    """Word <-> id mapping; ids 0..3 are always ``<pad> <start> <end> <unk>``."""

    def __init__(self, words: Iterable[str]):
        self.itos: list[str] = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.pad, self.start, self.end, self.unk = (self.stoi[s] for s in SPECIALS)

    @classmethod
    def build(cls, captions: Iterable[str], *, min_count: int = 5) -> "Vocabulary":
        """Keep words seen at least ``min_count`` times, most frequent first (ties by word)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(kept)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Caption -> ``[<start>, words..., <end>]`` ids."""
        return [self.start] + [self.stoi.get(w, self.unk) for w in tokenize(text)] + [self.end]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, dropping special tokens."""
        return " ".join(self.itos[i] for i in ids if i >= len(SPECIALS))

    def to_json(self) -> str:
        return json.dumps(self.itos[len(SPECIALS) :], ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Vocabulary":
        try:
            words = json.loads(text)
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"vocabulary is not valid JSON: {e}") from e
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ModelLoadError("vocabulary must be a JSON list of words")
        return cls(words)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
