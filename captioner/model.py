"""The caption model (encoder + decoder + vocabulary) and its safe on-disk format.

A model folder holds ``config.json``, ``vocab.json`` and ``model.safetensors``. Loading
never unpickles: safetensors holds only tensors, the rest is JSON. When the encoder was
frozen during training its weights are not stored; they come from the encoder's own
package by name, which keeps the shipped model small.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors import SafetensorError
from torch import nn
from torch.overrides import TorchFunctionMode

from captioner.concepts import concept_evidence, concept_matrix
from captioner.confidence import CALIBRATION_FILE, Calibrator, FeatureStats, image_signals, signal_rows
from captioner.consensus import CONSENSUS_FILE, CONSENSUS_WEIGHTS, Consensus
from captioner.decoder import build_decoder
from captioner.decoding import Caption, DecodingOptions, decode_grid, rerank, search_width
from captioner.encoders import ENCODERS, build_encoder
from captioner.errors import CaptionerError, ModelLoadError, OptionError, OutputError, printable, reason
from captioner.options import DEFAULT_MODEL_DIR, REQUIRED, Bounds, DecoderConfig, check_fields, option
from captioner.outputs import make_folder
from captioner.tags import Tag, top_tags
from captioner.tensor_files import open_tensors, save_tensors
from captioner.vocab import SPECIALS, Vocabulary

CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE = "config.json", "vocab.json", "model.safetensors"
MODEL_FILES = {CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE, CALIBRATION_FILE, CONSENSUS_FILE, CONSENSUS_WEIGHTS,
               "MODEL_CARD.md"}  # what a model folder may hold
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
MAX_ENSEMBLE = 16  # decoders in one model; each is a full LSTM decoder held in memory
GPU_BATCH_STEP = 64  # on a GPU, batches above this are encoded at a multiple of it (see gpu_batch_shape)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model, saved as config.json."""

    # registered encoder name
    encoder: str = option(REQUIRED, str, "image encoder", choices=tuple(ENCODERS))
    decoder: DecoderConfig
    decoding: DecodingOptions = DecodingOptions()  # defaults, tuned on dev for shipped models
    # True when the encoder was fine-tuned and saved
    encoder_weights_stored: bool = option(False, bool, "the encoder's own weights are stored")
    # decoders whose next-word probabilities are averaged (see ``ensemble``)
    ensemble_size: int = option(1, int, "decoders averaged in one model", Bounds(1, MAX_ENSEMBLE))

    def __post_init__(self) -> None:
        check_fields(self)
        if not isinstance(self.decoder, DecoderConfig) or not isinstance(self.decoding, DecodingOptions):
            raise OptionError("decoder and decoding must be DecoderConfig and DecodingOptions")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        """Parse config.json text; see :meth:`from_dict`."""
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nesting too deep to parse
            raise ModelLoadError(f"bad model config: not valid JSON ({e})") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: object) -> "ModelConfig":
        """Build from parsed JSON, checking every field's type and range before anything is allocated.

        Raises:
            ModelLoadError: not an object, an unknown or missing field, or a bad value (named with its field).
        """
        top = _json_object("model config", raw, cls)
        decoder = _json_object("decoder", top["decoder"], DecoderConfig)
        try:
            return cls(
                encoder=top["encoder"],
                decoder=DecoderConfig(**decoder),
                decoding=_decoding_options(top.get("decoding", {})),
                encoder_weights_stored=top.get("encoder_weights_stored", False),
                ensemble_size=top.get("ensemble_size", 1),
            )
        except (TypeError, ValueError) as e:  # OptionError is a ValueError
            raise ModelLoadError(f"bad model config: {e}") from e


