"""The caption model (encoder + decoder + vocabulary) and its safe on-disk format.

A model folder holds ``config.json``, ``vocab.json`` and ``model.safetensors``. Loading
never unpickles: safetensors holds only tensors, the rest is JSON. When the encoder was
frozen during training its weights are not stored; they come from the encoder's own
package by name, which keeps the shipped model small.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from captioner.concepts import concept_evidence, concept_matrix
from captioner.decoder import DecoderConfig, build_decoder
from captioner.decoding import Caption, DecodingOptions, decode_grid
from captioner.encoders import build_encoder
from captioner.errors import ModelLoadError
from captioner.vocab import Vocabulary

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model, saved as config.json."""

    encoder: str  # registered encoder name
    decoder: DecoderConfig
    decoding: DecodingOptions = DecodingOptions()  # defaults, tuned on dev for shipped models
    encoder_weights_stored: bool = False  # True when the encoder was fine-tuned and saved
    ensemble_size: int = 1  # decoders whose next-word probabilities are averaged (see ``ensemble``)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        raw = json.loads(text)
        try:
            config = cls(
                encoder=raw["encoder"],
                decoder=DecoderConfig(**raw["decoder"]),
                decoding=DecodingOptions(**raw.get("decoding", {})),
                encoder_weights_stored=bool(raw.get("encoder_weights_stored", False)),
                ensemble_size=int(raw.get("ensemble_size", 1)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"bad model config: {e}") from e
        if config.ensemble_size < 1:
            raise ModelLoadError(f"bad model config: ensemble_size {config.ensemble_size} < 1")
        return config


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

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 pixels -> (B, C, h, w) encoder grid."""
        return self.encoder.encode(pixels)

    def compile_encoder(self) -> None:
        """Compile the CNN with torch.compile: about 1.7x the images/s on CPU once compiled,
        at a one-off cost of tens of seconds, so it pays off for folders, not single photos."""
        self.encoder.features = torch.compile(self.encoder.features, dynamic=False)

    @torch.inference_mode()
    def caption_grid(self, grid: torch.Tensor, options: DecodingOptions | None = None) -> list[list[Caption]]:
        """Encoder grids (B, C, h, w) -> n-best captions per image."""
        options = options or self.config.decoding
        grid = grid.to(self.device)
        evidence = self.concept_evidence(grid, options.concept_threshold) if options.concept_boost > 0 else None
        return decode_grid(self.decoder, grid, self.vocab, options, evidence)

    def concept_evidence(self, grid: torch.Tensor, threshold: float) -> torch.Tensor | None:
        """(B, V) evidence from the encoder's own classifier (None when it has no head)."""
        probs = self.encoder.classify(grid)
        if probs is None:
            return None
        if self._concepts is None:
            self._concepts = concept_matrix(self.encoder.class_names, self.vocab)
        return concept_evidence(probs, self._concepts, threshold)

    def caption_pixels(self, pixels: torch.Tensor, options: DecodingOptions | None = None) -> list[list[Caption]]:
        """(B, S, S, 3) uint8 pixels from :func:`captioner.images.model_pixels` -> captions."""
        return self.caption_grid(self.encode(pixels), options)

    def save(self, directory: str | os.PathLike) -> None:
        """Write config.json, vocab.json and model.safetensors (float16 decoder weights)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"decoder.{k}": v.detach().half().contiguous() for k, v in self.decoder.state_dict().items()}
        if self.config.encoder_weights_stored:
            tensors.update({f"encoder.{k}": v.detach().contiguous() for k, v in self.encoder.state_dict().items()})
        save_file(tensors, directory / "model.safetensors")
        (directory / "config.json").write_text(self.config.to_json(), encoding="utf-8")
        self.vocab.save(directory / "vocab.json")

    @classmethod
    def load(cls, directory: str | os.PathLike = DEFAULT_MODEL_DIR, *, device: str | None = None) -> "CaptionModel":
        """Load a model folder (the shipped default model when none is given).

        Raises:
            ModelLoadError: a file is missing or the tensors do not fit the config.
        """
        directory = Path(directory)
        try:
            config = ModelConfig.from_json((directory / "config.json").read_text(encoding="utf-8"))
            vocab = Vocabulary.load(directory / "vocab.json")
            tensors = load_file(directory / "model.safetensors")
        except (OSError, SafetensorError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{directory}: cannot load model: {e}") from e
        model = cls(config, vocab, pretrained_encoder=not config.encoder_weights_stored)
        try:
            model.decoder.load_state_dict(_strip(tensors, "decoder."), strict=True)
            if config.encoder_weights_stored:
                model.encoder.load_state_dict(_strip(tensors, "encoder."), strict=True)
        except RuntimeError as e:
            raise ModelLoadError(f"{directory}: weights do not match config: {e}") from e
        model.encoder.to(memory_format=torch.channels_last)
        return model.to(device or "cpu").eval()


def ensemble(models: Sequence[CaptionModel]) -> CaptionModel:
    """One model whose search averages the next-word probabilities of ``models``' decoders.

    Members must have been trained alike (same encoder, vocabulary and decoder shape,
    e.g. the same config with different seeds); decoding defaults come from the first.

    Raises:
        ModelLoadError: the members differ in anything but their decoder weights.
    """
    if len(models) < 2:
        raise ModelLoadError(f"an ensemble needs at least 2 models, got {len(models)}")
    if any(m.config.encoder_weights_stored for m in models):
        raise ModelLoadError("models with fine-tuned encoders cannot share one encoder in an ensemble")
    first = models[0]
    for other in models[1:]:
        if other.config.encoder != first.config.encoder or other.config.decoder != first.config.decoder:
            raise ModelLoadError("ensemble members differ in encoder or decoder shape")
        if other.vocab.itos != first.vocab.itos:
            raise ModelLoadError("ensemble members have different vocabularies")
    decoders = [d for m in models for d in (m.decoder.members if m.config.ensemble_size > 1 else [m.decoder])]
    config = dataclasses.replace(first.config, ensemble_size=len(decoders))
    combined = CaptionModel(config, first.vocab)
    for target, source in zip(combined.decoder.members, decoders, strict=True):
        target.load_state_dict(source.state_dict())
    combined.encoder.to(memory_format=torch.channels_last)
    return combined.to(first.device).eval()


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
