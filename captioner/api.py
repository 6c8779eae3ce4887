"""Front doors for Python users: load a model, caption images, evaluate on a manifest.

    import captioner
    model = captioner.load_model()
    captions = captioner.caption_images(model, ["photo.jpg"])
"""

from __future__ import annotations

import itertools
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from captioner.allocator import keep_freed_memory
from captioner.data import check_scorable, read_manifest
from captioner.decoding import Caption, DecodingOptions
from captioner.errors import ImageReadError, OptionError
from captioner.evaluation import check_references, evaluate_grids, path_grids
from captioner.features import ImageFiles, collate_images
from captioner.images import ImageInput, model_pixels
from captioner.model import DEFAULT_MODEL_DIR, CaptionModel, check_model
from captioner.options import DEFAULT_WORKERS, check_device, check_flag, check_path
from captioner.tags import Tag

PATHS_AT_ONCE = 4096  # paths :func:`caption_paths` lists, and hands one DataLoader, at a time


def load_model(path: str | os.PathLike | None = None, *, device: str | None = None) -> CaptionModel:
    """The model in folder ``path``, or the default model shipped with the package, ready for inference.

    Also tunes this process's memory allocator for fast inference (:mod:`captioner.allocator`),
    folds the encoder's batch norm into its convolutions (about 1.3x the encoder's
    images/s), and starts building the consensus scorer's index in the background. A model
    to train or save comes from :meth:`CaptionModel.load` instead.
    """
    if path is not None:
        check_path(path, "path")
    if device is not None:
        check_device(device, "device")  # "CUDA is not available here; use cpu", not torch's RuntimeError
    keep_freed_memory()
    model = CaptionModel.load(DEFAULT_MODEL_DIR if path is None else path, device=device)
    model.encoder.fold_batch_norm()
    if model.consensus is not None:
        model.consensus.prepare()
    return model


@dataclass(frozen=True)
class PathResult:
    """Outcome for one file: its captions (n-best, best first) or why it was skipped."""

    path: ImageInput | bytes  # the item as the caller gave it (a path, or a picture where one was given)
    captions: list[Caption] | None  # None when the file could not be read
    error: str | None = None  # "PATH: reason" when skipped
    tags: tuple[Tag, ...] = ()  # the encoder's likeliest ImageNet labels (see captioner.tags)


def caption_paths(
    model: CaptionModel,
    paths: Iterable[Path],
    *,
    options: DecodingOptions | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
) -> Iterator[PathResult]:
    """Caption files in batches, in input order per batch; unreadable files yield an error result.

    Decoding and resizing happen in DataLoader workers when ``num_workers`` > 0, so the
    encoder and the beam search see full batches while the next ones are read. ``paths`` is
    taken :data:`PATHS_AT_ONCE` at a time: a generator of millions is never held whole.
    ``options`` replace the model's decoding settings whole; to change one, start from the
    model's: ``dataclasses.replace(model.config.decoding, n_best=3)``. Arguments are checked
    at the call, not when the first result is asked for.
    """
    _refuse_one(paths, "paths")
    batch_size, num_workers = _checked_run_args(model, options, batch_size, num_workers)
    return _caption_chunks(model, iter(paths), options, batch_size, num_workers)


def _caption_chunks(model: CaptionModel, pending: Iterator, options: DecodingOptions | None, batch_size: int,
                    num_workers: int) -> Iterator[PathResult]:
    """Results chunk by chunk; the caller's iterator raising part-way has the paths it gave before captioned first."""
    while True:
        chunk, failure = [], None
        try:
            for path in itertools.islice(pending, PATHS_AT_ONCE):
                chunk.append(path)
        except Exception as e:  # the caller's own error, raised where it would have been, after what came before
            failure = e
        if chunk:
            yield from _caption_listed_paths(model, chunk, options, batch_size, num_workers)
        if failure is not None:
            raise failure
        if len(chunk) < PATHS_AT_ONCE:
            return


def _caption_listed_paths(model: CaptionModel, paths: list, options: DecodingOptions | None, batch_size: int,
                          num_workers: int) -> Iterator[PathResult]:
    loader = DataLoader(
        ImageFiles(paths, model.encoder.preprocess.size),
        batch_size=batch_size,
        num_workers=min(num_workers, os.cpu_count() or 1),  # more processes than cores only slow the encoder
        collate_fn=collate_images,
    )
    for indices, pixels, errors in loader:
        results = {i: PathResult(paths[i], None, message) for i, message in errors}
        if pixels is not None:
            captioned = caption_pixel_batch(model, [paths[i] for i in indices], pixels, options)
            results.update(zip(indices, captioned, strict=True))
        yield from (results[i] for i in sorted(results))