def _json_object(what: str, raw: object, cls: type) -> dict:
    """``raw`` as a dict holding every required field of dataclass ``cls`` and no other."""
    if not isinstance(raw, dict):
        raise ModelLoadError(f"bad model config: {what} must be a JSON object, not {type(raw).__name__}")
    fields = dataclasses.fields(cls)
    unknown = sorted(set(raw) - {f.name for f in fields})
    if unknown:
        raise ModelLoadError(f"bad model config: {what} has unknown field {unknown[0]!r}")
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in raw]
    if missing:
        raise ModelLoadError(f"bad model config: {what} lacks field {missing[0]!r}")
    return raw


def _decoding_options(raw: object) -> DecodingOptions:
    try:
        return DecodingOptions.from_dict(raw)
    except OptionError as e:
        raise ModelLoadError(f"bad model config: decoding: {e}") from e


class CaptionModel(nn.Module):
    def __init__(self, config: ModelConfig, vocab: Vocabulary, *, pretrained_encoder: bool = True):
        super().__init__()
        if len(vocab) != config.decoder.vocab_size:
            raise ModelLoadError(f"vocabulary has {len(vocab)} words, config expects {config.decoder.vocab_size}")
        self.config = config
        self.vocab = vocab
        self.encoder = build_encoder(config.encoder, pretrained=pretrained_encoder)
        self.decoder = build_decoder(config.decoder, config.ensemble_size)
        self._concepts: torch.Tensor | None = None  # class -> word matrix, built on first use
        self.calibrator: Calibrator | None = None  # turns signals into confidence (captioner.confidence)
        self.consensus: Consensus | None = None  # the training photos' captions, for the calibrator's consensus

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 pixels -> (B, C, h, w) encoder grid.

        On a GPU two things keep a picture's grid its own, as on the CPU, and keep the cost
        of varying batch sizes bounded (both measured on an H100):

        - Convolutions run in float32, not TF32: with TF32 a grid moved by up to 0.016 (of
          values up to 6) with the size of the batch it came in, and by 0.04 from the CPU's;
          in float32 by 0 and 3e-5. It costs about 2% of a 32-image batch's captioning.
        - The batch is padded with blank pictures to :func:`gpu_batch_shape`, and the grid
          cut back: CUDA plans the convolutions anew for each batch size it meets (about
          1.7 s each, against 3 ms a batch once planned), and a server's batches come in
          every size.
        """
        if self.device.type != "cuda":
            return self.encoder.encode(pixels)
        count = len(pixels)
        if gpu_batch_shape(count) > count:
            pixels = torch.cat([pixels, pixels.new_zeros((gpu_batch_shape(count) - count, *pixels.shape[1:]))])
        with _float32_convolutions():
            return self.encoder.encode(pixels)[:count]

    def check_decoding(self, options: DecodingOptions) -> None:
        """Refuse options that ask this model for what it lacks, where its own defaults do not.

        A model fresh from ``captioner train`` has no consensus data (tools/fit_calibrator.py
        builds it), and a torchvision backbone keeps no classifier head: a consensus weight or
        a concept boost would change no caption there, and say nothing.

        Raises:
            OptionError: ``options`` is not a DecodingOptions, or asks for a consensus weight without
                consensus data, or a concept boost without a classifier.
        """
        if not isinstance(options, DecodingOptions):
            raise OptionError("options must be a DecodingOptions (e.g. dataclasses.replace(model.config.decoding, "
                              f"beam_size=2)), not {type(options).__name__}")
        own = self.config.decoding
        asked = {name for name in ("consensus_weight", "concept_boost")
                 if getattr(options, name) > 0 and getattr(options, name) != getattr(own, name)}
        if "consensus_weight" in asked and self.consensus is None:
            raise OptionError(f"decoding option consensus_weight reranks by the captions of the nearest training "
                              f"photos; this model has no {CONSENSUS_FILE} (tools/fit_calibrator.py builds one)")
        if "concept_boost" in asked and self.encoder.class_names is None:
            raise OptionError("decoding option concept_boost raises the words of what the encoder's classifier sees; "
                              f"this model's encoder ({self.config.encoder}) keeps no classifier")

    def compile_encoder(self) -> None:
        """Compile the CNN with torch.compile: about 1.4x the images/s on CPU once compiled,
        at a one-off cost of tens of seconds, so it pays off for folders, not single photos.

        A first batch is encoded here, so a machine where compiling cannot work (no C++
        compiler, say) fails once, now, instead of on every image.

        Raises:
            CaptionerError: compiling failed; the eager encoder is kept.
        """
        eager = self.encoder.features
        self.encoder.features = torch.compile(eager, dynamic=False)
        size = self.encoder.preprocess.size
        try:
            self.encode(torch.zeros((1, size, size, 3), dtype=torch.uint8))
        except Exception as e:  # noqa: BLE001 (any compiler failure; the message says which)
            self.encoder.features = eager
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            raise CaptionerError(f"torch.compile does not work here ({type(e).__name__}: {reason}); "
                                 "run without --compile") from e

    @torch.inference_mode()
    def caption_grid(self, grid: torch.Tensor, options: DecodingOptions | None = None, *,
                     stop: Callable[[], bool] | None = None) -> list[list[Caption]]:
        """Encoder grids (B, C, h, w) -> n-best captions per image, reranked by consensus if the options say so.

        ``stop``: asked between search steps (see :func:`captioner.search.search`).
        """
        options = options or self.config.decoding
        grid = grid.to(self.device)
        probs = self.encoder.classify(grid)
        evidence = self.concept_evidence(probs, options.concept_threshold) if options.concept_boost > 0 else None
        reranked = options.consensus_weight > 0 and self.consensus is not None
        searched = dataclasses.replace(options, n_best=search_width(options)) if reranked else options
        captions = decode_grid(self.decoder, grid, self.vocab, searched, evidence, stop=stop)  # reranking: all
        agreement = None
        if reranked:
            agreement = self.consensus.scores(grid.float().mean(dim=(2, 3)), [[c.text for c in n] for n in captions])
            captions, agreement = rerank(captions, agreement, options.consensus_weight, options.n_best)
        return self._with_confidence(grid, captions, probs, agreement)

    def _with_confidence(self, grid: torch.Tensor, captions: list[list[Caption]], probs: torch.Tensor | None,
                         agreement: list[list[float]] | None) -> list[list[Caption]]:
        """The captions with the calibrator's confidence filled in (as they are, for a model without one).

        A caption the length limit cut off gets confidence 0: it is not a whole sentence, and
        the calibrator only ever saw whole ones (it would rate "a", cut at one word, above
        the full caption, since shorter captions have likelier words).
        """
        if self.calibrator is None or self.consensus is None:
            return captions
        rows = self.confidence_signals(grid, captions, probs, self.calibrator.features, self.consensus, agreement)
        confidences = [self.calibrator.confidence(row).tolist() for row in rows]
        return [[dataclasses.replace(c, confidence=round(p, 4) if c.finished else 0.0)
                 for c, p in zip(n_best, ps, strict=True)]
                for n_best, ps in zip(captions, confidences, strict=True)]

    def confidence_signals(self, grid: torch.Tensor, captions: list[list[Caption]], probs: torch.Tensor | None,
                           features: FeatureStats, consensus: Consensus,
                           agreement: list[list[float]] | None = None) -> list[torch.Tensor]:
        """Per image, (n-best, len(SIGNALS)) calibrator signals of its captions; for decoding and for fitting.

        ``agreement``: the captions' consensus scores where reranking already computed them.
        """
        pooled = grid.float().mean(dim=(2, 3))  # (B, C): both the distance and the neighbours read it
        if agreement is None:
            agreement = consensus.scores(pooled, [[c.text for c in n] for n in captions])
        return signal_rows(captions, image_signals(pooled, probs, features), probs, self.concepts(),
                           self.vocab.word_ids, agreement)

    def concept_evidence(self, probs: torch.Tensor | None, threshold: float) -> torch.Tensor | None:
        """(B, V) evidence from (B, classes) probabilities of the encoder's own classifier (None without one)."""
        if probs is None:
            return None
        return concept_evidence(probs, self.concepts(), threshold)

    def concepts(self) -> torch.Tensor:
        """(classes, V) 0/1 matrix of the caption words that name each class (built on first use)."""
        if self._concepts is None:
            self._concepts = concept_matrix(self.encoder.class_names, self.vocab)
        return self._concepts

    @torch.inference_mode()
    def tags(self, grid: torch.Tensor) -> list[list[Tag]]:
        """Encoder grids (B, C, h, w) -> the classifier's likeliest labels per image (none without a head)."""
        probs = self.encoder.classify(grid.to(self.device))
        if probs is None:
            return [[] for _ in range(grid.shape[0])]
        return top_tags(probs, self.encoder.class_names)

    def caption_pixels(self, pixels: torch.Tensor, options: DecodingOptions | None = None) -> list[list[Caption]]:
        """(B, S, S, 3) uint8 pixels from :func:`captioner.images.model_pixels` -> captions."""
        return self.caption_grid(self.encode(pixels), options)

    def save(self, directory: str | os.PathLike, *, replace: bool = False) -> None:
        """Write config.json, vocab.json and model.safetensors (float16 decoder weights), whole or not at all.

        The files are written into a hidden sibling folder that is renamed into place, so an
        interrupted save leaves no half-written model behind.

        Args:
            directory: a new or empty folder.
            replace: also replace an existing model folder (training's ``best``); other files are never deleted.
        Raises:
            OutputError: ``directory`` exists and is not an empty folder (or, with ``replace``, a model
                folder), or it cannot be written, or the model's stored encoder was folded for inference.
        """
        if self.config.encoder_weights_stored and self.encoder.folded:
            raise OutputError(f"{printable(directory)}: cannot write model: its encoder was folded for inference "
                              "(captioner.load_model); load it with CaptionModel.load to save it")
        target = check_new_model_folder(directory, replace=replace)
        staging = target.parent / f".{target.name[:40]}.{secrets.token_hex(4)}.tmp"
        try:
            staging.mkdir()
            self._write_files(staging)
            _move_into_place(staging, target)
        except (OSError, SafetensorError) as e:
            raise OutputError(f"{printable(target)}: cannot write model: {reason(e)}") from e
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _write_files(self, directory: Path) -> None:
        tensors = {f"decoder.{k}": v.detach().half().contiguous() for k, v in self.decoder.state_dict().items()}
        if self.config.encoder_weights_stored:
            tensors.update({f"encoder.{k}": v.detach().contiguous() for k, v in self.encoder.state_dict().items()})
        save_tensors(tensors, directory / WEIGHTS_FILE)
        (directory / CONFIG_FILE).write_text(self.config.to_json(), encoding="utf-8")
        self.vocab.save(directory / VOCAB_FILE)
        if self.consensus is not None:
            self.consensus.save(directory)
        if self.calibrator is not None:
            self.calibrator.save(directory / CALIBRATION_FILE)

    @classmethod
    def load(cls, directory: str | os.PathLike = DEFAULT_MODEL_DIR, *, device: str | None = None) -> "CaptionModel":
        """Load a model folder (the shipped default model when none is given).

        Everything is checked before the model is built: the config's field types and ranges,
        the vocabulary's size, and the names and shapes in the weights file's header against
        the shapes the config implies; then that no weight is NaN or infinite.

        Raises:
            ModelLoadError: ``FILE: cannot load model: reason``, naming the field, value or tensor at fault.
        """
        directory = Path(directory)
        if not directory.is_dir():
            why = "a file, not a model folder" if directory.exists() else "no such folder"
            raise ModelLoadError(f"{printable(directory)}: cannot load model: {why}")
        config = _read_config(directory / CONFIG_FILE)
        vocab = _read_vocab(directory / VOCAB_FILE, config)
        tensors = _read_weights(directory / WEIGHTS_FILE, expected_tensors(config))
        model = cls(config, vocab, pretrained_encoder=not config.encoder_weights_stored)
        try:
            model.decoder.load_state_dict(_strip(tensors, "decoder."), strict=True)
            if config.encoder_weights_stored:
                model.encoder.load_state_dict(_strip(tensors, "encoder."), strict=True)
        except RuntimeError as e:  # the header check makes this unreachable short of a safetensors bug
            raise ModelLoadError(f"{printable(directory)}: cannot load model: weights do not fit the config") from e
        model.consensus, model.calibrator = read_consensus_and_calibrator(directory, model.encoder.out_channels)
        model.encoder.to(memory_format=torch.channels_last)
        return model.to(device or "cpu").eval()


