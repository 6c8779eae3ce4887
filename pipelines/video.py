"""Subtitles for a video: pick frames (uniformly or per shot), caption them in batches, merge.

    from captioner.api import load_model
    from captioner.pipelines.video import subtitle_video
    subs = subtitle_video("clip.mp4", model=load_model(), every=2.0)
    for cue in subs.segments:
        print(cue.start, cue.end, cue.text)
"""

from __future__ import annotations

import itertools
import os
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from captioner.pipelines.cues import Sample, merge_samples, shape_cues
from captioner.pipelines.prefetch import in_background
from captioner.pipelines.subtitles import Segment
from captioner.pipelines.video_source import Frame, OpenCVSource, VideoSource

from captioner.decoding import Caption, DecodingOptions
from captioner.images import model_pixels
from captioner.model import CaptionModel

Shot = tuple[float, float]  # (start, end) seconds of one shot between two cuts


@dataclass(frozen=True)
class VideoOptions:
    """How frames are picked and cues shaped; change fields with ``dataclasses.replace``."""

    every: float = 2.0  # seconds between sampled frames (also the density inside shots with ``scenes``)
    scenes: bool = False  # sample inside shots found by PySceneDetect; cues never cross a cut
    max_per_scene: int = 3  # frames captioned per shot at most (evenly spread), with ``scenes``
    min_score: float | None = None  # drop cues whose score (mean log-prob, <= 0) is lower
    min_duration: float = 1.0  # seconds a cue lasts at least, if the next cue leaves room
    max_duration: float = 7.0  # seconds a cue lasts at most; longer ones are split
    batch_size: int = 16  # frames per encoder + beam search batch

    def __post_init__(self) -> None:
        checks = {
            "every": (self.every > 0, "> 0"),
            "max_per_scene": (self.max_per_scene >= 1, ">= 1"),
            "min_duration": (self.min_duration >= 0, ">= 0"),
            "max_duration": (self.max_duration >= max(self.min_duration, 1e-3), ">= min_duration and > 0"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                raise ValueError(f"video option {name}={getattr(self, name)!r} must be {rule}")


@dataclass(frozen=True)
class VideoSubtitles:
    """The cues of one video and how complete they are."""

    path: Path
    segments: list[Segment]  # in time order, not overlapping
    duration: float  # seconds of video decoded (up to the break when decoding stopped early)
    frames_captioned: int
    stopped_at: float | None = None  # time of the last good frame when the file broke off early
    error: str | None = None  # "PATH: reason" when it broke off; the segments cover the video up to there
    notes: tuple[str, ...] = ()  # e.g. scene detection failed and uniform sampling was used


def subtitle_video(
    path: str | os.PathLike,
    *,
    model: CaptionModel,
    options: DecodingOptions | None = None,
    every: float = 2.0,
    scenes: bool = False,
    max_per_scene: int = 3,
    min_score: float | None = None,
    min_duration: float = 1.0,
    max_duration: float = 7.0,
    batch_size: int = 16,
) -> VideoSubtitles:
    """Caption a video's frames and turn them into subtitle cues.

    Args:
        path: the video file (anything OpenCV's FFmpeg backend decodes).
        model: the caption model; frames go through the same batched search as photos.
        options: decoding options (default: the model's own).
        every, scenes, max_per_scene, min_score, min_duration, max_duration, batch_size:
            see :class:`VideoOptions`.

    Returns:
        The cues with the decoded duration. A file that breaks off part-way still returns
        the cues up to the break, with ``stopped_at`` and ``error`` set: check them.

    Raises:
        VideoReadError: the file is missing, not a video, or has no decodable frame.
        ValueError: an option is out of range.
    """
    settings = VideoOptions(every=every, scenes=scenes, max_per_scene=max_per_scene, min_score=min_score,
                            min_duration=min_duration, max_duration=max_duration, batch_size=batch_size)
    with OpenCVSource(path) as source:
        return subtitle_source(source, model=model, options=options, settings=settings)


def subtitle_source(
    source: VideoSource,
    *,
    model: CaptionModel,
    options: DecodingOptions | None = None,
    settings: VideoOptions | None = None,
) -> VideoSubtitles:
    """:func:`subtitle_video` for an already opened source (any :class:`VideoSource`)."""
    settings = settings or VideoOptions()
    shots, note = detect_shots(source.path, settings.every) if settings.scenes else (None, None)
    if shots is None:
        times: Iterable[float] = uniform_times(settings.every)
    else:
        times = shot_times(shots, settings.every, settings.max_per_scene)
    captioned = list(caption_frames(model, source.frames(times), options, settings.batch_size))
    end = source.end_time
    samples = uniform_samples(captioned, end) if shots is None else shot_samples(captioned, shots, end)
    segments = shape_cues(merge_samples(samples), min_score=settings.min_score, min_duration=settings.min_duration,
                          max_duration=settings.max_duration, video_end=end)
    return VideoSubtitles(source.path, segments, end, len(captioned), source.stopped_at,
                          stop_message(source), (note,) if note else ())


def stop_message(source: VideoSource) -> str | None:
    """``PATH: reason`` when the source broke off before the end its container announced."""
    if source.stopped_at is None:
        return None
    expected = f" of about {source.expected_duration:.2f} s" if source.expected_duration else ""
    return (f"{source.path}: decoding stopped at {source.stopped_at:.2f} s{expected}; "
            "the file is truncated or corrupt after that point")


def uniform_times(every: float) -> Iterator[float]:
    """0, every, 2 * every, ... without accumulating rounding error."""
    return (k * every for k in itertools.count())


def detect_shots(path: Path, every: float) -> tuple[list[Shot] | None, str | None]:
    """Shots found by PySceneDetect's ContentDetector, or (None, why) when it fails.

    PySceneDetect decodes the whole file once more; any error of its own (it has many
    backends and file quirks) means uniform sampling instead, never a lost video.
    """
    from scenedetect import ContentDetector, detect

    try:
        scenes = detect(str(path), ContentDetector(), start_in_scene=True)
    except Exception as e:  # a third-party failure of any kind falls back to uniform sampling
        return None, f"{path}: scene detection failed ({e or type(e).__name__}); sampling every {every:g} s instead"
    shots = [(start.seconds, end.seconds) for start, end in scenes if end.seconds > start.seconds]
    if not shots:
        return None, f"{path}: scene detection found no shots; sampling every {every:g} s instead"
    return shots, None


def shot_times(shots: list[Shot], every: float, max_per_shot: int) -> list[float]:
    """Target times spread evenly inside each shot: one per ``every`` seconds, at most ``max_per_shot``.

    A shot split into n equal parts is sampled at the middle of each part, away from the
    cut itself (where fades and motion blur live).
    """
    times = []
    for start, end in shots:
        count = min(max_per_shot, max(1, round((end - start) / every)))
        times += [start + (k + 0.5) * (end - start) / count for k in range(count)]
    return times


def caption_frames(
    model: CaptionModel, frames: Iterable[Frame], options: DecodingOptions | None, batch_size: int
) -> Iterator[tuple[float, Caption]]:
    """(frame time, best caption) for each frame, captioned ``batch_size`` frames at a time.

    Frames are decoded and squashed to the encoder's input size in a background thread
    while the previous batch is captioned, and a batch of full-size frames is never held.
    """
    size = model.encoder.preprocess.size
    resized = in_background((f.time, model_pixels(f.pixels, size)) for f in frames)
    while batch := list(itertools.islice(resized, batch_size)):
        pixels = torch.from_numpy(np.stack([p for _, p in batch]))  # (B, S, S, 3) uint8
        for (time, _), n_best in zip(batch, model.caption_pixels(pixels, options), strict=True):
            yield time, n_best[0]


def uniform_samples(captioned: list[tuple[float, Caption]], end: float) -> list[Sample]:
    """Each frame stands for the video from its time to the next sampled frame's (the last: to the end)."""
    times = [t for t, _ in captioned]
    ends = times[1:] + [max(end, times[-1])] if times else []
    return [Sample(t, e, c.text, c.score) for (t, c), e in zip(captioned, ends, strict=True)]


def shot_samples(captioned: list[tuple[float, Caption]], shots: list[Shot], end: float) -> list[Sample]:
    """Frames of one shot share it, split halfway between neighbours; cues then start and end at cuts."""
    starts = [s for s, _ in shots]
    by_shot: dict[int, list[tuple[float, Caption]]] = {}
    for time, caption in captioned:
        by_shot.setdefault(max(0, bisect_right(starts, time) - 1), []).append((time, caption))
    samples = []
    for shot, members in sorted(by_shot.items()):
        shot_start, shot_end = shots[shot][0], min(shots[shot][1], end)
        times = [t for t, _ in members]
        bounds = [shot_start] + [(a + b) / 2 for a, b in itertools.pairwise(times)] + [max(shot_end, times[-1])]
        samples += [Sample(bounds[i], bounds[i + 1], c.text, c.score, shot) for i, (_, c) in enumerate(members)]
    return samples
