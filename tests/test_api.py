"""The Python front doors: three lines from import to captions, and evaluation on a manifest."""

import json

import pytest
from conftest import SHARED_SAMPLES
from PIL import Image

import captioner
from captioner.data import write_manifest
from captioner.pipelines.cli import main

PHOTOS = [SHARED_SAMPLES / "chelsea.png", SHARED_SAMPLES / "coffee.png"]


def test_three_lines_from_import_to_captions():
    model = captioner.load_model()
    captions = captioner.caption_images(model, PHOTOS)
    assert [type(c) for c in captions] == [captioner.Caption, captioner.Caption]
    assert all(c.text and c.tokens and c.score < 0 for c in captions)


def test_pil_images_give_the_same_captions_as_their_files(default_model):
    from_files = captioner.caption_images(default_model, PHOTOS)
    from_pil = captioner.caption_images(default_model, [Image.open(p) for p in PHOTOS])
    assert [c.text for c in from_pil] == [c.text for c in from_files]


def test_unreadable_path_raises_a_captioner_error(default_model, tmp_path):
    (tmp_path / "x.jpg").write_text("no")
    with pytest.raises(captioner.CaptionerError, match="x.jpg"):
        captioner.caption_images(default_model, [tmp_path / "x.jpg"])


@pytest.mark.slow
def test_evaluate_prints_all_scores_and_json_last(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, [(str(PHOTOS[0]), ["a cat sitting on the floor", "a tabby cat"]),
                              (str(PHOTOS[1]), ["a cup of coffee on a saucer", "coffee in a white cup"])])
    assert main(["evaluate", "--manifest", str(manifest), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    scores = json.loads(lines[-1])
    assert list(scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"]
    assert all(0 <= scores[k] <= 1 for k in scores if k != "CIDEr-D")
    assert any(line.startswith("CIDEr-D") for line in lines[:-1])


def test_a_pil_image_is_turned_upright_by_its_exif_tag_like_its_file(default_model, tmp_path):
    """The photo is stored lying on its side with an EXIF tag saying so: both doors must stand it up."""
    from captioner.images import model_pixels

    exif = Image.Exif()
    exif[0x0112] = 8  # display after turning 90 degrees counter-clockwise
    path = tmp_path / "sideways.jpg"
    Image.open(PHOTOS[0]).convert("RGB").transpose(Image.Transpose.ROTATE_270).save(path, exif=exif, quality=95)
    size = default_model.encoder.preprocess.size
    upright = model_pixels(PHOTOS[0], size).astype(int)
    assert abs(model_pixels(Image.open(path), size).astype(int) - upright).mean() < 8
    assert abs(model_pixels(path, size).astype(int) - upright).mean() < 8
    from_file = captioner.caption_images(default_model, [path])[0]
    assert captioner.caption_images(default_model, [Image.open(path)])[0].text == from_file.text
