"""A caption model whose encoder and decoder step run in ONNX Runtime (``--backend onnxruntime``).

The graphs come from :func:`captioner.onnx_export.export_onnx`. Two small adapters stand
where the PyTorch encoder and decoder stood, with the same methods (``encode``,
``classify``; ``start``, ``step``), so the same batched beam search, token rules, tags and
confidence run unchanged: only the arithmetic moves to ONNX Runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from captioner.decoder import DecoderState
from captioner.encoders import Preprocess
from captioner.errors import ModelLoadError, printable, reason
from captioner.model import CaptionModel, ModelConfig, read_consensus_and_calibrator
from captioner.onnx_export import GRAPHS, RUNTIME_FILE
from captioner.options import DecoderConfig, DecodingOptions
from captioner.vocab import SPECIALS, Vocabulary


def _session(path: Path):
    """An ONNX Runtime session on this process's torch thread count.

    Raises:
        ModelLoadError: ``PATH: cannot load ONNX graph: reason`` for a missing or malformed file.
    """
    import onnxruntime as ort

    if not path.is_file():
        raise ModelLoadError(f"{printable(path)}: cannot load ONNX graph: no such file (run captioner export)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    # idle threads sleep instead of spinning: the search calls the step graph many times, with PyTorch
    # and image decoding running in between on the same cores (1.8x the search's speed here)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 (ONNX Runtime raises its own exception types for bad files)
        raise ModelLoadError(f"{printable(path)}: cannot load ONNX graph: {reason(e)[:300]}") from e


class OnnxEncoder(nn.Module):
    """The encoder graph and the classifier head graph behind :class:`captioner.encoders.Encoder`'s methods."""

    def __init__(self, folder: Path, runtime: dict):
        super().__init__()
        pre = runtime["preprocess"]
        self.preprocess = Preprocess(pre["size"], tuple(pre["mean"]), tuple(pre["std"]))
        self.name = runtime["encoder"]
        self.out_channels = runtime["grid_channels"]
        self.class_names = tuple(runtime["class_names"]) or None
        self._encoder = _session(folder / "encoder.onnx")
        self._classifier = _session(folder / "classifier.onnx") if self.class_names else None

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 pixels -> (B, C, h, w) grid."""
        return torch.from_numpy(self._encoder.run(None, {"pixels": np.ascontiguousarray(pixels.numpy())})[0])

    def classify(self, grid: torch.Tensor) -> torch.Tensor | None:
        if self._classifier is None:
            return None
        return torch.from_numpy(self._classifier.run(None, {"grid": grid.float().numpy()})[0])


class OnnxDecoder(nn.Module):
    """``start`` and ``step`` of :class:`captioner.decoder.CaptionDecoder`, run by the two decoder graphs."""

    def __init__(self, folder: Path):
        super().__init__()
        self._start = _session(folder / "decoder_start.onnx")
        self._step = _session(folder / "decoder_step.onnx")
        self._device = nn.Parameter(torch.zeros(0), requires_grad=False)  # where model.device looks

    def start(self, grid: torch.Tensor, width: int = 1) -> DecoderState:
        h, c, values, keys = (torch.from_numpy(a) for a in self._start.run(None, {"grid": grid.float().numpy()}))
        return (h.repeat_interleave(width, dim=0), c.repeat_interleave(width, dim=0), values, keys)

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        h, c, values, keys = state
        feed = {"tokens": tokens.numpy(), "h": h.numpy(), "c": c.numpy(), "values": values.numpy(),
                "keys": keys.numpy()}
        log_probs, h, c = self._step.run(None, feed)
        return torch.from_numpy(log_probs), (torch.from_numpy(h), torch.from_numpy(c), values, keys)


def load_onnx_model(folder: str | Path) -> CaptionModel:
    """A :class:`CaptionModel` over the export in ``folder``.

    Raises:
        ModelLoadError: a graph or runtime.json is missing or malformed (the message names the file).
    """
    folder = Path(folder)
    runtime = _runtime(folder / RUNTIME_FILE)
    try:
        config = ModelConfig(encoder=runtime["encoder"], decoder=DecoderConfig(**runtime["decoder"]),
                             decoding=DecodingOptions.from_dict(runtime["decoding"]))
        words = runtime["vocabulary"]
        if list(words[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError("the vocabulary does not start with the special tokens")
        vocab = Vocabulary(words[len(SPECIALS):])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{printable(folder / RUNTIME_FILE)}: bad runtime description: {e}") from e
    model = CaptionModel(config, vocab, pretrained_encoder=False)
    try:
        model.encoder = OnnxEncoder(folder, runtime)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{printable(folder / RUNTIME_FILE)}: bad runtime description: {e!r}") from e
    model.decoder = OnnxDecoder(folder)
    model.consensus, model.calibrator = read_consensus_and_calibrator(folder, model.encoder.out_channels)
    return model.eval()


def _runtime(path: Path) -> dict:
    try:
        runtime = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{printable(path)}: cannot read the export's description: "
                             f"{getattr(e, 'strerror', None) or e}") from e
    if not isinstance(runtime, dict):
        raise ModelLoadError(f"{printable(path)}: bad runtime description: not a JSON object")
    return runtime


__all__ = ["GRAPHS", "OnnxDecoder", "OnnxEncoder", "load_onnx_model"]
