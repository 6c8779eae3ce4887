"""Subtitle one video or every video under a folder, reporting bad files and going on."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from captioner.pipelines.burn import burn_subtitles
from captioner.pipelines.sources import walk_videos
from captioner.pipelines.subtitles import CueWriter, WriteJSONL, write_subtitles
from captioner.pipelines.video import VideoOptions, subtitle_video
from tqdm import tqdm

from captioner.decoding import DecodingOptions
from captioner.errors import CaptionerError
from captioner.model import CaptionModel


@dataclass(frozen=True)
class VideoJob:
    """One video and where its subtitles go."""

    video: Path
    output: Path  # the subtitle file
    burn: Path | None = None  # a copy of the video with the cues drawn on, when asked for


def plan_jobs(
    source: Path, extension: str, *, output: Path | None = None, out_dir: Path | None = None, burn: Path | None = None
) -> list[VideoJob]:
    """Jobs for one video or for every video under a folder (recursive, sorted).

    Subtitles go to ``output`` (one video only), else into ``out_dir`` (keeping the
    folder's sub-paths, so equal names in two sub-folders do not collide), else beside
    each video with the format's extension. ``burn`` applies to one video only.
    """
    if not source.is_dir():
        if output is None:
            output = (out_dir or source.parent) / f"{source.stem}.{extension}"
        return [VideoJob(source, output, burn)]
    jobs = []
    for video in walk_videos(source):
        relative = video.relative_to(source)
        folder = out_dir / relative.parent if out_dir else video.parent
        jobs.append(VideoJob(video, folder / f"{video.stem}.{extension}"))
    return jobs


def run_jobs(
    jobs: list[VideoJob],
    *,
    model: CaptionModel,
    writer: CueWriter | WriteJSONL,
    options: DecodingOptions | None = None,
    settings: VideoOptions | None = None,
    progress: bool = True,
) -> int:
    """Subtitle each job's video; returns how many failed or broke off part-way.

    A video that cannot be read is reported as ``skipped PATH: reason`` on stderr and the
    run goes on. A video that breaks off part-way still gets subtitles up to the break and
    a ``warning: PATH: ...`` line, and counts as failed so scripts notice.
    """
    failed, settings = 0, settings or VideoOptions()
    bar = tqdm(jobs, desc="subtitling", unit="video", disable=not progress, file=sys.stderr)
    for job in bar:
        try:
            failed += not run_job(job, model=model, writer=writer, options=options, settings=settings)
        except CaptionerError as e:
            tqdm.write(f"skipped {e}", file=sys.stderr)
            failed += 1
    return failed


def run_job(
    job: VideoJob, *, model: CaptionModel, writer: CueWriter | WriteJSONL, options: DecodingOptions | None,
    settings: VideoOptions,
) -> bool:
    """Subtitle one video (and burn the copy); False when it broke off part-way."""
    subtitles = subtitle_video(job.video, model=model, options=options, **dataclasses.asdict(settings))
    for note in subtitles.notes:
        tqdm.write(f"note: {note}", file=sys.stderr)
    write_subtitles(subtitles.segments, job.output, writer)
    if job.burn:
        burn_subtitles(job.video, subtitles.segments, job.burn)
    if subtitles.error:
        tqdm.write(f"warning: {subtitles.error}; wrote the {len(subtitles.segments)} cues before it",
                   file=sys.stderr)
        return False
    return True