def caption_pixel_batch(
    model: CaptionModel, paths: list, pixels: torch.Tensor, options: DecodingOptions | None = None, *,
    stop: Callable[[], bool] | None = None,
) -> list[PathResult]:
    """Results for files already turned into (B, S, S, 3) uint8 pixels: one encoder pass, one batched search.

    The shared core of :func:`caption_paths`, the Ray pipeline's actors and the server's
    batcher (whose ``stop`` ends the search of a batch nobody waits for any more).
    """
    grid = model.encode(pixels)
    captions = model.caption_grid(grid, options, stop=stop)
    return [PathResult(path, n_best, tags=tuple(tags))
            for path, n_best, tags in zip(paths, captions, model.tags(grid), strict=True)]


def caption_images(
    model: CaptionModel,
    images: Iterable[str | os.PathLike | Image.Image],
    *,
    options: DecodingOptions | None = None,
    batch_size: int = 32,
) -> list[Caption]:
    """Best caption of each image (paths or PIL images), in order.

    ``options`` replace the model's decoding settings whole, as for :func:`caption_paths`.

    Raises:
        ImageReadError: a path could not be read (use :func:`caption_paths` to skip bad files).
    """
    _refuse_one(images, "images")
    images = list(images)
    batch_size, _ = _checked_run_args(model, options, batch_size, 0)
    captions: list[Caption] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = torch.from_numpy(np.stack([_listed_pixels(image, start + k, model.encoder.preprocess.size)
                                            for k, image in enumerate(chunk)]))
        captions.extend(n_best[0] for n_best in model.caption_pixels(pixels, options))
    return captions


def _listed_pixels(image, index: int, size: int) -> np.ndarray:
    """:func:`model_pixels`, with a nameless picture (a PIL image, an array) named by its place in the list."""
    try:
        return model_pixels(image, size)
    except ImageReadError as e:
        if isinstance(image, (Image.Image, np.ndarray)):
            raise ImageReadError(f"images[{index}]: {e}") from e
        raise


def evaluate(
    model: CaptionModel,
    manifest: str | os.PathLike,
    *,
    options: DecodingOptions | None = None,
    meteor: bool = True,
    batch_size: int = 32,
    num_workers: int = DEFAULT_WORKERS,
) -> dict[str, float]:
    """Caption every image of a manifest and score against its references (pycocoevalcap).

    Raises:
        DataError: the manifest is unreadable, empty, has a line without captions, lists an
            image twice or only one image (:func:`captioner.data.check_scorable`), or an image
            whose references hold no word the scorer reads (:func:`captioner.evaluation.check_references`).
        ImageReadError: an image of the manifest cannot be read (scores would be biased).
    """
    batch_size, num_workers = _checked_run_args(model, options, batch_size, num_workers)
    check_path(manifest, "manifest")
    check_flag(meteor, "meteor")
    entries = read_manifest(manifest, require_captions=True)
    check_scorable(entries, manifest)
    check_references(entries, manifest)
    grids = path_grids(model, [e.image for e in entries], batch_size=batch_size, num_workers=num_workers)
    scores, _ = evaluate_grids(model, grids, [e.captions for e in entries], options, meteor=meteor)
    return scores


def _refuse_one(given: Iterable, what: str) -> None:
    """One path or picture given alone is refused, not read letter by letter or row by row.

    Raises:
        OptionError: ``given`` is a single path (str, bytes or PathLike), PIL image or array
            rather than a collection, or not a collection at all.
    """
    if isinstance(given, (str, bytes, os.PathLike)):
        raise OptionError(f"{what} must be a list (or other iterable) of them; for one, pass [{given!r}]")
    if isinstance(given, Image.Image) or isinstance(given, np.ndarray) and given.ndim <= 3:  # (N, H, W, 3): N frames
        raise OptionError(f"{what} must be a list (or other iterable) of them; for one {type(given).__name__}, "
                          "pass [image]")
    if not isinstance(given, Iterable):
        raise OptionError(f"{what} must be a list (or other iterable) of them, not {type(given).__name__}")


def _checked_run_args(model: CaptionModel, options: DecodingOptions | None, batch_size: int,
                      num_workers: int) -> tuple[int, int]:
    """The front doors' own arguments, checked before any work, each named when wrong; the two
    counts returned as plain ints (numpy ones are accepted; DataLoader takes only plain ones).

    Raises:
        OptionError: ``model`` is not a model, ``options`` is not a :class:`DecodingOptions` or asks
            for what the model lacks (:meth:`CaptionModel.check_decoding`), or a count is not a
            positive (``num_workers``: non-negative) whole number.
    """
    check_model(model)
    if options is not None:
        model.check_decoding(options)
    for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:  # numpy ints too
            raise OptionError(f"{name}={value!r} must be a whole number of at least {least}")
    return int(batch_size), int(num_workers)
