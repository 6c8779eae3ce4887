"""Export a caption model as ONNX graphs that a runtime without PyTorch can search with.

Four graphs, each with a dynamic batch dimension, plus ``runtime.json``:

- ``encoder.onnx``: ``pixels`` (B, S, S, 3) uint8, squashed as :func:`captioner.images.model_pixels`
  makes them -> ``grid`` (B, C, h, w); normalization is inside the graph.
- ``classifier.onnx``: ``grid`` -> ``probs`` (B, classes), the encoder's ImageNet head (tags, concept boost).
- ``decoder_start.onnx``: ``grid`` -> ``h``, ``c`` (B, H) and the attention's ``values`` (B, L, H)
  and ``keys`` (B, L, A); repeat h and c for each hypothesis of an image (rows consecutive).
- ``decoder_step.onnx``: ``tokens`` (N,), ``h``, ``c`` (N, H), ``values``, ``keys`` (B, L, .) ->
  ``log_probs`` (N, V), ``h_out``, ``c_out``; N is B times the beam width.

``runtime.json`` holds the vocabulary, decoding defaults, preprocessing constants, class
names and the opset: with it, beam search as in :mod:`captioner.search` can be rebuilt in
any language. A model's ``calibration.json`` and the consensus files it reads are copied beside them.
It is written last and sealed: it lists every other file's SHA-256 and its own content's, and
a loader refuses an export whose files or description changed since (see :func:`check_seal`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from captioner.confidence import CALIBRATION_FILE
from captioner.consensus import CONSENSUS_FILE, CONSENSUS_WEIGHTS
from captioner.errors import ModelLoadError, OutputError, printable
from captioner.model import CaptionModel

OPSET = 17
GRAPHS = ("encoder", "classifier", "decoder_start", "decoder_step")
INT8_GRAPHS = ("decoder_start", "decoder_step", "classifier")  # what --int8 quantizes
SEAL_KEYS = ("files", "content_sha256")  # runtime.json's seal (see write_runtime)
RUNTIME_FILE = "runtime.json"


class _Encoder(nn.Module):
    def __init__(self, model: CaptionModel):
        super().__init__()
        self.encoder = model.encoder

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.encoder.preprocess.normalize(pixels))


class _Classifier(nn.Module):
    def __init__(self, model: CaptionModel):
        super().__init__()
        self.encoder = model.encoder

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.encoder.classify(grid)


class _Start(nn.Module):
    def __init__(self, model: CaptionModel):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, grid: torch.Tensor):
        return self.decoder.start(grid, 1)


class _Step(nn.Module):
    def __init__(self, model: CaptionModel):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, tokens, h, c, values, keys):
        log_probs, state = self.decoder.step(tokens, (h, c, values, keys))
        return log_probs, state[0], state[1]


MODEL_DATA_FILES = (CONSENSUS_FILE, CONSENSUS_WEIGHTS, CALIBRATION_FILE)  # reranking's and the calibrator's data


def export_onnx(model: CaptionModel, out: str | Path, *, calibration_from: str | Path | None = None,
                int8: bool = False) -> Path:
    """Write the four graphs and runtime.json into ``out`` (a new or empty folder); returns it.

    ``int8``: the decoder graphs' and the classifier's weights quantized (:func:`quantize_int8`),
    before runtime.json is written: an export stopped part-way is never a float one that loads.

    Raises:
        ModelLoadError: the model cannot be exported (an ensemble, or a decoder without attention).
        OutputError: ``out`` cannot be written, or quantizing a graph failed.
    """
    if model.config.ensemble_size != 1 or not model.config.decoder.attention:
        raise ModelLoadError("ONNX export covers one attention decoder; this model is an ensemble or has none")
    out = check_export_folder(out)
    model = model.to("cpu").eval()
    try:
        _export_graphs(model, out)
        if calibration_from is not None:
            for name in MODEL_DATA_FILES:
                if (Path(calibration_from) / name).exists():
                    shutil.copy(Path(calibration_from) / name, out / name)
        runtime = _runtime(model)
        if int8:
            _quantize_graphs(out)
            runtime["int8"] = list(INT8_GRAPHS)
        write_runtime(out, runtime)  # last: an export stopped before it has none, and is refused
    except BaseException:
        for file in out.iterdir():  # no half export left behind to refuse the next try
            file.unlink()
        raise
    return out


def check_export_folder(out: str | Path) -> Path:
    """``out`` made if missing and checked empty: before a model loads, and again when exporting.

    Raises:
        OutputError: ``out`` is not an empty folder, or cannot be made.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if any(out.iterdir()):
            raise OutputError(f"{printable(out)}: folder is not empty; give a new or empty folder for the export")
    except FileExistsError as e:
        raise OutputError(f"{printable(out)}: exists and is not a folder") from e
    except OSError as e:
        raise OutputError(f"{printable(out)}: cannot write the export: {e.strerror or e}") from e
    return out


