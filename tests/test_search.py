"""Beam search, greedy and sampling against a scripted decoder with hand-written probabilities."""

import math

import pytest
import torch

from captioner.decoding import DecodingOptions, decode_grid
from captioner.errors import CaptionerError
from captioner.processors import ConceptBoost, MinLength, NoRepeatNGram, SuppressTokens
from captioner.search import BeamSearch, Greedy, LengthRanker, Sampling, search
from captioner.vocab import Vocabulary

# Vocabulary ids: 0 <pad> 1 <start> 2 <end> 3 <unk> 4 a 5 b 6 c
VOCAB = Vocabulary(["a", "b", "c"])
END = VOCAB.end


class ScriptedDecoder:
    """Next-token probabilities depend only on the prefix emitted so far (the state holds it).

    ``table`` maps a prefix tuple (after <start>) to a dict token -> probability; missing
    tokens share what is left. The grid's first value selects one of several tables, so one
    batch can mix images with different scripts.
    """

    def __init__(self, tables, default=None):
        self.tables = tables
        self.default = default or {END: 1.0}  # for prefixes a table does not list

    def start(self, grid, width=1):
        # state, per hypothesis: (image index (N, 1), emitted prefix padded with -1 (N, 32))
        n = grid.shape[0] * width
        return (grid[:, :1].long().repeat_interleave(width, dim=0), torch.full((n, 32), -1, dtype=torch.long))

    def step(self, tokens, state):
        which, prefix = state
        prefix = prefix.clone()
        out = torch.empty(tokens.shape[0], len(VOCAB))
        for row in range(tokens.shape[0]):
            seq = [t for t in prefix[row].tolist() if t >= 0]
            if tokens[row] != VOCAB.start:
                seq.append(int(tokens[row]))
                prefix[row, len(seq) - 1] = int(tokens[row])
            probs = self.tables[int(which[row])].get(tuple(seq), self.default)
            rest = (1.0 - sum(probs.values())) / max(1, len(VOCAB) - len(probs))
            out[row] = torch.tensor([probs.get(t, rest) for t in range(len(VOCAB))])
        return out.clamp_min(1e-12).log(), (which, prefix)


A, B, C = 4, 5, 6
# Greedy takes "a" (0.5) then <end> (0.4 of the rest): "a" with p=0.5*0.4=0.20.
# Beam sees "b c <end>" = 0.4*0.9*0.9 = 0.324, the better caption.
TABLE = {
    (): {A: 0.5, B: 0.4, C: 0.1 - 4e-9},
    (A,): {END: 0.4, A: 0.3, B: 0.3 - 4e-9},
    (A, A): {END: 1.0 - 6e-9},
    (A, B): {END: 1.0 - 6e-9},
    (B,): {C: 0.9, END: 0.1 - 5e-9},
    (B, C): {END: 0.9, A: 0.1 - 5e-9},
    (C,): {END: 1.0 - 6e-9},
}


def grid_for(*which):
    return torch.tensor([[float(w)] for w in which])


def run(strategy, processors=(), tables=(TABLE,), which=(0,), max_length=10, default=None):
    return search(ScriptedDecoder(list(tables), default), grid_for(*which), strategy, list(processors),
                  start_id=VOCAB.start, max_length=max_length)


def test_greedy_takes_the_locally_best_token():
    (hyps,) = run(Greedy(1, 1, END))
    assert [h.tokens for h in hyps] == [(A, END)]
    assert hyps[0].sum_logprob == pytest.approx(math.log(0.5 * 0.4))


def test_beam_finds_the_globally_better_caption_with_exact_scores():
    (hyps,) = run(BeamSearch(1, 2, END))
    ranked = LengthRanker(0.0).rank(hyps)
    assert [h.tokens for h in ranked] == [(B, C, END), (A, END)]
    assert ranked[0].sum_logprob == pytest.approx(math.log(0.4 * 0.9 * 0.9))
    assert ranked[0].logprobs == pytest.approx((math.log(0.4), math.log(0.9), math.log(0.9)))
    assert ranked[0].min_prob == pytest.approx(0.4)
    assert ranked[1].sum_logprob == pytest.approx(math.log(0.5 * 0.4))


