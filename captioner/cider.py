"""CIDEr-D on token sequences, fast enough to be a per-sample training reward and a decoding signal.

Reported scores always go through pycocoevalcap (:mod:`captioner.metrics`). Self-critical
training needs thousands of CIDEr-D values per minute against document frequencies of the
whole training corpus, and consensus reranking (:mod:`captioner.consensus`) scores every
beam candidate of every photo against ten training photos' references, so this module keeps
coco-caption's formula (clipped tf-idf n-gram vectors, Gaussian length penalty with sigma 6,
x10) with the reference side precomputed as arrays. A test checks it equals pycocoevalcap's
``Cider`` on the same tokens.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Hashable, Iterable, Sequence

import numpy as np

Token = Hashable

MAX_N = 4
SIGMA = 6.0


def ngram_counts(tokens: Sequence[Token], max_n: int = MAX_N) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


class CiderD:
    """CIDEr-D of candidates against fixed reference sets, with corpus document frequencies.

    Every reference n-gram gets a number once, at construction, and each reference becomes
    a run of (n-gram, tf-idf weight) pairs, so that scoring is a few array operations per
    call instead of dictionary walks per reference. The terms are added one after the other
    in the order coco-caption's loops add them (``val[n] += ...``: a reference's n-grams in
    order of first occurrence, the shared n-grams in the candidate's order, the orders 1 to
    4 in turn), and logarithms and exponentials come from :mod:`math`, so a score is the
    same float those loops give, on any Python (3.12's ``sum()`` of floats compensates;
    ``+=`` does not).
    """

    def __init__(self, references: Sequence[Sequence[Sequence[Token]]]):
        """``references[i]`` is the list of tokenized reference captions of image ``i``."""
        flat = [t for refs in references for ref in refs for t in ref]
        self._words: dict[Token, int] = {t: i for i, t in enumerate(dict.fromkeys(flat))}
        ids = np.fromiter(map(self._words.__getitem__, flat), dtype=np.int64, count=len(flat))
        lengths = np.array([len(ref) for refs in references for ref in refs], dtype=np.int64)
        self._image_refs = np.cumsum([0] + [len(refs) for refs in references])  # image i's refs: [start, end)
        self.log_images = math.log(float(len(references)))
        self._levels: list[np.ndarray] = []  # per order n >= 2: the sorted keys (n-1-gram number x words + word)
        self._index_references(*self._number_grams(ids, lengths), lengths)

    def _number_grams(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, ...]:
        """Every n-gram occurrence in the references: (reference, n-gram number), by order then place.

        An n-gram's number within its order comes from the (n-1)-gram it starts with and its
        last word; numbers of order n are offset past those of the orders below.
        """
        words = max(1, len(self._words))
        refs, left = _places(lengths)
        numbers, offset = tokens, words
        occurrences = [(refs, tokens)]
        starts = [0]  # the first n-gram number of each order
        for n in range(2, MAX_N + 1):
            starts.append(offset)
            at = np.flatnonzero(left >= n)
            keys = numbers[at] * words + tokens[at + n - 1]
            level, _, _, inverse = _unique(keys, inverse=True)
            self._levels.append(level)
            numbers = np.full(len(tokens), -1, dtype=np.int64)
            numbers[at] = inverse
            occurrences.append((refs[at], inverse + offset))
            offset += len(level)
        self._grams, self._starts = offset, np.array(starts)
        return tuple(np.concatenate(column) for column in zip(*occurrences, strict=True))

    def _index_references(self, refs: np.ndarray, grams: np.ndarray, lengths: np.ndarray) -> None:
        """Each reference's distinct n-grams (sorted by number, for matching), their weights and norms."""
        _, first, tf = _unique(refs * self._grams + grams)
        ref_of, self._gram_of = refs[first], grams[first]
        image_of_ref = np.repeat(np.arange(len(self._image_refs) - 1), np.diff(self._image_refs))
        in_images, _, _ = _unique(image_of_ref[ref_of] * self._grams + self._gram_of)
        self._frequency = np.bincount(in_images % self._grams, minlength=self._grams)
        self._idf = self.log_images - np.array([math.log(max(1.0, f)) for f in range(int(self._frequency.max()) + 1)])
        self._order_of = np.searchsorted(self._starts, self._gram_of, side="right") - 1
        self._weight = tf * self._idf[self._frequency[self._gram_of]]
        counter = _counter_order(ref_of, first)  # a norm adds its squares in Counter's order
        cells = (ref_of * MAX_N + self._order_of)[counter]
        squares = np.bincount(cells, weights=(self._weight * self._weight)[counter], minlength=len(lengths) * MAX_N)
        self._ref_norms = np.sqrt(squares).reshape(-1, MAX_N)
        self._ref_lengths = np.maximum(lengths - 1, 0)  # coco-caption measures length in bigrams
        self._ref_pairs = np.searchsorted(ref_of, np.arange(len(lengths) + 1))  # ref r's pairs: [start, end)
        self._gram_of, self._order_of = self._gram_of.astype(np.int32), self._order_of.astype(np.int8)  # memory

    def _candidate_grams(self, candidates: Sequence[Sequence[Token]]) -> tuple[np.ndarray, ...]:
        """Each candidate's distinct n-grams in Counter order: (candidate, order, number or -1, weight).

        Words the references never use get numbers past theirs, so n-grams are told apart by
        their words (``identity``) whether or not some reference holds them (``number``).
        """
        words = len(self._words)
        flat = [t for candidate in candidates for t in candidate]
        ids = np.fromiter((self._words.get(t, -1) for t in flat), dtype=np.int64, count=len(flat))
        unknown: dict[Token, int] = {}
        for i in np.flatnonzero(ids < 0).tolist():
            ids[i] = words + unknown.setdefault(flat[i], len(unknown))
        span = max(1, words + len(unknown))
        lengths = np.array([len(candidate) for candidate in candidates], dtype=np.int64)
        owners, left = _places(lengths)
        identity, number = ids, np.where(ids < words, ids, -1)
        columns = [(owners, np.zeros_like(ids), identity, number)]
        offset, starts = span, self._starts
        for n, level in enumerate(self._levels, start=2):
            at = np.flatnonzero(left >= n)
            last = ids[at + n - 1]
            kinds, _, _, inverse = _unique(identity[at] * span + last, inverse=True)
            identity = np.full(len(ids), -1, dtype=np.int64)
            identity[at] = inverse
            keys = number[at] * max(1, words) + last
            order = np.argsort(keys)  # sorted queries search a large level several times faster
            found = np.empty_like(keys)
            found[order] = np.minimum(np.searchsorted(level, keys[order]), max(0, len(level) - 1))
            known = (number[at] >= 0) & (last < words) & (len(level) > 0)  # no reference is n words long
            if len(level):
                known &= level[found] == keys
            number = np.full(len(ids), -1, dtype=np.int64)
            number[at] = np.where(known, found, -1)
            columns.append((owners[at], np.full(len(at), n - 1), inverse + offset,
                            np.where(known, found + starts[n - 1], -1)))
            offset += len(kinds)
        owner, order, kind, gram = (np.concatenate(column) for column in zip(*columns, strict=True))
        pick, tf = _first_occurrences(owner, kind, offset)
        gram = gram[pick]
        frequency = np.where(gram >= 0, self._frequency[np.maximum(gram, 0)], 0)
        return owner[pick], order[pick], gram, tf * self._idf[frequency]

    def score(self, candidate: Sequence[Token], image: int) -> float:
        """CIDEr-D of one tokenized candidate for image index ``image`` (unscaled, like 0.55)."""
        return self.mean_scores([candidate], [image])[0]

    def mean_score(self, candidate: Sequence[Token], images: Sequence[int]) -> float:
        """The mean of :meth:`score` over ``images``."""
        return self.mean_scores([candidate], images)[0]

    def mean_scores(self, candidates: Sequence[Sequence[Token]], images: Sequence[int]) -> list[float]:
        """Each candidate's mean CIDEr-D over ``images``, all candidates in one pass."""
        if not candidates:
            return []
        count = len(candidates)
        if any(not isinstance(i, int | np.integer) or isinstance(i, bool) or not 0 <= i < len(self._image_refs) - 1
               for i in images):
            raise IndexError(f"image indices must be whole numbers in [0, {len(self._image_refs) - 1}), got {images}")
        owner, order, gram, weight = self._candidate_grams(candidates)
        norms = np.sqrt(np.bincount(owner * MAX_N + order, weights=weight * weight,
                                    minlength=count * MAX_N)).reshape(count, MAX_N)
        lengths = np.array([max(len(c) - 1, 0) for c in candidates])
        chosen = np.array(images, dtype=np.int64)
        refs = _ranges(self._image_refs[chosen], self._image_refs[chosen + 1])
        pairs = _ranges(self._ref_pairs[refs], self._ref_pairs[refs + 1])
        local = np.repeat(np.arange(len(refs)), self._ref_pairs[refs + 1] - self._ref_pairs[refs])  # pair -> refs
        dots = self._shared_terms(owner, gram, weight, pairs, local, len(refs), count)
        denominators = norms[:, None, :] * self._ref_norms[refs][None, :, :]
        dots = np.divide(dots, denominators, out=dots, where=denominators != 0)
        gaps = np.abs(lengths[:, None] - self._ref_lengths[refs][None, :])
        distinct, inverse = np.unique(gaps, return_inverse=True)
        penalties = np.array([math.exp(-(int(g) ** 2) / (2 * SIGMA**2)) for g in distinct])[inverse.reshape(gaps.shape)]
        terms = dots * penalties[:, :, None]
        totals = terms[:, :, 0]
        for n in range(1, MAX_N):
            totals = totals + terms[:, :, n]
        similarity = (totals / MAX_N).tolist()
        bounds = np.cumsum([0] + [int(self._image_refs[i + 1] - self._image_refs[i]) for i in images]).tolist()
        spans = list(itertools.pairwise(bounds))  # each image's refs, in order
        return [_added(10.0 * _added(row[a:b]) / (b - a) for a, b in spans) / len(images) for row in similarity]

    def _shared_terms(self, owner: np.ndarray, gram: np.ndarray, weight: np.ndarray, pairs: np.ndarray,
                      local: np.ndarray, refs: int, count: int) -> np.ndarray:
        """(candidates, refs, orders) clipped dot products, each added in the candidate's n-gram order."""
        known = np.flatnonzero(gram >= 0)
        shared, _, _, inverse = _unique(gram[known], inverse=True)
        if not len(pairs) or not len(shared):
            return np.zeros((count, refs, MAX_N))
        holders = np.full((len(shared), count), -1, dtype=np.int64)  # n-gram, candidate -> its place, or -1
        holders[inverse, owner[known]] = known
        ref_grams = self._gram_of[pairs]  # sorted within each reference, which speeds the search
        at = np.minimum(np.searchsorted(shared, ref_grams), len(shared) - 1)
        hit = np.flatnonzero(shared[at] == ref_grams)
        hit_row, candidate = np.nonzero(holders[at[hit]] >= 0)
        place = holders[at[hit[hit_row]], candidate]  # the candidate n-gram each shared pair matches
        pair, ref = pairs[hit[hit_row]], local[hit[hit_row]]
        r = self._weight[pair]
        terms = np.minimum(weight[place], r) * r
        cells = (candidate * refs + ref) * MAX_N + self._order_of[pair]
        ordered = np.lexsort((place, cells))
        dots = np.bincount(cells[ordered], weights=terms[ordered], minlength=count * refs * MAX_N)
        return dots.astype(np.float64, copy=False).reshape(count, refs, MAX_N)


