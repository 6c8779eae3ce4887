"""Subtitles for a video in one decode pass: pick frames (uniformly or per shot), caption them in batches, merge.

    from captioner.api import load_model
    from captioner.pipelines.video import subtitle_video
    from captioner.pipelines.video_options import VideoOptions
    subs = subtitle_video("clip.mp4", model=load_model(), settings=VideoOptions(mode="scenes"))
    for cue in subs.segments:
        print(cue.start, cue.end, cue.text)

How frames are picked is a sampling mode: a class (:data:`SAMPLERS`) that is offered the
frames of the one decode pass and hands on the frames to caption, already at the model's
input size. A sampler that says which time it needs next (uniform sampling) lets the source
seek over long stretches before it; one that needs every frame (scene detection) says None.
To add a mode, write such a class with a ``from_options`` constructor, add it to
:data:`SAMPLERS` and its name to ``video_options.SAMPLING_MODES``; the CLI's choices follow.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from bisect import bisect_left
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import cv2
import numpy as np
import torch

from captioner.confidence import check_min_confidence
from captioner.decoding import Caption, DecodingOptions
from captioner.errors import OptionError, printable
from captioner.images import model_pixels
from captioner.model import CaptionModel, check_model
from captioner.options import check_path
from captioner.pipelines.cues import CaptionedFrame, Segment, Span, frame_samples, merge_samples, shape_cues
from captioner.pipelines.prefetch import in_background
from captioner.pipelines.video_options import SAMPLING_MODES, VideoOptions
from captioner.pipelines.video_source import FALLBACK_FPS, TIME_TOLERANCE, FramePicker, Grab, OpenCVSource, VideoSource

# Frames are shrunk to about this width for the scene detector, as PySceneDetect's SceneManager does.
DETECTOR_WIDTH = 256
# Skipped spans named in a warning; the rest are counted.
SPANS_LISTED = 5


@dataclass(frozen=True)
class Pick:
    """A frame chosen for captioning, already at the model's input size."""

    time: float  # stream time in seconds
    pixels: np.ndarray  # (S, S, 3) uint8 RGB
    shot: int = 0  # shot index (0 for everything when sampling uniformly)
    shot_span: Span | None = None  # (start, end) of the frame's shot; None when sampled uniformly


class Sampler(Protocol):
    """Offered every frame of the decode pass in order; hands on the frames to caption."""

    notes: list[str]  # what went differently than asked (e.g. scene detection failed), without the path

    def offer(self, grab: Grab) -> Iterable[Pick]:
        """Frames to caption that are known once ``grab`` has been seen (they may be earlier ones)."""
        ...

    def finish(self, end: float) -> Iterable[Pick]:
        """The frames still held when the video ends at ``end`` seconds."""
        ...

    def wanted(self) -> float | None:
        """The earliest time of a frame still needed; None when every frame must be offered."""
        ...


def uniform_times(every: float) -> Iterator[float]:
    """0, every, 2 * every, ... without accumulating rounding error."""
    return (k * every for k in itertools.count())


class UniformSampler:
    """The first frame at or after 0, every, 2 * every, ... seconds (or at ``start`` and the grid after it)."""

    def __init__(self, every: float, size: int, *, start: float | None = None, shot: int = 0):
        times = uniform_times(every)
        if start is not None:
            times = itertools.chain([start], (t for t in times if t > start + TIME_TOLERANCE))
        self._picker, self._size, self._shot = FramePicker(times), size, shot
        self.notes: list[str] = []

    @classmethod
    def from_options(cls, settings: VideoOptions, source: VideoSource, size: int) -> UniformSampler:
        return cls(settings.every, size)

    def offer(self, grab: Grab) -> Iterator[Pick]:
        if self._picker.due(grab.time) and (rgb := grab.rgb()) is not None:
            self._picker.take(grab.time)
            yield Pick(grab.time, model_pixels(rgb, self._size), self._shot)

    def finish(self, end: float) -> Iterator[Pick]:
        return iter(())

    def wanted(self) -> float | None:
        return self._picker.next