def check_model(model: object) -> None:
    """The front doors' ``model`` argument is a model, checked at the call rather than deep inside.

    Raises:
        OptionError: naming what was given.
    """
    if not isinstance(model, CaptionModel):
        raise OptionError(f"model must be a CaptionModel (captioner.load_model()), not {type(model).__name__}")


def gpu_batch_shape(count: int) -> int:
    """The batch size a GPU encodes ``count`` pictures at: a power of two up to 64, then a multiple of 64.

    A few shapes, each planned once, at most twice the pictures (a GPU's cost of a small batch
    is mostly fixed) or 63 more.
    """
    if count <= GPU_BATCH_STEP:
        return 1 << max(count - 1, 0).bit_length()
    return -(-count // GPU_BATCH_STEP) * GPU_BATCH_STEP


@contextlib.contextmanager
def _float32_convolutions() -> Iterator[None]:
    """cuDNN's TF32 off inside (a process-wide switch, given back as it was)."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def read_consensus_and_calibrator(directory: Path, channels: int) -> tuple[Consensus | None, Calibrator | None]:
    """A model folder's consensus data (reranking and the calibrator read it) and calibrator, each if present.

    Raises:
        ModelLoadError: a file is damaged, or the calibrator's consensus files are missing (naming the file).
    """
    calibrated = (directory / CALIBRATION_FILE).exists()
    consensus = Consensus.load(directory, channels) if calibrated or (directory / CONSENSUS_FILE).exists() else None
    calibrator = Calibrator.load(directory / CALIBRATION_FILE, channels) if calibrated else None
    return consensus, calibrator


def ensemble(models: Sequence[CaptionModel], names: Sequence[str] | None = None) -> CaptionModel:
    """One model whose search averages the next-word probabilities of ``models``' decoders.

    Members must have been trained alike (same encoder, vocabulary and decoder shape,
    e.g. the same config with different seeds); decoding defaults come from the first.
    ``names`` are what messages call the members (their folders); by default "member N".

    Raises:
        ModelLoadError: the members differ in anything but their decoder weights (and dropout,
            which only training uses).
    """
    if len(models) < 2:
        raise ModelLoadError(f"an ensemble needs at least 2 models, got {len(models)}")
    names = list(names or (f"member {i + 1}" for i in range(len(models))))
    if any(m.config.encoder_weights_stored for m in models):
        raise ModelLoadError("models with fine-tuned encoders cannot share one encoder in an ensemble")
    first = models[0]
    for other, name in zip(models[1:], names[1:], strict=True):
        if other.config.encoder != first.config.encoder:
            raise ModelLoadError(f"{name}: its encoder is {other.config.encoder}, {names[0]}'s is "
                                 f"{first.config.encoder}; an ensemble's members share one")
        if other.vocab.itos != first.vocab.itos:
            raise ModelLoadError(f"{name}: its vocabulary differs from {names[0]}'s; ensemble members must be "
                                 "trained on the same captions")
        for field in dataclasses.fields(DecoderConfig):
            mine, theirs = getattr(other.config.decoder, field.name), getattr(first.config.decoder, field.name)
            if field.name != "dropout" and mine != theirs:
                raise ModelLoadError(f"{name}: its decoder has {field.name}={mine}, {names[0]}'s {theirs}; "
                                     "ensemble members must be trained alike")
    decoders = [d for m in models for d in _decoders(m)]
    if len(decoders) > MAX_ENSEMBLE:
        raise ModelLoadError(f"an ensemble holds at most {MAX_ENSEMBLE} decoders; these models hold {len(decoders)}")
    config = dataclasses.replace(first.config, ensemble_size=len(decoders))
    combined = CaptionModel(config, first.vocab)
    for target, source in zip(combined.decoder.members, decoders, strict=True):
        target.load_state_dict(source.state_dict())
    # the training photos' captions do not depend on the decoder: reranking keeps working; the
    # calibrator was fitted to one decoder's captions, so the ensemble has none until refitted
    combined.consensus = first.consensus
    combined.encoder.to(memory_format=torch.channels_last)
    return combined.to(first.device).eval()


def _decoders(model: CaptionModel) -> list[nn.Module]:
    return list(model.decoder.members) if model.config.ensemble_size > 1 else [model.decoder]


def check_distinct_decoders(models: Sequence[CaptionModel], names: Sequence[str]) -> None:
    """Refuse members that share a decoder's weights: a copy of a folder, or a member given again
    beside an ensemble holding it, would count that decoder twice in the average.

    (:func:`ensemble` itself takes any members: a model averaged with itself is how the tests
    check that averaging keeps a model's captions.)

    Raises:
        ModelLoadError: naming the two members.
    """
    owned = [(decoder, name) for model, name in zip(models, names, strict=True) for decoder in _decoders(model)]
    for i, (decoder, name) in enumerate(owned):
        for earlier, earlier_name in owned[:i]:
            if _same_weights(decoder, earlier):
                raise ModelLoadError(f"{name}: holds a decoder with the same weights as one of {earlier_name}'s; "
                                     "the ensemble would weigh it twice")


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    mine, theirs = a.state_dict(), b.state_dict()
    return mine.keys() == theirs.keys() and all(
        tensor.shape == theirs[key].shape and torch.equal(tensor, theirs[key]) for key, tensor in mine.items())


def member(model: CaptionModel, index: int) -> CaptionModel:
    """Decoder ``index`` of an ensemble as a model of its own (sharing the encoder): a distillation
    starting point, or the cost of one decoder in a benchmark.

    Raises:
        ModelLoadError: ``model`` is not an ensemble, or has no decoder ``index``.
    """
    size = model.config.ensemble_size
    if size == 1 or not 0 <= index < size:
        raise ModelLoadError(f"member {index} of a model of {size} decoder(s): choose 0 to {size - 1} of an ensemble")
    config = dataclasses.replace(model.config, ensemble_size=1)
    single = CaptionModel(config, model.vocab, pretrained_encoder=False)
    single.encoder = model.encoder
    single.consensus = model.consensus
    single.decoder.load_state_dict(model.decoder.members[index].state_dict())
    return single.to(model.device).eval()


def check_new_model_folder(directory: str | os.PathLike, *, replace: bool = False) -> Path:
    """Fail now, before models are loaded or trained, if a model could not be saved to ``directory``.

    Raises:
        OutputError: ``directory`` is a file, a link or a non-empty folder (with ``replace``, a model
            folder may be replaced), or its parent folder cannot be created or written.
    """
    path = Path(directory)
    try:
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            kind = "a symbolic link" if path.is_symlink() else "not a folder"
            raise OutputError(f"{printable(path)}: exists and is {kind}; give a new folder for the model")
        entries = {p.name for p in path.iterdir()} if path.exists() else set()
        if entries and not (replace and CONFIG_FILE in entries and entries <= MODEL_FILES):
            raise OutputError(f"{printable(path)}: folder is not empty; give a new or empty folder for the model")
        make_folder(path.parent)  # names the part of the path that is a file
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".captioner-check-"):
            pass
    except OSError as e:
        raise OutputError(f"{printable(path)}: cannot write a model here: {reason(e)}") from e
    return path


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename the finished folder onto ``target`` (an empty folder is replaced by the rename itself)."""
    if not target.exists() or not any(target.iterdir()):
        os.replace(staging, target)
        return
    old = target.parent / f".{target.name[:40]}.{secrets.token_hex(4)}.old"
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def _load_error(path: Path, reason: str) -> ModelLoadError:
    return ModelLoadError(f"{printable(path)}: cannot load model: {reason}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _load_error(path, "file is missing") from None
    except UnicodeDecodeError:
        raise _load_error(path, "not UTF-8 text") from None
    except OSError as e:
        raise _load_error(path, reason(e)) from e


def _read_config(path: Path) -> ModelConfig:
    text = _read_text(path)
    try:
        return ModelConfig.from_json(text)
    except ModelLoadError as e:
        raise _load_error(path, str(e)) from e


def _read_vocab(path: Path, config: ModelConfig) -> Vocabulary:
    text = _read_text(path)
    try:
        vocab = Vocabulary.from_json(text)
    except ModelLoadError as e:
        raise _load_error(path, str(e)) from e
    seen: set[str] = set()
    for word in vocab.itos:
        if word in seen:
            raise _load_error(path, f"word {word!r} is listed twice")
        seen.add(word)
    if len(vocab) != config.decoder.vocab_size:
        raise _load_error(path, f"vocabulary has {len(vocab)} words (with the {len(SPECIALS)} special tokens), "
                                f"{CONFIG_FILE} says vocab_size={config.decoder.vocab_size}")
    return vocab


def expected_tensors(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Tensor name -> (shape, is floating point) that ``config`` implies for model.safetensors.

    The modules are built on the meta device: shapes without a single byte of weights.
    """
    with torch.device("meta"), _NoRandomInit():
        parts = {"decoder": build_decoder(config.decoder, config.ensemble_size)}
        if config.encoder_weights_stored:
            parts["encoder"] = build_encoder(config.encoder, pretrained=False)
    return {f"{prefix}.{name}": (tuple(t.shape), t.dtype.is_floating_point)
            for prefix, module in parts.items() for name, t in module.state_dict().items()}


class _NoRandomInit(TorchFunctionMode):
    """Skips random weight initialization while modules are built for their shapes only.

    ``normal_`` on the meta device runs through a Python reference that imports TorchDynamo
    (0.8 s on first use), which every model load would otherwise pay.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _RANDOM_INITS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


_RANDOM_INITS = {"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "orthogonal_"}


def _read_weights(path: Path, expected: dict[str, tuple[tuple[int, ...], bool]]) -> dict[str, torch.Tensor]:
    """Check the header against ``expected``, then load the tensors and check they are finite."""
    if not path.is_file():
        raise _load_error(path, "file is missing")
    try:
        with open_tensors(path) as f:
            _check_header(path, {name: f.get_slice(name) for name in f.keys()}, expected)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as e:
        raise _load_error(path, f"not a safetensors file ({reason(e)})") from e
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _load_error(path, f"tensor {name} holds NaN or infinite values")
    return tensors


def _check_header(path: Path, stored: dict, expected: dict[str, tuple[tuple[int, ...], bool]]) -> None:
    """``stored``: name -> safetensors slice (shape and dtype only; no data is read)."""
    for name in sorted(set(expected) - set(stored)):
        raise _load_error(path, f"tensor {name} is missing (the config expects it)")
    for name in sorted(set(stored) - set(expected)):
        raise _load_error(path, f"tensor {name} is not part of the model the config describes")
    for name, (shape, floating) in expected.items():
        got = tuple(stored[name].get_shape())
        if got != shape:
            raise _load_error(path, f"tensor {name} has shape {list(got)}, the config implies {list(shape)}")
        dtype = stored[name].get_dtype()
        if floating and dtype not in FLOAT_DTYPES:
            raise _load_error(path, f"tensor {name} holds {dtype} values, not floating point")


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