def test_length_penalty_changes_the_ranking():
    (hyps,) = run(BeamSearch(1, 3, END))
    # mean log-prob: "a <end>" = log(0.2)/2 = -0.80; "b c <end>" = log(0.324)/3 = -0.38; "a a <end>" ~ log(.15)/3
    best_mean = LengthRanker(1.0).rank(hyps)[0]
    assert best_mean.tokens == (B, C, END)
    short_table = {(): {A: 0.6, B: 0.4 - 1e-9}, (A,): {END: 0.5, C: 0.5 - 1e-9}, (B,): {END: 1 - 1e-9},
                   (A, C): {END: 1 - 1e-9}}
    (hyps,) = run(BeamSearch(1, 2, END), tables=(short_table,))
    by_sum = LengthRanker(0.0).rank(hyps)[0]  # "a <end>" 0.30 and "b <end>" 0.40 vs "a c <end>" 0.30
    assert by_sum.tokens == (B, END)


def test_min_length_blocks_early_end():
    (hyps,) = run(Greedy(1, 1, END), [MinLength(2, END)])
    assert hyps[0].tokens[:-1].__len__() >= 2
    assert hyps[0].tokens == (A, A, END)  # "a" then, <end> forbidden, "a" (0.3) beats "b" (0.3-4e-9)


def test_suppress_tokens_never_emits_them():
    (hyps,) = run(Greedy(1, 1, END), [SuppressTokens([A])])
    assert A not in hyps[0].tokens
    assert hyps[0].tokens == (B, C, END)


def test_no_repeat_ngram_blocks_repeats():
    loop = {(): {A: 0.9}, (A,): {A: 0.9}, (A, A): {A: 0.9}, (A, A, A): {A: 0.9}}
    (plain,) = run(Greedy(1, 1, END), tables=(loop,), max_length=4)
    assert plain[0].tokens == (A, A, A, A)
    (blocked,) = run(Greedy(1, 1, END), [NoRepeatNGram(1)], tables=(loop,), max_length=4)
    assert blocked[0].tokens.count(A) == 1


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_bans_exactly_the_tokens_that_would_repeat_an_ngram(n):
    """Against the rule spelled out one row at a time, on sequences with many repeats."""
    tokens = torch.randint(0, 4, (64, 9), generator=torch.Generator().manual_seed(n))
    banned = torch.isneginf(NoRepeatNGram(n)(torch.zeros(64, 6), tokens))
    for row, seq in enumerate(tokens.tolist()):
        prefix = seq[len(seq) - n + 1 :] if n > 1 else []
        expected = {seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i : i + n - 1] == prefix}
        assert set(torch.nonzero(banned[row]).flatten().tolist()) == expected
    assert banned.any(dim=1).float().mean() > 0.25  # the check above was not vacuous
    short = tokens[:, : n - 1]
    assert not torch.isneginf(NoRepeatNGram(n)(torch.zeros(64, 6), short)).any()  # no complete n-gram yet


def test_always_returns_a_hypothesis_when_nothing_ends():
    never_end = {A: 0.9, END: 0.0}
    (hyps,) = run(BeamSearch(1, 2, END), tables=({},), max_length=3, default=never_end)
    assert hyps, "beam search must never return nothing"
    assert all(not h.finished for h in hyps)
    assert hyps[0].tokens == (A, A, A)