def write_runtime(out: Path, runtime: dict) -> None:
    """Write ``runtime.json`` sealed: the checksum of every other file of the export, and of its own content.

    An export is one model: a graph copied in from another export, a file a stopped export
    never wrote, or an edited vocabulary would caption wrongly without a word, so loading
    checks the seal (:func:`check_seal`).
    """
    runtime = {key: value for key, value in runtime.items() if key not in SEAL_KEYS}
    runtime["files"] = {p.name: _sha256(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != RUNTIME_FILE}
    runtime["content_sha256"] = _content_sha256(runtime)
    (out / RUNTIME_FILE).write_text(json.dumps(runtime, indent=1), encoding="utf-8")


def check_seal(folder: Path, runtime: dict) -> None:
    """The export is as written (exports made before the seal have none, and are not checked).

    Raises:
        ModelLoadError: a listed file is missing or differs, a file the export would have listed
            (calibration or consensus data) is there unlisted, or runtime.json was edited.
    """
    if "content_sha256" not in runtime:
        if "files" in runtime:  # a sealed export whose checksum was taken out
            raise ModelLoadError(f"{printable(folder / RUNTIME_FILE)}: edited after the export (its checksum is "
                                 "gone); export again (decoding options can be given as flags instead)")
        return
    if runtime["content_sha256"] != _content_sha256(runtime):
        raise ModelLoadError(f"{printable(folder / RUNTIME_FILE)}: edited after the export (its checksum differs); "
                             "export again (decoding options can be given as flags instead)")
    files = runtime.get("files")
    if not isinstance(files, dict):
        raise ModelLoadError(f"{printable(folder / RUNTIME_FILE)}: bad runtime description: no list of files")
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise ModelLoadError(f"{printable(path)}: missing from the export (runtime.json lists it); export again")
        if _sha256(path) != digest:
            raise ModelLoadError(f"{printable(path)}: not the file this export wrote (another export's, or changed "
                                 "since); export again")
    for name in MODEL_DATA_FILES:  # read whenever present, so one copied in would act for this model
        if name not in files and (folder / name).exists():
            raise ModelLoadError(f"{printable(folder / name)}: not part of this export (runtime.json does not list "
                                 "it: another model's?); remove it, or export again")


def _content_sha256(runtime: dict) -> str:
    rest = {key: value for key, value in runtime.items() if key != "content_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode("utf-8")).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _export_graphs(model: CaptionModel, out: Path) -> None:
    size = model.encoder.preprocess.size
    with torch.no_grad():
        pixels = torch.zeros((2, size, size, 3), dtype=torch.uint8)
        grid = model.encoder(model.encoder.preprocess.normalize(pixels)).clone()
        state = model.decoder.start(grid, 3)
        tokens = torch.full((6,), model.vocab.start, dtype=torch.long)
        _export(_Encoder(model), (pixels,), out / "encoder.onnx", ["pixels"], ["grid"], {"pixels": {0: "B"}})
        if model.encoder.class_names is not None:  # encoders without an ImageNet head have no tags to give
            _export(_Classifier(model), (grid,), out / "classifier.onnx", ["grid"], ["probs"], {"grid": {0: "B"}})
        _export(_Start(model), (grid,), out / "decoder_start.onnx", ["grid"], ["h", "c", "values", "keys"],
                {"grid": {0: "B"}})
        _export(_Step(model), (tokens, *state), out / "decoder_step.onnx", ["tokens", "h", "c", "values", "keys"],
                ["log_probs", "h_out", "c_out"],
                {"tokens": {0: "N"}, "h": {0: "N"}, "c": {0: "N"}, "values": {0: "B"}, "keys": {0: "B"}})
    _check(out)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    graph = io.BytesIO()  # written by us: the exporter takes a path as UTF-8 text only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it records as constants
        torch.onnx.export(module.eval(), args, graph, input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    path.write_bytes(graph.getvalue())


def _check(out: Path) -> None:
    import onnx

    for name in GRAPHS:
        if (out / f"{name}.onnx").exists():  # the classifier only where the encoder has a head
            onnx.checker.check_model(onnx.load_from_string((out / f"{name}.onnx").read_bytes()), full_check=True)


def _runtime(model: CaptionModel) -> dict:
    preprocess = model.encoder.preprocess
    return {
        "opset": OPSET,
        "encoder": model.config.encoder,
        "preprocess": {"size": preprocess.size, "mean": list(preprocess.mean), "std": list(preprocess.std),
                       "resize": "squash to size x size, bicubic; the encoder graph normalizes"},
        "grid_channels": model.encoder.out_channels,
        "decoder": dataclasses.asdict(model.config.decoder),
        "decoding": dataclasses.asdict(model.config.decoding),
        "vocabulary": list(model.vocab.itos),
        "special_tokens": {"pad": model.vocab.pad, "start": model.vocab.start, "end": model.vocab.end,
                           "unknown": model.vocab.unk},
        "class_names": list(model.encoder.class_names or ()),
    }


def quantize_int8(out: str | Path) -> None:
    """Replace a finished export's decoder graphs' and classifier's float weights with int8, and seal it again.

    Their matrix products carry the decoder's cost; the encoder's convolutions would need
    static quantization with calibration images, and stay float.
    """
    out = Path(out)
    _quantize_graphs(out)
    runtime = json.loads((out / RUNTIME_FILE).read_text(encoding="utf-8"))
    runtime["int8"] = list(INT8_GRAPHS)
    write_runtime(out, runtime)  # sealed again, over the quantized graphs


def _quantize_graphs(out: Path) -> None:
    """ONNX Runtime dynamic quantization of :data:`INT8_GRAPHS`, each in place.

    Raises:
        OutputError: the quantizer failed (it reports a full disk as a protobuf error), naming the graph.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in INT8_GRAPHS:
        path = out / f"{name}.onnx"
        if not path.exists():
            continue
        staging = out / f".{name}.int8.onnx"
        try:
            with _root_logger_quiet():
                quantize_dynamic(str(path), str(staging), weight_type=QuantType.QInt8)
            staging.replace(path)
        except Exception as e:  # noqa: BLE001 (onnx and protobuf errors have no common base)
            staging.unlink(missing_ok=True)
            raise OutputError(f"{printable(path)}: cannot quantize to int8: {type(e).__name__}: {e}") from e


@contextlib.contextmanager
def _root_logger_quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer advises pre-processing through ``logging.warning`` on the root
    logger, which would also give a process without logging set up a handler for good."""
    root = logging.getLogger()
    level, quiet = root.level, logging.NullHandler()
    root.addHandler(quiet)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        root.removeHandler(quiet)
