"""Decoding with the real shipped model: batching never changes a caption."""

import numpy as np
import pytest
import torch
from conftest import SHARED_SAMPLES

from captioner.api import caption_images
from captioner.decoding import DecodingOptions

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


def test_sampling_with_a_seed_is_reproducible(default_model):
    options = DecodingOptions(method="sample", seed=3, temperature=0.8, top_p=0.9)
    first = caption_images(default_model, PHOTOS[:2], options=options)
    second = caption_images(default_model, PHOTOS[:2], options=options)
    assert [c.text for c in first] == [c.text for c in second]


def test_unk_is_suppressed_and_max_length_holds(default_model, grids):
    for (caption,) in default_model.caption_grid(grids, DecodingOptions(max_length=5)):
        assert "<unk>" not in caption.tokens and len(caption.tokens) <= 5