def test_batched_beam_equals_each_image_alone():
    other = {(): {C: 0.7, B: 0.3 - 1e-9}, (C,): {A: 0.6, END: 0.4 - 1e-9}, (C, A): {END: 1 - 1e-9}}
    tables = (TABLE, other)
    batched = run(BeamSearch(3, 3, END), tables=tables, which=(0, 1, 0))
    alone = [run(BeamSearch(1, 3, END), tables=tables, which=(w,))[0] for w in (0, 1, 0)]
    for got, want in zip(batched, alone, strict=True):
        assert [(h.tokens, pytest.approx(h.logprobs)) for h in got] == [(h.tokens, h.logprobs) for h in want]


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k():
    def sample(seed, top_k=0):
        gen = torch.Generator().manual_seed(seed)
        return run(Sampling(1, 8, END, 1.0, top_k, 1.0, [gen]))[0]

    assert [h.tokens for h in sample(7)] == [h.tokens for h in sample(7)]
    first_tokens = {h.tokens[0] for h in sample(3, top_k=1)}
    assert first_tokens == {A}


def test_top_p_keeps_the_nucleus_only():
    gen = torch.Generator().manual_seed(0)
    (hyps,) = run(Sampling(1, 16, END, 1.0, 0, 0.45, [gen]))  # "a" alone holds 0.5 > 0.45
    assert {h.tokens[0] for h in hyps} == {A}
    (hyps,) = run(Sampling(1, 64, END, 1.0, 0, 0.85, [gen]))  # "a" + "b" hold 0.9; "c" is cut
    assert {h.tokens[0] for h in hyps} == {A, B}


@pytest.mark.parametrize("temperature, top_p", [(1e-300, 1.0), (1e-40, 1.0), (1.0, 1e-300), (1.0, 1e-50)])
def test_sampling_at_a_vanishing_temperature_or_nucleus_is_greedy_not_an_error(temperature, top_p):
    gen = torch.Generator().manual_seed(0)
    (sampled,) = run(Sampling(1, 8, END, temperature, 0, top_p, [gen]))
    (greedy,) = run(Greedy(1, 1, END))
    assert {h.tokens for h in sampled} == {greedy[0].tokens}


def test_decode_grid_returns_n_best_captions_with_scores():
    options = DecodingOptions(beam_size=2, n_best=2)
    (captions,) = decode_grid(ScriptedDecoder([TABLE]), grid_for(0), VOCAB, options)
    assert [c.text for c in captions] == ["b c", "a"]
    assert captions[0].score == pytest.approx(math.log(0.324) / 3)
    assert captions[0].min_prob == pytest.approx(0.4)


@pytest.mark.parametrize("bad", [dict(beam_size=0), dict(method="nope"), dict(top_p=0.0), dict(n_best=4)])
def test_bad_decoding_options_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        DecodingOptions(**bad)


def script_logprobs(tokens, table=TABLE):
    """The scripted decoder's own log-probability of each token, fed one by one (teacher forcing)."""
    decoder = ScriptedDecoder([table])
    state = decoder.start(grid_for(0))
    logprobs, previous = [], VOCAB.start
    for token in tokens:
        log_probs, state = decoder.step(torch.tensor([previous]), state)
        logprobs.append(float(log_probs[0, token]))
        previous = token
    return logprobs


BONUS = 5.0  # on "c": log(0.1) + 5 beats log(0.5), so every strategy now starts with "c"


def boost_c(rows):
    bias = torch.zeros(rows, len(VOCAB))
    bias[:, C] = BONUS
    return ConceptBoost(bias)


@pytest.mark.parametrize("make", [lambda: Greedy(1, 1, END), lambda: BeamSearch(1, 3, END),
                                  lambda: Sampling(1, 6, END, 1.0, 0, 1.0, [torch.Generator().manual_seed(0)])],
                         ids=["greedy", "beam", "sample"])
def test_hypotheses_record_the_models_log_probs_not_the_boosted_ones(make):
    strategy = make()
    (hyps,) = run(strategy, [boost_c(strategy.width)])
    assert C in LengthRanker(0.0).rank(hyps)[0].tokens  # the boost steered the search (unboosted: "a"/"b c")
    for hyp in hyps:
        assert hyp.logprobs == pytest.approx(script_logprobs(hyp.tokens), abs=1e-6)
        first_c = hyp.tokens.index(C) if C in hyp.tokens else -1  # the boost lasts until "c" is used
        boosted = [lp + (BONUS if i == first_c else 0.0) for i, lp in enumerate(hyp.logprobs)]
        assert hyp.search_logprobs == pytest.approx(boosted, abs=1e-5)


