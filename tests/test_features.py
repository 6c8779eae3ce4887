"""The feature cache: computed once, and a cache file that cannot serve is a miss, not a crash."""

import shutil

import pytest
import torch
from conftest import SAMPLES, SHARED_SAMPLES
from safetensors.torch import save_file

from captioner.encoders import build_encoder
from captioner.features import cache_key, cached_features, read_cache

PHOTOS = [SAMPLES / "chelsea.png", SHARED_SAMPLES / "rocket.jpg"]


@pytest.fixture(scope="module")
def encoder():
    return build_encoder("efficientnet_lite0").eval()


@pytest.fixture()
def cache(encoder, tmp_path):
    """A cache folder holding the real features of PHOTOS; returns (folder, file, features)."""
    features = cached_features(encoder, PHOTOS, tmp_path / "cache", num_workers=0, progress=False)
    file = tmp_path / "cache" / f"{cache_key(encoder.name, PHOTOS, False)}.safetensors"
    assert file.is_file()
    return tmp_path / "cache", file, features


def test_features_are_cached_and_read_back(encoder, cache, capsys):
    folder, file, features = cache
    assert features.shape == (2, 1280, 7, 7) and features.dtype == torch.float16
    again = cached_features(encoder, PHOTOS, folder, num_workers=0, progress=False)
    assert torch.equal(again, features)
    assert capsys.readouterr().err == ""
    assert [p.name for p in folder.iterdir()] == [file.name]  # no temporary file left behind


def test_a_photo_replaced_under_the_same_name_is_encoded_again(encoder, tmp_path):
    photos = [tmp_path / "a.png", tmp_path / "b.jpg"]
    for source, photo in zip(PHOTOS, photos, strict=True):
        shutil.copy(source, photo)
    first = cached_features(encoder, photos, tmp_path / "cache", num_workers=0, progress=False)
    shutil.copy(SHARED_SAMPLES / "coffee.png", photos[0])  # another picture, same name
    second = cached_features(encoder, photos, tmp_path / "cache", num_workers=0, progress=False)
    assert not torch.equal(second[0], first[0]) and torch.equal(second[1], first[1])
    assert len(list((tmp_path / "cache").iterdir())) == 2


def _garbage(file, features):
    file.write_bytes(b"\x89garbage" * 100)


def _cut(file, features):
    file.write_bytes(file.read_bytes()[:1000])


def _too_few(file, features):
    save_file({"features": features[:1].contiguous()}, file)


def _float32(file, features):
    save_file({"features": features.float()}, file)


def _other_channels(file, features):
    save_file({"features": features[:, :640].contiguous()}, file)


def _nan(file, features):
    poisoned = features.clone()
    poisoned[1, 5, 3, 3] = float("nan")
    save_file({"features": poisoned}, file)


def _other_key(file, features):
    save_file({"grids": features}, file)


@pytest.mark.parametrize(
    "poison, reason",
    [
        (_garbage, "Error while deserializing header"),
        (_cut, "Error while deserializing header"),
        (_too_few, "holds 1 grids of 1280 channels, not 2 of 1280"),
        (_float32, "holds torch.float32 of 4 dimensions, not 4-d float16"),
        (_other_channels, "holds 2 grids of 640 channels, not 2 of 1280"),
        (_nan, "holds NaN or infinite values"),
        (_other_key, "holds ['grids'], not features"),
    ],
)
def test_a_poisoned_cache_file_is_recomputed_with_one_note(encoder, cache, capsys, poison, reason):
    folder, file, features = cache
    poison(file, features)
    again = cached_features(encoder, PHOTOS, folder, num_workers=0, progress=False)
    assert torch.equal(again, features)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"note: {file}: unreadable (")
    assert reason in err[0] and err[0].endswith("); recomputing")
    assert torch.equal(read_cache(file, 2, 1280), features)  # replaced by a good file


def test_a_cache_that_cannot_be_written_is_noted_and_the_features_still_returned(encoder, tmp_path, capsys):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    features = cached_features(encoder, PHOTOS, blocked, num_workers=0, progress=False)
    assert features.shape == (2, 1280, 7, 7)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"note: {blocked}/") and "cannot store features" in err[0]
