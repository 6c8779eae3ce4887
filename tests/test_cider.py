"""The training reward's CIDEr-D equals pycocoevalcap's Cider on the same tokens."""

import itertools
import json
import math
from collections import Counter
from pathlib import Path

import pytest
from pycocoevalcap.cider.cider import Cider

from captioner.cider import CiderD, ngram_counts
from captioner.vocab import tokenize

REFS = [
    [["a", "dog", "runs", "on", "the", "grass"], ["a", "brown", "dog", "running"], ["dog", "in", "a", "field"]],
    [["two", "people", "walk", "on", "a", "beach"], ["a", "couple", "by", "the", "sea"]],
    [["a", "man", "rides", "a", "bike"], ["a", "cyclist", "on", "the", "road"], ["a", "man", "on", "a", "bicycle"]],
    [["a", "cat", "sleeps", "on", "a", "sofa"], ["a", "tabby", "cat", "lying", "down"]],
]
CANDIDATES = [["a", "dog", "running", "on", "grass"], ["people", "on", "the", "beach"],
              ["a", "man", "riding", "a", "bike", "on", "the", "road"], ["a", "dog", "on", "a", "sofa"]]


def test_per_image_scores_match_pycocoevalcap():
    ours = CiderD(REFS)
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(REFS)}
    res = {i: [" ".join(c)] for i, c in enumerate(CANDIDATES)}
    corpus, per_image = Cider().compute_score(gts, res)
    mine = [ours.score(c, i) for i, c in enumerate(CANDIDATES)]
    assert mine == pytest.approx(list(per_image), abs=1e-9)
    assert sum(mine) / len(mine) == pytest.approx(corpus, abs=1e-9)


def test_a_reference_scores_higher_than_a_wrong_caption():
    ours = CiderD(REFS)
    assert ours.score(REFS[2][0], 2) > ours.score(CANDIDATES[3], 2)


def test_one_candidate_over_several_images_is_the_mean_of_its_scores_exactly():
    ours = CiderD(REFS)
    for candidate in CANDIDATES:
        images = [3, 0, 2, 0]  # repeated and out of order, as nearest neighbours come
        assert ours.mean_score(candidate, images) == sum(ours.score(candidate, j) for j in images) / len(images)


def _real_captions(count: int) -> list[list[list[str]]]:
    """Tokenized human captions of the first ``count`` Flickr8k dev photos (from the committed manifest)."""
    manifest = Path(__file__).parent.parent / "data_manifests" / "flickr8k_dev.jsonl"
    with manifest.open(encoding="utf-8") as lines:
        entries = [json.loads(line) for line in itertools.islice(lines, count)]
    return [[tokenize(c) for c in entry["captions"]] for entry in entries]


def _awkward(candidate: list[str], i: int) -> list[str]:
    """Candidates a search writes too: repeated n-grams, words no reference uses, cut short, empty."""
    return [candidate,
            candidate + candidate[:3],
            candidate[:2] + ["zqxv", "zqxv"] + candidate[2:],
            candidate[:1],
            []][i % 5]


def test_real_captions_score_as_pycocoevalcap_scores_them():
    captions = _real_captions(200)
    refs = [caps[1:] for caps in captions]
    candidates = [_awkward(caps[0], i) for i, caps in enumerate(captions)]
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(c)] for i, c in enumerate(candidates)}
    _, per_image = Cider().compute_score(gts, res)
    ours = CiderD(refs)
    assert [ours.score(c, i) for i, c in enumerate(candidates)] == pytest.approx(list(per_image), abs=1e-9)


def _plain_cider_d(references: list[list[list[str]]], candidate: list[str], image: int) -> float:
    """coco-caption's CIDEr-D as plain loops over dictionaries, for comparing floats exactly."""
    frequency: Counter = Counter()
    for refs in references:
        frequency.update({g for r in refs for g in ngram_counts(r)})
    log_images = math.log(float(len(references)))

    def vector(tokens):
        vec, norm = [{} for _ in range(4)], [0.0] * 4
        for gram, tf in ngram_counts(tokens).items():
            weight = tf * (log_images - math.log(max(1.0, frequency[gram])))
            vec[len(gram) - 1][gram] = weight
            norm[len(gram) - 1] += weight * weight
        return vec, [math.sqrt(x) for x in norm], max(len(tokens) - 1, 0)

    vh, nh, lh = vector(candidate)
    similarities = []
    for ref in references[image]:
        vr, nr, lr = vector(ref)
        total = 0.0
        for n in range(4):
            dot = 0.0
            for g, w in vh[n].items():  # += as coco-caption adds: sum() compensates on Python 3.12
                if g in vr[n]:
                    dot += min(w, vr[n][g]) * vr[n][g]
            if nh[n] and nr[n]:
                dot /= nh[n] * nr[n]
            total += dot * math.exp(-((lh - lr) ** 2) / (2 * 6.0**2))
        similarities.append(total / 4)
    mean = 0.0
    for similarity in similarities:
        mean += similarity
    return 10.0 * mean / len(similarities)


def test_scores_are_the_floats_the_plain_formula_gives():
    captions = _real_captions(60)
    refs = [caps[1:] for caps in captions]
    ours = CiderD(refs)
    for i, caps in enumerate(captions):
        candidate = _awkward(caps[0], i)
        assert ours.score(candidate, i) == _plain_cider_d(refs, candidate, i)


def test_several_candidates_in_one_pass_score_as_each_alone():
    captions = _real_captions(40)
    ours = CiderD([caps[1:] for caps in captions])
    candidates = [_awkward(caps[0], i) for i, caps in enumerate(captions[:10])]
    images = [7, 3, 7, 0, 39]  # repeated and out of order, as nearest neighbours may come
    together = ours.mean_scores(candidates, images)
    assert together == [ours.mean_score(c, images) for c in candidates]
    assert len(set(together)) > 5  # the candidates differ, so must their scores


def test_orders_no_reference_reaches_and_unknown_images_are_handled():
    short = CiderD([[["a"]], [["b"]]])  # no bigram in any reference
    assert short.score(["a", "b", "a"], 0) == _plain_cider_d([[["a"]], [["b"]]], ["a", "b", "a"], 0)
    three = [[["a", "b", "c"]], [["a", "b"]]]  # no 4-gram
    assert CiderD(three).score(["a", "b", "c", "a"], 0) == _plain_cider_d(three, ["a", "b", "c", "a"], 0)
    for image in (-1, 2, True, 1.0):
        with pytest.raises(IndexError, match="image indices"):
            short.score(["a"], image)