def _places(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each token of sequences laid end to end: its sequence, and the tokens left from it to that sequence's end."""
    sequence = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return sequence, lengths[sequence] - position


def _first_occurrences(sequence: np.ndarray, gram: np.ndarray, grams: int) -> tuple[np.ndarray, np.ndarray]:
    """Each sequence's distinct n-grams as (index of the first occurrence, count), in Counter's order."""
    unique, first, count = _unique(sequence * grams + gram)
    keep = _counter_order(unique // grams, first)
    return first[keep], count[keep]


def _counter_order(sequence: np.ndarray, first: np.ndarray) -> np.ndarray:
    """The order :func:`ngram_counts` meets distinct n-grams in: by sequence, then first occurrence.

    Occurrences come order by order, each in place order, sequences ascending within an
    order; so within a sequence, the first occurrence's index orders by order, then place.
    """
    return np.argsort(sequence * (int(first.max(initial=0)) + 1) + first)


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The integers of [starts[i], ends[i]) for each i, laid end to end."""
    sizes = ends - starts
    return np.repeat(starts - np.cumsum(sizes) + sizes, sizes) + np.arange(int(sizes.sum()))


def _unique(keys: np.ndarray, *, inverse: bool = False) -> tuple[np.ndarray, ...]:
    """np.unique's (values, first index, counts[, inverse]) from one stable argsort.

    Several times faster than np.unique with indices on a million keys, which is most of
    building the reference side.
    """
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.ones(len(keys), dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    at = np.flatnonzero(starts)
    counts = np.diff(at, append=len(keys))
    if not inverse:
        return ordered[at], order[at], counts
    places = np.empty(len(keys), dtype=np.int64)
    places[order] = np.cumsum(starts) - 1
    return ordered[at], order[at], counts, places


def _added(values: Iterable[float]) -> float:
    """Floats added one after the other, as on every Python (3.12's sum() compensates)."""
    total = 0.0
    for value in values:
        total += value
    return total
