"""Loading real photos in every awkward shape Pillow can hand us, and refusing bad files clearly."""

import os
import shutil
import struct
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import captioner.images
from captioner.errors import CaptionerError, ImageReadError
from captioner.images import bytes_pixels, ignore_pillow_noise, is_image_path, load_image, model_pixels, to_rgb

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"  # /work/shared/samples
ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def cat():
    with Image.open(SAMPLES / "chelsea.png") as image:
        return image.convert("RGB")  # 451x300


def mean_abs_diff(a, b):
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean()


def assert_read_error(path, reason):
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert reason.lower() in message[len(f"{path}: ") :].lower(), message
    return info.value


@pytest.mark.parametrize("name, size", [("chelsea.png", (451, 300)), ("rocket.jpg", (640, 427))])
def test_rgb_photo_loads_unchanged(name, size):
    image = load_image(SAMPLES / name)
    assert image.mode == "RGB"
    assert image.size == size
    with Image.open(SAMPLES / name) as original:
        assert np.array_equal(np.asarray(image), np.asarray(original.convert("RGB")))


def test_pixels_stay_readable_after_the_file_is_gone(tmp_path, cat):
    """The file handle is closed on return, so the image must already be decoded."""
    path = tmp_path / "cat.png"
    cat.save(path)
    image = load_image(path)
    path.unlink()
    assert np.array_equal(np.asarray(image), np.asarray(cat))


def test_exif_orientation_is_applied(tmp_path, cat):
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # camera held rotated: display after turning 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    cat.save(path, exif=exif, quality=95)
    with Image.open(path) as raw:
        assert raw.size == (451, 300) and raw.getexif()[ORIENTATION] == 6

    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (300, 451)
    upright = cat.transpose(Image.Transpose.ROTATE_270)
    wrong_way = cat.transpose(Image.Transpose.ROTATE_90)
    assert mean_abs_diff(image, upright) < 3
    assert mean_abs_diff(image, wrong_way) > 20
    # The tag is consumed, so nothing downstream can rotate the photo a second time.
    assert image.getexif().get(ORIENTATION, 1) == 1


def test_grayscale(tmp_path):
    with Image.open(SAMPLES / "coffee.png") as coffee:
        gray = coffee.convert("L")
    path = tmp_path / "gray.png"
    gray.save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (600, 400)
    pixels = np.asarray(image)
    assert np.array_equal(pixels[..., 0], np.asarray(gray))
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])


def test_palette_with_transparency_composited_on_white(tmp_path, cat):
    palette = cat.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    indices = np.asarray(palette)
    clear = int(indices[0, 0])
    path = tmp_path / "palette.png"
    palette.save(path, transparency=clear)
    with Image.open(path) as raw:
        assert raw.mode == "P" and raw.info["transparency"] == clear

    pixels = np.asarray(load_image(path))
    assert pixels.shape == (300, 451, 3)
    assert (pixels[indices == clear] == 255).all()
    opaque = palette.convert("RGB")
    assert np.array_equal(pixels[indices != clear], np.asarray(opaque)[indices != clear])


def test_rgba_transparent_pixels_become_white(tmp_path):
    with Image.open(SAMPLES / "astronaut.png") as astronaut:
        rgb = np.asarray(astronaut.convert("RGB"))
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:100] = 0  # fully transparent band on top
    alpha[100:200] = 128  # half transparent band
    path = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)

    image = load_image(path)
    assert image.mode == "RGB" and image.size == (512, 512)
    pixels = np.asarray(image).astype(int)
    assert (pixels[:100] == 255).all()
    half = (rgb[100:200].astype(int) + 255) / 2
    assert np.abs(pixels[100:200] - half).max() <= 1
    assert np.array_equal(pixels[200:], rgb[200:])


def test_cmyk_jpeg(tmp_path, cat):
    path = tmp_path / "cmyk.jpg"
    cat.convert("CMYK").save(path, quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (451, 300)
    assert mean_abs_diff(image, cat) < 5  # an inverted-CMYK mix-up would be off by ~100


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_a_large_jpeg_is_decoded_at_a_reduced_scale_with_the_same_picture(tmp_path, cat, mode):
    """DCT scaling for model input: 1/4 of each side here, and pixels as from the full decode."""
    path = tmp_path / "large.jpg"
    cat.resize((4000, 3000)).convert(mode).save(path, quality=90)
    reduced = load_image(path, min_side=3 * 224)
    assert reduced.mode == "RGB" and reduced.size == (1000, 750)  # the largest reduction keeping both sides >= 672
    assert load_image(path).size == (4000, 3000)  # without min_side, the whole picture
    with Image.open(path) as full:
        full_pixels = to_rgb(full).resize((224, 224), Image.Resampling.BICUBIC, reducing_gap=3.0)
    assert mean_abs_diff(model_pixels(path, 224), full_pixels) < 2  # measured 0.13-0.17 (0-255 scale)


def test_16_bit_grayscale_maps_to_8_bit(tmp_path):
    values = np.zeros((20, 30), np.uint16)
    values[:, :10] = 65535
    values[:, 10:20] = 100 * 257  # 8-bit 100 stretched to 16 bits
    values[:, 20:] = 200  # dark in 16-bit terms, not a mid gray
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "I;16"

    image = load_image(path)
    assert image.mode == "RGB" and image.size == (30, 20)
    pixels = np.asarray(image)
    assert (pixels[:, :10] == 255).all()
    assert (pixels[:, 10:20] == 100).all()
    assert (pixels[:, 20:] == 0).all()


def test_8_bit_values_in_a_16_bit_file_and_floats_in_0_1_keep_their_picture(tmp_path, cat):
    gray = np.asarray(cat.convert("L"))
    path = tmp_path / "widened.png"
    cat.convert("L").convert("I;16").save(path)  # Pillow widens without scaling: values stay 0-255
    assert np.array_equal(np.asarray(load_image(path))[..., 0], gray)
    floats = Image.fromarray(gray.astype(np.float32) / 255.0, mode="F")
    assert np.abs(np.asarray(to_rgb(floats))[..., 0].astype(int) - gray).max() <= 1


def test_16_bit_photo_keeps_its_picture(tmp_path, cat):
    gray = np.asarray(cat.convert("L"))
    path = tmp_path / "cat16.png"
    Image.fromarray(gray.astype(np.uint16) * 257).save(path)
    pixels = np.asarray(load_image(path))
    assert np.array_equal(pixels[..., 1], gray)


def test_to_rgb_returns_rgb_input_as_is(cat):
    assert to_rgb(cat) is cat


def test_zero_byte_file(tmp_path):
    path = tmp_path / "zero.jpg"
    path.touch()
    assert_read_error(path, "empty file")


def test_truncated_jpeg(tmp_path):
    data = (SAMPLES / "rocket.jpg").read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) * 4 // 10])
    assert_read_error(path, "truncated")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not a photo at all\n")
    error = assert_read_error(path, "not an image")
    assert isinstance(error, CaptionerError)


