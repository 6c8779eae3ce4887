"""Encoder feature caching: with a frozen encoder, each image goes through the CNN once.

Training for many epochs on 2 CPU cores is only practical because the encoder's grids are
computed once, stored as float16 in a safetensors file, and reused by every epoch and by
dev-set evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from torch.utils.data import DataLoader, Dataset

from captioner.encoders import Encoder
from captioner.errors import DataError, ImageReadError, printable, reason
from captioner.images import model_pixels
from captioner.options import DEFAULT_WORKERS
from captioner.progress import progress_bar
from captioner.tensor_files import load_tensors, save_tensors


class ImageFiles(Dataset):
    """Loads and resizes images in DataLoader workers; a bad file yields its error message."""

    def __init__(self, paths: list[Path], size: int, *, flip: bool = False):
        self.paths = paths
        self.size = size  # the encoder's square input side
        self.flip = flip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            pixels = model_pixels(self.paths[index], self.size)
        except ImageReadError as e:
            return index, None, str(e)
        if self.flip:
            pixels = np.ascontiguousarray(pixels[:, ::-1])
        return index, pixels, None


def collate_images(items: list[tuple[int, np.ndarray | None, str | None]]):
    """Stack the good images into (B, S, S, 3) uint8; keep the bad ones' errors aside."""
    good = [(i, p) for i, p, _ in items if p is not None]
    errors = [(i, e) for i, p, e in items if p is None]
    indices = [i for i, _ in good]
    pixels = torch.from_numpy(np.stack([p for _, p in good])) if good else None
    return indices, pixels, errors


def extract_features(
    encoder: Encoder,
    paths: list[Path],
    *,
    batch_size: int = 32,
    num_workers: int = DEFAULT_WORKERS,
    flip: bool = False,
    progress: bool = True,
) -> torch.Tensor:
    """Encode every image; returns (N, C, h, w) float16 in ``paths`` order.

    Raises:
        ImageReadError: any image could not be read (training data must be complete).
    """
    loader = DataLoader(
        ImageFiles(paths, encoder.preprocess.size, flip=flip),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_images,
    )
    encoder.eval()
    out: torch.Tensor | None = None
    for indices, pixels, errors in progress_bar(loader, show=progress, desc="features", unit="batch"):
        if errors:
            raise ImageReadError(errors[0][1])
        grid = encoder.encode(pixels).to("cpu", torch.float16)
        if out is None:
            out = torch.empty((len(paths), *grid.shape[1:]), dtype=torch.float16)
        out[indices] = grid
    if out is None:
        raise DataError("no images to encode")
    return out


def cache_key(encoder_name: str, paths: list[Path], flip: bool) -> str:
    """Stable name for a feature cache: the encoder, the exact image list and each file's size and modification time.

    The sizes and times make a photo replaced under the same name a new cache, encoded
    again, instead of a run silently training on the old photo's features.
    """
    files = [[str(p), *_stamp(p)] for p in paths]
    digest = hashlib.sha1(json.dumps([encoder_name, flip, files]).encode()).hexdigest()[:16]
    return f"{encoder_name}{'-flip' if flip else ''}-{digest}"


def _stamp(path: Path) -> tuple[int, int]:
    """(size, modification time in ns) of ``path``; (-1, -1) when it cannot be read (encoding it will say why)."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return -1, -1
    return info.st_size, info.st_mtime_ns


def cached_features(
    encoder: Encoder, paths: list[Path], cache_dir: str | os.PathLike, *, flip: bool = False, **kwargs
) -> torch.Tensor:
    """Features (N, C, h, w) float16 of ``paths`` from ``cache_dir``, computing and saving them on first use.

    A cache file that cannot be read back as exactly these features (cut short, garbage,
    another shape) is a miss: a note goes to stderr and the features are computed again.
    A cache that cannot be written is noted too; the features are still returned.
    """
    file = Path(cache_dir) / f"{cache_key(encoder.name, paths, flip)}.safetensors"
    if file.exists():
        try:
            return read_cache(file, len(paths), encoder.out_channels)
        except CacheMiss as e:
            print(f"note: {printable(file)}: unreadable ({e}); recomputing", file=sys.stderr)
    features = extract_features(encoder, paths, flip=flip, **kwargs)
    try:
        _write_cache(file, features)
    except (OSError, SafetensorError) as e:
        print(f"note: {printable(file)}: cannot store features ({reason(e)}); going on without the cache",
              file=sys.stderr)
    return features


class CacheMiss(Exception):
    """A cache file that cannot serve as the requested features; the message says why."""


def read_cache(file: Path, count: int, channels: int) -> torch.Tensor:
    """The (count, channels, h, w) float16 features stored in ``file``.

    Raises:
        CacheMiss: the file is unreadable, or holds anything but finite features of that shape.
    """
    try:
        tensors = load_tensors(file)
    except (OSError, SafetensorError) as e:
        raise CacheMiss(reason(e)) from e
    if set(tensors) != {"features"}:
        raise CacheMiss(f"holds {sorted(tensors)}, not features")
    features = tensors["features"]
    if features.dtype != torch.float16 or features.ndim != 4:
        raise CacheMiss(f"holds {features.dtype} of {features.ndim} dimensions, not 4-d float16")
    if features.shape[:2] != (count, channels):
        raise CacheMiss(f"holds {features.shape[0]} grids of {features.shape[1]} channels, "
                        f"not {count} of {channels}")
    if not bool(torch.isfinite(features).all()):
        raise CacheMiss("holds NaN or infinite values")
    return features


def _write_cache(file: Path, features: torch.Tensor) -> None:
    """Save under a unique temporary name and rename it over ``file``: readers never see half a file."""
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=file.parent, prefix=f".{file.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        save_tensors({"features": features.contiguous()}, name)
        os.replace(name, file)
    finally:
        Path(name).unlink(missing_ok=True)
