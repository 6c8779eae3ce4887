"""Model folders: save/load round trip, and loading refuses anything but tensors and JSON."""

import pickle

import pytest
import torch
from conftest import SAMPLES

from captioner.api import caption_images
from captioner.decoder import DecoderConfig
from captioner.decoding import DecodingOptions
from captioner.errors import ModelLoadError
from captioner.model import CaptionModel, ModelConfig
from captioner.vocab import Vocabulary


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    vocab = Vocabulary(["a", "cat", "dog", "on", "the", "grass"])
    config = ModelConfig("efficientnet_lite0", DecoderConfig(len(vocab), 1280, 16, 16, True, 16, 0.0),
                         DecodingOptions(beam_size=2, max_length=6))
    return CaptionModel(config, vocab).eval()


def test_save_load_round_trip_gives_the_same_captions(small_model, tmp_path):
    small_model.save(tmp_path / "m")
    loaded = CaptionModel.load(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    assert loaded.config == small_model.config
    small_model.decoder.half().float()  # the file stores decoder weights as float16
    before = caption_images(small_model, [SAMPLES / "chelsea.png"])
    after = caption_images(loaded, [SAMPLES / "chelsea.png"])
    assert [c.text for c in after] == [c.text for c in before]
    assert after[0].score == pytest.approx(before[0].score, abs=1e-4)


def test_a_pickle_in_place_of_safetensors_is_refused(small_model, tmp_path):
    small_model.save(tmp_path / "m")
    with open(tmp_path / "m" / "model.safetensors", "wb") as f:
        pickle.dump({"decoder.out.weight": torch.zeros(1)}, f)
    with pytest.raises(ModelLoadError, match="cannot load model"):
        CaptionModel.load(tmp_path / "m")


def test_missing_files_and_mismatched_shapes_are_clear_errors(small_model, tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load model"):
        CaptionModel.load(tmp_path / "nowhere")
    small_model.save(tmp_path / "m")
    Vocabulary(["a", "b"]).save(tmp_path / "m" / "vocab.json")
    with pytest.raises(ModelLoadError, match="vocabulary has 6 words"):
        CaptionModel.load(tmp_path / "m")


def test_unknown_config_fields_are_refused(small_model, tmp_path):
    small_model.save(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"encoder": "efficientnet_lite0", "decoder": {"bogus": 1}}')
    with pytest.raises(ModelLoadError, match="bad model config"):
        CaptionModel.load(tmp_path / "m")


def test_default_model_is_small_and_loads_without_network(default_model):
    from captioner.model import DEFAULT_MODEL_DIR

    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir())
    assert size < 40 * 2**20
    assert (DEFAULT_MODEL_DIR / "MODEL_CARD.md").exists()
    assert default_model.config.encoder == "efficientnet_lite0"
    assert default_model.decoder.config.attention