class ShotFrames:
    """Candidate frames of the open shot: at most ``capacity``, kept evenly spread as the shot grows.

    The first frame in each ``step``-second cell from the shot's start is kept. When more
    than ``capacity`` are kept, the cells double and every other candidate goes, so memory
    stays bounded however long the shot runs, and the candidates still cover all of it.
    """

    def __init__(self, start: float, step: float, capacity: int):
        self.start, self.step, self.capacity = start, step, capacity
        self.kept: list[tuple[float, np.ndarray]] = []  # (time, (S, S, 3) pixels), in time order

    def _cell(self, time: float) -> int:
        return math.floor((time - self.start) / self.step + 1e-9)

    def wants(self, time: float) -> bool:
        return not self.kept or self._cell(time) > self._cell(self.kept[-1][0])

    def add(self, time: float, pixels: np.ndarray) -> None:
        self.kept.append((time, pixels))
        while len(self.kept) > self.capacity:
            self.step *= 2
            cells = [self._cell(t) for t, _ in self.kept]
            self.kept = [c for i, c in enumerate(self.kept) if i == 0 or cells[i] > cells[i - 1]]

    def spread(self, end: float, every: float, most: int) -> list[tuple[float, np.ndarray]]:
        """One frame per ``every`` seconds of the shot (at least one, at most ``most``), evenly spread.

        The shot split into n equal parts is sampled nearest the middle of each part, away
        from the cuts (where fades and motion blur live).
        """
        if not self.kept:
            return []
        length = max(end - self.start, 0.0)
        count = min(most, max(1, round(length / every)))
        times = [t for t, _ in self.kept]
        chosen = {_nearest(times, self.start + (k + 0.5) * length / count) for k in range(count)}
        return [self.kept[i] for i in sorted(chosen)]


def _nearest(times: list[float], target: float) -> int:
    i = bisect_left(times, target)
    return min((j for j in (i - 1, i) if 0 <= j < len(times)), key=lambda j: abs(times[j] - target))


class SceneSampler:
    """Frames spread over each shot found by PySceneDetect's ContentDetector, in the same decode pass.

    Every frame is retrieved, shrunk to about 256 pixels wide (as PySceneDetect's own
    SceneManager does) and shown to the detector. Candidates of the open shot are kept at
    the model's input size (:class:`ShotFrames`); at the cut the evenly spread ones are
    handed on and the rest dropped, so a shot's frames are never all held. The detector's
    flash filter runs in SUPPRESS mode, which reports a cut on the frame it happens (the
    default MERGE mode may report it ``min_scene_len`` frames late), so the shot closes at once.

    Should the detector fail (not installed, or any error of its own), the shot so far is
    closed and the rest of the video is sampled uniformly, with a note: never a lost video.
    """

    def __init__(self, every: float, most: int, size: int, fps: float):
        self._every, self._most, self._size, self._fps = every, most, size, fps or FALLBACK_FPS
        self.notes: list[str] = []
        self._shot: ShotFrames | None = None
        self._shots = 0  # shots closed so far
        self._fallback: UniformSampler | None = None
        self._detect_size: tuple[int, int] | None = None
        try:
            self._detector, self._timecode = _content_detector()
        except Exception as e:  # a third-party failure of any kind falls back to uniform sampling
            self._detector, self._failure = None, f"scene detection failed ({e or type(e).__name__})"

    @classmethod
    def from_options(cls, settings: VideoOptions, source: VideoSource, size: int) -> SceneSampler:
        return cls(settings.every, settings.max_per_scene, size, source.fps)

    def offer(self, grab: Grab) -> Iterator[Pick]:
        if self._fallback is None and self._detector is None:
            yield from self._fall_back(grab, self._failure)
        if self._fallback is not None:
            yield from self._fallback.offer(grab)
            return
        bgr = grab.bgr()
        if bgr is None:
            return
        try:
            cut = self._is_cut(grab.index, bgr)
        except Exception as e:  # a third-party failure of any kind falls back to uniform sampling
            yield from self._fall_back(grab, f"scene detection failed ({e or type(e).__name__})")
            yield from self._fallback.offer(grab)
            return
        if cut and self._shot is not None and grab.time > self._shot.start:
            yield from self._close(grab.time)
        if self._shot is None:
            self._shot = ShotFrames(grab.time, self._every / 4, max(8, 4 * self._most))
        if self._shot.wants(grab.time):
            self._shot.add(grab.time, model_pixels(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), self._size))

    def finish(self, end: float) -> Iterator[Pick]:
        if self._shot is not None:
            yield from self._close(max(end, self._shot.start))

    def wanted(self) -> float | None:
        return None if self._fallback is None else self._fallback.wanted()

    def _is_cut(self, index: int, bgr: np.ndarray) -> bool:
        if self._detect_size is None:
            height, width = bgr.shape[:2]
            scale = max(1.0, width / DETECTOR_WIDTH)
            self._detect_size = (max(1, round(width / scale)), max(1, round(height / scale)))
        if (bgr.shape[1], bgr.shape[0]) != self._detect_size:  # also evens out a frame size that changes mid-stream
            bgr = cv2.resize(bgr, self._detect_size, interpolation=cv2.INTER_AREA)
        return bool(self._detector.process_frame(self._timecode(index, self._fps), bgr))

    def _close(self, end: float) -> Iterator[Pick]:
        shot, self._shot = self._shot, None
        for time, pixels in shot.spread(end, self._every, self._most):
            yield Pick(time, pixels, self._shots, (shot.start, end))
        self._shots += 1

    def _fall_back(self, grab: Grab, reason: str) -> Iterator[Pick]:
        if self._shot is not None and grab.time > self._shot.start:
            yield from self._close(grab.time)
        self._shot, self._detector = None, None
        since = f" from {grab.time:.2f} s on" if self._shots else ""
        self.notes.append(f"{reason}; sampling every {self._every:g} s instead{since}")
        self._fallback = UniformSampler(self._every, self._size, start=grab.time, shot=self._shots)


