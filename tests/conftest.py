import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(*flags: str):
    """``captioner serve FLAGS`` as users start it: a real uvicorn process on loopback; yields (url, process)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "captioner.pipelines.cli", "serve", "--port", str(port), *flags],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url + "/healthz", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def live_server():
    """``captioner serve`` with its defaults."""
    with serving() as (url, _):
        yield url


def bury_too_deep(root: Path, name: str, content: bytes) -> Path:
    """Write ``content`` as ``name`` in a folder whose path is longer than the system lets anyone list by name.

    Made step by step from inside, as a user's unpacked archive can be; returns the deepest folder's path.
    """
    import os

    start = os.getcwd()
    os.makedirs(root, exist_ok=True)
    os.chdir(root)
    try:
        for _ in range(18):  # 18 x 244 characters: past PATH_MAX (4096)
            os.mkdir("d" * 243)
            os.chdir("d" * 243)
        with open(name, "wb") as f:
            f.write(content)
    finally:
        os.chdir(start)
    return root.joinpath(*["d" * 243] * 18)
