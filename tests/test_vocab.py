"""Caption tokenization and the vocabulary that is saved next to every model."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from captioner.errors import ModelLoadError
from captioner.vocab import SPECIALS, Vocabulary, tokenize, treebank_words

SHARED_DATA = ROOT.parent / "shared" / "data"
FLICKR8K_CAPTIONS = SHARED_DATA / "flickr8k" / "captions.txt"
COCO_MINI_CAPTIONS = SHARED_DATA / "coco_mini" / "captions_train2017.json"

CAPTIONS = [
    "A dog runs on the grass .",
    "A black dog runs .",
    "The dog jumps over a log .",
    "A cat sleeps .",
    "Two dogs play on the grass .",
]
# counts: a 4, dog 3, the 3, runs 2, on 2, grass 2, then nine words seen once

TOKENIZE_CASES = [
    ("A dog , running .", ["a", "dog", "running"]),
    ("A Black DOG.", ["a", "black", "dog"]),
    ('Two "brown" dogs -- playing ...', ["two", "brown", "dogs", "playing"]),
    ("A dog's toy !", ["a", "dog", "'s", "toy"]),
    ("A tri-colored dog", ["a", "tri-colored", "dog"]),
    ("CAFÉ with 2 tables", ["café", "with", "2", "tables"]),
    (" . , ! ", []),
    ("", []),
]


@pytest.mark.parametrize("text, words", TOKENIZE_CASES)
def test_tokenize(text, words):
    assert tokenize(text) == words


# Hand-written cases where Treebank rules are subtle; the words are what the shipped vocabulary expects.
TRICKY = [
    ("Don't stop, they'll go!", ["do", "n't", "stop", "they", "'ll", "go"]),
    ("I'm I'd we're we've isn't", ["i", "'m", "i", "'d", "we", "'re", "we", "'ve", "is", "n't"]),
    ("I cannot; she CANNOT.", ["i", "can", "not", "she", "can", "not"]),
    ("gonna wanna gotta gimme lemme", ["gon", "na", "wan", "na", "got", "ta", "gim", "me", "lem", "me"]),
    ("'Tis 'twas more'n d'ye", ["'t", "is", "'t", "was", "more", "'n", "d", "'ye"]),
    ("The dogs' toys and the dog's bone.", ["the", "dogs", "toys", "and", "the", "dog", "'s", "bone"]),
    ("a dog'\nruns", ["a", "dog'", "runs"]),  # a quote before a newline is not split off
    ('He said "hi" -- then left.', ["he", "said", "hi", "then", "left"]),
    ("''Quoted'' and ``quoted''", ["quoted", "and", "quoted"]),
    ("A tri-colored dog -- jumping", ["a", "tri-colored", "dog", "jumping"]),
    ("3,000 dogs at 10:30, 3.5 km", ["3,000", "dogs", "at", "10:30", "3.5", "km"]),
    ("x,y:z", ["x", "y", "z"]),
    ("$3.88 or 50% & more @home #1", ["3.88", "or", "50", "more", "home", "1"]),
    ("Mr. Smith walks in the U.S.A.", ["mr.", "smith", "walks", "in", "the", "u.s.a"]),  # only the last period
    ('period then quote."', ["period", "then", "quote"]),
    ("wait...what?", ["wait", "what"]),
    ("a dog (brown) [big] {x} <y> runs", ["a", "dog", "brown", "big", "x", "y", "runs"]),
    ("CAFÉ naïve\n", ["café", "naïve"]),
]


@pytest.mark.parametrize("text, words", TRICKY)
def test_tokenize_tricky_cases(text, words):
    assert tokenize(text) == words


def _nltk_treebank():
    nltk_tokenize = pytest.importorskip("nltk.tokenize", reason="NLTK (a test dependency) is not installed")
    return nltk_tokenize.TreebankWordTokenizer()


def _assert_same_as_nltk(texts: list[str]) -> None:
    """Our rules give NLTK's Treebank tokens exactly (punctuation included) on every text, as tokenize uses them."""
    nltk_tokens = _nltk_treebank().tokenize
    differing = [t for t in texts if treebank_words(t.lower()) != nltk_tokens(t.lower())]
    assert not differing, f"{len(differing)} of {len(texts)} texts tokenized differently, e.g. {differing[:3]}"


def test_same_tokens_as_nltk_on_tricky_cases():
    _assert_same_as_nltk([text for text, _ in TRICKY] + [text for text, _ in TOKENIZE_CASES])


def test_same_tokens_as_nltk_on_every_flickr8k_caption():
    """The shipped vocabulary was built from NLTK's tokens of these captions: any difference would matter."""
    if not FLICKR8K_CAPTIONS.is_file():
        pytest.skip(f"Flickr8k captions not found at {FLICKR8K_CAPTIONS} (the shared data folder is absent)")
    lines = FLICKR8K_CAPTIONS.read_text(encoding="utf-8").splitlines()
    captions = [line.split("\t", 1)[1] for line in lines if "\t" in line]
    assert len(captions) == len(lines) > 30_000
    _assert_same_as_nltk(captions)


def test_same_tokens_as_nltk_on_coco_mini_captions():
    if not COCO_MINI_CAPTIONS.is_file():
        pytest.skip(f"COCO mini captions not found at {COCO_MINI_CAPTIONS} (the shared data folder is absent)")
    annotations = json.loads(COCO_MINI_CAPTIONS.read_text(encoding="utf-8"))["annotations"]
    assert len(annotations) >= 400
    _assert_same_as_nltk([a["caption"] for a in annotations])


def test_same_tokens_as_nltk_on_imagenet_class_names():
    """Concept words come from these labels' head nouns (captioner.concepts)."""
    from torchvision.models import EfficientNet_B0_Weights

    names = EfficientNet_B0_Weights.DEFAULT.meta["categories"]
    assert len(names) == 1000
    _assert_same_as_nltk(names)


def test_import_captioner_does_not_import_nltk():
    code = "import sys, captioner, captioner.concepts, captioner.decoding; print('nltk' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "False"


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


def test_words_stop_at_end_and_drop_specials():
    vocab = Vocabulary(["a", "b", "c"])
    ids = [vocab.start, 4, vocab.unk, 5, vocab.pad, vocab.end, 6, 4]  # nothing after <end> is a word
    assert vocab.words(ids) == ["a", "b"]
    assert vocab.decode(ids) == "a b"
    assert vocab.words([4, 6]) == ["a", "c"]  # cut at the length limit: no <end> at all
    assert vocab.words([vocab.end, 4]) == []


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
