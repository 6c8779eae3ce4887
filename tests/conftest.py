from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "captioner" / "examples"
SHARED_SAMPLES = ROOT.parent / "shared" / "samples"


@pytest.fixture(scope="session")
def default_model():
    """The shipped model, loaded once per test session (it loads in about a second)."""
    from captioner.api import load_model

    return load_model()


@pytest.fixture(scope="module")
def small_model():
    """A tiny untrained model (16-wide decoder, 6 words) on the real encoder: fast to build, save and load."""
    import torch

    from captioner.model import CaptionModel, ModelConfig
    from captioner.options import DecoderConfig, DecodingOptions
    from captioner.vocab import Vocabulary

    torch.manual_seed(0)
    vocab = Vocabulary(["a", "cat", "dog", "on", "the", "grass"])
    config = ModelConfig("efficientnet_lite0", DecoderConfig(len(vocab), 1280, 16, 16, True, 16, 0.0),
                         DecodingOptions(beam_size=2, max_length=6))
    return CaptionModel(config, vocab).eval()
