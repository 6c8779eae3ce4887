"""Classifier-guided decoding: label head nouns map to caption words and boost them once."""

import math

import pytest
import torch

from captioner.concepts import concept_evidence, concept_matrix, head_noun
from captioner.processors import ConceptBoost
from captioner.vocab import Vocabulary

VOCAB = Vocabulary(["a", "cat", "dog", "mug", "bike", "is"])


def test_head_nouns_of_imagenet_style_labels():
    assert head_noun("Egyptian cat") == "cat"
    assert head_noun("coffee mug") == "mug"
    assert head_noun("tabby") == "tabby"


def test_evidence_sums_classes_sharing_a_word_and_respects_the_threshold():
    classes = ("tabby", "tiger cat", "Egyptian cat", "coffee mug", "mountain bike")
    matrix = concept_matrix(classes, VOCAB)
    assert matrix.sum() == 5  # tabby -> cat by the grounding map, as the two cats by their head noun
    probs = torch.tensor([[0.1, 0.2, 0.5, 0.15, 0.05]])
    evidence = concept_evidence(probs, matrix, threshold=0.5)
    assert float(evidence[0, VOCAB.stoi["cat"]]) == pytest.approx(0.8)  # tabby, tiger cat, Egyptian cat
    assert evidence[0, VOCAB.stoi["mug"]] == 0  # 0.15 is under the threshold
    assert evidence[0, VOCAB.stoi["bike"]] == 0


def test_grounding_names_classes_in_plain_caption_words():
    vocab = Vocabulary(["a", "cup", "coffee", "scooter", "motorcycle", "rocket", "dog", "bar", "player", "cat"])
    classes = ("espresso", "moped", "space shuttle", "tabby", "space bar", "CD player", "tiger cat")
    matrix = concept_matrix(classes, vocab)
    words = [{vocab.itos[j] for j in torch.nonzero(row).flatten().tolist()} for row in matrix]
    assert words == [{"coffee", "cup"}, {"scooter", "motorcycle"}, {"rocket"}, {"cat"}, set(), set(), {"cat"}]
    assert concept_matrix(("some new label cat",), vocab).sum() == 1  # a label the map lacks: its head noun


def test_the_shipped_grounding_is_the_tools_output_for_every_imagenet_label():
    """grounding.json is generated (tools/ground_classes.py); hand edits belong in the tool's tables."""
    import importlib.util
    import json
    from pathlib import Path

    from captioner.concepts import GROUNDING_FILE
    from captioner.encoders import imagenet_classes

    tool = Path(__file__).resolve().parents[1] / "tools" / "ground_classes.py"
    spec = importlib.util.spec_from_file_location("ground_classes", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = json.loads(GROUNDING_FILE.read_text(encoding="utf-8"))
    classes = imagenet_classes()
    assert [e["label"] for e in shipped] == list(classes)
    assert [e["words"] for e in shipped] == module.grounding(classes)


def test_boost_applies_until_the_word_is_used():
    bias = torch.zeros(2, len(VOCAB))
    bias[0, VOCAB.stoi["cat"]] = 3.0
    log_probs = torch.full((2, len(VOCAB)), math.log(1 / len(VOCAB)))
    boost = ConceptBoost(bias)
    fresh = boost(log_probs, torch.tensor([[VOCAB.stoi["a"]], [VOCAB.stoi["a"]]]))
    assert fresh[0, VOCAB.stoi["cat"]] - log_probs[0, VOCAB.stoi["cat"]] == 3.0
    assert torch.equal(fresh[1], log_probs[1])  # the other image has no evidence
    used = boost(log_probs, torch.tensor([[VOCAB.stoi["cat"]], [VOCAB.stoi["a"]]]))
    assert torch.equal(used[0], log_probs[0])


def test_default_model_names_the_cat_through_its_classifier(default_model):
    """On the cat photo the LSTM alone says "a small white dog"; the classifier's "cat" gets in with the boost.

    (captioner/examples/chelsea.png is the same file as ../shared/samples/chelsea.png.)
    """
    import dataclasses

    from conftest import SAMPLES

    from captioner.api import caption_images
    from captioner.decoding import DecodingOptions

    options = default_model.config.decoding
    assert options.concept_boost > 0
    photo = [SAMPLES / "chelsea.png"]
    boosted = caption_images(default_model, photo, options=options)[0]
    plain = caption_images(default_model, photo, options=dataclasses.replace(options, concept_boost=0.0))[0]
    assert "cat" in boosted.tokens
    assert "cat" not in plain.tokens  # the boost, not the LSTM, put it there
    # The score stays the model's own: the boosted caption is less likely to the model than its own choice.
    assert boosted.score < plain.score
    assert DecodingOptions().concept_boost == 0.0  # off unless a model's config turns it on


def test_cat_is_a_concept_of_the_cat_photo(default_model):
    """The word that the boost adds is one the encoder's classifier gives evidence for."""
    import numpy as np
    from conftest import SAMPLES

    from captioner.images import model_pixels

    model, threshold = default_model, default_model.config.decoding.concept_threshold
    pixels = torch.from_numpy(np.stack([model_pixels(SAMPLES / "chelsea.png", model.encoder.preprocess.size)]))
    with torch.inference_mode():
        evidence = model.concept_evidence(model.encoder.classify(model.encode(pixels)), threshold)
    assert evidence[0, model.vocab.stoi["cat"]] >= threshold
    assert evidence[0, model.vocab.stoi["dog"]] == 0
