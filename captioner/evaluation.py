"""Caption in batches, then score: the one evaluation loop.

``captioner.evaluate`` (image files), training's per-epoch dev pass (cached grids) and
tools/tune_decoding.py (cached grids, many settings) all call :func:`evaluate_grids`; they
differ only in where the encoder grids come from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from captioner.data import ManifestEntry
from captioner.decoding import DecodingOptions
from captioner.errors import CaptionerError, DataError, ImageReadError, printable
from captioner.features import ImageFiles, collate_images
from captioner.metrics import score_captions, tokenize_for_scoring
from captioner.model import CaptionModel

NAMED_ERRORS = 3  # unreadable images named in an evaluation's error; the rest are counted


def check_references(entries: Sequence[ManifestEntry], manifest: str | os.PathLike) -> None:
    """Refuse, before any captioning, an image whose references the scorer would find no word in.

    :func:`captioner.data.read_manifest` refuses captions without a letter or digit, but the
    scorer's PTB tokenizer also drops what it cannot tokenize (emoji, a Roman numeral ⅷ,
    zero-width spaces), and only running it tells which. Scoring would otherwise fail after
    every image had been captioned.

    Raises:
        DataError: naming the manifest and the image.
    """
    tokenized = tokenize_for_scoring({str(i): list(entry.captions) for i, entry in enumerate(entries)})
    for i, entry in enumerate(entries):
        if not any(reference.strip() for reference in tokenized[str(i)]):
            raise DataError(f"{printable(manifest)}: {printable(entry.image)}: its reference captions have no word "
                            "the scorer reads (it drops punctuation, and characters its tokenizer cannot read, such "
                            "as emoji)")


def evaluate_grids(
    model: CaptionModel,
    grids: Iterable[torch.Tensor],
    references: Sequence[Sequence[str]],
    options: DecodingOptions | None = None,
    *,
    meteor: bool = False,
) -> tuple[dict[str, float], list[str]]:
    """Caption each batch of encoder grids, then score every image's best caption.

    Args:
        grids: (B, C, h, w) batches covering the images in ``references`` order.
        references: each image's reference captions (none may be empty).
        options: decoding options (the model's own by default).
        meteor: also compute METEOR (a JVM start; off for quick checks).
    Returns:
        The scores (see :func:`captioner.metrics.score_captions`) and the best caption of each image.
    Raises:
        CaptionerError: the batches do not cover the references one to one, or scoring is impossible.
    """
    captions = [n_best[0].text for batch in grids for n_best in model.caption_grid(batch, options)]
    if len(captions) != len(references):
        raise CaptionerError(f"{len(captions)} captions for {len(references)} images")
    scores = score_captions(
        {str(i): list(refs) for i, refs in enumerate(references)},
        {str(i): caption for i, caption in enumerate(captions)},
        meteor=meteor,
    )
    return scores, captions


def index_batches(count: int, size: int = 100) -> Iterator[list[int]]:
    """Positions 0..count-1 in consecutive lists of at most ``size``."""
    for start in range(0, count, size):
        yield list(range(start, min(start + size, count)))


def grid_batches(grids_of: Callable[[list[int]], torch.Tensor], count: int, size: int = 100) -> Iterator[torch.Tensor]:
    """``grids_of(indices)`` for consecutive index batches: grids from a cache tensor or an encoder."""
    return (grids_of(indices) for indices in index_batches(count, size))


def path_grids(
    model: CaptionModel, paths: Sequence[Path], *, batch_size: int = 32, num_workers: int = 0
) -> Iterator[torch.Tensor]:
    """Encoder grids of image files, batch by batch in ``paths`` order (read in DataLoader workers).

    After the first unreadable image nothing more is encoded, but the rest are still read,
    so that one run names every image to fix rather than one per run.

    Raises:
        ImageReadError: images cannot be read (all of them counted, the first few named);
            scores over the others would be biased.
    """
    loader = DataLoader(
        ImageFiles(list(paths), model.encoder.preprocess.size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_images,
    )
    unreadable: list[str] = []
    for _, pixels, errors in loader:
        unreadable += [error for _, error in errors]
        if not unreadable:
            yield model.encode(pixels)
    if len(unreadable) == 1:
        raise ImageReadError(unreadable[0])
    if unreadable:
        more = f" and {len(unreadable) - NAMED_ERRORS} more" if len(unreadable) > NAMED_ERRORS else ""
        raise ImageReadError(f"{len(unreadable)} images cannot be read: {'; '.join(unreadable[:NAMED_ERRORS])}{more}")