def test_caption_score_is_the_models_while_the_boost_decides_the_caption():
    options = DecodingOptions(beam_size=2, n_best=2, concept_boost=BONUS, concept_threshold=0.5)
    evidence = torch.zeros(1, len(VOCAB))
    evidence[0, C] = 1.0
    (captions,) = decode_grid(ScriptedDecoder([TABLE]), grid_for(0), VOCAB, options, evidence)
    assert captions[0].text == "c"  # ranked first by its boosted search score
    assert captions[0].score == pytest.approx(math.log(0.1) / 2, abs=1e-6)  # "c" 0.1, then <end> ~1.0
    assert captions[0].min_prob == pytest.approx(0.1)
    assert captions[1].text == "a" and captions[1].score > captions[0].score  # the model prefers "a"


class NaNDecoder(ScriptedDecoder):
    """Broken weights: log-probs turn NaN at the second step."""

    def step(self, tokens, state):
        log_probs, state = super().step(tokens, state)
        if int((state[1] >= 0).sum()):
            log_probs = torch.full_like(log_probs, math.nan)
        return log_probs, state


STRATEGIES = [lambda b: Greedy(b, 1, END), lambda b: BeamSearch(b, 3, END),
              lambda b: Sampling(b, 4, END, 1.0, 0, 1.0, [torch.Generator().manual_seed(0) for _ in range(b)])]


@pytest.mark.parametrize("make", STRATEGIES, ids=["greedy", "beam", "sample"])
def test_nan_log_probs_raise_a_captioner_error(make):
    with pytest.raises(CaptionerError, match="NaN log-probabilities; its weights are broken"):
        search(NaNDecoder([TABLE]), grid_for(0), make(1), [], start_id=VOCAB.start, max_length=10)


def ban_everything(log_probs, tokens):
    return torch.full_like(log_probs, -math.inf)


@pytest.mark.parametrize("make", STRATEGIES, ids=["greedy", "beam", "sample"])
def test_when_the_rules_forbid_every_token_the_caption_ends(make):
    hyps = run(make(2), [ban_everything], tables=(TABLE, TABLE), which=(0, 1))
    assert len(hyps) == 2
    for per_image in hyps:
        assert per_image and all(h.tokens == (END,) and h.finished for h in per_image)
        assert per_image[0].logprobs == pytest.approx(script_logprobs((END,)))


class ImpossibleDecoder(ScriptedDecoder):
    """Every token has probability 0 (log-prob -inf), which no softmax gives: broken weights."""

    def step(self, tokens, state):
        log_probs, state = super().step(tokens, state)
        return torch.full_like(log_probs, -math.inf), state


@pytest.mark.parametrize("make", STRATEGIES, ids=["greedy", "beam", "sample"])
def test_log_probs_that_allow_nothing_raise_a_captioner_error(make):
    with pytest.raises(CaptionerError, match="weights are broken"):
        search(ImpossibleDecoder([TABLE]), grid_for(0), make(1), [], start_id=VOCAB.start, max_length=3)


class NeverEndDecoder(ScriptedDecoder):
    """<end> has probability exactly 0: when the rules forbid everything else, nothing is left."""

    def step(self, tokens, state):
        log_probs, state = super().step(tokens, state)
        log_probs[:, END] = -math.inf
        return log_probs, state


@pytest.mark.parametrize("make", STRATEGIES, ids=["greedy", "beam", "sample"])
def test_every_image_gets_a_hypothesis_even_when_neither_rules_nor_model_allow_an_end(make):
    hyps = search(NeverEndDecoder([TABLE]), grid_for(0, 0), make(2), [ban_everything],
                  start_id=VOCAB.start, max_length=3)
    assert len(hyps) == 2
    for per_image in hyps:
        assert per_image and all(len(h.tokens) == 3 and not h.finished for h in per_image)
        assert all(math.isfinite(h.sum_logprob) for h in per_image)  # the model's own choices, not banned ones
