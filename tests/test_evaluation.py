"""The one "caption in batches, then score" loop, from grids and from image files."""

import os

import pytest
import torch
from conftest import SAMPLES, SHARED_SAMPLES

from captioner.api import evaluate
from captioner.data import write_manifest
from captioner.decoding import DecodingOptions
from captioner.errors import CaptionerError, DataError, ImageReadError
from captioner.evaluation import evaluate_grids, grid_batches, index_batches, path_grids
from captioner.metrics import score_captions

REFERENCES = [("a cat on the grass", "a cat"), ("a dog on the grass",), ("the cat and the dog",)]


def test_index_batches_cover_every_position_once():
    assert list(index_batches(5, 2)) == [[0, 1], [2, 3], [4]]
    assert list(index_batches(0, 2)) == []


def test_grids_in_batches_are_captioned_in_order_and_scored(small_model):
    grids = torch.randn(3, 1280, 7, 7, generator=torch.Generator().manual_seed(0))
    scores, captions = evaluate_grids(small_model, grid_batches(lambda ids: grids[ids], 3, size=2), REFERENCES)
    assert captions == [n_best[0].text for n_best in small_model.caption_grid(grids)]  # one batch, same captions
    expected = score_captions({str(i): list(r) for i, r in enumerate(REFERENCES)},
                              {str(i): c for i, c in enumerate(captions)}, meteor=False)
    assert scores == expected


def test_options_reach_the_search(small_model):
    grids = torch.randn(3, 1280, 7, 7, generator=torch.Generator().manual_seed(1))
    _, short = evaluate_grids(small_model, [grids], REFERENCES, DecodingOptions(method="greedy", max_length=2))
    assert all(len(c.split()) <= 2 for c in short)
    _, longer = evaluate_grids(small_model, [grids], REFERENCES, DecodingOptions(method="greedy", max_length=6))
    assert any(len(c.split()) > 2 for c in longer)


def test_batches_that_do_not_cover_the_references_are_refused(small_model):
    grids = torch.randn(2, 1280, 7, 7)
    with pytest.raises(CaptionerError, match="2 captions for 3 images"):
        evaluate_grids(small_model, [grids], REFERENCES)


def test_path_grids_match_the_encoder_and_name_an_unreadable_file(small_model, tmp_path):
    photos = [SAMPLES / "chelsea.png", SHARED_SAMPLES / "rocket.jpg", SAMPLES / "coffee.png"]
    batches = list(path_grids(small_model, photos, batch_size=2))
    assert [b.shape[0] for b in batches] == [2, 1]
    cut = tmp_path / "cut.jpg"
    cut.write_bytes((SHARED_SAMPLES / "rocket.jpg").read_bytes()[:300])
    with pytest.raises(ImageReadError, match="cut.jpg"):
        list(path_grids(small_model, [photos[0], cut], batch_size=2))


def test_path_grids_read_on_after_an_unreadable_file_and_name_all_of_them(small_model, tmp_path):
    """One run names every photo to fix (the first few, and a count), and encodes nothing after the first."""
    bad = []
    for i in range(5):
        bad.append(tmp_path / f"bad{i}.jpg")
        bad[-1].write_bytes(b"not a photo" * (i + 1))
    photos = [SAMPLES / "chelsea.png", bad[0], SHARED_SAMPLES / "rocket.jpg", *bad[1:], SAMPLES / "coffee.png"]
    encoded = []
    with pytest.raises(ImageReadError) as error:
        for grids in path_grids(small_model, photos, batch_size=2):
            encoded.append(grids.shape[0])
    message = str(error.value)
    assert message.startswith("5 images cannot be read: ") and message.endswith(" and 2 more")
    assert [name in message for name in ("bad0.jpg", "bad1.jpg", "bad2.jpg", "bad3.jpg")] == [True] * 3 + [False]
    assert encoded == []  # the first batch held bad0.jpg
    assert message.count("\n") == 0


def test_evaluate_refuses_a_manifest_line_without_captions_before_captioning(small_model, tmp_path):
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, [(str(SAMPLES / "chelsea.png"), ["a cat"]), (str(tmp_path / "missing.jpg"), [])])
    with pytest.raises(DataError, match=rf"^{manifest}:2: not a manifest record \(no captions"):
        evaluate(small_model, manifest, meteor=False)


def test_evaluate_refuses_a_repeated_image_whose_words_would_count_twice(small_model, tmp_path):
    manifest = tmp_path / "m.jsonl"
    cat, coffee = str(SAMPLES / "chelsea.png"), str(SAMPLES / "coffee.png")
    write_manifest(manifest, [(cat, ["a cat"]), (coffee, ["a cup"]), (cat, ["a cat"])])
    with pytest.raises(DataError, match="chelsea.png is listed more than once"):
        evaluate(small_model, manifest, meteor=False)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").symlink_to(cat)
    for again in (str(SAMPLES / ".." / SAMPLES.name / "chelsea.png"), "photos/cat.png"):  # the same file, spelled anew
        write_manifest(manifest, [(cat, ["a cat"]), (coffee, ["a cup"]), (again, ["a cat"])])
        with pytest.raises(DataError, match=f"{again.split('/')[-1]} is listed more than once"):
            evaluate(small_model, manifest, meteor=False)


def test_a_hard_link_to_a_listed_image_is_the_same_image(small_model, tmp_path):
    manifest = tmp_path / "m.jsonl"
    cat = tmp_path / "cat.png"
    cat.write_bytes((SAMPLES / "chelsea.png").read_bytes())
    os.link(cat, tmp_path / "also.png")
    write_manifest(manifest, [(str(cat), ["a cat"]), (str(SAMPLES / "coffee.png"), ["a cup"]), ("also.png", ["a cat"])])
    with pytest.raises(DataError, match="also.png is listed more than once"):
        evaluate(small_model, manifest, meteor=False)


def test_references_the_scorer_finds_no_word_in_are_refused_before_any_captioning(small_model, tmp_path):
    manifest = tmp_path / "m.jsonl"
    unreadable = tmp_path / "broken.jpg"  # captioning first would fail on it instead
    unreadable.write_bytes(b"not a photo")
    write_manifest(manifest, [(str(SAMPLES / "chelsea.png"), ["a cat"]), (str(unreadable), ["a broken photo"]),
                              (str(SAMPLES / "coffee.png"), ["ⅷ", "..."])])  # a letter to Python
    with pytest.raises(DataError, match=rf"^{manifest}: .*coffee.png: its reference captions have no word the "):
        evaluate(small_model, manifest, meteor=False)


def test_a_manifest_with_a_byte_order_mark_reads_and_meteor_must_be_a_bool(small_model, tmp_path):
    from captioner.data import read_manifest
    from captioner.errors import OptionError

    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, [(str(SAMPLES / "chelsea.png"), ["a cat"]), (str(SAMPLES / "coffee.png"), ["a cup"])])
    manifest.write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())  # as Windows Notepad saves UTF-8
    assert [e.captions for e in read_manifest(manifest)] == [("a cat",), ("a cup",)]
    with pytest.raises(OptionError, match="meteor='no' must be True or False"):
        evaluate(small_model, manifest, meteor="no")


def test_evaluate_scores_a_manifest(small_model, tmp_path):
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, [(str(SAMPLES / "chelsea.png"), ["a cat on the grass"]),
                              (str(SAMPLES / "coffee.png"), ["a cup on the table"])])
    scores = evaluate(small_model, manifest, meteor=False, num_workers=0)
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"}
