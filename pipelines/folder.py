"""Caption every image under a folder into a resumable JSONL/CSV file."""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm import tqdm

from captioner.api import PathResult, caption_paths
from captioner.confidence import check_min_confidence
from captioner.decoding import DecodingOptions
from captioner.errors import CaptionerError, OptionError, one_line, printable
from captioner.model import CaptionModel, check_model
from captioner.options import DEFAULT_WORKERS, check_flag, check_path
from captioner.outputs import same_file
from captioner.pipelines.record_formats import check_fallback, earlier_failures, format_for, result_record
from captioner.pipelines.records import RecordFile
from captioner.pipelines.sources import unlisted_line, walk_images
from captioner.progress import progress_bar

__all__ = ["FolderSummary", "caption_folder"]

# Paths handed to one DataLoader at a time: bounds memory however large the folder is.
CHUNK_PATHS = 2048


@dataclass(frozen=True)
class FolderSummary:
    """What one run did, and what the output holds after it."""

    captioned: int  # images captioned in this run
    failed: int  # unreadable files reported in this run
    already_done: int  # images skipped because the output already held them
    earlier_failed: int = 0  # files under the folder whose error record is from an earlier run (not retried)

    def describe(self) -> str:
        """The one-line summary the CLI prints, with the way on when earlier failures remain."""
        return (f"{self.captioned} captioned, {self.failed} failed, {self.already_done} already done"
                + earlier_failures(self.earlier_failed))


def caption_folder(
    root: str | os.PathLike,
    records: RecordFile | str | os.PathLike,
    *,
    model: CaptionModel,
    options: DecodingOptions | None = None,
    record_format: str | None = None,
    batch_size: int = 32,
    num_workers: int = DEFAULT_WORKERS,
    progress: bool = True,
    retry_errors: bool = False,
    min_confidence: float | None = None,
    fallback: str | None = None,
) -> FolderSummary:
    """Caption all images under ``root`` into ``records``, skipping those it already holds.

    Args:
        root: the folder, searched recursively; records name files by absolute paths under
            its resolved location, so any spelling of it resumes the same output.
        records: an open :class:`RecordFile` (the CLI opens and locks it before loading the
            model), or a path to open here in ``record_format`` (default: from its extension).
        retry_errors: caption again the files whose record is an error. Whenever the output
            holds superseded records, it is rewritten at the end with one per path (the latest).
        min_confidence: mark captions less confident than this ``"unsure": true`` (a calibrated model's).
        fallback: "tags" puts a description from the tags in place of an unsure caption
            (see :func:`captioner.pipelines.record_formats.result_record`).

    Each record is flushed when written, so an interrupted run is resumed by running the same
    call again. Unreadable files get an error record and a ``skipped PATH: reason`` line on
    stderr; the run goes on.

    Raises:
        OptionError: ``root`` is not a folder, ``min_confidence`` is given for a model without
            calibration, or ``options`` ask for what the model lacks (:meth:`CaptionModel.check_decoding`).
        OutputError: the output cannot be opened, read back or written.
    """
    check_model(model)
    check_path(root, "root")
    check_flag(retry_errors, "retry_errors")
    check_flag(progress, "progress")
    if not isinstance(records, RecordFile):
        check_path(records, "records")
        with RecordFile(records, format_for(records, record_format)) as opened:
            return caption_folder(root, opened, model=model, options=options, batch_size=batch_size,
                                  num_workers=num_workers, progress=progress, retry_errors=retry_errors,
                                  min_confidence=min_confidence, fallback=fallback)
    if not os.path.isdir(root):
        raise OptionError(f"{printable(root)}: not a folder")
    check_fallback(fallback, min_confidence)
    check_min_confidence(min_confidence, model)
    if options is not None:
        model.check_decoding(options)
    bar = progress_bar(show=progress, desc="captioning", unit="img")
    run = _Run(records, retry_errors, min_confidence, fallback, bar)
    try:
        for chunk in _chunks(run.pending(Path(os.path.realpath(root))), CHUNK_PATHS):
            for result in _caption_chunk(model, chunk, options, batch_size, num_workers):
                run.add(result)
    finally:
        run.bar.close()
    records.compact()  # one record per path: retried files' old errors (or an older version's duplicates) go
    return FolderSummary(run.captioned, run.failed, run.already, run.earlier_failed)


