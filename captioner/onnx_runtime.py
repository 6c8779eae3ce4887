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
from captioner.errors import ModelLoadError, printable, reason, shortened
from captioner.finite import is_finite_number
from captioner.model import CaptionModel, ModelConfig, read_consensus_and_calibrator
from captioner.onnx_export import GRAPHS, RUNTIME_FILE, check_seal
from captioner.options import DecoderConfig, DecodingOptions
from captioner.tags import label_problem
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
        graph = path.read_bytes()  # ONNX Runtime takes a path as UTF-8 text only: a folder name that is not fails
    except OSError as e:
        raise ModelLoadError(f"{printable(path)}: cannot load ONNX graph: {reason(e)}") from e
    try:
        return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 (ONNX Runtime raises its own exception types for bad files)
        raise ModelLoadError(f"{printable(path)}: cannot load ONNX graph: {reason(e)[:300]}") from e


def _run(session, path: Path, feed: dict) -> list[np.ndarray]:
    """``session.run`` whose failure names its graph: a fault of the export, never of one image.

    Raises:
        ModelLoadError: ``PATH: ONNX Runtime failed on this graph: reason``.
    """
    try:
        return session.run(None, feed)
    except Exception as e:  # noqa: BLE001 (ONNX Runtime raises its own exception types)
        raise ModelLoadError(f"{printable(path)}: ONNX Runtime failed on this graph: {reason(e)[:300]}") from e


def _static(session, output: bool, index: int, axis: int) -> int | None:
    """A graph input's or output's size along ``axis`` when the graph fixes it (None: dynamic)."""
    shape = (session.get_outputs() if output else session.get_inputs())[index].shape
    size = shape[axis] if axis < len(shape) else None
    return size if isinstance(size, int) else None


