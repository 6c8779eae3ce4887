"""Caption every image under a folder into a resumable JSONL/CSV file."""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from captioner.pipelines.records import RecordFile, format_for
from captioner.pipelines.sources import walk_images
from tqdm import tqdm

from captioner.api import PathResult, caption_paths
from captioner.decoding import DecodingOptions
from captioner.model import CaptionModel

# Paths handed to one DataLoader at a time: bounds memory however large the folder is.
CHUNK_PATHS = 2048


@dataclass(frozen=True)
class FolderSummary:
    """What one run did."""

    captioned: int  # images captioned in this run
    failed: int  # unreadable files reported in this run
    already_done: int  # images skipped because the output already held them


def result_record(result: PathResult) -> dict:
    """The JSON/CSV record of one file: its best caption with confidence, or its error."""
    if result.captions is None:
        return {"path": str(result.path), "error": result.error}
    best = result.captions[0]
    return {"path": str(result.path), "caption": best.text, "score": round(best.score, 6),
            "min_prob": round(best.min_prob, 6)}


def _chunks(paths: Iterable[Path], size: int) -> Iterator[list[Path]]:
    iterator = iter(paths)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def caption_folder(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: CaptionModel,
    options: DecodingOptions | None = None,
    record_format: str | None = None,
    batch_size: int = 32,
    num_workers: int = 2,
    progress: bool = True,
) -> FolderSummary:
    """Caption all images under ``root`` into ``out``, skipping those ``out`` already holds.

    Each record is flushed when written, so an interrupted run is resumed by running the
    same call again. Unreadable files get an error record and a ``skipped PATH: reason``
    line on stderr; the run goes on.
    """
    out = Path(out)
    captioned = failed = already = 0
    with RecordFile(out, format_for(out, record_format)) as records:

        def pending() -> Iterator[Path]:
            nonlocal already
            for path in walk_images(root):
                if str(path) in records.done:
                    already += 1
                else:
                    yield path

        bar = tqdm(desc="captioning", unit="img", disable=not progress, file=sys.stderr)
        for chunk in _chunks(pending(), CHUNK_PATHS):
            for result in caption_paths(model, chunk, options=options, batch_size=batch_size, num_workers=num_workers):
                records.write(result_record(result))
                if result.captions is None:
                    failed += 1
                    tqdm.write(f"skipped {result.error}", file=sys.stderr)
                else:
                    captioned += 1
                bar.update(1)
        bar.close()
    return FolderSummary(captioned, failed, already)
