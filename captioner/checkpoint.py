"""Training checkpoints read back safely: ``weights_only`` loading, then checks that the file fits the run.

``last.pt`` holds tensors and plain values only, so it loads with ``weights_only=True``: a
tampered file cannot run code. A file cut short, tampered with, or saved for another model
or vocabulary is refused with one line that says why and how to go on.
"""

from __future__ import annotations

import errno
import json
import pickle
import warnings
from pathlib import Path

import torch

from captioner.errors import CheckpointError, printable
from captioner.train_config import MODEL_FIELDS, RESTORED_FIELDS, TrainConfig
from captioner.vocab import SPECIALS, Vocabulary

CHECKPOINT_ENTRIES = {  # key -> type every checkpoint holds
    "model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict, "epoch": int, "best_cider": float,
    "stale_epochs": int, "scst_done": int, "history": str, "config": str, "rng": torch.Tensor,
}


def resume_error(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{printable(path)}: cannot resume: {reason}; start over in another folder")


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """The checkpoint in ``path``, loaded with ``weights_only=True`` (no object is ever unpickled).

    Raises:
        CheckpointError: the file cannot be read, is cut short, holds pickled objects or lacks an entry.
    """
    # Errors are raised "from None": torch's own message suggests weights_only=False, which
    # would run whatever code a tampered file holds.
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols: the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise resume_error(path, "it holds objects other than tensors and plain values (never unpickled)") from None
    except OSError as e:
        if e.errno in (None, errno.EINVAL):  # torch's zip reader seeking past the end of a cut file
            raise resume_error(path, "the file is cut short or is not a checkpoint") from None
        raise resume_error(path, e.strerror or "cannot read it") from None
    except Exception:  # a cut or foreign file raises RuntimeError, EOFError, ValueError, KeyError, ...
        raise resume_error(path, "the file is cut short or is not a checkpoint") from None
    if not isinstance(state, dict):
        raise resume_error(path, "it is not a checkpoint")
    state.setdefault("scst_done", 0)  # absent from checkpoints of runs before self-critical training
    for key, kind in CHECKPOINT_ENTRIES.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise resume_error(path, f"its entry {key!r} is missing or malformed")
    return state


def check_fits(path: Path, state: dict, cfg: TrainConfig, vocab: Vocabulary, expected: dict) -> None:
    """The checkpoint was saved for this run's model, vocabulary and tensor shapes."""
    try:
        saved = json.loads(state["config"])
        history = json.loads(state["history"])
        words = json.loads(state.get("vocab", "null"))  # absent from checkpoints of older versions
    except (TypeError, json.JSONDecodeError):
        raise resume_error(path, "its config, history or vocabulary is not valid JSON") from None
    if not isinstance(saved, dict) or not _is_history(history):
        raise resume_error(path, "its config or history is malformed")
    for name in MODEL_FIELDS:
        if saved.get(name) != getattr(cfg, name):
            raise resume_error(path, f"it was saved with {name}={saved.get(name)!r}, this run has "
                                      f"{name}={getattr(cfg, name)!r}")
    for name in RESTORED_FIELDS:
        if name == "encoder_lr" and not cfg.finetune_encoder:
            continue  # a frozen CNN has no rate (older versions saved one they then ignored)
        if name in saved and saved[name] != getattr(cfg, name):
            raise _changed(path, cfg, saved, name, f"the run was saved with {name}={saved[name]!r}, and a resumed "
                                                   "run keeps its optimizer and random state")
    if state.get("scst_done") and "scst_lr" in saved and saved["scst_lr"] != cfg.scst_lr:
        raise _changed(path, cfg, saved, "scst_lr", f"the run has begun its self-critical epochs with "
                                                    f"scst_lr={saved['scst_lr']!r}, which its optimizer keeps")
    if "dev_beam_size" in saved and saved["dev_beam_size"] != cfg.dev_beam_size:
        raise resume_error(path, f"it chose its best epoch at dev_beam_size={saved['dev_beam_size']!r}, so its best "
                                 f"score cannot be compared: give dev_beam_size={saved['dev_beam_size']!r}")
    if state.get("scst_done") and isinstance(saved.get("epochs"), int) and cfg.epochs > saved["epochs"]:
        raise _changed(path, cfg, saved, "epochs", "the run has begun its self-critical epochs, and cross-entropy "
                                                   "epochs cannot follow them", way=" (scst_epochs may grow)")
    if words is not None and words != vocab.itos[len(SPECIALS):]:
        count = len(words) if isinstance(words, list) else "?"
        raise resume_error(path, f"it was saved with another vocabulary ({count} words, this run has "
                                 f"{len(vocab) - len(SPECIALS)})")
    tensors = state["model"]
    unmatched = sorted(set(expected) ^ set(tensors))
    if unmatched:
        name = unmatched[0]
        raise resume_error(path, f"tensor {name} is {'missing' if name in expected else 'not part of this model'}")
    for name, tensor in expected.items():
        stored = tensors[name]
        if not isinstance(stored, torch.Tensor) or stored.shape != tensor.shape:
            shape = list(stored.shape) if isinstance(stored, torch.Tensor) else type(stored).__name__
            raise resume_error(path, f"tensor {name} is {shape}, this run has {list(tensor.shape)}")


def _changed(path: Path, cfg: TrainConfig, saved: dict, name: str, why: str, *, way: str = "") -> CheckpointError:
    """A resume refused for a setting that would not take effect: ``cannot resume with NAME=NEW: WHY;
    resume with NAME=SAVED``."""
    return CheckpointError(f"{printable(path)}: cannot resume with {name}={getattr(cfg, name)!r}: {why}; resume with "
                           f"{name}={saved[name]!r}{way}, or start over in another folder")


def _is_history(history: object) -> bool:
    """A list of epoch records, each with the dev CIDEr-D that picks the best epoch."""
    return isinstance(history, list) and all(
        isinstance(r, dict) and isinstance(r.get("CIDEr-D"), (int, float)) and isinstance(r.get("epoch"), int)
        for r in history
    )
