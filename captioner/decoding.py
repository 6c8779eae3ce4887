"""The one function that turns encoder grids into typed captions (options: :mod:`captioner.options`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from captioner.options import DecodingOptions
from captioner.processors import ConceptBoost, LogitProcessor, MinLength, NoRepeatNGram, SuppressTokens
from captioner.search import BeamSearch, Greedy, Hypothesis, LengthRanker, Sampling, SearchStrategy, StepDecoder, search
from captioner.vocab import Vocabulary


@dataclass(frozen=True)
class Caption:
    """A generated caption with the model's confidence in it.

    ``score`` and ``min_prob`` are the decoder's own probabilities of the words it emitted,
    whatever token rules steered the search (a concept boost, no-repeat, min-length): a
    boosted word does not look more certain than the model thinks it is. The order of
    n-best captions starts from ``search_score``, the search's own ranking key, so the
    rules' choices are not undone at the end; it need not follow ``score``. Consensus
    reranking (:func:`rerank`) then adds agreement with similar training photos' captions.
    """

    text: str  # words joined by spaces
    tokens: tuple[str, ...]  # the words
    score: float  # the model's mean log-probability per emitted token (including <end>)
    min_prob: float  # the model's probability of the least likely token
    finished: bool = True  # False when the length limit cut the caption
    confidence: float | None = None  # estimated probability the caption is acceptable (a calibrated model's)
    search_score: float = 0.0  # search log-probability sum (boosts included) / length**length_penalty


def make_strategy(options: DecodingOptions, batch_size: int, end_id: int) -> SearchStrategy:
    if options.method == "beam":
        return BeamSearch(batch_size, options.beam_size, end_id)
    if options.method == "greedy":
        return Greedy(batch_size, 1, end_id)
    generators = None
    if options.seed is not None:  # the same stream for every image: a seed gives an image the same samples anywhere
        generators = [torch.Generator().manual_seed(options.seed) for _ in range(batch_size)]
    return Sampling(batch_size, options.n_best, end_id, options.temperature, options.top_k, options.top_p,
                    generators)


def make_processors(
    options: DecodingOptions, vocab: Vocabulary, concept_bias: torch.Tensor | None = None
) -> list[LogitProcessor]:
    """Token rules for one search; ``concept_bias`` (N, V) comes from :mod:`captioner.concepts`."""
    suppressed = [vocab.pad, vocab.start] + ([vocab.unk] if options.suppress_unk else [])
    processors: list[LogitProcessor] = [SuppressTokens(suppressed)]
    if concept_bias is not None:
        processors.append(ConceptBoost(concept_bias))
    if options.min_length:
        processors.append(MinLength(options.min_length, vocab.end))
    if options.no_repeat_ngram:
        processors.append(NoRepeatNGram(options.no_repeat_ngram))
    return processors


def to_caption(hyp: Hypothesis, vocab: Vocabulary, ranker: LengthRanker) -> Caption:
    """A hypothesis as words, scored with the model's own log-probabilities and ranked by the search's."""
    words = tuple(vocab.words(hyp.tokens))
    return Caption(" ".join(words), words, hyp.mean_logprob, hyp.min_prob, hyp.finished,
                   search_score=ranker.score(hyp))


# Hypotheses searched at once at most. It bounds memory whatever the batch size and beam (a
# hostile `--beam-size 64 --max-length 100 --batch-size 1024` needs about 80 MB per image);
# a larger batch is searched in parts, with the same captions (seeded sampling draws from a
# stream per image).
MAX_SEARCH_ROWS = 2048


def search_width(options: DecodingOptions) -> int:
    """Hypotheses kept per image by the options' strategy."""
    return {"beam": options.beam_size, "greedy": 1}.get(options.method, options.n_best)


def decode_grid(
    decoder: StepDecoder,
    grid: torch.Tensor,
    vocab: Vocabulary,
    options: DecodingOptions,
    evidence: torch.Tensor | None = None,
    *,
    stop: Callable[[], bool] | None = None,
) -> list[list[Caption]]:
    """Encoder grids (B, C, h, w) -> the ``n_best`` captions of each image, best first.

    ``evidence`` (B, V) is per-image classifier evidence for words; with
    ``options.concept_boost`` > 0 it is turned into a log-prob bonus. ``stop``: see
    :func:`captioner.search.search`.
    """
    part = max(1, MAX_SEARCH_ROWS // search_width(options))
    if grid.shape[0] > part:
        return [captions for start in range(0, grid.shape[0], part)
                for captions in decode_grid(decoder, grid[start : start + part], vocab, options,
                                            None if evidence is None else evidence[start : start + part], stop=stop)]
    strategy = make_strategy(options, grid.shape[0], vocab.end)
    bias = None
    if evidence is not None and options.concept_boost > 0:
        bias = (options.concept_boost * evidence.float().cpu()).repeat_interleave(strategy.width, dim=0)
    processors = make_processors(options, vocab, bias)
    hyps = search(decoder, grid, strategy, processors, start_id=vocab.start, max_length=options.max_length,
                  stop=stop)
    ranker = LengthRanker(options.length_penalty)
    return [[to_caption(h, vocab, ranker) for h in ranker.rank(per_image)[: options.n_best]] for per_image in hyps]


def rerank(captions: list[list[Caption]], agreement: list[list[float]], weight: float,
           n_best: int) -> tuple[list[list[Caption]], list[list[float]]]:
    """Each image's captions ordered by search score + ``weight`` x agreement, the first ``n_best`` kept.

    Consensus reranking (Devlin et al. 2015): among the fluent captions a beam finds, the one
    closest to what people wrote about the most similar training photos is more often right
    than the one the decoder alone likes best. It starts from the search's ranking key, so a
    concept boost and the length penalty keep their say. ``agreement`` is each caption's
    consensus CIDEr-D (:mod:`captioner.consensus`), returned in the new order beside the captions.
    """
    ranked = []
    for n, a in zip(captions, agreement, strict=True):
        pairs = sorted(zip(n, a, strict=True), key=lambda pair: pair[0].search_score + weight * pair[1], reverse=True)
        ranked.append(pairs[:n_best])
    return [[c for c, _ in pairs] for pairs in ranked], [[a for _, a in pairs] for pairs in ranked]
