"""Our scores must equal coco-caption's own evaluation harness (COCOEvalCap) to 1e-6."""

import json

import pytest

from captioner.errors import CaptionerError
from captioner.metrics import METRIC_NAMES, score_captions

REFERENCES = {
    "dog.jpg": ["A black dog runs across the green grass .", "a dog running on a lawn", "The dog is playing outside ."],
    "beach.jpg": ["Two people walk along the beach at sunset .", "A couple walking by the sea.", "people on a beach"],
    "bike.jpg": ["A man in a red shirt rides a bicycle down the street .", "a cyclist on a city road",
                 "A man riding his bike ."],
}
CANDIDATES = {
    "dog.jpg": "a black dog is running on the grass",
    "beach.jpg": "two people are walking on the beach",
    "bike.jpg": "a man rides a bike on the street",
}


class _NoSpice:
    """SPICE downloads Stanford models at first use; it is not one of our metrics."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


def _coco_harness(monkeypatch, tmp_path) -> dict[str, float]:
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    ids = {name: i for i, name in enumerate(REFERENCES, start=1)}
    gt = {
        "images": [{"id": i} for i in ids.values()],
        "annotations": [{"image_id": ids[n], "id": 100 * ids[n] + k, "caption": c}
                        for n, caps in REFERENCES.items() for k, c in enumerate(caps)],
        "type": "captions", "info": {}, "licenses": [],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    coco = COCO(str(tmp_path / "gt.json"))
    results = coco.loadRes([{"image_id": ids[n], "caption": c} for n, c in CANDIDATES.items()])
    monkeypatch.setattr(coco_eval, "Spice", _NoSpice)
    evaluator = coco_eval.COCOEvalCap(coco, results)
    evaluator.params["image_id"] = results.getImgIds()
    evaluator.evaluate()
    names = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
             "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr-D"}
    return {ours: evaluator.eval[theirs] for theirs, ours in names.items()}


@pytest.mark.slow
def test_scores_match_coco_caption_harness(monkeypatch, tmp_path):
    ours = score_captions(REFERENCES, CANDIDATES)
    theirs = _coco_harness(monkeypatch, tmp_path)
    assert list(ours) == list(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-6), name
    assert 0 < ours["BLEU-4"] < ours["BLEU-1"] <= 1
    assert ours["CIDEr-D"] > 0.5  # unscaled CIDEr-D: these candidates are close to their references


def test_perfect_candidates_score_full_bleu():
    refs = {"a": ["a dog runs on the grass"], "b": ["two people walk on a beach"]}
    scores = score_captions(refs, {k: v[0] for k, v in refs.items()}, meteor=False)
    assert scores["BLEU-1"] == pytest.approx(1.0)
    assert scores["BLEU-4"] == pytest.approx(1.0)
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    assert "METEOR" not in scores


@pytest.mark.parametrize("separator", ["\r", "\u2028", "\r\n"])
def test_a_line_break_inside_a_reference_leaves_every_score_as_a_space_would(separator):
    broken = {k: [c.replace(" ", separator, 1) for c in refs] for k, refs in REFERENCES.items()}
    spaced = score_captions(REFERENCES, CANDIDATES, meteor=False)
    assert score_captions(broken, CANDIDATES, meteor=False) == pytest.approx(spaced)


def test_mismatched_ids_are_refused():
    with pytest.raises(CaptionerError, match="same image ids"):
        score_captions({"a": ["x"]}, {"b": "x"}, meteor=False)


@pytest.mark.parametrize("empty", [[], [""], ["  ", ""]])
def test_an_image_without_references_is_named_not_an_assert_in_the_scorer(empty):
    refs = {"a": ["a dog runs on the grass"], "b": empty}
    with pytest.raises(CaptionerError, match="^image b has no reference captions to score against$"):
        score_captions(refs, {"a": "a dog", "b": "a beach"}, meteor=False)


def test_ctrl_c_while_meteor_scores_stops_its_jvm_instead_of_hanging(monkeypatch):
    from pycocoevalcap.meteor import meteor as meteor_module

    from captioner.metrics import score_captions

    started = []

    def interrupted(self, hypothesis, references):
        started.append(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(meteor_module.Meteor, "_stat", interrupted)
    with pytest.raises(KeyboardInterrupt):
        score_captions({"1": ["a cat on a mat"]}, {"1": "a cat"}, meteor=True)
    (meteor,) = started
    assert meteor.meteor_p.poll() is not None and not meteor.lock.locked()  # stopped, and __del__ cannot block
