"""Decoding options and the one function that turns encoder grids into typed captions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from captioner.processors import ConceptBoost, LogitProcessor, MinLength, NoRepeatNGram, SuppressTokens
from captioner.search import BeamSearch, Greedy, Hypothesis, LengthRanker, Sampling, SearchStrategy, StepDecoder, search
from captioner.vocab import Vocabulary

METHODS = ("beam", "greedy", "sample")


@dataclass(frozen=True)
class DecodingOptions:
    """How captions are searched; change fields with ``dataclasses.replace``."""

    method: str = "beam"  # "beam", "greedy" or "sample"
    beam_size: int = 3  # live hypotheses per image (beam only)
    max_length: int = 20  # tokens at most, counting <end>
    min_length: int = 0  # words at least before <end> may be emitted
    length_penalty: float = 0.0  # alpha: rank by sum log-prob / length**alpha
    no_repeat_ngram: int = 0  # forbid repeating n-grams of this size (0: off)
    suppress_unk: bool = True  # never emit <unk>
    n_best: int = 1  # hypotheses returned per image (<= beam_size; samples drawn for "sample")
    temperature: float = 1.0  # sampling temperature
    top_k: int = 0  # sample among the k most likely tokens (0: all)
    top_p: float = 1.0  # nucleus sampling mass (1.0: off)
    seed: int | None = None  # sampling seed, for reproducible samples
    concept_boost: float = 0.0  # log-prob bonus per unit of classifier evidence for a word (0: off)
    concept_threshold: float = 0.5  # classifier evidence a word needs before it is boosted

    def __post_init__(self) -> None:
        checks = {
            "method": (self.method in METHODS, f"one of {METHODS}"),
            "beam_size": (self.beam_size >= 1, ">= 1"),
            "max_length": (self.max_length >= 1, ">= 1"),
            "min_length": (0 <= self.min_length < self.max_length, ">= 0 and < max_length"),
            "no_repeat_ngram": (self.no_repeat_ngram >= 0, ">= 0"),
            "n_best": (
                self.n_best >= 1 and (self.method != "beam" or self.n_best <= self.beam_size),
                ">= 1 and <= beam_size",
            ),
            "temperature": (self.temperature > 0, "> 0"),
            "top_k": (self.top_k >= 0, ">= 0"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "concept_boost": (self.concept_boost >= 0, ">= 0"),
            "concept_threshold": (0 < self.concept_threshold <= 1, "in (0, 1]"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                raise ValueError(f"decoding option {name}={getattr(self, name)!r} must be {rule}")


@dataclass(frozen=True)
class Caption:
    """A generated caption with its confidence."""

    text: str  # words joined by spaces
    tokens: tuple[str, ...]  # the words
    score: float  # mean log-probability per emitted token (including <end>)
    min_prob: float  # probability of the least likely token
    finished: bool = True  # False when the length limit cut the caption


def make_strategy(options: DecodingOptions, batch_size: int, end_id: int) -> SearchStrategy:
    if options.method == "beam":
        return BeamSearch(batch_size, options.beam_size, end_id)
    if options.method == "greedy":
        return Greedy(batch_size, 1, end_id)
    generator = None
    if options.seed is not None:
        generator = torch.Generator().manual_seed(options.seed)
    return Sampling(batch_size, options.n_best, end_id, options.temperature, options.top_k, options.top_p, generator)


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


def to_caption(hyp: Hypothesis, vocab: Vocabulary) -> Caption:
    words = tuple(vocab.itos[i] for i in hyp.tokens if i >= 4)
    return Caption(" ".join(words), words, hyp.mean_logprob, hyp.min_prob, hyp.finished)


def decode_grid(
    decoder: StepDecoder,
    grid: torch.Tensor,
    vocab: Vocabulary,
    options: DecodingOptions,
    evidence: torch.Tensor | None = None,
) -> list[list[Caption]]:
    """Encoder grids (B, C, h, w) -> the ``n_best`` captions of each image, best first.

    ``evidence`` (B, V) is per-image classifier evidence for words; with
    ``options.concept_boost`` > 0 it is turned into a log-prob bonus.
    """
    strategy = make_strategy(options, grid.shape[0], vocab.end)
    bias = None
    if evidence is not None and options.concept_boost > 0:
        bias = (options.concept_boost * evidence.float().cpu()).repeat_interleave(strategy.width, dim=0)
    processors = make_processors(options, vocab, bias)
    hyps = search(decoder, grid, strategy, processors, start_id=vocab.start, max_length=options.max_length)
    ranker = LengthRanker(options.length_penalty)
    return [[to_caption(h, vocab) for h in ranker.rank(per_image)[: options.n_best]] for per_image in hyps]