def test_missing_file(tmp_path):
    assert_read_error(tmp_path / "nowhere.png", "no such file")


def test_path_given_as_string(tmp_path):
    path = tmp_path / "zero.png"
    path.touch()
    assert_read_error(str(path), "empty file")


def test_too_many_pixels_raises_instead_of_warning(tmp_path, monkeypatch):
    path = tmp_path / "chelsea.png"
    shutil.copy(SAMPLES / "chelsea.png", path)
    monkeypatch.setattr(captioner.images, "MAX_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_read_error(path, "451x300 pixels exceeds the limit of 1000")


def test_the_pixel_limit_is_ours_not_pillows(tmp_path):
    # Pillow by itself refuses from 179 million pixels (2x its 89.5 million): a 100-megapixel camera's photo
    Image.new("1", (10_000, 9_000), 1).save(tmp_path / "90mp.png")
    assert model_pixels(tmp_path / "90mp.png", 224).shape == (224, 224, 3)
    Image.new("1", (16_000, 15_100)).save(tmp_path / "over.png")  # 241.6 million
    assert_read_error(tmp_path / "over.png", "16000x15100 pixels exceeds the limit of 240000000")


@pytest.mark.parametrize("limit", [100_000, 50_000])
def test_pillow_bomb_guard_becomes_read_error(tmp_path, monkeypatch, limit):
    """Above Pillow's own limit it warns (up to 2x) or raises; both must end as ImageReadError."""
    path = tmp_path / "chelsea.png"  # 135,300 pixels
    shutil.copy(SAMPLES / "chelsea.png", path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ignore_pillow_noise()  # as in a process that imported captioner (pytest puts its own filters first)
        assert_read_error(path, f"exceeds the limit of {limit}")
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


def corrupt_exif_jpeg(path):
    """A JPEG whose EXIF block names a tag lying past its end: Pillow warns, the picture decodes."""
    entry = struct.pack("<H", 1) + struct.pack("<HHLL", 0x010E, 2, 100, 1000) + struct.pack("<L", 0)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path, "JPEG", exif=b"Exif\0\0II*\0" + struct.pack("<L", 8) + entry)
    return path


def test_threads_decoding_at_once_leave_the_processs_warning_filters_as_they_were(tmp_path):
    data = corrupt_exif_jpeg(tmp_path / "exif.jpg").read_bytes()
    before = list(warnings.filters)

    def decode() -> None:
        for _ in range(50):
            assert bytes_pixels(data, "exif.jpg", 224).shape == (224, 224, 3)

    threads = [threading.Thread(target=decode) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert warnings.filters == before  # once: 'ignore' for every UserWarning, left behind by racing threads


def test_a_corrupt_exif_block_and_a_picture_over_the_limit_print_no_pillow_warning(tmp_path):
    corrupt_exif_jpeg(tmp_path / "exif.jpg")
    Image.new("1", (16_000, 15_100)).save(tmp_path / "over.png")  # 241.6 million pixels: Pillow warns, we refuse
    done = subprocess.run([sys.executable, "-m", "captioner.pipelines.cli", "caption", str(tmp_path / "exif.jpg"),
                           str(tmp_path / "over.png")], capture_output=True, text=True, timeout=300)
    assert done.stdout.startswith(f"{tmp_path / 'exif.jpg'}\t")
    assert done.stderr.strip().splitlines() == [f"skipped {tmp_path / 'over.png'}: 16000x15100 pixels exceeds the "
                                                "limit of 240000000"], done.stderr


@pytest.mark.parametrize("name", ["a.jpg", "a.JPG", "b.Png", "c.jpeg", "d.JPEG", "e.webp", "f.TIFF", "dir/g.bmp"])
def test_is_image_path_accepts_photo_extensions(name):
    assert is_image_path(name)
    assert is_image_path(Path(name))


@pytest.mark.parametrize("name", ["notes.txt", "jpg", "photo.jpg.zip", "clip.mp4", "model.safetensors", ""])
def test_is_image_path_rejects_others(name):
    assert not is_image_path(name)


def test_a_fifo_named_like_a_photo_is_refused_not_waited_on(tmp_path):
    path = tmp_path / "pipe.jpg"
    os.mkfifo(path)
    assert_read_error(path, "not a regular file")
