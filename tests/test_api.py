"""The Python front doors: three lines from import to captions, and evaluation on a manifest."""

import json

import numpy as np
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


def test_the_front_doors_name_a_wrong_argument_before_any_work(default_model, tmp_path):
    from captioner.errors import ModelLoadError, OptionError

    cat = SHARED_SAMPLES / "chelsea.png"
    with pytest.raises(OptionError, match="images must be a list"):
        captioner.caption_images(default_model, str(cat))  # it would be read letter by letter
    with pytest.raises(OptionError, match="paths must be a list"):
        captioner.caption_paths(default_model, cat)  # at the call, not at the first result
    picture = Image.open(cat)
    for one in (picture, np.asarray(picture.convert("RGB"))):  # it would be walked row by row
        message = f"images must be a list .* for one {type(one).__name__}, pass \\[image\\]"
        with pytest.raises(OptionError, match=message):
            captioner.caption_images(default_model, one)
    with pytest.raises(OptionError, match="images must be a list .* not NoneType"):
        captioner.caption_images(default_model, None)
    frames = np.stack([np.asarray(picture.convert("RGB").resize((64, 48)))] * 2)  # (N, H, W, 3): N frames
    assert len(captioner.caption_images(default_model, frames)) == 2
    for bad in (0, -1, 2.5):
        with pytest.raises(OptionError, match=f"batch_size={bad!r} must be a whole number of at least 1"):
            captioner.caption_images(default_model, [cat], batch_size=bad)
    with pytest.raises(OptionError, match="num_workers=-1"):
        captioner.caption_paths(default_model, [cat], num_workers=-1)
    assert captioner.caption_images(default_model, [cat], batch_size=np.int64(2))[0].text  # numpy ints are counts
    with pytest.raises(OptionError, match="options must be a DecodingOptions"):
        captioner.caption_images(default_model, [cat], options={"beam_size": 2})
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="a file, not a model folder"):
        captioner.load_model(tmp_path / "model.txt")
    with pytest.raises(ModelLoadError):
        captioner.load_model("")  # the current folder, not the shipped model
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="CUDA is not available here"):
            captioner.load_model(device="cuda")


def test_every_front_door_names_a_wrong_model_path_or_options_argument(default_model, tmp_path):
    from captioner.errors import OptionError
    from captioner.pipelines.folder import caption_folder
    from captioner.pipelines.video import subtitle_video

    cat = SHARED_SAMPLES / "chelsea.png"
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, [(str(cat), ["a cat"]), (str(SHARED_SAMPLES / "coffee.png"), ["a cup"])])
    for call, message in [
        (lambda: captioner.caption_images(None, [cat]), "model must be a CaptionModel .* not NoneType"),
        (lambda: captioner.caption_paths("model", [cat]), "model must be a CaptionModel .* not str"),
        (lambda: captioner.evaluate(default_model, [manifest]), "manifest must be one path .* not list"),
        (lambda: captioner.load_model(b"/models/m"), "path must be a path as str or os.PathLike, not bytes"),
        (lambda: caption_folder(tmp_path, tmp_path / "o.jsonl", model=None), "model must be a CaptionModel"),
        (lambda: caption_folder(bytes(tmp_path), tmp_path / "o.jsonl", model=default_model), "root must be"),
        (lambda: caption_folder(tmp_path, None, model=default_model), "records must be one path .* NoneType"),
        (lambda: caption_folder(tmp_path, tmp_path / "o.jsonl", model=default_model, options={"n_best": 2}),
         "options must be a DecodingOptions .* not dict"),
        (lambda: caption_folder(tmp_path, tmp_path / "o.jsonl", model=default_model, retry_errors="no"),
         "retry_errors='no' must be True or False"),
        (lambda: subtitle_video(tmp_path / "v.mp4", model=default_model, settings={"every": 1.0}),
         "settings must be a VideoOptions .* not dict"),
        (lambda: subtitle_video([tmp_path / "v.mp4"], model=default_model), "path must be one path .* not list"),
        (lambda: subtitle_video(tmp_path / "v.mp4", model=default_model, options={"n_best": 2}),
         "options must be a DecodingOptions"),
    ]:
        with pytest.raises(OptionError, match=message):
            call()
    assert not (tmp_path / "o.jsonl").exists()


