"""Settings of one training run: a frozen dataclass that checks every field when built.

A run is configured by a JSON file holding any subset of the fields, by keyword arguments,
or by command-line flags generated from the fields' ``help`` metadata. A wrong type or an
out-of-range value is refused before any data is read, naming the field and the value.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from captioner.data import is_device
from captioner.errors import OptionError, printable
from captioner.options import MAX_DIM, REQUIRED, Bounds, check_device, check_fields, option

MODEL_FIELDS = ("encoder", "finetune_encoder", "embed_dim", "hidden_dim", "attention", "attention_dim")
"""Fields that shape the model: a checkpoint saved with other values cannot be resumed."""
RESTORED_FIELDS = ("lr", "encoder_lr", "weight_decay", "seed")
"""Fields a resumed run takes from its checkpoint (the optimizer's rates and decay, the random state):
resuming with other values is refused, since they would not take effect."""
PER_MACHINE_FIELDS = ("train_manifest", "dev_manifest", "out_dir", "cache_dir", "init_from", "teacher", "num_workers",
                      "device")
"""Fields each machine of a torchrun job may spell or choose for itself (its paths, its loader threads);
every other field must be the same in every process."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (a JSON config file holds any subset of these)."""

    train_manifest: str = option(REQUIRED, str, "JSONL manifest of training images and captions", aliases=("--train",))
    dev_manifest: str = option(REQUIRED, str, "JSONL manifest used to pick the best epoch", aliases=("--dev",))
    out_dir: str = option("runs/train", str, "folder for checkpoints, metrics log, plot and the best model",
                          aliases=("--out",))
    encoder: str = option("efficientnet_lite0", str, "image encoder: efficientnet_lite0 (offline), efficientnet_lite1 "
                          "and efficientnet_lite2 (offline, with the encoders extra), resnet50, efficientnet_b0 "
                          "(torchvision, weights downloaded once) or any name in encoders.ENCODERS")
    finetune_encoder: bool = option(False, bool, "train the CNN too (slow without a GPU); its batch-norm "
                                    "statistics stay the ImageNet ones")
    encoder_lr: float | None = option(None, float, "peak learning rate of the CNN when fine-tuning (default: lr); "
                                      "well below lr keeps its ImageNet labels (tags) meaningful",
                                      Bounds(0, 10, open_low=True))
    cache_dir: str = option("cache", str, "where frozen-encoder features are stored")
    flip_augment: bool = option(True, bool, "also train on horizontally flipped images' features")
    min_word_count: int = option(5, int, "keep words seen at least this often in training captions",
                                 Bounds(1, 1_000_000))
    max_caption_words: int = option(22, int, "truncate longer training captions", Bounds(1, 1000))
    embed_dim: int = option(512, int, "word embedding size", Bounds(1, MAX_DIM))
    hidden_dim: int = option(512, int, "LSTM hidden and cell size", Bounds(1, MAX_DIM))
    attention: bool = option(True, bool, "attend over the encoder grid (off: plain vector-initialized LSTM)")
    attention_dim: int = option(512, int, "size of the attention's hidden layer", Bounds(1, MAX_DIM))
    dropout: float = option(0.5, float, "dropout on embeddings and before the output layer",
                            Bounds(0, 1, open_high=True))
    word_dropout: float = option(0.0, float, "share of the decoder's input words (after <start>) replaced by <unk> "
                                 "under teacher forcing, so it leans on the image", Bounds(0, 1, open_high=True))
    grid_crop: float = option(1.0, float, "smallest share of the encoder grid's side (cached, or the CNN's output "
                              "when fine-tuning) that a random crop keeps, resized back, in cross-entropy training; "
                              "1: no crop", Bounds(0, 1, open_low=True))
    scheduled_sampling: float = option(0.0, float, "largest share of the decoder's input words (after <start>) "
                                       "drawn from its own previous prediction instead of the reference, ramped "
                                       "linearly from 0 in the first cross-entropy epoch to this in the last "
                                       "(0: off)", Bounds(0, 1))
    epochs: int = option(12, int, "cross-entropy epochs at most (0: none, only the self-critical phase, "
                         "starting from init_from)", Bounds(0, 100_000))
    batch_size: int = option(64, int, "captions per training batch", Bounds(1, 65_536))
    lr: float = option(1e-3, float, "AdamW peak learning rate", Bounds(0, 10, open_low=True))
    weight_decay: float = option(1e-4, float, "AdamW weight decay", Bounds(0, 10))
    warmup_steps: int = option(200, int, "linear warm-up steps, then cosine decay to lr_min_ratio * lr",
                               Bounds(0, 10**9))
    lr_min_ratio: float = option(0.05, float, "final learning rate as a fraction of lr", Bounds(0, 1))
    grad_clip: float = option(5.0, float, "clip the gradient norm to this", Bounds(0, 1e6, open_low=True))
    label_smoothing: float = option(0.1, float, "cross-entropy label smoothing", Bounds(0, 1, open_high=True))
    patience: int = option(3, int, "stop after this many epochs without a better dev CIDEr-D", Bounds(1, 100_000))
    init_from: str | None = option(None, str, "start from this model folder's decoder and vocabulary (fine-tuning, "
                                   "distillation into a trained decoder); the model fields below must match it")
    teacher: str | None = option(None, str, "model folder (one decoder or an ensemble) whose next-word distribution "
                                 "the decoder also learns under teacher forcing (word-level distillation); the "
                                 "vocabulary is the teacher's")
    distill_weight: float = option(0.5, float, "share of the loss that is the KL divergence to the teacher's "
                                   "distribution; the rest is cross-entropy on the reference words", Bounds(0, 1))
    average_last: int = option(0, int, "also average the decoder weights of the last N cross-entropy epochs and keep "
                               "the average if it scores higher on dev (0: off)", Bounds(0, 100))
    scst_epochs: int = option(0, int, "self-critical CIDEr-D epochs after cross-entropy (0: none)", Bounds(0, 100_000))
    scst_lr: float = option(2e-5, float, "constant learning rate of the self-critical phase",
                            Bounds(0, 10, open_low=True))
    scst_samples: int = option(5, int, "sampled captions per image in the self-critical phase", Bounds(2, 64))
    scst_batch_images: int = option(32, int, "images per self-critical batch", Bounds(1, 65_536))
    dev_beam_size: int = option(3, int, "beam used for the per-epoch dev evaluation", Bounds(1, 64))
    dev_limit: int = option(0, int, "evaluate on the first N dev images only (0: all)", Bounds(0, 10**9))
    seed: int = option(0, int, "random seed", Bounds(0, 2**63 - 1))
    num_workers: int = option(2, int, "image-reading worker processes", Bounds(0, 256))
    device: str = option("auto", str, "torch device (auto: CUDA when present, else CPU)")
    amp: bool = option(True, bool, "mixed precision on CUDA")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.teacher is not None and self.scheduled_sampling > 0:
            raise OptionError("scheduled_sampling and teacher do not go together: the teacher reads the reference "
                              "words, so its next-word targets would not follow the student's drawn prefix")
        if self.epochs == 0 and (self.init_from is None or self.scst_epochs == 0):
            raise OptionError("epochs=0 skips cross-entropy training: it needs init_from (the decoder to continue) "
                              "and scst_epochs > 0 (the only phase left)")
        if self.encoder_lr is not None and not self.finetune_encoder:
            raise OptionError("encoder_lr needs finetune_encoder=true: the CNN stays frozen, so no rate of its own "
                              "would take effect")
        if self.average_last == 1:
            raise OptionError("average_last=1 would average one epoch with itself: give 0 (off) or at least 2")
        _check_encoder(self.encoder)
        _check_device(self.device)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> "TrainConfig":
        """The config in JSON file ``path``, with the ``overrides`` that are not None applied.

        Raises:
            OptionError: ``PATH: reason``: unreadable, not a JSON object, an unknown or missing
                field, or a bad value (named with its field).
        """
        path = Path(path)
        raw = _read_json_object(path)
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise OptionError(f"{printable(path)}: unknown field {unknown[0]!r}")
        values = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
        for name in ("train_manifest", "dev_manifest"):
            if name not in values:
                raise OptionError(f"{printable(path)}: field {name!r} is missing")
        try:
            return cls(**values)
        except OptionError as e:
            raise OptionError(f"{printable(path)}: {e}") from e


def _check_encoder(name: str) -> None:
    from captioner.encoders import ENCODERS  # torch: imported when a run is configured, not for --help

    if name not in ENCODERS:
        raise OptionError(f"encoder={name!r} must be one of {', '.join(sorted(ENCODERS))}")


def _check_device(name: str) -> None:
    if name != "auto":  # whether this machine has it is checked when training starts
        check_device(name, "device", available=False)


def _read_json_object(path: Path) -> dict:
    try:
        if is_device(path):
            raise OptionError(f"{printable(path)}: not a training config: a device, not a file")
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise OptionError(f"{printable(path)}: cannot read training config: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise OptionError(f"{printable(path)}: training config is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise OptionError(f"{printable(path)}: training config must be a JSON object, not {type(raw).__name__}")
    return raw
