"""Reading video frames with their stream timestamps, behind one small source interface.

Times always come from the stream (``CAP_PROP_POS_MSEC`` after each grab), never from a
frame index divided by a nominal frame rate, so variable-frame-rate files stay in sync.
A time that is missing (<= 0 after the first frame) or goes backwards is replaced by the
previous time plus one frame step, and counted.

Frames nobody asked for are only grabbed (demuxed and decoded, never converted); a frame's
pixels are retrieved only when a sampler asks for them.

A broken stream does not end decoding: a frame that fails to decode is skipped and grabbing
goes on, and only a long run of failures (the end of the file, or nothing decodable after a
break) stops it. The skipped spans are recorded for the caller to report.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import cv2
import numpy as np

from captioner.errors import VideoReadError, printable
from captioner.images import MAX_PIXELS

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"})

Span = tuple[float, float]  # (start, end) in seconds

# Frame times are milliseconds rounded by the container; a frame this close before a target counts as at it.
TIME_TOLERANCE = 0.001

# Consecutive failed grabs that end decoding. At the end of a file a failed grab costs about 30 us, so
# waiting this long is cheap, while a damaged region of a few hundred frames is still skipped over.
MAX_FAILED_GRABS = 1000

# Frame step assumed when the container gives no usable frame rate (only for repairing bad times).
FALLBACK_FPS = 25.0

# A decode counts as complete when it ends this close to the length the container claims: that
# length is estimated for MKV/WebM and variable frame rates, so small shortfalls are normal.
END_TOLERANCE_SECONDS = 0.5
END_TOLERANCE_SHARE = 0.02

OPEN_HINT = "is it a video in a container and codec that this OpenCV build's FFmpeg backend reads?"


def is_video_path(path: str | os.PathLike) -> bool:
    """True when the file name has a video extension (case-insensitive)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def quiet_ffmpeg() -> None:
    """Silence FFmpeg's and OpenCV's own log lines (``header damaged`` for every broken packet,
    ``[ WARN ] ... can't be used to capture by name`` before a file we then report as unreadable).

    We report damaged spans and unreadable files ourselves, in one line. It must run before
    OpenCV's FFmpeg backend first opens a file; a value the user set (e.g. 24 to debug) is kept.
    """
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def _opencv_safe(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class OpenCVName:
    """A ``str`` for ``path`` that OpenCV can be handed without misreading it or crashing.

    OpenCV turns the str into UTF-8 and crashes (a segfault, not an exception) on a file
    name that is not valid UTF-8 (Python hands its bytes over as lone surrogates). Such a
    path is reached through a symbolic link with an ASCII name in a private temporary
    folder, removed by :meth:`close`. Paths are made absolute so FFmpeg never reads a name
    such as ``pipe:0.mp4`` as a protocol (that one would read standard input).

    Raises:
        OSError: the link cannot be made (no temporary folder, no symlinks on this system).
    """

    def __init__(self, path: str | os.PathLike):
        self._folder: str | None = None
        target = os.path.abspath(path)
        if _opencv_safe(target):
            self.name = target
            return
        suffix = Path(target).suffix
        self._folder = tempfile.mkdtemp(prefix="captioner-")
        self.name = os.path.join(self._folder, "link" + (suffix if suffix.isascii() and _opencv_safe(suffix) else ""))
        try:
            if not _opencv_safe(self.name):
                raise OSError(f"the temporary folder {printable(self._folder)} has a name OpenCV cannot take")
            os.symlink(target, self.name)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    time: float  # presentation time in seconds, read from the stream
    index: int  # position in decode order, for messages only (never used for timing)
    pixels: np.ndarray  # (H, W, 3) uint8 RGB


class Grab:
    """A frame the source has grabbed: its time is known, its pixels are decoded only when asked for.

    Valid only until the source grabs the next frame.
    """

    __slots__ = ("time", "index", "_retrieve", "_bgr", "_asked")

    def __init__(self, time: float, index: int, retrieve: Callable[[], np.ndarray | None]):
        self.time = time  # presentation time in seconds
        self.index = index  # position in decode order
        self._retrieve = retrieve
        self._bgr: np.ndarray | None = None
        self._asked = False

    def bgr(self) -> np.ndarray | None:
        """(H, W, 3) uint8 BGR pixels, or None when this frame cannot be retrieved."""
        if not self._asked:
            self._bgr, self._asked = self._retrieve(), True
        return self._bgr

    def rgb(self) -> np.ndarray | None:
        """(H, W, 3) uint8 RGB pixels, or None when this frame cannot be retrieved."""
        bgr = self.bgr()
        return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class VideoSource(Protocol):
    """What the subtitle pipeline needs from a video, whatever decodes it. Sources are single-pass."""

    path: Path
    fps: float  # nominal frames per second (for writing copies; never used for timing)
    size: tuple[int, int]  # (width, height) in pixels
    end_time: float  # seconds just past the last frame decoded so far
    skipped: list[Span]  # stretches of frames that could not be decoded and were skipped over
    retimed: int  # frames whose stream time was missing or went backwards, and was estimated
    expected_duration: float | None  # length the container claims, in seconds
    stopped_at: float | None  # time of the last good frame when decoding ended well before that length

    def grabs(self) -> Iterator[Grab]:
        """Every decodable frame in stream order, pixels on demand."""
        ...

    def frames(self, times: Iterable[float] | None = None) -> Iterator[Frame]:
        """The first frame at or after each of the sorted ``times`` (every frame when None)."""
        ...

    def close(self) -> None: ...


class FramePicker:
    """Decides, frame by frame, whether a frame is the first one at or after the next wanted time.

    ``times`` must be sorted and may be infinite (uniform sampling). One frame serves every
    target time it reaches, so a target never gets two frames and frames are never revisited.
    ``due`` only asks; ``take`` marks the targets as served (call it once the frame's pixels
    are in hand, so a frame that fails to decode leaves its target to the next one).
    """

    def __init__(self, times: Iterable[float]):
        self._times = iter(times)
        self._next = next(self._times, None)

    def due(self, time: float) -> bool:
        return self._next is not None and time >= self._next - TIME_TOLERANCE

    def take(self, time: float) -> None:
        while self._next is not None and self._next <= time + TIME_TOLERANCE:
            self._next = next(self._times, None)

    def wants(self, time: float) -> bool:
        """``due`` and ``take`` in one call."""
        if not self.due(time):
            return False
        self.take(time)
        return True


class StreamClock:
    """Frame times made safe to use: never missing, never going backwards.

    The first frame keeps its stream time (clamped to >= 0). A later time that is <= 0,
    not finite, or not after the previous one is replaced by the previous time plus the
    last good frame interval (the nominal one until there is one), and counted in ``retimed``.
    """

    def __init__(self, fps: float):
        self.step = 1.0 / (fps if fps > 0 else FALLBACK_FPS)  # seconds between frames, last seen
        self.last: float | None = None  # time of the last frame
        self.retimed = 0

    def time_of(self, raw: float, *, after_gap: bool = False) -> float:
        """The time to use for a frame whose stream says ``raw`` seconds (``after_gap``: frames were lost before it)."""
        if self.last is None:
            time = raw if math.isfinite(raw) and raw > 0 else 0.0
        elif not math.isfinite(raw) or raw <= 0 or raw <= self.last:
            time = self.last + self.step
            self.retimed += 1
        else:
            time = raw
            if not after_gap:
                self.step = raw - self.last
        self.last = time
        return time

    @property
    def end(self) -> float:
        """Seconds just past the last frame (0 before any)."""
        return 0.0 if self.last is None else self.last + self.step


class OpenCVSource:
    """A video file decoded with OpenCV's FFmpeg backend; a context manager.

    Raises:
        VideoReadError: the file is missing, cannot be opened, or has no decodable frame.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        """``threads``: FFmpeg's decoding threads (None: OpenCV's default, one per core)."""
        self.path = Path(path)
        self.threads = threads
        if not self.path.is_file():
            reason = ("is a folder, not a video" if self.path.is_dir()
                      else "not a regular file" if self.path.exists() else "no such file")  # a FIFO would block
            raise VideoReadError(f"{printable(self.path)}: {reason}")
        quiet_ffmpeg()
        try:
            self._name = OpenCVName(self.path)
        except OSError as e:
            raise VideoReadError(f"{printable(self.path)}: cannot give this file name to OpenCV ({e})") from e
        try:
            params = [cv2.CAP_PROP_N_THREADS, threads] if threads else []
            self._cap = cv2.VideoCapture(self._name.name, cv2.CAP_FFMPEG, params)
        except cv2.error:
            self._cap = None
        if self._cap is None or not self._cap.isOpened():
            self.close()
            raise VideoReadError(f"{printable(self.path)}: cannot open as a video ({OPEN_HINT})")
        self._read_properties()
        width, height = self.size
        if width * height > MAX_PIXELS:  # the photos' decompression bomb guard holds for frames too
            self.close()
            raise VideoReadError(f"{printable(self.path)}: {width}x{height} pixels per frame exceeds the limit of "
                                 f"{MAX_PIXELS}")
        self.skipped: list[Span] = []
        self._clock = StreamClock(self.fps)
        self._finished = False
        self._primed, failures = self._grab_next()  # fail now, before anyone spends time on a model
        if not self._primed:
            self.close()
            raise VideoReadError(f"{printable(self.path)}: no decodable video frames (empty file or no video stream)")
        self._leading_failures = failures

    def _read_properties(self) -> None:
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if math.isfinite(fps) and 0 < fps < 1000 else 0.0
        self.size = (int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        count = self._cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.frame_count = int(count) if math.isfinite(count) and count > 0 else 0  # may be an estimate

    def _grab(self) -> bool:
        try:
            return bool(self._cap.grab())
        except cv2.error:
            return False

    def _grab_next(self) -> tuple[bool, int]:
        """Grab the next decodable frame: (found, failed grabs before it)."""
        for failures in range(MAX_FAILED_GRABS):
            if self._grab():
                return True, failures
        return False, MAX_FAILED_GRABS

    def grabs(self) -> Iterator[Grab]:
        """Every decodable frame in stream order; afterwards ``end_time``, ``skipped`` and ``stopped_at`` are final.

        The file is read to its end once (a source is single-pass).
        """
        index, ok, failures = 0, self._primed, self._leading_failures
        self._primed = False
        while ok:
            gap_start = self._clock.end if self._clock.last is not None else 0.0
            time = self._clock.time_of(self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0, after_gap=failures > 0)
            if failures and time > gap_start:
                self.skipped.append((gap_start, time))
            yield Grab(time, index, self._retrieve)
            index += 1
            ok, failures = self._grab_next()
        self._finished = True

    def frames(self, times: Iterable[float] | None = None) -> Iterator[Frame]:
        """The first frame at or after each of the sorted ``times`` (every frame when None)."""
        picker = None if times is None else FramePicker(times)
        for grab in self.grabs():
            if picker is None or picker.due(grab.time):
                pixels = grab.rgb()
                if pixels is not None:
                    if picker is not None:
                        picker.take(grab.time)
                    yield Frame(grab.time, grab.index, pixels)

    def _retrieve(self) -> np.ndarray | None:
        try:
            ok, bgr = self._cap.retrieve()
        except cv2.error:
            return None
        return bgr if ok and bgr is not None and bgr.ndim == 3 and bgr.shape[2] == 3 else None

    @property
    def end_time(self) -> float:
        """Seconds just past the last frame decoded so far."""
        return self._clock.end

    @property
    def retimed(self) -> int:
        return self._clock.retimed

    @property
    def expected_duration(self) -> float | None:
        """Length the container claims, in seconds (None when it does not say)."""
        return self.frame_count / self.fps if self.frame_count and self.fps > 0 else None

    @property
    def stopped_at(self) -> float | None:
        """Time of the last good frame when decoding ended well short of the container's length.

        Compared in time, not frames: FFmpeg only estimates the frame count (duration x
        nominal rate) for MKV/WebM and variable-frame-rate files, so a good file may decode
        fewer frames than "expected" but still reaches the announced length.
        """
        expected = self.expected_duration
        if not self._finished or expected is None or self._clock.last is None:
            return None
        tolerance = max(END_TOLERANCE_SECONDS, END_TOLERANCE_SHARE * expected, 2 * self._clock.step)
        return self._clock.last if self.end_time < expected - tolerance else None

    def close(self) -> None:
        cap = getattr(self, "_cap", None)
        if cap is not None:
            cap.release()
        self._name.close()

    def __enter__(self) -> "OpenCVSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
