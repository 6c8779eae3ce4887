"""Subtitle one video or every video under a folder, reporting bad files and going on.

    jobs = prepare_jobs(Path("clips"), "srt", out_dir=Path("subs"))   # before the model loads
    run = run_jobs(jobs, model=load_model(), writer=WriteSRT())
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from captioner.decoding import DecodingOptions
from captioner.errors import CaptionerError, OptionError, OutputError, VideoReadError, one_line, printable, reason
from captioner.model import CaptionModel
from captioner.outputs import STANDARD_OUTPUT, check_writable_file, check_writable_folder, file_identity, same_file
from captioner.pipelines.burn import burn_subtitles, check_burn_source, check_burn_target
from captioner.pipelines.folder import check_model_captions
from captioner.pipelines.sources import OnError, walk_videos
from captioner.pipelines.subtitles import CueWriter, WriteJSONL, write_subtitles
from captioner.pipelines.video import VideoOptions, open_video, subtitle_source
from captioner.progress import progress_bar


@dataclass(frozen=True)
class VideoJob:
    """One video and where its subtitles go."""

    video: Path
    output: Path  # the subtitle file
    burn: Path | None = None  # a copy of the video with the cues drawn on, when asked for


def prepare_jobs(
    source: Path, extension: str, *, output: Path | None = None, out_dir: Path | None = None, burn: Path | None = None,
    on_error: OnError | None = None,
) -> list[VideoJob]:
    """:func:`plan_jobs`, then every output location checked, in well under a second: call it before the model loads.

    For one video, its subtitle file and ``burn`` copy must be writable (folders are
    created) and neither may be the video itself. In folder mode ``out_dir`` must be a
    writable folder; each subtitle file is checked again when its video comes up.

    Raises:
        OptionError: ``output`` or ``burn`` with a folder, an output that is the video, a ``burn``
            format we cannot write.
        OutputError: an output location cannot be written.
        VideoReadError: ``source`` does not exist.
    """
    if not source.exists():
        raise VideoReadError(f"{printable(source)}: no such file or folder")
    jobs = plan_jobs(source, extension, output=output, out_dir=out_dir, burn=burn, on_error=on_error)
    if out_dir is not None:
        check_writable_folder(out_dir)
    if not source.is_dir():
        job = jobs[0]
        for target, what in ((job.output, "the subtitle file"), (job.burn, "--burn")):
            if target is not None and same_file(target, job.video):
                raise OptionError(f"{printable(target)}: {what} would overwrite the input video")
        if job.burn is not None:
            if same_file(job.burn, job.output):
                raise OptionError(f"{printable(job.burn)}: --burn and the subtitle file are the same file")
            check_burn_source(job.video, job.burn)  # before check_burn_target makes the copy's folder
            check_burn_target(job.burn)
        if os.fspath(job.output) != STANDARD_OUTPUT:
            check_writable_file(job.output)
        elif sys.stdout is None:  # started with its standard output closed (>&-)
            raise OutputError("-o -: standard output is closed; give a file name")
    return jobs


def plan_jobs(
    source: Path, extension: str, *, output: Path | None = None, out_dir: Path | None = None, burn: Path | None = None,
    on_error: OnError | None = None,
) -> list[VideoJob]:
    """Jobs for one video or for every video under a folder (recursive, sorted).

    Subtitles go to ``output`` (one video only), else into ``out_dir`` (keeping the
    folder's sub-paths, so equal names in two sub-folders do not collide), else beside
    each video with the format's extension. Two videos of one folder that differ only in
    their extension (``a.mp4``, ``a.avi``) get ``a.mp4.srt`` and ``a.avi.srt`` instead of
    one overwriting the other, and so does a video whose stem is another's whole name
    (``a.mp4.mp4`` beside those two gets ``a.mp4.mp4.srt``), until no two share a name; of
    whole names equal but for case (``A.mp4``, ``a.mp4``), the later ones in walk order get the
    first number no other subtitle file has (``a.mp4.2.srt``). ``burn`` applies to one video
    only. ``on_error``: see :func:`captioner.pipelines.sources.walk_files`.

    Raises:
        OptionError: ``output`` or ``burn`` given for a folder, or both ``output`` and ``out_dir``.
    """
    if source.is_dir() and (output is not None or burn is not None):
        raise OptionError(f"{printable(source)}: -o and --burn take one video, not a folder (use --out-dir)")
    if output is not None and out_dir is not None:
        raise OptionError("-o names the subtitle file and --out-dir a folder for it: give one of them")
    if not source.is_dir():
        return [VideoJob(source, output or (out_dir or source.parent) / f"{source.stem}.{extension}", burn)]
    videos = list(walk_videos(source, on_error))
    folders = [out_dir / video.parent.relative_to(source) if out_dir else video.parent for video in videos]
    names = [video.stem for video in videos]
    while True:  # a name shared by two videos becomes the video's whole name, until none is shared
        taken = Counter(_disk_name(folder / name) for folder, name in zip(folders, names, strict=True))
        renamed = [video.name if taken[_disk_name(folder / name)] > 1 else name
                   for video, folder, name in zip(videos, folders, names, strict=True)]
        if renamed == names:
            break
        names = renamed
    used = set(taken)  # whole names equal but for case (A.mp4, a.mp4): the later ones get the first free number
    kept: set[str] = set()
    for i, (folder, name) in enumerate(zip(folders, names, strict=True)):
        if _disk_name(folder / name) in kept:
            number = 2
            while _disk_name(folder / f"{name}.{number}") in used:
                number += 1
            names[i] = f"{name}.{number}"
            used.add(_disk_name(folder / names[i]))
        kept.add(_disk_name(folder / names[i]))
    return [VideoJob(video, folder / f"{name}.{extension}") for video, folder, name in zip(videos, folders, names,
                                                                                           strict=True)]


def _disk_name(path: Path) -> str:
    """A path as a Mac or Windows disk tells names apart: without case."""
    return os.fspath(path).casefold()


def run_jobs(
    jobs: list[VideoJob],
    *,
    model: CaptionModel,
    writer: CueWriter | WriteJSONL,
    options: DecodingOptions | None = None,
    settings: VideoOptions | None = None,
    progress: bool = True,
) -> VideoRun:
    """Subtitle each job's video; returns how many failed and how many were subtitled only in part.

    A video that cannot be read, or whose subtitles or burned copy cannot be written, is
    reported as ``skipped VIDEO: reason`` on stderr, counts as failed, and the run goes on.
    A video with undecodable stretches or that breaks off part-way still gets its subtitles
    and a ``warning: VIDEO: ...`` line, and counts as subtitled in part.
    """
    run, settings = VideoRun(), settings or VideoOptions()
    inputs = {identity for job in jobs if (identity := file_identity(job.video)) is not None}
    bar = progress_bar(jobs, show=progress, desc="subtitling", unit="video")
    model_checked = False
    for job in bar:
        try:
            _refuse_writing_over_inputs(job, inputs)
            run.partial += not run_job(job, model=model, writer=writer, options=options, settings=settings)
        except BrokenPipeError:  # the reader of -o - went away (``| head``): nobody reads the rest either
            raise
        except (CaptionerError, OSError) as e:
            tqdm.write(f"skipped {one_line(failure_reason(job, e))}", file=sys.stderr)
            run.failed += 1
        except Exception as e:  # noqa: BLE001 (a fault nothing foresaw in one video: the others still get theirs)
            if not model_checked:
                check_model_captions(model, options)  # unless the model itself fails on any picture
                model_checked = True
            tqdm.write(f"skipped {one_line(job.video)}: {type(e).__name__}: {one_line(reason(e))}", file=sys.stderr)
            run.failed += 1
    return run


def _refuse_writing_over_inputs(job: VideoJob, inputs: set[tuple[int, int]]) -> None:
    """A subtitle file or burned copy that is one of the run's videos (a link to it, say) is not written:
    writing follows links, and would replace the video.

    Raises:
        OutputError: naming the output.
    """
    for target in (job.output, job.burn):
        if target is not None and os.fspath(target) != STANDARD_OUTPUT and file_identity(target) in inputs:
            raise OutputError(f"{printable(target)}: is a video of this run (or a link to one); not overwritten")


@dataclass
class VideoRun:
    """What became of a run's videos: the rest were subtitled whole."""

    failed: int = 0  # not subtitled: unreadable, or an output could not be written
    partial: int = 0  # subtitled, but with undecodable stretches or cut off before their end

    @property
    def complete(self) -> bool:
        return not self.failed and not self.partial

    def summary(self, videos: int) -> str:
        """``N subtitled (K only in part), F failed`` for a run of ``videos`` jobs."""
        part = f" ({self.partial} only in part)" if self.partial else ""
        return f"{videos - self.failed} subtitled{part}, {self.failed} failed"


def run_job(
    job: VideoJob, *, model: CaptionModel, writer: CueWriter | WriteJSONL, options: DecodingOptions | None,
    settings: VideoOptions,
) -> bool:
    """Subtitle one video (and burn the copy); False when the cues cover it only in part."""
    with open_video(job.video, settings) as source:
        check_writable_file(job.output)  # a folder or a read-only place there: know it before captioning
        subtitles = subtitle_source(source, model=model, options=options, settings=settings)
    for note in subtitles.notes:
        tqdm.write(f"note: {one_line(note)}", file=sys.stderr)
    write_subtitles(subtitles.segments, job.output, writer)
    if job.burn:
        burn_subtitles(job.video, subtitles.segments, job.burn)
    for warning in subtitles.warnings:
        tqdm.write(f"warning: {one_line(warning)}", file=sys.stderr)
    return not subtitles.warnings


def failure_reason(job: VideoJob, error: BaseException) -> str:
    """``VIDEO: reason``, the reason naming the output when an output failed."""
    video = printable(job.video)
    if isinstance(error, OSError) and not isinstance(error, CaptionerError):
        where = f"{printable(error.filename)}: " if error.filename else ""
        reason = f"{where}{error.strerror or error}"
    else:
        reason = printable(error)
    return reason if reason.startswith(f"{video}: ") else f"{video}: {reason}"