def _content_detector() -> tuple[object, Callable[[int, float], object]]:
    """A ContentDetector reporting cuts on the frame they happen, and the timecode type it takes."""
    from scenedetect import ContentDetector, FrameTimecode
    from scenedetect.detector import FlashFilter

    return ContentDetector(filter_mode=FlashFilter.Mode.SUPPRESS), FrameTimecode


# A sampler class for each mode name of VideoOptions.mode; a class has
# ``from_options(settings, source, size) -> Sampler``.
SAMPLERS: dict[str, type] = {"uniform": UniformSampler, "scenes": SceneSampler}
assert tuple(SAMPLERS) == SAMPLING_MODES, "every sampling mode needs a sampler, and every sampler a mode name"


@dataclass(frozen=True)
class VideoSubtitles:
    """The cues of one video and how complete they are."""

    path: Path
    segments: list[Segment]  # in time order, not overlapping
    duration: float  # seconds of video decoded (up to the break when decoding stopped early)
    frames_captioned: int
    stopped_at: float | None = None  # time of the last good frame when the file broke off early
    skipped: tuple[Span, ...] = ()  # stretches of undecodable frames skipped over
    warnings: tuple[str, ...] = ()  # "PATH: reason" for each way the cues fall short of the whole video
    notes: tuple[str, ...] = ()  # "PATH: ..." for what went differently, e.g. uniform sampling after a failure


def subtitle_video(
    path: str | os.PathLike,
    *,
    model: CaptionModel,
    options: DecodingOptions | None = None,
    settings: VideoOptions | None = None,
) -> VideoSubtitles:
    """Caption a video's frames and turn them into subtitle cues, decoding the file once.

    Args:
        path: the video file (anything OpenCV's FFmpeg backend decodes; any file name).
        model: the caption model; frames go through the same batched search as photos.
        options: decoding options (default: the model's own).
        settings: sampling and cue options (default: ``VideoOptions()``).

    Returns:
        The cues with the decoded duration. Undecodable stretches are skipped over and a
        file that breaks off still gives the cues up to the break: both are listed in
        ``warnings``, so check it.

    Raises:
        OptionError: an argument of the wrong type, or options the model cannot act on.
        VideoReadError: the file is missing, not a video, or has no decodable frame.
    """
    check_path(path, "path")
    check_model(model)
    settings = _checked_settings(settings)
    if options is not None:  # before the file is opened: an argument's fault is named as such
        model.check_decoding(options)
    with open_video(path, settings) as source:
        check_min_confidence(settings.min_confidence, model)
        return _subtitles(source, model, options, settings, None)