class OnnxEncoder(nn.Module):
    """The encoder graph and the classifier head graph behind :class:`captioner.encoders.Encoder`'s methods."""

    def __init__(self, folder: Path, runtime: dict):
        super().__init__()
        pre = runtime["preprocess"]
        size, mean, std = pre["size"], pre["mean"], pre["std"]
        if not _positive_int(size) or not _numbers(mean, 3) or not _numbers(std, 3) or min(std) <= 0:
            raise ValueError("preprocess needs a positive whole size and three means and standard deviations "
                             f"(std above 0), not {shortened(repr((size, mean, std)), 120)}")
        self.preprocess = Preprocess(size, tuple(mean), tuple(std))
        self.name = runtime["encoder"]
        self.out_channels = runtime["grid_channels"]
        if not _positive_int(self.out_channels):
            raise ValueError(f"grid_channels must be a positive whole number, not {self.out_channels!r}")
        names = runtime["class_names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("class_names must be a list of names")
        for i, name in enumerate(names):
            if problem := label_problem(name):
                raise ValueError(f"class_names[{i}] {shortened(repr(name), 60)} {problem}")
        self.class_names = tuple(names) or None
        self._paths = {"encoder": folder / "encoder.onnx", "classifier": folder / "classifier.onnx"}
        self._encoder = _session(self._paths["encoder"])
        self._classifier = _session(self._paths["classifier"]) if self.class_names else None
        self._check_graphs()

    def _check_graphs(self) -> None:
        """The graphs take the pixels and give the grid and classes runtime.json says.

        Raises:
            ModelLoadError: naming the graph that does not fit.
        """
        size, channels = self.preprocess.size, self.out_channels
        for axis in (1, 2):
            if _static(self._encoder, False, 0, axis) not in (None, size):
                raise _misfit(self._paths["encoder"], f"takes {self._encoder.get_inputs()[0].shape} pixels, "
                                                      f"runtime.json says {size}x{size}")
        if _static(self._encoder, True, 0, 1) not in (None, channels):
            raise _misfit(self._paths["encoder"], f"gives a grid of {_static(self._encoder, True, 0, 1)} channels, "
                                                  f"runtime.json says {channels}")
        if self._classifier is not None:
            if _static(self._classifier, False, 0, 1) not in (None, channels):
                raise _misfit(self._paths["classifier"], f"takes a grid of {_static(self._classifier, False, 0, 1)} "
                                                         f"channels, runtime.json says {channels}")
            if _static(self._classifier, True, 0, 1) not in (None, len(self.class_names)):
                raise _misfit(self._paths["classifier"], f"gives {_static(self._classifier, True, 0, 1)} classes, "
                                                         f"runtime.json names {len(self.class_names)}")

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 pixels -> (B, C, h, w) grid."""
        return torch.from_numpy(_run(self._encoder, self._paths["encoder"],
                                     {"pixels": np.ascontiguousarray(pixels.numpy())})[0])

    def classify(self, grid: torch.Tensor) -> torch.Tensor | None:
        if self._classifier is None:
            return None
        return torch.from_numpy(_run(self._classifier, self._paths["classifier"], {"grid": grid.float().numpy()})[0])


class OnnxDecoder(nn.Module):
    """``start`` and ``step`` of :class:`captioner.decoder.CaptionDecoder`, run by the two decoder graphs."""

    def __init__(self, folder: Path, vocabulary_size: int, grid_channels: int):
        super().__init__()
        self._paths = {"start": folder / "decoder_start.onnx", "step": folder / "decoder_step.onnx"}
        self._start = _session(self._paths["start"])
        self._step = _session(self._paths["step"])
        self._device = nn.Parameter(torch.zeros(0), requires_grad=False)  # where model.device looks
        if _static(self._start, False, 0, 1) not in (None, grid_channels):
            raise _misfit(self._paths["start"], f"takes a grid of {_static(self._start, False, 0, 1)} channels, "
                                                f"runtime.json says {grid_channels}")
        if _static(self._step, True, 0, 1) not in (None, vocabulary_size):
            raise _misfit(self._paths["step"], f"scores {_static(self._step, True, 0, 1)} words, "
                                               f"runtime.json's vocabulary has {vocabulary_size}")

    def start(self, grid: torch.Tensor, width: int = 1) -> DecoderState:
        h, c, values, keys = (torch.from_numpy(a)
                              for a in _run(self._start, self._paths["start"], {"grid": grid.float().numpy()}))
        return (h.repeat_interleave(width, dim=0), c.repeat_interleave(width, dim=0), values, keys)

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        h, c, values, keys = state
        feed = {"tokens": tokens.numpy(), "h": h.numpy(), "c": c.numpy(), "values": values.numpy(),
                "keys": keys.numpy()}
        log_probs, h, c = _run(self._step, self._paths["step"], feed)
        return torch.from_numpy(log_probs), (torch.from_numpy(h), torch.from_numpy(c), values, keys)


def load_onnx_model(folder: str | Path) -> CaptionModel:
    """A :class:`CaptionModel` over the export in ``folder``.

    Raises:
        ModelLoadError: a graph or runtime.json is missing or malformed (the message names the file).
    """
    folder = Path(folder)
    runtime = _runtime(folder / RUNTIME_FILE)
    check_seal(folder, runtime)
    try:
        config = ModelConfig(encoder=runtime["encoder"], decoder=DecoderConfig(**runtime["decoder"]),
                             decoding=DecodingOptions.from_dict(runtime["decoding"]))
        words = runtime["vocabulary"]
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError("the vocabulary must be a list of words")
        if list(words[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError("the vocabulary does not start with the special tokens")
        if len(set(words)) != len(words):
            raise ValueError("the vocabulary lists a word twice")
        vocab = Vocabulary(words[len(SPECIALS):])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{printable(folder / RUNTIME_FILE)}: bad runtime description: {e}") from e
    try:
        model = CaptionModel(config, vocab, pretrained_encoder=False)
    except ModelLoadError as e:
        raise ModelLoadError(f"{printable(folder / RUNTIME_FILE)}: bad runtime description: {e}") from e
    try:
        model.encoder = OnnxEncoder(folder, runtime)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{printable(folder / RUNTIME_FILE)}: bad runtime description: {e!r}") from e
    model.decoder = OnnxDecoder(folder, len(vocab.itos), model.encoder.out_channels)
    model.consensus, model.calibrator = read_consensus_and_calibrator(folder, model.encoder.out_channels)
    return model.eval()


def _misfit(graph: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"{printable(graph)}: does not fit the export's {RUNTIME_FILE}: it {what} "
                          "(graphs and description from different exports?)")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _numbers(values: object, count: int) -> bool:
    return (isinstance(values, list) and len(values) == count
            and all(is_finite_number(v) for v in values))


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
