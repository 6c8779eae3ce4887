"""Calibrated confidence: the shipped calibrator on real photos, its fit, its file, and --min-confidence."""

import dataclasses
import json
import shutil

import pytest
import srt
import torch
from conftest import SAMPLES, SHARED_SAMPLES
from test_video_source import write_video

from captioner.api import caption_images
from captioner.confidence import CALIBRATION_FILE, SIGNALS, SIGNS, Calibrator, FeatureStats
from captioner.errors import ModelLoadError
from captioner.model import DEFAULT_MODEL_DIR, CaptionModel
from captioner.pipelines.cli import main
from captioner.pipelines.record_formats import format_for
from captioner.pipelines.report import render_contact_sheet
from captioner.tags import Tag, tag_description

PHOTOS = [SHARED_SAMPLES / name for name in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")]


def test_the_default_model_gives_every_caption_a_confidence_in_0_1(default_model):
    captions = caption_images(default_model, PHOTOS)
    confidences = [c.confidence for c in captions]
    assert all(isinstance(p, float) and 0 <= p <= 1 for p in confidences)
    assert len(set(confidences)) == len(PHOTOS)  # it depends on the photo


def test_confidence_is_monotone_in_the_signals_whose_meaning_fixes_a_direction(default_model):
    calibrator = default_model.calibrator
    torch.manual_seed(0)
    rows = torch.tensor(calibrator.center, dtype=torch.float64) + torch.randn(200, len(SIGNALS), dtype=torch.float64) \
        * torch.tensor(calibrator.scale, dtype=torch.float64)
    for k, name in enumerate(SIGNALS):
        if SIGNS[name] == 0:
            continue
        moved = rows.clone()
        moved[:, k] += calibrator.scale[k]
        change = calibrator.confidence(moved) - calibrator.confidence(rows)
        assert (SIGNS[name] * change >= 0).all(), name


def test_fit_learns_a_real_signal_and_drops_one_whose_weight_would_break_its_sign():
    torch.manual_seed(0)
    n = 2000
    signals = torch.randn(n, len(SIGNALS), dtype=torch.float64)
    distance = SIGNALS.index("feature_distance")
    # acceptable follows mean_logprob, and (against its fixed sign) rises with feature_distance
    logit = 2 * signals[:, 0] + 1.5 * signals[:, distance]
    acceptable = (torch.rand(n, dtype=torch.float64) < torch.sigmoid(logit)).double()
    calibrator = Calibrator.fit(signals, acceptable, FeatureStats((0.0,), (1.0,)))
    assert calibrator.weights[0] > 1.0
    assert calibrator.weights[distance] == 0.0
    predicted = calibrator.confidence(signals)
    assert abs(float(predicted.mean()) - float(acceptable.mean())) < 0.02  # calibrated in the large


def test_the_calibrator_round_trips_through_the_model_folder_as_json(default_model, tmp_path):
    default_model.save(tmp_path / "m")
    text = (tmp_path / "m" / CALIBRATION_FILE).read_text()
    assert json.loads(text)["acceptable"] == "per-image CIDEr-D >= 0.5"  # plain JSON, no pickle
    reloaded = CaptionModel.load(tmp_path / "m")
    assert reloaded.calibrator == default_model.calibrator
    assert [c.confidence for c in caption_images(reloaded, PHOTOS[:2])] == \
        [c.confidence for c in caption_images(default_model, PHOTOS[:2])]


@pytest.mark.parametrize("damage, reason", [
    (lambda text: text[: len(text) // 2], "Expecting"),
    (lambda text: text.replace('"bias": ', '"bias": NaN, "x": '), "bias holds a value that is not a finite number"),
    (lambda text: text.replace('"bias": ', '"bias": ' + "9" * 400 + ', "x": '), "bias holds a value that is not a fin"),
    (lambda text: json.dumps({**json.loads(text), "weights": [1.0]}), "weights must be a list of 9 numbers"),
    (lambda text: json.dumps({**json.loads(text), "features": {"mean": [0.0], "std": [1.0]}}), "1 channels"),
    (lambda text: json.dumps({**json.loads(text), "features": {"mean": [], "std": []}}), "mean must be a list"),
    (lambda text: json.dumps({**json.loads(text), "features": [1, 2]}), 'features must be an object'),
    (lambda text: json.dumps({**json.loads(text), "signals": 5}), "signals 5 are not"),
    (lambda text: json.dumps({**json.loads(text), "acceptable": None}), "acceptable must be text"),
])
def test_a_damaged_calibration_file_is_refused_naming_it(tmp_path, damage, reason):
    folder = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    path = folder / CALIBRATION_FILE
    path.write_text(damage(path.read_text()))
    with pytest.raises(ModelLoadError, match=f"{CALIBRATION_FILE}: bad calibration: .*{reason}"):
        CaptionModel.load(folder)


def test_a_calibrator_of_extreme_finite_numbers_gives_no_nan():
    """Shares of the logit as large as floats go, of opposite signs, would add up to inf - inf."""
    n = len(SIGNALS)
    extreme = Calibrator(center=(0.0,) * n, scale=(1e-300,) * n, weights=(1e308,) + (0.0,) * (n - 2) + (-1e308,),
                         bias=0.0, features=FeatureStats((0.0,), (1.0,)))
    signals = torch.ones(3, n, dtype=torch.float64)
    signals[1, 0] = -1.0
    signals[2, -1] = -1.0
    assert extreme.confidence(signals).tolist() == [0.5, 0.0, 1.0]


def test_a_caption_the_length_limit_cut_off_gets_confidence_0(default_model):
    cut = caption_images(default_model, PHOTOS[:2], options=dataclasses.replace(default_model.config.decoding,
                                                                                max_length=3))
    assert [c.finished for c in cut] == [False, False]
    assert [c.confidence for c in cut] == [0.0, 0.0]
    assert all(c.confidence > 0 for c in caption_images(default_model, PHOTOS[:2]))


def test_caption_min_confidence_marks_unsure_captions(capsys):
    cat = str(SAMPLES / "chelsea.png")
    assert main(["caption", cat, "--min-confidence", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.split("\t")[1] == "a cat is playing with a toy" and "\tunsure (confidence 0." in line
    assert main(["caption", cat, "--min-confidence", "0"]) == 0  # sure: the column stays, empty
    assert capsys.readouterr().out == f"{cat}\ta cat is playing with a toy\t\n"
    assert main(["caption", cat, "--min-confidence", "0", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert 0 <= record["confidence"] <= 1 and "unsure" not in record
    assert main(["caption", cat, "--min-confidence", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unsure"] is True


def test_min_confidence_needs_a_calibrated_model_and_a_probability(tmp_path, capsys):
    folder = tmp_path / "uncalibrated"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    (folder / CALIBRATION_FILE).unlink()
    cat = str(SAMPLES / "chelsea.png")
    assert main(["caption", cat, "--model", str(folder), "--min-confidence", "0.5"]) == 2
    assert "min_confidence needs a calibrated model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", cat, "--min-confidence", "1.5"])
    assert exit_info.value.code == 2 and "1.5 is not in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("extension", ["jsonl", "csv"])
def test_batch_keeps_unsure_captions_marked_and_the_contact_sheet_greys_them(tmp_path, extension):
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in PHOTOS:
        shutil.copy(photo, folder)
    threshold = sorted(c.confidence for c in caption_images(CaptionModel.load(), PHOTOS))[2]  # two below it
    out = tmp_path / f"out.{extension}"
    assert main(["batch", str(folder), "-o", str(out), "--quiet", "--min-confidence", str(threshold),
                 "--html", str(tmp_path / "sheet.html")]) == 0
    records = list(format_for(out).read(out))
    assert len(records) == 4 and all("caption" in r for r in records)
    assert sorted(r.get("unsure", False) for r in records) == [False, False, True, True]
    assert all((r["confidence"] < threshold) == r.get("unsure", False) for r in records)
    page = (tmp_path / "sheet.html").read_text()
    assert page.count('<figure class="unsure">') == 2 and page.count("confidence 0.") == 4


def test_a_contact_sheet_of_records_without_confidence_shows_none():
    page = render_contact_sheet([{"path": "a.jpg", "caption": "a dog", "score": -1.0}], title="t")
    assert "confidence" not in page.split("</style>")[1] and 'class="unsure"' not in page


def test_video_min_confidence_drops_unsure_cues(tmp_path):
    clip = write_video(tmp_path / "clip.mp4", [("chelsea.png", 4), ("coffee.png", 4)])
    assert main(["video", str(clip), "-o", str(tmp_path / "all.srt"), "--min-confidence", "0"]) == 0
    assert len(list(srt.parse((tmp_path / "all.srt").read_text()))) >= 1
    assert main(["video", str(clip), "-o", str(tmp_path / "none.srt"), "--min-confidence", "1"]) == 0
    assert list(srt.parse((tmp_path / "none.srt").read_text())) == []


def test_tag_description_is_a_plain_phrase_from_the_likeliest_tag():
    assert tag_description([Tag("espresso", 0.9), Tag("cup", 0.05)]) == "a photo of an espresso"
    assert tag_description([Tag("tabby", 0.5)]) == "a photo of a tabby"
    assert tag_description([]) is None


def test_fallback_tags_puts_a_description_in_place_of_an_unsure_caption(capsys):
    coffee = str(SHARED_SAMPLES / "coffee.png")
    assert main(["caption", coffee, "--min-confidence", "1", "--fallback", "tags", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["caption"] == "a photo of an espresso" and record["unsure"] is True
    assert record["model_caption"] == "a small brown dog is running through the water"
    assert main(["caption", coffee, "--min-confidence", "0", "--fallback", "tags", "--json"]) == 0
    assert "model_caption" not in json.loads(capsys.readouterr().out)  # sure enough: the model's caption stays
    assert main(["caption", coffee, "--fallback", "tags"]) == 2
    assert "give --min-confidence too" in capsys.readouterr().err


def test_fallback_records_round_trip_in_csv_and_show_on_the_contact_sheet(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(SHARED_SAMPLES / "coffee.png", folder)
    out = tmp_path / "out.csv"
    assert main(["batch", str(folder), "-o", str(out), "--quiet", "--min-confidence", "1", "--fallback", "tags",
                 "--html", str(tmp_path / "sheet.html")]) == 0
    (record,) = format_for(out).read(out)
    assert (record["caption"], record["model_caption"]) == ("a photo of an espresso",
                                                            "a small brown dog is running through the water")
    assert "the model said: a small brown dog" in (tmp_path / "sheet.html").read_text()
