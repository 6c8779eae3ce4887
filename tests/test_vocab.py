"""Caption tokenization and the vocabulary that is saved next to every model."""

import json

import nltk.data
import pytest

from captioner.errors import ModelLoadError
from captioner.vocab import SPECIALS, Vocabulary, tokenize

CAPTIONS = [
    "A dog runs on the grass .",
    "A black dog runs .",
    "The dog jumps over a log .",
    "A cat sleeps .",
    "Two dogs play on the grass .",
]
# counts: a 4, dog 3, the 3, runs 2, on 2, grass 2, then nine words seen once


@pytest.mark.parametrize(
    "text, words",
    [
        ("A dog , running .", ["a", "dog", "running"]),
        ("A Black DOG.", ["a", "black", "dog"]),
        ('Two "brown" dogs -- playing ...', ["two", "brown", "dogs", "playing"]),
        ("A dog's toy !", ["a", "dog", "'s", "toy"]),
        ("A tri-colored dog", ["a", "tri-colored", "dog"]),
        ("CAFÉ with 2 tables", ["café", "with", "2", "tables"]),
        (" . , ! ", []),
        ("", []),
    ],
)
def test_tokenize(text, words):
    assert tokenize(text) == words


def test_tokenize_needs_no_nltk_data(tmp_path, monkeypatch):
    """Training machines have no NLTK downloads; Treebank rules are plain regular expressions."""
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(LookupError):
        nltk.data.find("tokenizers/punkt")  # proves nothing can be loaded from disk here
    words = tokenize("A man rides a horse . A dog watches .")
    assert words == ["a", "man", "rides", "a", "horse", "a", "dog", "watches"]
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    assert vocab.decode(vocab.encode("the dog runs on grass")) == "the dog runs on grass"


def test_special_tokens_come_first():
    vocab = Vocabulary(["zebra", "<unk>", "apple", "<pad>"])
    assert vocab.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert list(SPECIALS) == vocab.itos[:4]
    assert (vocab.pad, vocab.start, vocab.end, vocab.unk) == (0, 1, 2, 3)
    assert vocab.itos[4:] == ["zebra", "apple"]  # specials passed in are not repeated
    assert len(vocab) == 6
    assert all(vocab.stoi[w] == i for i, w in enumerate(vocab.itos))


def test_build_keeps_frequent_words_most_frequent_first():
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    # ties broken alphabetically so the same captions always give the same ids
    assert vocab.itos[4:] == ["a", "dog", "the", "grass", "on", "runs"]
    assert vocab.itos[:4] == list(SPECIALS)


def test_build_threshold():
    assert Vocabulary.build(CAPTIONS, min_count=3).itos[4:] == ["a", "dog", "the"]
    assert Vocabulary.build(CAPTIONS, min_count=5).itos[4:] == []
    everything = Vocabulary.build(CAPTIONS, min_count=1)
    assert len(everything) == 4 + 15
    assert {"sleeps", "log", "cat"} <= set(everything.itos)
    assert "." not in everything.stoi
    assert Vocabulary.build([], min_count=1).itos == list(SPECIALS)


def test_build_counts_words_after_tokenizing():
    vocab = Vocabulary.build(["Dog .", "dog", "DOG!"], min_count=3)
    assert vocab.itos[4:] == ["dog"]


@pytest.mark.parametrize("min_count", [0, -1])
def test_build_rejects_min_count_below_one(min_count):
    with pytest.raises(ValueError, match="min_count"):
        Vocabulary.build(CAPTIONS, min_count=min_count)


def test_encode_decode_round_trip():
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    ids = vocab.encode("The dog runs on the grass .")
    assert ids[0] == vocab.start and ids[-1] == vocab.end
    assert ids[1:-1] == [vocab.stoi[w] for w in ["the", "dog", "runs", "on", "the", "grass"]]
    assert vocab.decode(ids) == "the dog runs on the grass"


def test_unknown_words_map_to_unk():
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    ids = vocab.encode("A dog chases the zebra")
    assert ids == [vocab.start, vocab.stoi["a"], vocab.stoi["dog"], vocab.unk, vocab.stoi["the"], vocab.unk, vocab.end]
    assert vocab.decode(ids) == "a dog the"  # <unk> is a special token, so decode drops it
    assert vocab.encode("") == [vocab.start, vocab.end]


def test_decode_drops_padding():
    vocab = Vocabulary(["a", "b"])
    assert vocab.decode([1, 4, 5, 2, 0, 0]) == "a b"


def test_json_round_trip(tmp_path):
    vocab = Vocabulary.build(CAPTIONS + ["Un café crème .", "un café noir"], min_count=2)
    assert "café" in vocab.stoi
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert json.loads(path.read_text(encoding="utf-8")) == vocab.itos[4:]  # specials are implied, not stored
    loaded = Vocabulary.load(path)
    assert loaded.itos == vocab.itos
    assert loaded.stoi == vocab.stoi
    assert loaded.encode("un café sur the grass") == vocab.encode("un café sur the grass")
    assert Vocabulary.from_json(vocab.to_json()).itos == vocab.itos


@pytest.mark.parametrize("text", ['{"words": ["a"]}', '["a", 1]', '"a"', "not json", '["a", "b"'])
def test_from_json_rejects_bad_files(text):
    with pytest.raises(ModelLoadError, match="vocabulary"):
        Vocabulary.from_json(text)


def test_load_truncated_file(tmp_path):
    path = tmp_path / "vocab.json"
    Vocabulary(["a", "dog"]).save(path)
    path.write_text(path.read_text(encoding="utf-8")[:-3], encoding="utf-8")
    with pytest.raises(ModelLoadError):
        Vocabulary.load(path)
