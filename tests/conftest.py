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
