"""Training: teacher forcing on cached encoder grids, selection on dev CIDEr-D.

With a frozen encoder (the default) every image goes through the CNN once
(:mod:`captioner.features`); an epoch is then a few minutes on 2 CPU cores. With
``finetune_encoder`` the CNN runs on every batch instead, which needs a GPU to be practical.
Each epoch writes an atomic checkpoint, a metrics line and a plot, so a run can be
resumed with ``resume=True`` after any interruption.

Under torchrun (``RANK``/``WORLD_SIZE`` set) the cross-entropy phase runs data-parallel:
the decoder is wrapped in DistributedDataParallel, every process builds the same shuffled,
length-bucketed global batches (one seed) and takes its slice of each, and the loss is
normalized by the global token count, so N processes with a global batch of B take the
same steps as one process with batch B. Each machine's first process fills the feature
cache while the others wait; rank 0 alone evaluates, logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from captioner.allocator import keep_freed_memory
from captioner.augment import crop_grids, drop_words
from captioner.checkpoint import check_fits, read_checkpoint, resume_error
from captioner.cider import CiderD
from captioner.data import ManifestEntry, check_scorable, read_manifest
from captioner.decoding import DecodingOptions
from captioner.distributed import ProcessGroup, described, join, leave, peer_lost
from captioner.encoders import build_encoder
from captioner.errors import CaptionerError, DataError, OptionError, OutputError, count_of, printable
from captioner.evaluation import check_references, evaluate_grids, grid_batches
from captioner.features import cached_features
from captioner.images import check_image_file, model_pixels
from captioner.model import CaptionModel, ModelConfig, check_new_model_folder, expected_tensors
from captioner.options import DecoderConfig, check_device
from captioner.outputs import check_writable_folder, descriptor_is_at
from captioner.progress import progress_bar
from captioner.scst import reward_tokens, self_critical_terms
from captioner.tensor_files import load_tensors, save_tensors
from captioner.train_config import PER_MACHINE_FIELDS, TrainConfig
from captioner.vocab import SPECIALS, Vocabulary, tokenize

__all__ = ["TrainConfig", "Trainer", "train"]


def _pad(sequences: list[list[int]], length: int, pad: int) -> torch.Tensor:
    out = torch.full((len(sequences), length), pad, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.tensor(seq[:length])
    return out


def _caption_pairs(entries: list[ManifestEntry], vocab: Vocabulary, max_words: int) -> list[tuple[int, list[int]]]:
    """(image index, token ids) for every reference caption; long captions keep their <end>."""
    pairs = []
    for i, entry in enumerate(entries):
        for caption in entry.captions:
            ids = vocab.encode(caption)
            if len(ids) > max_words + 2:
                ids = ids[: max_words + 1] + [vocab.end]
            pairs.append((i, ids))
    return pairs


def _lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _check_same_settings(cfg: TrainConfig, group: ProcessGroup) -> None:
    """Refuse, in every process alike, settings that differ between the processes of one run.

    Each process applies its own: a different batch size or epoch count runs the collectives
    out of step (the run hangs), a different learning rate or seed trains the decoders apart.

    Raises:
        OptionError: naming each field that differs and its value in each process.
    """
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in PER_MACHINE_FIELDS}
    everyone = group.gather(settings)
    differing = [name for name in settings if len({json.dumps(s[name]) for s in everyone}) > 1]
    if differing:
        shown = "; ".join(f"{name}: " + ", ".join(f"{s[name]!r} on rank {rank}" for rank, s in enumerate(everyone))
                          for name in differing)
        raise OptionError(f"the processes of this run were given different settings ({shown}); give every "
                          "process the same")


def _check_distributable(cfg: TrainConfig, world: int) -> None:
    """Under torchrun both phases run data-parallel on cached grids.

    Raises:
        OptionError: the run also fine-tunes the CNN, or a global batch is smaller than the
            number of processes.
    """
    if cfg.batch_size < world:
        raise OptionError(f"batch_size={cfg.batch_size} is the global batch: give at least one caption to each of "
                          f"the {world} processes")
    if cfg.scst_epochs and cfg.scst_batch_images < world:
        raise OptionError(f"scst_batch_images={cfg.scst_batch_images} is the global batch: give at least one image "
                          f"to each of the {world} processes")
    if cfg.finetune_encoder:
        raise OptionError("under torchrun, training runs on cached features: set finetune_encoder false, or "
                          "fine-tune the CNN in one process")


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name, "device")
    return torch.device(name)


# DecoderConfig fields that shape the weights (dropout does not: a run from init_from may change it)
SHAPE_FIELDS = ("vocab_size", "feature_dim", "embed_dim", "hidden_dim", "attention", "attention_dim")
RUN_FILES = ("last.pt", "metrics.jsonl", "best")  # what an earlier run leaves in out_dir
LOCK_FILE = ".lock"  # held by the process training into the folder
IN_PLACE_FILES = ("metrics.jsonl", "curves.png")  # appended to or rewritten, not renamed into place


def prepare_output(out: Path, *, resume: bool, averaging: bool = False) -> Path:
    """Fail at the start, not after an epoch, if the run's outputs could not be written.

    ``averaging``: the run keeps epoch snapshots in ``out/epochs`` and saves their average to ``out/averaged``.

    Raises:
        OutputError: ``out`` cannot be created or written, or holds an earlier run that is not being resumed.
    """
    check_writable_folder(out)
    for name in IN_PLACE_FILES:
        if (out / name).is_dir() or ((out / name).exists() and not os.access(out / name, os.W_OK)):
            raise OutputError(f"{printable(out / name)}: cannot write training output here: not a writable file")
    if not resume and any((out / name).exists() for name in RUN_FILES):
        raise OutputError(f"{printable(out)}: holds an earlier run; resume it (--resume) or choose another folder")
    if resume and not (out / "last.pt").exists() and any((out / name).exists() for name in RUN_FILES):
        # resuming with nothing to resume from starts afresh, which would overwrite that run's best/
        raise OutputError(f"{printable(out)}: holds an earlier run but no last.pt to resume it from; "
                          "choose another folder to start over")
    check_new_model_folder(out / "best", replace=True)
    if averaging:
        epochs = out / "epochs"  # a link to a folder elsewhere (another disk) will do
        if os.path.lexists(epochs) and not (epochs.is_dir() and os.access(epochs, os.W_OK | os.X_OK)):
            raise OutputError(f"{printable(epochs)}: cannot keep epoch snapshots here: not a writable folder")
        check_new_model_folder(out / "averaged", replace=True)
    return out


_RUN_LOCKS: dict[Path, int] = {}  # run folders this process has locked -> the lock file's descriptor


def lock_run_folder(out: Path) -> None:
    """Refuse a second training process writing to ``out`` (two runs interleave their logs and checkpoints).

    A POSIX lock: held by this process until :func:`unlock_run_folder` or its end (a kill too),
    not inherited by forked workers, and no obstacle to this process itself (a notebook or a
    test may make several Trainers for one folder).

    Raises:
        OutputError: another process holds it, or the lock file cannot be made.
    """
    key = out.resolve()
    if key in _RUN_LOCKS:
        return
    while True:
        try:
            fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputError(f"{printable(out / LOCK_FILE)}: cannot lock the run folder: {e.strerror or e}") from e
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputError(f"{printable(out)}: another training run is writing to this folder; wait for it "
                                  "to end or choose another folder") from e
            raise OutputError(f"{printable(out / LOCK_FILE)}: cannot lock the run folder: {e.strerror or e}") from e
        if descriptor_is_at(fd, key / LOCK_FILE):
            break
        # a run that failed to start removed the file between our open and our lock: the lock
        # we hold is on a file no other run will see, so take the one now at that path
        os.close(fd)
    _RUN_LOCKS[key] = fd


def unlock_run_folder(out: Path) -> None:
    """Let another process train in ``out`` (closing the descriptor ends this process's lock on it)."""
    fd = _RUN_LOCKS.pop(out.resolve(), None)
    if fd is not None:
        os.close(fd)


def _check_memory(config: ModelConfig) -> None:
    """Refuse a model too large to train here before allocating it (instead of dying of OOM later).

    Raises:
        OptionError: weights, gradients and AdamW's two moments alone would take over half the RAM.
    """
    params = sum(math.prod(shape) for shape, _ in expected_tensors(config).values())
    needed = params * 4 * 4  # float32 weights, gradients and two optimizer moments; activations come on top
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > total // 2:
        raise OptionError(f"a decoder of {params / 1e6:.0f} M parameters needs about {needed / 2**30:.1f} GB to "
                          f"train before activations, and this machine has {total / 2**30:.1f} GB; choose smaller "
                          "embed_dim, hidden_dim or attention_dim")


def _load_teacher(cfg: TrainConfig, init: CaptionModel | None) -> CaptionModel | None:
    """The distillation teacher, checked to read the same cached grids and write the same words.

    Raises:
        OptionError: the teacher's encoder or vocabulary differs from the run's, or the encoder is fine-tuned.
    """
    if cfg.teacher is None:
        return None
    teacher = CaptionModel.load(cfg.teacher)
    label = f"teacher={cfg.teacher!r}"
    if cfg.finetune_encoder or teacher.config.encoder_weights_stored:
        raise OptionError(f"{label}: distillation reads the cached grids of a frozen encoder; "
                          "neither the run nor the teacher may fine-tune its encoder")
    if teacher.config.encoder != cfg.encoder:
        raise OptionError(f"{label}: its encoder is {teacher.config.encoder}, this run's is {cfg.encoder}")
    if init is not None and init.vocab.itos != teacher.vocab.itos:
        raise OptionError(f"{label}: its vocabulary differs from init_from={cfg.init_from!r}'s")
    return teacher.requires_grad_(False)


def _distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over real (non-pad) target positions of KL(teacher || student) between next-word distributions."""
    student = logits.float().log_softmax(dim=-1)
    teacher = teacher_logits.float().log_softmax(dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1)  # (B, T)
    return kl[mask].sum()


def _start_from(model: CaptionModel, init: CaptionModel, folder: str) -> None:
    """Copy ``init``'s decoder (and fine-tuned encoder) into ``model``, which must be shaped alike.

    Raises:
        OptionError: the model settings differ from the folder's model, or it is an ensemble.
    """
    if init.config.ensemble_size != 1:
        raise OptionError(f"init_from={folder!r} is an ensemble of {init.config.ensemble_size} decoders; "
                          "start from one decoder")
    ours, theirs = model.config, init.config
    differ = [f"{name} {getattr(theirs.decoder, name)} (here {getattr(ours.decoder, name)})"
              for name in SHAPE_FIELDS if getattr(theirs.decoder, name) != getattr(ours.decoder, name)]
    if theirs.encoder != ours.encoder:
        differ.insert(0, f"encoder {theirs.encoder} (here {ours.encoder})")
    if differ:
        raise OptionError(f"init_from={folder!r}: its model is shaped otherwise: {', '.join(differ)}")
    if theirs.encoder_weights_stored and not ours.encoder_weights_stored:
        # its decoder reads the tuned CNN's features: on ImageNet features it would be another model
        raise OptionError(f"init_from={folder!r} has a fine-tuned encoder; continue with finetune_encoder on")
    model.decoder.load_state_dict(init.decoder.state_dict())  # dropout is not a shape: this run's applies
    if theirs.encoder_weights_stored:
        model.encoder.load_state_dict(init.encoder.state_dict())


class Trainer:
    """Owns the model, optimizer and data of one run; ``fit`` runs epochs until stopping."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False):
        """Check the output folder, read and check the manifests, build the model and its features.

        Raises:
            OptionError: the device is not available.
            OutputError: the output folder cannot be written, or holds a run that ``resume`` does not continue.
            DataError: a manifest is malformed, or no training word is frequent enough.
            ImageReadError: a training or dev image cannot be read.
        """
        self.cfg = cfg
        keep_freed_memory()
        self.device = _pick_device(cfg.device)
        self.group = join(self.device.type)
        if self.group.distributed:
            _check_same_settings(cfg, self.group)
            _check_distributable(cfg, self.group.world)
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.group.local_rank)
        self.out = prepare_output(Path(cfg.out_dir), resume=resume, averaging=cfg.average_last > 1)
        if self.group.leader:  # the one process that writes there
            lock_run_folder(self.out)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.train_entries = read_manifest(cfg.train_manifest, require_captions=True)
        self.dev_entries = read_manifest(cfg.dev_manifest, require_captions=True)
        # the best epoch is the one with the highest dev CIDEr-D: a dev set it cannot score picks epoch 1
        check_scorable(self.dev_entries[: cfg.dev_limit or None], cfg.dev_manifest)
        self._check_dev_references()
        for entry in (*self.train_entries, *self.dev_entries):  # a missing dev photo, now: not after minutes of caching
            check_image_file(entry.image)
        self.init_model = CaptionModel.load(cfg.init_from) if cfg.init_from else None
        self.teacher = _load_teacher(cfg, self.init_model)
        if self.init_model is not None or self.teacher is not None:
            # the starting decoder's and the teacher's output ids are this vocabulary's
            self.vocab = (self.init_model or self.teacher).vocab
        else:
            self.vocab = Vocabulary.build((c for e in self.train_entries for c in e.captions),
                                          min_count=cfg.min_word_count)
        if len(self.vocab) == len(SPECIALS):
            raise DataError(f"{printable(cfg.train_manifest)}: no word occurs min_word_count={cfg.min_word_count} "
                            "times; lower min_word_count")
        self.model = self._build_model().to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.device).eval()
        # fine-tuning decodes every batch's images; PIL releases the GIL, so threads decode in parallel
        self._readers = ThreadPoolExecutor(max_workers=max(1, cfg.num_workers))
        self.pairs = _caption_pairs(self.train_entries, self.vocab, cfg.max_caption_words)
        self._check_shares()  # before the features are cached: a phase that cannot run fails now, not hours later
        self.train_grids, self.dev_grids = self._load_grids()
        if cfg.dev_limit:
            self.dev_entries = self.dev_entries[: cfg.dev_limit]
        self.optimizer = torch.optim.AdamW(self._parameter_groups(), weight_decay=cfg.weight_decay)
        self.steps_per_epoch = math.ceil(len(self.pairs) / cfg.batch_size)
        total = self.steps_per_epoch * cfg.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _lr_factor(s, total, cfg))
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and self.device.type == "cuda")
        # summed, then divided by the global token count: one process and N give the same loss
        self.loss_fn = nn.CrossEntropyLoss(ignore_index=self.vocab.pad, label_smoothing=cfg.label_smoothing,
                                           reduction="sum")
        self.train_decoder = DistributedDataParallel(self.model.decoder) if self.group.distributed \
            else self.model.decoder
        if self.group.distributed:  # each process its own random stream (draws, dropped words, crops),
            torch.manual_seed(cfg.seed + self.group.rank)  # now that the weights are shared; one process: as before
        # a drawn input word is never padding, <start> or <end>: search never feeds those mid-caption
        self._never_drawn = torch.tensor([self.vocab.pad, self.vocab.start, self.vocab.end], device=self.device)
        self.rank_random_states: list[torch.Tensor] = []  # under torchrun: every process's, at the last epoch's end
        self.epoch = 0
        self.best_cider = -1.0
        self.stale_epochs = 0
        self.scst_done = 0
        self._cider: CiderD | None = None  # self-critical reward, built when that phase first runs
        self.history: list[dict] = []

    def _parameter_groups(self) -> list[dict]:
        """The decoder at ``lr``; a fine-tuned CNN at ``encoder_lr``, since pretrained features need smaller steps."""
        groups = [{"params": list(self.model.decoder.parameters()), "lr": self.cfg.lr}]
        if self.cfg.finetune_encoder:
            groups.append({"params": list(self.model.encoder.parameters()), "lr": self._encoder_lr(self.cfg.lr)})
        return groups

    def _encoder_lr(self, decoder_lr: float) -> float:
        """The CNN's learning rate when the decoder's is ``decoder_lr`` (same ratio in every phase)."""
        return decoder_lr * (self.cfg.encoder_lr or self.cfg.lr) / self.cfg.lr

    def _build_model(self) -> CaptionModel:
        cfg = self.cfg
        channels = build_encoder(cfg.encoder, pretrained=False).out_channels  # to size the decoder
        decoder = DecoderConfig(
            vocab_size=len(self.vocab),
            feature_dim=channels,
            embed_dim=cfg.embed_dim,
            hidden_dim=cfg.hidden_dim,
            attention=cfg.attention,
            attention_dim=cfg.attention_dim,
            dropout=cfg.dropout,
        )
        config = ModelConfig(
            encoder=cfg.encoder,
            decoder=decoder,
            decoding=DecodingOptions(beam_size=cfg.dev_beam_size),
            encoder_weights_stored=cfg.finetune_encoder,
        )
        _check_memory(config)
        model = CaptionModel(config, self.vocab)
        if self.init_model is not None:
            _start_from(model, self.init_model, cfg.init_from)
        model.encoder.requires_grad_(cfg.finetune_encoder)
        return model

    def _load_grids(self) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
        """Cached grids per view (original, flipped) for train, and for dev; None when fine-tuning."""
        if self.cfg.finetune_encoder:
            return None, None
        encoder = self.model.encoder.eval()
        paths = [e.image for e in self.train_entries]
        cache, workers = self.cfg.cache_dir, self.cfg.num_workers
        if self.group.local_rank != 0:
            self.group.barrier()  # this machine's first process fills the cache; the others then read it
        views = [cached_features(encoder, paths, cache, num_workers=workers)]
        if self.cfg.flip_augment:
            views.append(cached_features(encoder, paths, cache, flip=True, num_workers=workers))
        dev = cached_features(encoder, [e.image for e in self.dev_entries], cache, num_workers=workers)
        if self.group.local_rank == 0:
            self.group.barrier()
        if self.cfg.dev_limit:
            dev = dev[: self.cfg.dev_limit]
        return views, dev

    def _grids_for(self, image_ids: list[int], entries: list[ManifestEntry], train: bool) -> torch.Tensor:
        """Encoder grids (B, C, h, w) of the given images, from the cache or the (trainable) CNN."""
        if self.train_grids is not None:
            source = self.train_grids[random.randrange(len(self.train_grids))] if train else self.dev_grids
            return source[image_ids].to(self.device).float()
        encoder = self.model.encoder
        size = encoder.preprocess.size
        paths = [entries[i].image for i in image_ids]
        pixels = torch.from_numpy(np.stack(list(self._readers.map(lambda p: model_pixels(p, size), paths))))
        if not train:
            return encoder.encode(pixels)
        if self.cfg.flip_augment:  # the fine-tuning counterpart of the cached flipped view
            flipped = torch.rand(len(paths)) < 0.5
            pixels[flipped] = pixels[flipped].flip(dims=[2])
        images = encoder.preprocess.normalize(pixels.to(self.device))
        return self.model.encoder(images.contiguous(memory_format=torch.channels_last))

    def train_epoch(self) -> float:
        self.model.train()
        for module in self.model.encoder.modules():
            # batch norm keeps its ImageNet statistics: a batch of 64 images estimates them worse
            if not self.cfg.finetune_encoder or isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        total_loss, count = 0.0, 0
        batches = self._my_share(self._length_bucketed_batches(), count_of(len(self.pairs), "caption"))
        bar = progress_bar(batches, show=self.group.leader, desc=f"epoch {self.epoch + 1}", unit="batch")
        for batch_ids in bar:
            batch = [self.pairs[i] for i in batch_ids]
            loss, size = self._train_step(batch)
            total_loss += loss * size
            count += size
            bar.set_postfix(loss=f"{total_loss / count:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        return total_loss / count

    def _check_shares(self) -> None:
        """Under torchrun, both phases need at least one item per process in some global batch.

        Raises:
            DataError: too few captions (cross-entropy) or images (self-critical) for the processes.
        """
        if len(self.pairs) < self.group.world:
            raise self._too_few(count_of(len(self.pairs), "caption"))
        if self.cfg.scst_epochs and len(self.train_entries) < self.group.world:
            raise self._too_few(count_of(len(self.train_entries), "image"))

    def _too_few(self, what: str) -> DataError:
        return DataError(f"{printable(self.cfg.train_manifest)}: {what} cannot give each of the "
                         f"{self.group.world} processes one item of a global batch; use fewer processes")

    def _my_share(self, batches: list[list[int]], what: str) -> list[list[int]]:
        """This process's slices of the global batches (:meth:`ProcessGroup.my_slices`).

        Raises:
            DataError: no global batch can give every process one item (every process raises alike).
        """
        share = self.group.my_slices(batches)
        if not share:
            raise self._too_few(what)
        return share

    def _sample_rate(self) -> float:
        """This cross-entropy epoch's scheduled-sampling rate: 0 in the first, the configured most in the last."""
        last = max(1, self.cfg.epochs - 1)
        return self.cfg.scheduled_sampling * min(1.0, self.epoch / last)

    def _length_bucketed_batches(self) -> list[list[int]]:
        """Shuffled batches of similar-length captions: less padding, ~40% less LSTM work."""
        order = list(range(len(self.pairs)))
        random.shuffle(order)
        size = self.cfg.batch_size
        pool = size * 50
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: len(self.pairs[i][1]))
            batches.extend(chunk[i : i + size] for i in range(0, len(chunk), size))
        random.shuffle(batches)
        return batches

    def _train_step(self, batch: list[tuple[int, list[int]]]) -> tuple[float, int]:
        """One optimizer step; (the global batch's mean token loss, its caption count)."""
        length = max(len(ids) for _, ids in batch)
        tokens = _pad([ids for _, ids in batch], length, self.vocab.pad).to(self.device)  # (B, T)
        targets = tokens[:, 1:] != self.vocab.pad
        # the global batch's target tokens per process: DDP averages gradients over processes
        per_process = float(self.group.sum(targets.sum()).item()) / self.group.world
        inputs = drop_words(tokens[:, :-1], self.cfg.word_dropout, unk=self.vocab.unk, pad=self.vocab.pad)
        with torch.autocast(self.device.type, enabled=self.scaler.is_enabled()):
            grid = self._grids_for([i for i, _ in batch], self.train_entries, train=True)
            grid = crop_grids(grid, self.cfg.grid_crop)
            logits = self.train_decoder(grid, inputs, self._sample_rate(), self._never_drawn)  # (B, T-1, V)
            loss = self.loss_fn(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher.decoder(grid, tokens[:, :-1])
                weight = self.cfg.distill_weight
                loss = (1 - weight) * loss + weight * _distillation_loss(logits, teacher_logits, targets)
            loss = loss / per_process
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        mean = float(self.group.sum(loss).item()) / self.group.world
        return mean, int(self.group.sum(torch.tensor(len(batch))).item())

    def evaluate_dev(self, options: DecodingOptions | None = None, *, meteor: bool = False) -> dict[str, float]:
        """Dev-set scores of beam-searched captions (no METEOR by default: it is slow to start)."""
        self.model.eval()
        grids = grid_batches(lambda ids: self._grids_for(ids, self.dev_entries, train=False), len(self.dev_entries))
        scores, _ = evaluate_grids(self.model, grids, [e.captions for e in self.dev_entries], options, meteor=meteor)
        return scores

    def fit(self) -> dict:
        # once a self-critical epoch has run (a resumed run), cross-entropy is over whatever patience says:
        # a better self-critical epoch resets the stale count that stopped it
        while self.scst_done == 0 and self.epoch < self.cfg.epochs and self.stale_epochs < self.cfg.patience:
            self._run_epoch("xe", self.train_epoch, "train_loss")
        if self.cfg.average_last > 1 and self.scst_done == 0 and self.group.leader and self._averaging_due():
            self._average_snapshots()  # the last step: the other processes have nothing left to do
        if self.cfg.scst_epochs and self.scst_done == 0:
            self._start_scst()
        while self.scst_done < self.cfg.scst_epochs:
            self.scst_done += 1
            self._run_epoch("scst", self.scst_epoch, "train_reward")
        return max(self.history, key=lambda r: r["CIDEr-D"]) if self.history else {}

    def _run_epoch(self, phase: str, run, measured: str) -> None:
        """Run one epoch; ``measured`` names what ``run`` returns (loss, or mean sample reward)."""
        started = time.time()
        value = run()
        scores = self.group.share(self.evaluate_dev() if self.group.leader else None)  # rank 0's, everywhere
        self._gather_random_states()
        self.epoch += 1
        record = {"epoch": self.epoch, "phase": phase, measured: value,
                  "seconds": round(time.time() - started, 1), **scores}
        self.history.append(record)
        better = scores["CIDEr-D"] > self.best_cider
        if better:
            self.best_cider, self.stale_epochs = scores["CIDEr-D"], 0
        else:
            self.stale_epochs += 1
        if not self.group.leader:
            return
        # the checkpoint first: a run stopped after it resumes from this epoch, and redoes
        # whatever of the rest is missing from the checkpoint (_finish_epoch); a run stopped
        # before it reruns the epoch, with nothing of it written
        self.save_checkpoint()
        self._finish_epoch(record, better)

    def _finish_epoch(self, record: dict, better: bool) -> None:
        """Write what follows from an epoch's checkpoint: best/ (when it is the best), its snapshot, its log."""
        if better:
            self.model.save(self.out / "best", replace=True)
        if record["phase"] == "xe" and self.cfg.average_last > 1:
            self._snapshot()
        self._log(record)

    def _averaging_due(self) -> bool:
        """No average since the last cross-entropy epoch (a run resumed with more epochs averages again)."""
        trained = [r["epoch"] for r in self.history if r["phase"] == "xe"]
        return bool(trained) and not any(r["phase"] == "average" and r["epoch"] >= trained[-1] for r in self.history)

    def _snapshots(self) -> list[Path]:
        """Saved decoder weights of the latest cross-entropy epochs, oldest first."""
        return sorted((self.out / "epochs").glob("epoch-*.safetensors"), key=lambda p: int(p.stem.split("-")[1]))

    def _snapshot(self) -> None:
        """Keep this epoch's decoder weights (float32) for averaging; only the last ``average_last`` stay."""
        folder = self.out / "epochs"
        folder.mkdir(exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.model.decoder.state_dict().items()}
        save_tensors(state, folder / f"epoch-{self.epoch}.safetensors")
        for old in self._snapshots()[: -self.cfg.average_last]:
            old.unlink()

    def _average_snapshots(self) -> None:
        """Average the last epochs' decoder weights (Polyak-style checkpoint averaging), score it on dev.

        Neighbouring epochs of a cosine schedule sit around one minimum; their mean is often
        flatter and better than any of them. It becomes ``best`` only if it scores higher.
        """
        files = self._snapshots()[-self.cfg.average_last :]
        if len(files) < 2:
            return
        states = [load_tensors(f) for f in files]
        average = {k: torch.stack([s[k] for s in states]).mean(dim=0) for k in states[0]}
        trained = {k: v.clone() for k, v in self.model.decoder.state_dict().items()}
        self.model.decoder.load_state_dict(average)
        scores = self.evaluate_dev()
        record = {"epoch": self.epoch, "phase": "average", "averaged": [int(f.stem.split("-")[1]) for f in files],
                  **scores}
        self.history.append(record)
        self.model.save(self.out / "averaged", replace=True)
        if scores["CIDEr-D"] > self.best_cider:
            self.best_cider = scores["CIDEr-D"]
            self.model.save(self.out / "best", replace=True)
        # the checkpoint keeps the last epoch's weights: a run resumed with more epochs trains on from
        # them (and averages again), not from the average
        self.model.decoder.load_state_dict(trained)
        self._log(record)
        self.save_checkpoint()

    def _start_scst(self) -> None:
        """Continue from the best cross-entropy weights (or init_from's) with a fresh, small-step optimizer."""
        if self.cfg.epochs:
            if self.group.leader:  # rank 0 wrote best/ (on its machine); the others get its weights from it
                best = CaptionModel.load(self.out / "best", device=str(self.device))
                self.model.decoder.load_state_dict(best.decoder.state_dict())
                if self.cfg.finetune_encoder:
                    self.model.encoder.load_state_dict(best.encoder.state_dict())
            self.group.broadcast(self.model.decoder)
        self.optimizer.state.clear()
        decoder_group, *encoder_group = self.optimizer.param_groups
        decoder_group["lr"] = self.cfg.scst_lr
        for group in encoder_group:
            group["lr"] = self._encoder_lr(self.cfg.scst_lr)
        if any(r["phase"] == "start" for r in self.history):
            return  # resumed before the first self-critical epoch ended: the start is scored, kept and logged
        # the starting point: an SCST epoch must beat it to become best
        baseline = self.group.share(self.evaluate_dev() if self.group.leader else None)
        self._gather_random_states()
        self.best_cider = max(self.best_cider, baseline["CIDEr-D"])
        if not self.cfg.epochs and self.group.leader:
            # no cross-entropy epoch left a best: the starting model is it until an SCST epoch beats it.
            # The checkpoint first, as after an epoch: a run stopped after it writes best/ and the log again
            record = {"epoch": 0, "phase": "start", **baseline}
            self.history.append(record)
            self.save_checkpoint()
            self._finish_epoch(record, better=True)

    def _reward_scorer(self) -> CiderD:
        return CiderD([[reward_tokens(tokenize(c)) for c in e.captions] for e in self.train_entries])

    def scst_epoch(self) -> float:
        """One pass of self-critical training over the training images; returns the mean reward.

        Under torchrun each process samples for its slice of every global batch of images;
        the loss is normalized by all processes' tokens and the gradients are added up, so
        a step is the one process's step on the whole batch (up to the samples drawn).

        Raises:
            RuntimeError: the processes' decoders no longer agree after the epoch.
        """
        if self._cider is None:
            self._cider = self._reward_scorer()
        self.model.eval()  # no dropout while sampling: rewards judge the model that will be used
        order = list(range(len(self.train_entries)))
        random.shuffle(order)  # the same order in every process
        size, group = self.cfg.scst_batch_images, self.group
        batches = self._my_share([order[start : start + size] for start in range(0, len(order), size)],
                                 count_of(len(order), "image"))
        bar = progress_bar(batches, show=group.leader, desc=f"scst {self.scst_done}", unit="batch")
        reward = torch.zeros(2, dtype=torch.float64)  # summed rewards, samples
        for ids in bar:
            grid = self._grids_for(ids, self.train_entries, train=True)
            terms = self_critical_terms(self.model.decoder, grid, ids, self._cider, self.vocab,
                                        samples=self.cfg.scst_samples)
            loss = terms.loss_sum / float(group.sum(torch.tensor(terms.tokens)).item())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            group.sum_gradients(self.model.decoder)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            reward += group.sum(torch.tensor([terms.reward_sum, terms.samples]))
            bar.set_postfix(reward=f"{reward[0] / reward[1]:.3f}")
        if not group.same_everywhere(self.model.decoder):
            raise RuntimeError("the processes' decoders differ after a self-critical epoch")
        return float(reward[0] / reward[1]) if reward[1] else 0.0

    def _log(self, record: dict) -> None:
        from captioner.plot import plot_history

        try:
            with (self.out / "metrics.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            plot_history(self.history, self.out / "curves.png")
        except OSError as e:
            raise OutputError(f"{printable(self.out)}: cannot write the metrics log or plot: {e.strerror or e}") from e
        print(json.dumps(record), flush=True)

    def _dev_fingerprint(self) -> str:
        """The dev photos (by file name, so a moved dataset still matches) and their references, hashed."""
        digest = hashlib.sha256()
        for entry in self.dev_entries:
            digest.update(json.dumps([entry.image.name, list(entry.captions)]).encode())
        return f"{len(self.dev_entries)}:{digest.hexdigest()[:16]}"

    def _complete_last_epoch(self) -> None:
        """Rewrite best/ and the snapshot of the checkpoint's last epoch, in case the run stopped before they were.

        The checkpoint is written first at the end of an epoch and holds that epoch's
        weights, so when its epoch was the best, best/ is written again from them (a run
        stopped while best/ was being replaced left none).
        """
        for leftover in self.out.iterdir():  # a model folder being written or replaced when the run stopped
            if re.fullmatch(r"\.(best|averaged)\.[0-9a-f]{8}\.(tmp|old)", leftover.name) and leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
        last = self.history[-1] if self.history else None
        if last is not None and last["phase"] == "start":  # the starting model is the best until an epoch beats it
            self.model.save(self.out / "best", replace=True)
            return
        if last is None or last["phase"] not in ("xe", "scst"):  # the others write best/ before their checkpoint
            return
        if last["CIDEr-D"] == self.best_cider and all(r["CIDEr-D"] < self.best_cider for r in self.history[:-1]):
            self.model.save(self.out / "best", replace=True)
        if last["phase"] == "xe" and self.cfg.average_last > 1 and not any(
                int(f.stem.split("-")[1]) == last["epoch"] for f in self._snapshots()):
            self._snapshot()

    def _rewrite_log(self) -> None:
        """``metrics.jsonl`` as the checkpoint's history, before a resumed run appends to it.

        A run stopped while writing it leaves a line cut short, and one stopped between the log
        and the checkpoint leaves an epoch that will run again; either would corrupt or repeat
        a line once the resumed run appends.

        Raises:
            OutputError: the log cannot be written.
        """
        path, staging = self.out / "metrics.jsonl", self.out / "metrics.jsonl.tmp"
        try:
            staging.write_text("".join(json.dumps(record) + "\n" for record in self.history), encoding="utf-8")
            os.replace(staging, path)
        except OSError as e:
            staging.unlink(missing_ok=True)
            raise OutputError(f"{printable(path)}: cannot write the metrics log: {e.strerror or e}") from e

    def _check_dev_references(self) -> None:
        """:func:`check_references` on the dev set, by the leader, which alone scores it (and needs
        Java for it); every process raises its verdict alike.

        Raises:
            DataError: a dev image whose references hold no word the scorer reads.
        """
        problem = None
        if self.group.leader:
            try:
                check_references(self.dev_entries[: self.cfg.dev_limit or None], self.cfg.dev_manifest)
            except DataError as e:
                problem = str(e)
        problem = self.group.share(problem)
        if problem:
            raise DataError(problem)

    def _gather_random_states(self) -> None:
        """Every process's torch random state, for the leader's checkpoint (all processes call this).

        Each process draws from its own stream (dropped words, self-critical samples): a run
        resumed with every stream where it was continues as if it had not stopped.
        """
        if self.group.distributed:
            self.rank_random_states = self.group.gather(torch.get_rng_state())

    def save_checkpoint(self) -> None:
        """Atomically replace ``last.pt`` (tensors and plain values only: loads with weights_only)."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "best_cider": self.best_cider,
            "stale_epochs": self.stale_epochs,
            "scst_done": self.scst_done,
            "history": json.dumps(self.history),
            "config": json.dumps(dataclasses.asdict(self.cfg)),
            "vocab": self.vocab.to_json(),
            "rng": torch.get_rng_state(),
            # each process's own stream, under torchrun (rank order)
            "rank_rng": torch.stack(self.rank_random_states) if self.rank_random_states else torch.empty(0),
            # Python's generator (batch order, views, self-critical order): its 624 words and position
            # (its cached gauss value is not used here)
            "py_rng": torch.tensor(random.getstate()[1], dtype=torch.int64),
            "dev": self._dev_fingerprint(),
        }
        tmp = self.out / "last.pt.tmp"
        # serialized in memory first: torch writing a file reports a full disk as "enforce fail at
        # inline_container.cc ... unexpected pos", where Python's own write says "No space left on device"
        buffer = io.BytesIO()
        torch.save(state, buffer)
        try:
            with open(tmp, "wb") as file:
                file.write(buffer.getbuffer())
            os.replace(tmp, self.out / "last.pt")
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"{printable(self.out / 'last.pt')}: cannot write checkpoint: {e.strerror or e}") from e

    def load_checkpoint(self) -> None:
        """Continue the run saved in ``last.pt``.

        Raises:
            CheckpointError: ``OUT/last.pt: cannot resume: reason; start over in another folder`` for a
                file that is cut short, holds pickled objects, or was saved for another model or vocabulary.
        """
        path = self.out / "last.pt"
        state = read_checkpoint(path, self.device)
        check_fits(path, state, self.cfg, self.vocab, self.model.state_dict())
        saved_dev = state.get("dev")  # absent from checkpoints of older versions
        if isinstance(saved_dev, str) and saved_dev != self._dev_fingerprint():
            raise resume_error(path, f"it chose its best epoch on another dev set ({saved_dev.split(':')[0]} photos; "
                                     f"this run's has {len(self.dev_entries)}), so its best score cannot be "
                                     "compared: give its own dev manifest and dev_limit")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"].cpu())
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            raise resume_error(path, f"its optimizer or random state does not fit this run ({type(e).__name__})") from e
        self.epoch = state["epoch"]
        self.best_cider = float(state["best_cider"])
        self.stale_epochs = state["stale_epochs"]
        self.scst_done = state.get("scst_done", 0)
        self.history = json.loads(state["history"])
        if "py_rng" in state:  # saved since the order of writes changed; older checkpoints reseed as before
            random.setstate((3, tuple(state["py_rng"].tolist()), None))
        else:
            random.seed(self.cfg.seed + self.epoch)
        if self.group.leader:
            self._rewrite_log()
            self._complete_last_epoch()
        if self.group.distributed:
            saved = state.get("rank_rng")
            if isinstance(saved, torch.Tensor) and saved.dim() == 2 and len(saved) == self.group.world:
                torch.set_rng_state(saved[self.group.rank].cpu().clone())  # where it was (a view crashes torch)
            else:  # saved by another number of processes, or by an older version: a stream of its own for each
                torch.manual_seed(self.cfg.seed + self.epoch * self.group.world + self.group.rank)


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Train a caption model; returns the best epoch's record. The best model is in ``out_dir/best``.

    Raises:
        OptionError: a setting cannot be used here (e.g. a CUDA device on a machine without one).
        OutputError: ``out_dir`` cannot be written, or holds an earlier run and ``resume`` is off.
        DataError: a manifest is malformed or lacks captions.
        ImageReadError: a training or dev image cannot be read.
        CheckpointError: ``resume`` found a ``last.pt`` that cannot be continued.
    """
    out = Path(cfg.out_dir)
    made = not os.path.lexists(out)
    try:
        with _peers_watched():
            trainer = Trainer(cfg, resume=resume)
    except BaseException:
        if described().leader:  # the folder is the leader's: another process tidying it could pull it from under it
            _tidy_unused(out, made)  # a run that could not start (a bad manifest, say) leaves nothing behind
        raise
    try:
        with _peers_watched():
            if resume and _checkpoint_everywhere(trainer):
                trainer.load_checkpoint()
            best = trainer.fit()
            # every process finishes before any tears the group down: a process that left while the
            # leader still wrote its files sometimes died in gloo's teardown (SIGABRT)
            trainer.group.barrier()
        return best
    finally:
        unlock_run_folder(trainer.out)
        leave(trainer.group)


@contextlib.contextmanager
def _peers_watched() -> Iterator[None]:
    """A collective that fails because another process of the run stopped becomes one plain error.

    That process said why (a bad photo, a full disk, a kill); gloo's own message here,
    "Connection closed by peer" with a source line, would read as a bug of this one.

    Raises:
        TrainingStopped: in place of such a failure.
    """
    try:
        yield
    except RuntimeError as e:
        if not (described().distributed and peer_lost(e)):
            raise
        raise TrainingStopped("another process of this training run stopped (its own message says why); this one "
                              "stops too") from e


class TrainingStopped(CaptionerError):
    """Another process of a torchrun job stopped, so this one cannot go on."""


def _tidy_unused(out: Path, made: bool) -> None:
    """After a failed start: a run folder holding only this run's lock loses it, and goes too if this run made it.

    A lock file this process does not hold stays: another run is writing there (refusing
    this one), and without its file a third run could lock a new one beside it.
    """
    held = out.resolve() in _RUN_LOCKS
    with contextlib.suppress(OSError):
        names = {p.name for p in out.iterdir()}
        if held and names == {LOCK_FILE}:
            (out / LOCK_FILE).unlink()  # while still held: a run that opened it meanwhile sees it gone and retries
            names = set()
        if made and not names:
            out.rmdir()
    unlock_run_folder(out)


def _checkpoint_everywhere(trainer: Trainer) -> bool:
    """Whether every process finds ``last.pt`` (False when none does: a fresh start).

    Raises:
        OptionError: some processes find it and others do not (an ``out_dir`` that is not
            shared between machines); every process raises, instead of running out of step.
    """
    found = (trainer.out / "last.pt").exists()
    processes = int(trainer.group.sum(torch.tensor(int(found))).item())
    if 0 < processes < trainer.group.world:
        raise OptionError(f"{printable(trainer.out / 'last.pt')}: --resume found the checkpoint on {processes} of "
                          f"{trainer.group.world} processes; under torchrun on several machines out_dir must be a "
                          "folder they share")
    return found
