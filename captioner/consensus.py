"""Consensus: how well a caption agrees with what people wrote about the most similar training photos.

A caption that shares the words of human captions of visually similar images is likely
right; a fluent caption of a photo unlike any training photo (a cup of coffee described as
a dog in water) agrees with nobody. The score is the caption's CIDEr-D against the
references of its :data:`NEIGHBOURS` nearest training images (cosine similarity of
PCA-reduced pooled encoder features), with document frequencies of the whole training
set. It is one of the calibrator's signals (:mod:`captioner.confidence`).

Stored in the model folder as ``consensus.safetensors`` (feature mean, PCA components,
the training images' codes) and ``consensus.json`` (their reference captions). A few MB;
the document frequencies and n-gram vectors are counted from the captions on first use
(a quarter of a second). Folders written before kept the frequencies in the JSON file
too; they were counted from the same captions, and are not read.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError

from captioner.cider import CiderD
from captioner.errors import ModelLoadError, printable
from captioner.scst import reward_tokens
from captioner.tensor_files import load_tensors, save_tensors
from captioner.vocab import tokenize

CONSENSUS_WEIGHTS, CONSENSUS_FILE = "consensus.safetensors", "consensus.json"
NEIGHBOURS = 10
DIMENSIONS = 128  # PCA components kept of the pooled features


class Consensus:
    """Nearest training images by pooled feature, and CIDEr-D against their references."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, codes: torch.Tensor,
                 references: list[list[str]], neighbours: int = NEIGHBOURS):
        self.mean, self.components = mean.float(), components.float()  # (C,), (C, k)
        self.codes = torch.nn.functional.normalize(codes.float(), dim=1)  # (N, k)
        self.references = references  # per training image, its captions as space-joined words
        self.neighbours = neighbours
        self._cider: CiderD | None = None
        self._cider_lock = threading.Lock()
        _LIVE.add(self)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the lock and the index behind; the index is rebuilt on first use."""
        state = dict(self.__dict__)
        del state["_cider_lock"]
        state["_cider"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cider_lock = threading.Lock()
        _LIVE.add(self)

    @classmethod
    def build(cls, pooled: torch.Tensor, captions: Sequence[Sequence[str]], *,
              dims: int = DIMENSIONS, neighbours: int = NEIGHBOURS) -> "Consensus":
        """From the training images' (N, C) pooled features and their reference captions."""
        pooled = pooled.float()
        mean = pooled.mean(dim=0)
        _, _, rows = torch.linalg.svd(pooled - mean, full_matrices=False)  # exact, so a refit gives the same file
        components = rows[: min(dims, rows.shape[0])].T.contiguous()  # (C, k)
        references = [[" ".join(tokenize(c)) for c in caps] for caps in captions]
        return cls(mean, components, (pooled - mean) @ components, references, neighbours)

    def scores(self, pooled: torch.Tensor, captions: Sequence[Sequence[str]]) -> list[list[float]]:
        """(B, C) pooled features and each image's captions -> each caption's consensus CIDEr-D."""
        query = torch.nn.functional.normalize((pooled.float().cpu() - self.mean) @ self.components, dim=1)
        neighbours = (query @ self.codes.T).topk(min(self.neighbours, len(self.codes)), dim=1).indices.tolist()
        cider = self._scorer()
        return [cider.mean_scores([reward_tokens(tokenize(text)) for text in texts], near)
                for near, texts in zip(neighbours, captions, strict=True)]

    def prepare(self) -> None:
        """Build the CIDEr-D index (a quarter to half a second) in a background thread now.

        Loading a model for inference calls this, so that the index is built while the first
        photos are read, encoded and searched, not after: ``captioner caption`` on one photo
        would otherwise wait for it. Scoring waits for the build if it has not finished.
        """
        threading.Thread(target=self._scorer, name="consensus-index", daemon=True).start()

    def _scorer(self) -> CiderD:
        with self._cider_lock:
            if self._cider is None:
                self._cider = CiderD([[reward_tokens(r.split()) for r in refs] for refs in self.references])
            return self._cider

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        save_tensors({"mean": self.mean.contiguous(), "components": self.components.contiguous(),
                   "codes": self.codes.half().contiguous()}, folder / CONSENSUS_WEIGHTS)
        text = json.dumps({"neighbours": self.neighbours, "references": self.references})
        (folder / CONSENSUS_FILE).write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path, channels: int) -> "Consensus":
        """Read the two files :meth:`save` wrote.

        Raises:
            ModelLoadError: ``FILE: bad consensus data: reason``.
        """
        folder = Path(folder)
        try:
            tensors = load_tensors(folder / CONSENSUS_WEIGHTS)
            mean, components, codes = tensors["mean"], tensors["components"], tensors["codes"]
        except (OSError, SafetensorError, KeyError) as e:
            raise ModelLoadError(f"{printable(folder / CONSENSUS_WEIGHTS)}: bad consensus data: {e}") from e
        if mean.shape != (channels,) or components.shape[0] != channels or codes.shape[1] != components.shape[1] \
                or not all(torch.isfinite(t).all() for t in (mean, components, codes)):
            raise ModelLoadError(f"{printable(folder / CONSENSUS_WEIGHTS)}: bad consensus data: shapes "
                                 f"{tuple(mean.shape)}, {tuple(components.shape)}, {tuple(codes.shape)} do not fit "
                                 f"{channels} channels, or a value is not finite")
        try:
            raw = json.loads((folder / CONSENSUS_FILE).read_text(encoding="utf-8"))
            references = raw["references"]
            neighbours = raw.get("neighbours", NEIGHBOURS)
            if not isinstance(neighbours, int) or isinstance(neighbours, bool) or neighbours < 1:
                raise ValueError(f"neighbours={str(neighbours)[:40]} must be a whole number of at least 1")
            if not isinstance(references, list) or len(references) != codes.shape[0]:
                raise ValueError(f"{len(references)} reference lists for {codes.shape[0]} images")
            if not all(isinstance(r, list) and r for r in references):
                raise ValueError("each image needs a non-empty list of reference captions")
            if not all(isinstance(caption, str) for r in references for caption in r):
                raise ValueError("a reference caption is not text")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError,
                AttributeError) as e:
            raise ModelLoadError(f"{printable(folder / CONSENSUS_FILE)}: bad consensus data: {e}") from e
        return cls(mean, components, codes, references, neighbours)


_LIVE: weakref.WeakSet[Consensus] = weakref.WeakSet()


def _fresh_locks_in_child() -> None:
    """A process forked while a background build held a lock gets it free (and builds its own index)."""
    for consensus in list(_LIVE):
        consensus._cider_lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_locks_in_child)
