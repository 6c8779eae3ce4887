"""Decoding options, and decoding with the real shipped model: batching never changes a caption,
and a caption's score is the model's own."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLES, SHARED_SAMPLES

from captioner.api import caption_images
from captioner.decoding import Caption, rerank
from captioner.errors import OptionError
from captioner.options import METHODS, DecodingOptions

PHOTOS = [SHARED_SAMPLES / n for n in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")]


@pytest.fixture(scope="module")
def grids(default_model):
    from captioner.images import model_pixels

    size = default_model.encoder.preprocess.size
    pixels = torch.from_numpy(np.stack([model_pixels(p, size) for p in PHOTOS]))
    return default_model.encode(pixels)


@pytest.mark.parametrize("options", [DecodingOptions(beam_size=3), DecodingOptions(beam_size=5, length_penalty=1.0),
                                     DecodingOptions(method="greedy")])
def test_batched_search_equals_searching_each_image_alone(default_model, grids, options):
    batched = default_model.caption_grid(grids, options)
    alone = [default_model.caption_grid(grids[i : i + 1], options)[0] for i in range(len(PHOTOS))]
    assert [c[0].text for c in batched] == [c[0].text for c in alone]
    assert [c[0].score for c in batched] == pytest.approx([c[0].score for c in alone], abs=1e-4)


def test_n_best_is_ordered_and_scored(default_model, grids):
    options = DecodingOptions(beam_size=4, n_best=3, length_penalty=1.0)
    for n_best in default_model.caption_grid(grids, options):
        assert len(n_best) == 3
        assert len({c.text for c in n_best}) == 3
        scores = [c.score for c in n_best]  # length penalty 1.0 ranks by mean log-prob, which is the score
        assert scores == sorted(scores, reverse=True)
        assert all(0 < c.min_prob <= 1 and c.score < 0 for c in n_best)
        # no token rule changed a chosen word's log-prob, so the search's key is the model's mean
        assert [c.search_score for c in n_best] == pytest.approx(scores, abs=1e-5)


def test_rerank_orders_by_search_score_plus_weighted_agreement_and_keeps_n_best():
    def caption(text: str, search_score: float) -> Caption:
        return Caption(text, tuple(text.split()), -1.0, 0.5, search_score=search_score)

    captions = [[caption("a cat", -1.2), caption("a dog", -1.0), caption("a cow", -2.0)], [caption("a car", -0.5)]]
    agreement = [[0.5, 0.1, 2.0], [0.3]]
    ranked, agree = rerank(captions, agreement, 0.0, 3)  # the search's own order
    assert [c.text for c in ranked[0]] == ["a dog", "a cat", "a cow"] and agree[0] == [0.1, 0.5, 2.0]
    ranked, agree = rerank(captions, agreement, 1.0, 2)  # keys -0.7, -0.9, 0.0
    assert [[c.text for c in n] for n in ranked] == [["a cow", "a cat"], ["a car"]]
    assert agree == [[2.0, 0.5], [0.3]]


def test_consensus_reranking_reorders_the_whole_beam_by_agreement_with_similar_training_photos(default_model,
                                                                                                grids):
    weight = 2.0
    options = DecodingOptions(beam_size=5, n_best=5, length_penalty=1.0)
    plain = default_model.caption_grid(grids, options)
    reranked = default_model.caption_grid(grids, dataclasses.replace(options, consensus_weight=weight))
    agreement = default_model.consensus.scores(grids.float().mean(dim=(2, 3)), [[c.text for c in n] for n in reranked])
    for n_plain, n_new, agree in zip(plain, reranked, agreement, strict=True):
        assert sorted(c.text for c in n_new) == sorted(c.text for c in n_plain)  # the same beam, reordered
        keys = [c.search_score + weight * a for c, a in zip(n_new, agree, strict=True)]
        assert keys == sorted(keys, reverse=True)
    assert [n[0].text for n in plain] != [n[0].text for n in reranked]  # it changes some photo's best caption
    one = default_model.caption_grid(grids, dataclasses.replace(options, n_best=1, consensus_weight=weight))
    assert [n[0].text for n in one] == [n[0].text for n in reranked]  # n_best 1 still chooses from the whole beam


def test_confidence_of_a_reranked_caption_is_the_calibrators_reading_of_its_own_signals(default_model, grids):
    best = default_model.caption_grid(grids, DecodingOptions(beam_size=5, consensus_weight=1.0))
    probs = default_model.encoder.classify(grids)
    rows = default_model.confidence_signals(grids, best, probs, default_model.calibrator.features,
                                            default_model.consensus)
    expected = [round(float(default_model.calibrator.confidence(row)[0]), 4) for row in rows]
    assert [n[0].confidence for n in best] == pytest.approx(expected, abs=1e-4)


def test_a_model_without_consensus_data_keeps_the_searchs_order(small_model, grids):
    assert small_model.consensus is None
    options = DecodingOptions(beam_size=2, n_best=2, max_length=6)
    plain = small_model.caption_grid(grids, options)
    assert small_model.caption_grid(grids, dataclasses.replace(options, consensus_weight=5.0)) == plain


def test_sampling_with_a_seed_is_reproducible(default_model):
    options = DecodingOptions(method="sample", seed=3, temperature=0.8, top_p=0.9)
    first = caption_images(default_model, PHOTOS[:2], options=options)
    second = caption_images(default_model, PHOTOS[:2], options=options)
    assert [c.text for c in first] == [c.text for c in second]


def test_unk_is_suppressed_and_max_length_holds(default_model, grids):
    for (caption,) in default_model.caption_grid(grids, DecodingOptions(max_length=5)):
        assert "<unk>" not in caption.tokens and len(caption.tokens) <= 5


def teacher_forced_logprobs(model, grid, caption):
    """The decoder's log-probability of each of the caption's tokens (and its <end>), fed one by one."""
    vocab = model.vocab
    ids = [vocab.stoi[w] for w in caption.tokens] + ([vocab.end] if caption.finished else [])
    logprobs, previous = [], vocab.start
    with torch.inference_mode():
        state = model.decoder.start(grid)
        for token in ids:
            log_probs, state = model.decoder.step(torch.tensor([previous], device=grid.device), state)
            logprobs.append(float(log_probs[0, token]))
            previous = token
    return logprobs


def test_score_is_the_teacher_forced_log_probability_with_the_default_options(default_model, grids):
    """Concept boost 4, beam 5, no-repeat 2 and consensus reranking steer the search; the score stays the model's own.

    On the cat photo the boost swaps "small white dog" for "cat": the model's own score of
    the cat caption is -1.145 (least likely word 0.014), below the unboosted caption's -0.750.
    """
    options = default_model.config.decoding
    assert options.concept_boost > 0 and options.beam_size == 5 and options.consensus_weight > 0
    captions = default_model.caption_grid(grids, options)
    for i, (caption,) in enumerate(captions):
        logprobs = teacher_forced_logprobs(default_model, grids[i : i + 1], caption)
        assert caption.score == pytest.approx(sum(logprobs) / len(logprobs), abs=1e-4), PHOTOS[i].name
        assert caption.min_prob == pytest.approx(math.exp(min(logprobs)), rel=1e-3), PHOTOS[i].name
    cat = captions[0][0]
    assert "cat" in cat.tokens and cat.score == pytest.approx(-1.145, abs=0.01)


# --- options: types and bounds -------------------------------------------------------------------------

BAD_OPTIONS = [
    ("method", "nope"), ("method", 3),
    ("beam_size", 0), ("beam_size", 65), ("beam_size", 10000), ("beam_size", True), ("beam_size", "5"),
    ("beam_size", 3.0), ("beam_size", None),
    ("max_length", 0), ("max_length", 101),
    ("min_length", -1), ("min_length", 20),  # not below max_length (20)
    ("length_penalty", math.nan), ("length_penalty", math.inf), ("length_penalty", -0.1), ("length_penalty", 10.5),
    ("length_penalty", "1"),
    ("no_repeat_ngram", -1), ("no_repeat_ngram", 11),
    ("suppress_unk", "false"), ("suppress_unk", 0),
    ("n_best", 0), ("n_best", 4),  # more than beam_size (3)
    ("temperature", 0), ("temperature", -1.0), ("temperature", 100.5), ("temperature", math.nan),
    ("temperature", math.inf), ("temperature", False),
    ("top_k", -1), ("top_k", 100_001), ("top_k", 1.5),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan),
    ("seed", -1), ("seed", 2**64), ("seed", 1.0), ("seed", True), ("seed", "3"),
    ("concept_boost", -1.0), ("concept_boost", 50.5), ("concept_boost", math.nan),
    ("concept_threshold", 0.0), ("concept_threshold", 1.1),
    ("consensus_weight", -0.5), ("consensus_weight", 51.0), ("consensus_weight", math.inf),
]


@pytest.mark.parametrize("name, value", BAD_OPTIONS)
def test_bad_option_values_raise_an_option_error_naming_the_field(name, value):
    with pytest.raises(OptionError, match=rf"^decoding option {name}=") as error:
        DecodingOptions(**{name: value})
    assert isinstance(error.value, ValueError)  # the CLI turns it into a usage error (exit 2)
    assert repr(value) in str(error.value) or str(value) in str(error.value)


@pytest.mark.parametrize("changes", [dict(method="greedy", n_best=2), dict(method="sample", n_best=65)])
def test_n_best_must_fit_the_method(changes):
    with pytest.raises(OptionError, match="n_best"):
        DecodingOptions(**changes)


@pytest.mark.parametrize("method", ["beam", "greedy"])
@pytest.mark.parametrize("name, value", [("temperature", 0.7), ("top_k", 5), ("top_p", 0.9), ("seed", 1)])
def test_sampling_options_are_refused_with_another_method_instead_of_ignored(method, name, value):
    with pytest.raises(OptionError, match=f"^decoding option {name}={value} applies to method 'sample' only, "
                                          f"not '{method}'$"):
        DecodingOptions(method=method, **{name: value})
    assert getattr(DecodingOptions(method="sample", **{name: value}), name) == value


def test_bounds_are_inclusive_where_documented():
    edge = DecodingOptions(method="sample", beam_size=64, n_best=64, max_length=100, min_length=99, length_penalty=10,
                           no_repeat_ngram=10, temperature=100, top_k=100_000, top_p=1, seed=2**64 - 1,
                           concept_boost=50, concept_threshold=1)
    assert edge.beam_size == 64 and edge.seed == 2**64 - 1
    assert DecodingOptions(method="sample", n_best=64, seed=0).n_best == 64


def test_numbers_are_normalized_to_the_fields_type():
    options = DecodingOptions(method="sample", length_penalty=1, temperature=2, beam_size=np.int64(5))
    assert type(options.length_penalty) is float and options.length_penalty == 1.0
    assert type(options.temperature) is float
    assert type(options.beam_size) is int and options.beam_size == 5


def test_every_field_carries_what_the_cli_needs():
    for f in dataclasses.fields(DecodingOptions):
        assert isinstance(f.metadata.get("help"), str) and f.metadata["help"], f.name
        assert f.metadata["type"] in (int, float, bool, str), f.name
        if f.metadata["type"] in (int, float):
            assert f.default is None or f.default in f.metadata["bounds"], f.name
    method = next(f for f in dataclasses.fields(DecodingOptions) if f.name == "method")
    assert method.metadata["choices"] == METHODS


def test_from_dict_reads_the_shipped_config():
    raw = json.loads((ROOT / "captioner" / "default_model" / "config.json").read_text(encoding="utf-8"))
    options = DecodingOptions.from_dict(raw["decoding"])
    assert dataclasses.asdict(options) == raw["decoding"]
    assert DecodingOptions.from_dict({}) == DecodingOptions()
    assert DecodingOptions.from_dict({"beam_size": 5, "seed": None}).beam_size == 5


@pytest.mark.parametrize("raw, match", [
    ({"beam_size": 5, "beamsize": 3, "colour": 1}, "unknown decoding option.*beamsize, colour"),
    ({"beam_size": "5"}, "beam_size='5'"),
    ({"length_penalty": None}, "length_penalty=None"),
    ({"suppress_unk": "false"}, "suppress_unk"),
    (["beam"], "must be an object"),
    ("beam", "must be an object"),
])
def test_from_dict_rejects_what_json_can_hold_but_options_cannot(raw, match):
    with pytest.raises(OptionError, match=match):
        DecodingOptions.from_dict(raw)


def test_a_batch_larger_than_the_search_bound_is_searched_in_parts_with_the_same_captions(default_model, grids,
                                                                                          monkeypatch):
    import captioner.decoding

    options = DecodingOptions(beam_size=3)
    whole = default_model.caption_grid(grids, options)
    monkeypatch.setattr(captioner.decoding, "MAX_SEARCH_ROWS", 3)  # one image (3 beams) per part
    searches = []
    real_search = captioner.decoding.search
    monkeypatch.setattr(captioner.decoding, "search", lambda *a, **k: searches.append(1) or real_search(*a, **k))
    parts = default_model.caption_grid(grids, options)
    assert len(searches) == len(PHOTOS)
    assert [c[0].text for c in parts] == [c[0].text for c in whole]
    assert [c[0].score for c in parts] == pytest.approx([c[0].score for c in whole], abs=1e-4)


def test_a_seed_gives_a_photo_the_same_samples_whatever_else_is_in_its_batch(default_model):
    """The server batches other users' photos with yours: a seeded sample must not depend on them."""
    options = dataclasses.replace(default_model.config.decoding, method="sample", seed=3, n_best=2,
                                  consensus_weight=0.0)
    cat, coffee = SAMPLES / "chelsea.png", SAMPLES / "coffee.png"
    alone = caption_images(default_model, [cat], options=options)
    together = caption_images(default_model, [coffee, cat, coffee, cat], options=options)
    assert together[1].text == together[3].text == alone[0].text
    assert together[0].text == together[2].text
    other_seed = caption_images(default_model, [cat] * 3, options=dataclasses.replace(options, seed=4))
    assert len({c.text for c in other_seed}) == 1