@dataclass
class _Run:
    """One run's progress: writes each result and counts it."""

    records: RecordFile
    retry_errors: bool
    min_confidence: float | None
    fallback: str | None
    bar: tqdm
    captioned: int = 0
    failed: int = 0
    already: int = 0
    earlier_failed: int = 0

    def pending(self, root: Path) -> Iterator[Path]:
        """Images the output does not hold yet (with ``retry_errors``: or holds only an error for)."""
        for path in walk_images(root, self.unlisted):
            if path.name == self.records.path.name and same_file(path, self.records.path):
                continue  # the output itself, written inside the folder under an image's extension
            if self.records.holds(path, retry_errors=self.retry_errors):
                self.already += 1
                self.earlier_failed += self.records.failed(path)
            else:
                yield path

    def unlisted(self, folder: Path, error: OSError) -> None:
        """A folder that cannot be listed: its files cannot be captioned, and the run says so."""
        self.failed += 1
        tqdm.write(unlisted_line(folder, error), file=sys.stderr)

    def add(self, result: PathResult) -> None:
        record = result_record(result, min_confidence=self.min_confidence, fallback=self.fallback)
        self.records.write(record)
        if result.captions is None:
            self.failed += 1
            tqdm.write(f"skipped {one_line(record['error'])}", file=sys.stderr)
        else:
            self.captioned += 1
        self.bar.update(1)


def _caption_chunk(
    model: CaptionModel, paths: list[Path], options: DecodingOptions | None, batch_size: int, num_workers: int
) -> Iterator[PathResult]:
    """Results for ``paths``; if captioning them together fails, each file alone, so one bad file stops nothing.

    Our own errors raised here are about the model, not a file (e.g. NaN log-probabilities):
    they stop the run instead of filling the output with one error record per file.
    """
    done = 0
    try:
        for result in caption_paths(model, paths, options=options, batch_size=batch_size, num_workers=num_workers):
            yield result
            done += 1
        return
    except CaptionerError:
        raise
    except Exception:  # noqa: BLE001 (an unforeseen failure: find the file that causes it)
        pass
    model_checked = False
    for path in paths[done:]:
        try:
            yield from caption_paths(model, [path], options=options, batch_size=1, num_workers=0)
        except CaptionerError:
            raise
        except Exception as e:  # noqa: BLE001 (reported on this file's record; the batch goes on)
            if not model_checked:
                check_model_captions(model, options)
                model_checked = True
            yield PathResult(path, None, f"{path}: {type(e).__name__}: {e}")


def check_model_captions(model: CaptionModel, options: DecodingOptions | None) -> None:
    """A file failed in a way we did not foresee: make sure it is the file, not the model.

    A model that fails on every picture (cast to half precision, say) would otherwise give
    every photo an error record, which a plain rerun then keeps as done.

    Raises:
        CaptionerError: a blank picture fails too.
    """
    size = model.encoder.preprocess.size
    try:
        model.caption_pixels(torch.zeros((1, size, size, 3), dtype=torch.uint8), options)
    except Exception as e:  # noqa: BLE001 (whatever it is, it is not about a file)
        raise CaptionerError(f"the model fails to caption any picture, a blank one too ({type(e).__name__}: "
                             f"{one_line(e)}); the files it failed on have no record, so a rerun with a working "
                             "model captions them") from e


def _chunks(paths: Iterable[Path], size: int) -> Iterator[list[Path]]:
    iterator = iter(paths)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