def test_a_model_that_fails_on_every_picture_stops_a_folder_run_and_records_no_file_as_failed(tmp_path):
    import shutil

    from captioner.errors import CaptionerError
    from captioner.pipelines.folder import caption_folder

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("chelsea.png", "coffee.png", "astronaut.png"):
        shutil.copy(SHARED_SAMPLES / name, photos / name)
    broken = captioner.load_model().half()  # float16 weights, float32 pictures: every batch fails
    out = tmp_path / "out.jsonl"
    with pytest.raises(CaptionerError, match="the model fails to caption any picture, a blank one too"):
        caption_folder(photos, out, model=broken, progress=False, num_workers=0)
    assert not out.exists() or out.read_text() == ""  # no photo is on record as failed
    summary = caption_folder(photos, out, model=captioner.load_model(), progress=False, num_workers=0)
    assert (summary.captioned, summary.failed) == (3, 0)


def test_options_changed_from_the_models_own_keep_its_caption(default_model):
    import dataclasses

    cat = SHARED_SAMPLES / "chelsea.png"
    plain = next(captioner.caption_paths(default_model, [cat])).captions
    three = dataclasses.replace(default_model.config.decoding, n_best=3)
    alternatives = next(captioner.caption_paths(default_model, [cat], options=three)).captions
    assert len(plain) == 1 and len(alternatives) == 3 and alternatives[0].text == plain[0].text


def test_an_item_that_is_no_picture_is_a_read_error_and_caption_paths_goes_on(default_model):
    cat, coffee = SHARED_SAMPLES / "chelsea.png", SHARED_SAMPLES / "coffee.png"
    results = list(captioner.caption_paths(default_model, [cat, None, 123, bytes(coffee)]))
    assert [r.path for r in results] == [cat, None, 123, bytes(coffee)]
    assert [r.error for r in results[1:3]] == ["None: not a path, a PIL image or an (H, W, 3) array (NoneType)",
                                               "123: not a path, a PIL image or an (H, W, 3) array (int)"]
    assert "cat" in results[0].captions[0].text and "dog" in results[3].captions[0].text  # a bytes path reads
    photo_bytes = next(captioner.caption_paths(default_model, [cat.read_bytes()]))  # the photo, not its path
    assert photo_bytes.error.endswith(": not a file name: it holds a NUL character") and not photo_bytes.captions
    with pytest.raises(captioner.CaptionerError, match=r"^123: not a path"):
        captioner.caption_images(default_model, [cat, 123])


def test_odd_pil_images_are_read_errors_or_captioned_never_a_bare_error(default_model):
    from captioner.errors import ImageReadError

    with pytest.raises(ImageReadError, match="an empty PIL image"):
        captioner.caption_images(default_model, [Image.new("RGB", (0, 0))])
    closed = Image.open(SHARED_SAMPLES / "chelsea.png")
    closed.close()
    with pytest.raises(ImageReadError, match="cannot read this PIL image"):
        captioner.caption_images(default_model, [closed])
    premultiplied = Image.open(SHARED_SAMPLES / "chelsea.png").convert("LA").convert("La")
    assert captioner.caption_images(default_model, [premultiplied])[0].text


def test_building_decoding_options_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; from captioner import DecodingOptions; DecodingOptions(beam_size=2); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_a_callers_iterator_that_fails_part_way_has_what_it_gave_captioned_first(default_model):
    cat, coffee = SHARED_SAMPLES / "chelsea.png", SHARED_SAMPLES / "coffee.png"

    def listing():
        yield cat
        yield coffee
        raise OSError("the listing's disk went away")

    results = captioner.caption_paths(default_model, listing())
    first, second = next(results), next(results)
    assert [first.path, second.path] == [cat, coffee] and first.captions and second.captions
    with pytest.raises(OSError, match="the listing's disk went away"):
        next(results)


def test_a_nameless_picture_that_cannot_be_read_is_named_by_its_place_in_the_list(default_model):
    from captioner.errors import ImageReadError

    cat = SHARED_SAMPLES / "chelsea.png"
    flat = np.zeros((4, 4), dtype=np.uint8)
    with pytest.raises(ImageReadError, match=r"^images\[2\]: an array picture must be \(H, W, 3\) uint8 RGB, "
                                             r"got uint8 \(4, 4\)$"):
        captioner.caption_images(default_model, [cat, Image.open(cat), flat])
    with pytest.raises(ImageReadError, match=r"^images\[1\]: an empty PIL image"):
        captioner.caption_images(default_model, [cat, Image.new("RGB", (0, 0))])
