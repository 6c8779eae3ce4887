"""Caption tokenization and the word vocabulary saved with each model."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

from captioner.errors import ModelLoadError, printable

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)


def _rules(*pairs: tuple[str, str]) -> tuple[tuple[re.Pattern[str], str], ...]:
    return tuple((re.compile(pattern), replacement) for pattern, replacement in pairs)


# The Penn Treebank word rules (Robert MacIntyre's sed script, as NLTK's TreebankWordTokenizer
# applies them), in order: each pads what it splits off with spaces, then the text is split on
# whitespace. The shipped vocabulary was built with these tokens, so the rules are kept whole
# rather than simplified; tests/test_vocab.py checks them against NLTK on every Flickr8k caption.
# Owning them keeps NLTK (0.6 s to import) out of ``import captioner``.
_PUNCTUATION_RULES = _rules(
    (r'^"', "``"),  # starting quotes
    (r"(``)", r" \1 "),
    (r"([ \(\[{<])(\"|\'{2})", r"\1 `` "),
    (r"([:,])([^\d])", r" \1 \2"),  # commas and colons, but not inside numbers (3,36)
    (r"([:,])$", r" \1 "),
    (r"\.\.\.", r" ... "),
    (r"[;@#$%&]", r" \g<0> "),
    (r'([^\.])(\.)([\]\)}>"\']*)\s*$', r"\1 \2\3 "),  # only the text's final period
    (r"[?!]", r" \g<0> "),
    (r"([^'])' ", r"\1 ' "),
    (r"[\]\[\(\)\{\}\<\>]", r" \g<0> "),  # brackets
    (r"--", r" -- "),
)
_WORD_RULES = _rules(  # applied to the text padded with a space at both ends
    (r"''", " '' "),  # ending quotes
    (r'"', " '' "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
    (r"(?i)\b(can)(not)\b", r" \1 \2 "),  # contractions written as one word
    (r"(?i)\b(d)('ye)\b", r" \1 \2 "),
    (r"(?i)\b(gim)(me)\b", r" \1 \2 "),
    (r"(?i)\b(gon)(na)\b", r" \1 \2 "),
    (r"(?i)\b(got)(ta)\b", r" \1 \2 "),
    (r"(?i)\b(lem)(me)\b", r" \1 \2 "),
    (r"(?i)\b(more)('n)\b", r" \1 \2 "),
    (r"(?i)\b(wan)(na)(?=\s)", r" \1 \2 "),
    (r"(?i) ('t)(is)\b", r" \1 \2 "),
    (r"(?i) ('t)(was)\b", r" \1 \2 "),
)


def treebank_words(text: str) -> list[str]:
    """Penn Treebank tokens of ``text``, punctuation included ("don't" -> "do", "n't")."""
    for pattern, replacement in _PUNCTUATION_RULES:
        text = pattern.sub(replacement, text)
    text = f" {text} "
    for pattern, replacement in _WORD_RULES:
        text = pattern.sub(replacement, text)
    return text.split()


def tokenize(text: str) -> list[str]:
    """Lowercased Treebank words, without punctuation-only tokens (captions end in ' .')."""
    return [w for w in treebank_words(text.lower()) if any(ch.isalnum() for ch in w)]


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

    def word_ids(self, words: Iterable[str]) -> list[int]:
        """Ids of the words that are in the vocabulary (unknown words left out)."""
        return [self.stoi[w] for w in words if w in self.stoi]

    def words(self, ids: Iterable[int]) -> list[str]:
        """Ids -> the caption's words: stops at ``<end>`` and drops the other special tokens.

        The one way ids become words (search results, SCST rewards, ``decode``).
        """
        words = []
        for i in ids:
            if i == self.end:
                break
            if i >= len(SPECIALS):
                words.append(self.itos[i])
        return words

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text: :meth:`words` joined by spaces."""
        return " ".join(self.words(ids))

    def to_json(self) -> str:
        return json.dumps(self.itos[len(SPECIALS) :], ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Vocabulary":
        try:
            words = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nesting too deep to parse
            raise ModelLoadError(f"vocabulary is not valid JSON: {e}") from e
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ModelLoadError("vocabulary must be a JSON list of words")
        return cls(words)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        """Raises: ModelLoadError naming the file (not UTF-8, not a JSON list of words); OSError (unreadable)."""
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ModelLoadError(f"{printable(path)}: vocabulary is not UTF-8 text (byte {e.start})") from e
        except ModelLoadError as e:
            raise ModelLoadError(f"{printable(path)}: {e}") from e
