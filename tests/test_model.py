"""Model folders: save/load round trip, and loading refuses anything but tensors and JSON."""

import dataclasses
import pickle

import pytest
import torch
from conftest import SAMPLES

from captioner.api import caption_images
from captioner.decoder import DecoderConfig
from captioner.decoding import DecodingOptions
from captioner.errors import ModelLoadError
from captioner.model import CaptionModel, ModelConfig, ensemble
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
    assert size < 64 * 2**20  # three float16 decoders of 17 MB
    assert (DEFAULT_MODEL_DIR / "MODEL_CARD.md").exists()
    assert default_model.config.encoder == "efficientnet_lite0"
    assert default_model.decoder.config.attention


def _sibling(model: CaptionModel, seed: int) -> CaptionModel:
    """A model shaped like ``model`` with other decoder weights (a different training seed)."""
    torch.manual_seed(seed)
    other = CaptionModel(model.config, model.vocab, pretrained_encoder=False)
    other.encoder = model.encoder
    return other.eval()


def test_an_ensemble_of_one_model_twice_captions_like_the_model(small_model):
    both = ensemble([small_model, small_model])
    options = DecodingOptions(beam_size=3, max_length=6, n_best=3)
    grid = torch.randn(4, 1280, 7, 7, generator=torch.Generator().manual_seed(0))
    alone = [c for n_best in small_model.caption_grid(grid, options) for c in n_best]
    together = [c for n_best in both.caption_grid(grid, options) for c in n_best]
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.score for c in together] == pytest.approx([c.score for c in alone], abs=1e-5)
    photo = caption_images(both, [SAMPLES / "chelsea.png"])  # the full path, from pixels
    assert photo[0].text == caption_images(small_model, [SAMPLES / "chelsea.png"])[0].text


def test_ensemble_step_averages_member_probabilities(small_model):
    other = _sibling(small_model, seed=1)
    both = ensemble([small_model, other])
    grid = torch.randn(2, 1280, 7, 7)
    decoders = [both.decoder, small_model.decoder, other.decoder]
    states = [d.start(grid) for d in decoders]
    words = [small_model.vocab.start, small_model.vocab.stoi["cat"], small_model.vocab.stoi["on"]]
    with torch.no_grad():
        for word in words:  # several steps: each member must keep getting its own state back
            tokens = torch.tensor([word] * 2)
            steps = [d.step(tokens, s) for d, s in zip(decoders, states, strict=True)]
            (mixed, first, second), states = [log_probs for log_probs, _ in steps], [s for _, s in steps]
            assert mixed.exp() == pytest.approx((first.exp() + second.exp()) / 2, abs=1e-6)
            assert not torch.allclose(first, second)


@pytest.mark.parametrize("attention", [True, False])
def test_ensemble_save_load_round_trip(attention, tmp_path):
    vocab = Vocabulary(["a", "cat", "dog", "on", "the", "grass"])
    config = ModelConfig("efficientnet_lite0", DecoderConfig(len(vocab), 1280, 16, 16, attention, 16, 0.0),
                         DecodingOptions(beam_size=2, max_length=6))
    members = [CaptionModel(config, vocab, pretrained_encoder=False) for _ in range(2)]
    for m in members:
        m.decoder.half().float()  # the file stores decoder weights as float16
    combined = ensemble(members)
    combined.save(tmp_path / "m")
    loaded = CaptionModel.load(tmp_path / "m")
    assert loaded.config.ensemble_size == 2
    grid = torch.randn(3, 1280, 7, 7)
    assert [c[0].text for c in loaded.caption_grid(grid)] == [c[0].text for c in combined.caption_grid(grid)]
    three = ensemble([loaded, members[0]])  # an ensemble can grow by another member
    assert three.config.ensemble_size == 3


def test_ensemble_members_must_match(small_model):
    with pytest.raises(ModelLoadError, match="at least 2"):
        ensemble([small_model])
    other_vocab = Vocabulary(["a", "cat", "dog", "on", "the", "sand"])
    stranger = CaptionModel(small_model.config, other_vocab, pretrained_encoder=False)
    with pytest.raises(ModelLoadError, match="different vocabularies"):
        ensemble([small_model, stranger])
    wider = dataclasses.replace(small_model.config, decoder=dataclasses.replace(small_model.config.decoder,
                                                                                hidden_dim=32))
    with pytest.raises(ModelLoadError, match="decoder shape"):
        ensemble([small_model, CaptionModel(wider, small_model.vocab, pretrained_encoder=False)])