def _checked_settings(settings: object) -> VideoOptions:
    if settings is None:
        return VideoOptions()
    if not isinstance(settings, VideoOptions):
        raise OptionError(f"settings must be a VideoOptions (e.g. VideoOptions(every=1.0)), not "
                          f"{type(settings).__name__}")
    return settings


def open_video(path: str | os.PathLike, settings: VideoOptions) -> OpenCVSource:
    """``path`` as a source whose decoder leaves the model its share of the cores.

    In uniform mode the model captions batches while the file decodes beside it, so FFmpeg
    gets half the cores and the model the rest until decoding ends (see :func:`subtitle_source`).
    Scene detection reads every frame in the decoding thread and is slower with fewer
    decoding threads (4.2 against 4.6 s on a 60 s 720p clip, 2 cores), so it keeps FFmpeg's default.

    Raises:
        VideoReadError: as :class:`OpenCVSource`.
    """
    threads = max(1, torch.get_num_threads() // 2) if settings.mode == "uniform" else None
    return OpenCVSource(path, threads=threads)


# (B, S, S, 3) uint8 pixels and decoding options -> each frame's captions, best first
PixelCaptioner = Callable[[torch.Tensor, DecodingOptions | None], list[list[Caption]]]


def subtitle_source(
    source: VideoSource,
    *,
    model: CaptionModel,
    options: DecodingOptions | None = None,
    settings: VideoOptions | None = None,
    caption: PixelCaptioner | None = None,
) -> VideoSubtitles:
    """:func:`subtitle_video` for an already opened source (any :class:`VideoSource`).

    ``caption`` captions each batch of frames (default: ``model.caption_pixels``). The server
    passes its dynamic batcher here, so video frames share its thread and batches, and a
    request past its timeout stops at its next batch (the function raises).
    """
    check_model(model)
    settings = _checked_settings(settings)
    check_min_confidence(settings.min_confidence, model)
    if options is not None:
        model.check_decoding(options)
    return _subtitles(source, model, options, settings, caption)


def _subtitles(source: VideoSource, model: CaptionModel, options: DecodingOptions | None, settings: VideoOptions,
               caption: PixelCaptioner | None) -> VideoSubtitles:
    """:func:`subtitle_source`'s work, on arguments its front doors have checked."""
    sampler = SAMPLERS[settings.mode].from_options(settings, source, model.encoder.preprocess.size)
    decoded = threading.Event()
    cores = nullcontext(caption) if caption else _sharing_cores(model.caption_pixels, decoded,
                                                                getattr(source, "threads", None))
    # the decoding thread is stopped before the source closes
    frames = sample_frames(source, sampler, seek=settings.seek)
    with cores as caption_batch, closing(in_background(frames, finished=decoded)) as picks:
        # on a GPU each new batch size costs a one-off stall, so growing batches pay only where the
        # server's batcher has warmed every size up (``caption`` given) or on the CPU
        grow = caption is not None or model.device.type == "cpu"
        captioned = list(caption_picks(caption_batch, picks, options, settings.batch_size, grow=grow))
    if settings.min_confidence is not None:  # an unsure frame leaves a gap: its stretch gets no cue
        captioned = [replace(f, text="") if f.confidence < settings.min_confidence else f
                     for f in captioned]
    end = source.end_time
    segments = shape_cues(merge_samples(frame_samples(captioned, end)), min_score=settings.min_score,
                          min_duration=settings.min_duration, max_duration=settings.max_duration, video_end=end)
    name = printable(source.path)
    notes = [f"{name}: {note}" for note in sampler.notes] + retime_notes(source)
    thresholds = [flag for flag, value in (("--min-confidence", settings.min_confidence),
                                           ("--min-score", settings.min_score)) if value is not None]
    if captioned and not segments and thresholds:  # an empty file is written: say why, rather than leave a puzzle
        notes.append(f"{name}: no cue left: every caption was below {' or '.join(thresholds)}")
    return VideoSubtitles(source.path, segments, end, len(captioned), source.stopped_at, tuple(source.skipped),
                          tuple(decode_warnings(source)), tuple(notes))


@contextmanager
def _sharing_cores(caption: PixelCaptioner, decoded: threading.Event,
                   decode_threads: int | None) -> Iterator[PixelCaptioner]:
    """``caption`` on the cores the decoder leaves while the file still decodes, on all of them
    after; torch's thread count is given back on leaving, errors included.

    Two thread pools on two cores mostly wait for each other: on ``benchmarks/bench_video.py``'s
    120 s 720p clip, one FFmpeg thread beside one torch thread, then two torch threads once
    the file was read, took 3.03 s (2.79-3.10) where both at full width took 3.45 s (3.44-3.75).
    """
    full = torch.get_num_threads()
    beside = max(1, full - decode_threads) if decode_threads else full

    def caption_batch(pixels: torch.Tensor, options: DecodingOptions | None) -> list[list[Caption]]:
        torch.set_num_threads(full if decoded.is_set() else beside)
        return caption(pixels, options)

    try:
        yield caption_batch
    finally:
        torch.set_num_threads(full)


def sample_frames(source: VideoSource, sampler: Sampler, *, seek: bool = True) -> Iterator[Pick]:
    """The one decode pass: the frames offered to the sampler (``seek``: it may skip those
    before the time it wants next), the frames it picks handed on."""
    for grab in source.grabs(sampler.wanted if seek else None):
        yield from sampler.offer(grab)
    yield from sampler.finish(source.end_time)


def caption_picks(
    caption: PixelCaptioner, picks: Iterable[Pick], options: DecodingOptions | None, batch_size: int, *,
    grow: bool = True,
) -> Iterator[CaptionedFrame]:
    """Each picked frame with its best caption, in batches of ``batch_size`` frames, or with
    ``grow`` of 1, 2, 4, ... up to ``batch_size``.

    ``picks`` come from a background thread (decoding, scene detection, resizing) that
    runs while the previous batch is captioned; only model-size frames are ever batched.
    Growing batches start the model on the first frame decoded, where a first full batch
    left it waiting for ``batch_size`` frames: ``benchmarks/bench_video.py``'s 720p clip ran
    in 1.60-1.65 s against 1.71-1.72 s (two interleaved runs each, 3 repeats). The sizes do
    not depend on timing, so a video gets the same subtitles every time.
    """
    picks = iter(picks)
    for size in (_growing(batch_size) if grow else itertools.repeat(batch_size)):
        if not (batch := list(itertools.islice(picks, size))):
            break
        pixels = torch.from_numpy(np.stack([p.pixels for p in batch]))  # (B, S, S, 3) uint8
        for pick, n_best in zip(batch, caption(pixels, options), strict=True):
            best = n_best[0]
            yield CaptionedFrame(pick.time, best.text, best.score, pick.shot, pick.shot_span, best.confidence)


def _growing(batch_size: int) -> Iterator[int]:
    """Batch sizes 1, 2, 4, ... up to ``batch_size``, then ``batch_size`` for ever."""
    size = 1
    while True:
        yield size
        size = min(2 * size, batch_size)


def decode_warnings(source: VideoSource) -> list[str]:
    """``PATH: reason`` for skipped stretches and for a file that broke off before its announced end."""
    name, warnings = printable(source.path), []
    if source.skipped:
        spans = ", ".join(f"{a:.2f}-{b:.2f} s" for a, b in source.skipped[:SPANS_LISTED])
        more = len(source.skipped) - SPANS_LISTED
        spans += f" and {more} more" if more > 0 else ""
        warnings.append(f"{name}: skipped undecodable frames at {spans}; the cues around them cover the gap")
    if source.stopped_at is not None:
        expected = f" of about {source.expected_duration:.2f} s" if source.expected_duration else ""
        warnings.append(f"{name}: decoding stopped at {source.stopped_at:.2f} s{expected}; "
                        "the file is truncated or corrupt after that point")
    return warnings


def retime_notes(source: VideoSource) -> list[str]:
    if not source.retimed:
        return []
    return [f"{printable(source.path)}: {source.retimed} frames had no usable stream time (missing or going "
            "backwards); their times were estimated from the frame before"]
