"""CIDEr-D on token sequences, fast enough to be a per-sample training reward.

Reported scores always go through pycocoevalcap (:mod:`captioner.metrics`). Self-critical
training needs thousands of CIDEr-D values per minute against document frequencies of the
whole training corpus, so this module keeps coco-caption's formula (clipped tf-idf n-gram
vectors, Gaussian length penalty with sigma 6, x10) with the reference side precomputed.
A test checks it equals pycocoevalcap's ``Cider`` on the same tokens.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Hashable, Sequence

Token = Hashable
NGramVector = tuple[list[dict[tuple, float]], list[float], int]  # per-n vectors, per-n norms, length

MAX_N = 4
SIGMA = 6.0


def ngram_counts(tokens: Sequence[Token], max_n: int = MAX_N) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


class CiderD:
    """CIDEr-D of candidates against fixed reference sets, with corpus document frequencies."""

    def __init__(self, references: Sequence[Sequence[Sequence[Token]]]):
        """``references[i]`` is the list of tokenized reference captions of image ``i``."""
        frequency: Counter = Counter()
        for refs in references:
            frequency.update({g for ref in refs for g in ngram_counts(ref)})
        self._start(frequency, len(references), references)

    @classmethod
    def from_frequencies(cls, document_frequency: Counter, images: int,
                         references: Sequence[Sequence[Sequence[Token]]]) -> "CiderD":
        """A scorer whose document frequencies were counted before (over ``images`` images), e.g. stored."""
        scorer = cls.__new__(cls)
        scorer._start(document_frequency, images, references)
        return scorer

    def _start(self, frequency: Counter, images: int, references: Sequence[Sequence[Sequence[Token]]]) -> None:
        self.document_frequency = frequency
        self.log_images = math.log(float(images))
        self._references = references
        self._refs: dict[int, _ReferenceIndex] = {}  # per image, made when it is first scored

    def _vector(self, counts: Counter) -> NGramVector:
        vec: list[dict[tuple, float]] = [defaultdict(float) for _ in range(MAX_N)]
        norm = [0.0] * MAX_N
        length = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            weight = tf * (self.log_images - math.log(max(1.0, self.document_frequency[gram])))
            vec[n][gram] = weight
            norm[n] += weight * weight
            if n == 1:  # coco-caption measures length in bigrams
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, candidate: Sequence[Token], image: int) -> float:
        """CIDEr-D of one tokenized candidate for image index ``image`` (unscaled, like 0.55)."""
        return self.mean_score(candidate, [image])

    def mean_score(self, candidate: Sequence[Token], images: Sequence[int]) -> float:
        """The mean of :meth:`score` over ``images``, with the candidate's vector built once."""
        hyp = self._vector(ngram_counts(candidate))
        return sum(self._image_score(hyp, image) for image in images) / len(images)

    def _image_score(self, hyp: NGramVector, image: int) -> float:
        index = self._refs.get(image)
        if index is None:
            vectors = [self._vector(ngram_counts(r)) for r in self._references[image]]
            index = self._refs[image] = _ReferenceIndex(vectors)
        return 10.0 * sum(index.similarities(hyp)) / len(index.norms)


class _ReferenceIndex:
    """One image's reference vectors as an inverted index: n-gram -> (reference, weight) pairs.

    A candidate's similarity to each reference (coco-caption's clipped tf-idf dot product,
    normalized, times the Gaussian length penalty, averaged over n) needs only the n-grams
    the two share. Looking each candidate n-gram up once per image, rather than once per
    reference, makes scoring several candidates against the same neighbours (consensus
    reranking) several times cheaper. Each dot product still sums the same terms in the
    candidate's n-gram order with ``sum()``, so scores are the same floats as before.
    """

    def __init__(self, references: list[NGramVector]):
        self.postings: list[dict[tuple, list[tuple[int, float]]]] = [{} for _ in range(MAX_N)]
        for j, (vectors, _, _) in enumerate(references):
            for n in range(MAX_N):
                for gram, weight in vectors[n].items():
                    self.postings[n].setdefault(gram, []).append((j, weight))
        self.norms = [norms for _, norms, _ in references]
        self.lengths = [length for _, _, length in references]

    def similarities(self, hyp: NGramVector) -> list[float]:
        """The candidate's similarity to each reference, in reference order."""
        vh, nh, lh = hyp
        totals = [0.0] * len(self.norms)
        penalties = [math.exp(-((lh - lr) ** 2) / (2 * SIGMA**2)) for lr in self.lengths]
        for n in range(MAX_N):
            terms: dict[int, list[float]] = {}  # per reference sharing an n-gram: its terms, in candidate order
            postings = self.postings[n]
            for gram, w in vh[n].items():
                for j, r in postings.get(gram, ()):
                    if j in terms:
                        terms[j].append(min(w, r) * r)
                    else:
                        terms[j] = [min(w, r) * r]
            for j, shared in terms.items():  # a reference sharing nothing adds 0.0, as before
                dot = sum(shared)  # sum() as before: Python 3.12's sum of floats is compensated, += is not
                nr = self.norms[j][n]
                if nh[n] and nr:
                    dot /= nh[n] * nr
                totals[j] += dot * penalties[j]
        return [total / MAX_N for total in totals]
