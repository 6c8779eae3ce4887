"""The training reward's CIDEr-D equals pycocoevalcap's Cider on the same tokens."""

import pytest
from pycocoevalcap.cider.cider import Cider

from captioner.cider import CiderD

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
