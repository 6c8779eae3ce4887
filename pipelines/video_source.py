"""Reading video frames with their stream timestamps, behind one small source interface.

Times always come from the stream (``CAP_PROP_POS_MSEC`` after each grab), never from a
frame index divided by a nominal frame rate, so variable-frame-rate files stay in sync.
A time that is missing (<= 0 after the first frame), repeated or going backwards is replaced
by one after the previous time (:class:`StreamClock`), and counted.

Frames nobody asked for are only grabbed (demuxed and decoded, never converted); a frame's
pixels are retrieved only when a sampler asks for them. A caller that says which time it
wants next (uniform sampling) lets the source seek over long stretches it does not need, in
MP4/MOV and Matroska/WebM files (:func:`seekable_container`; :class:`SeekLedger` says when).
On an intact file the frames are the ones reading through gives; see ``grabs`` for damaged ones.

A broken stream does not end decoding: a frame that fails to decode is skipped and grabbing
goes on, and only a long run of failures (the end of the file, or nothing decodable after a
break) stops it. The skipped spans are recorded for the caller to report.
"""

from __future__ import annotations

import math
import os
import time as clock
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import cv2
import numpy as np
from PIL import Image

from captioner.errors import VideoReadError, printable
from captioner.images import MAX_PIXELS, PHOTO_FORMATS
from captioner.pipelines.opencv_files import OpenCVName, quiet_ffmpeg

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

# Seeking. A wanted time at least SEEK_MIN_GAP seconds past the last frame is reached by seeking to
# SEEK_PREROLL seconds (at least two frames) before it: the frame landed on must lie after the last frame
# and before the wanted time, and a frame must follow it. The last SEEK_TAIL seconds the container claims
# are read through, so the end of the video (or where it breaks off) is found as without seeking.
SEEK_MIN_GAP = 1.5
SEEK_PREROLL = 0.1
SEEK_TAIL = 2.0
# Seeks tried before the ledger may call seeking a loss for this video.
SEEK_TRIAL = 3

OPEN_HINT = "is it a video in a container and codec that this OpenCV build's FFmpeg backend reads?"


def is_video_path(path: str | os.PathLike) -> bool:
    """True when the file name has a video extension (case-insensitive)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    time: float  # presentation time in seconds, read from the stream
    index: int  # position among the frames read (a seek skips some), for messages only (never for timing)
    pixels: np.ndarray  # (H, W, 3) uint8 RGB


class Grab:
    """A frame the source has grabbed: its time is known, its pixels are decoded only when asked for.

    Valid only until the source grabs the next frame.
    """

    __slots__ = ("time", "index", "_retrieve", "_bgr", "_asked")

    def __init__(self, time: float, index: int, retrieve: Callable[[], np.ndarray | None]):
        self.time = time  # presentation time in seconds
        self.index = index  # position among the frames read (a seek skips some)
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

    def grabs(self, wanted: Callable[[], float | None] | None = None) -> Iterator[Grab]:
        """Every decodable frame in stream order, pixels on demand.

        ``wanted``, asked after each frame, gives the earliest time the caller still needs
        (None: every frame); frames before it may then be skipped, never the first frame at or after it.
        """
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

    @property
    def next(self) -> float | None:
        """The next wanted time (None once the times are used up)."""
        return self._next

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

    The first frame keeps its stream time (clamped to >= 0). A later time that is <= 0 or
    not finite, or that starts again more than two frames before the previous one (joined
    recordings), is replaced by the previous time plus the last good frame interval (the
    nominal one until there is one). A time repeated, or at most two frames back (a frame
    stored twice or out of order), becomes the previous time plus half a frame (of the
    shorter of that interval and the nominal one), so the frame after it keeps its own time:
    a whole step would land on that frame's time and push every later frame one step on.
    Each replaced time is counted in ``retimed``.
    """

    def __init__(self, fps: float):
        self.step = 1.0 / (fps if fps > 0 else FALLBACK_FPS)  # seconds between frames, last seen
        self.nominal = self.step  # seconds between frames by the container's frame rate
        self.last: float | None = None  # time of the last frame
        self.retimed = 0
        self._halved = False  # the last frame was put half a step on: the next interval is not a frame step

    def time_of(self, raw: float, *, after_gap: bool = False) -> float:
        """The time to use for a frame whose stream says ``raw`` seconds (``after_gap``: frames were lost before it)."""
        halved, self._halved = self._halved, False
        if self.last is None:
            time = raw if math.isfinite(raw) and raw > 0 else 0.0
        elif not math.isfinite(raw) or raw <= 0 or raw < self.last - 2 * self.step - TIME_TOLERANCE:
            time = self.last + self.step
            self.retimed += 1
        elif raw <= self.last:
            time, self._halved = self.last + min(self.step, self.nominal) / 2, True
            self.retimed += 1
        else:
            time = raw
            if not (after_gap or halved):
                self.step = raw - self.last
        self.last = time
        return time

    @property
    def end(self) -> float:
        """Seconds just past the last frame (0 before any)."""
        return 0.0 if self.last is None else self.last + self.step


def seekable_container(path: Path) -> bool:
    """True for MP4/MOV (an ``ftyp`` box first) and Matroska/WebM (an EBML header) files.

    Their sample tables and cues give times that only grow and say which frames are keyframes,
    so a seek lands where reading through would be. Other containers are read through:
    MPEG-TS times may restart part-way (joined recordings), and AVI indexes may flag every
    frame as a keyframe, so a seek would land in the wrong place or decode from a P-frame.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(12)
    except OSError:
        return False
    return head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3"


class SeekLedger:
    """Whether seeking pays for this video: the time seeks took against reading through what they skipped.

    A seek decodes from the keyframe before its aim, so it is cheap when keyframes are close
    (a few per second) and dearer than reading through when they are 10 s apart, which the
    file does not say. So each seek's time is set against the frames it skipped at the
    measured cost of a grab; after ``SEEK_TRIAL`` seeks, seeking stops once it has cost more.
    Only the speed depends on it, never which frames are yielded.
    """

    def __init__(self) -> None:
        self.grabs, self.grab_seconds = 0, 0.0  # frames read through, and the time they took
        self.seeks, self.spent, self.saved = 0, 0.0, 0.0  # seconds seeks took, seconds reading through would have

    def read(self, seconds: float) -> None:
        self.grabs += 1
        self.grab_seconds += seconds

    def seek(self, seconds: float, frames_skipped: float) -> None:
        self.seeks += 1
        self.spent += seconds
        self.saved += max(frames_skipped, 0.0) * self.grab_seconds / max(self.grabs, 1)

    def pays(self) -> bool:
        return self.seeks < SEEK_TRIAL or self.spent <= self.saved


def _refuse_a_photo(path: Path) -> None:
    """A still photo given as a video (a slip): refused, not subtitled with one cue of 1/25 s.

    Raises:
        VideoReadError: ``path`` holds a photo of one frame (an animated GIF is let through).
    """
    try:
        with Image.open(path, formats=PHOTO_FORMATS) as image:
            if getattr(image, "n_frames", 1) > 1:
                return
            kind = image.format
    except Exception:  # noqa: BLE001 (not a photo Pillow can read: a damaged TIFF's frame count raises TypeError)
        return
    raise VideoReadError(f"{printable(path)}: a {kind} photo, not a video (captioner caption captions photos)")


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
        if self.path.stat().st_size == 0:  # said as for a photo, not as a format OpenCV cannot read
            raise VideoReadError(f"{printable(self.path)}: empty file")
        _refuse_a_photo(self.path)
        quiet_ffmpeg()
        try:
            self._name = OpenCVName(self.path)
        except OSError as e:
            raise VideoReadError(f"{printable(self.path)}: cannot give this file name to OpenCV ({e})") from e
        self._cap = self._open()
        if self._cap is None:
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
        self.ledger = SeekLedger()
        # off for good once a seek misses or the stream misbehaves; the ledger may also stop it
        self._seeking = seekable_container(self.path)
        self._finished = False
        self._primed, failures = self._grab_next()  # fail now, before anyone spends time on a model
        if not self._primed:
            self.close()
            raise VideoReadError(f"{printable(self.path)}: no decodable video frames (no video stream, or none of its "
                                 "frames decodes)")
        self._leading_failures = failures

    def _open(self) -> cv2.VideoCapture | None:
        try:
            params = [cv2.CAP_PROP_N_THREADS, self.threads] if self.threads else []
            cap = cv2.VideoCapture(self._name.name, cv2.CAP_FFMPEG, params)
        except cv2.error:
            return None
        return cap if cap.isOpened() else None

    def _read_properties(self) -> None:
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if math.isfinite(fps) and 0 < fps < 1000 else 0.0
        self.size = (int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        count = self._cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.frame_count = int(count) if math.isfinite(count) and count > 0 else 0  # may be an estimate

    def _grab(self) -> bool:
        start = clock.perf_counter()
        try:
            return bool(self._cap.grab())
        except cv2.error:
            return False
        finally:
            self.ledger.read(clock.perf_counter() - start)

    def _stream_time(self) -> float:
        return self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0

    def _grab_next(self) -> tuple[bool, int]:
        """Grab the next decodable frame: (found, failed grabs before it)."""
        for failures in range(MAX_FAILED_GRABS):
            if self._grab():
                return True, failures
        return False, MAX_FAILED_GRABS

    def grabs(self, wanted: Callable[[], float | None] | None = None) -> Iterator[Grab]:
        """Every decodable frame in stream order; afterwards ``end_time``, ``skipped`` and ``stopped_at`` are final.

        The file is read to its end once (a source is single-pass). With ``wanted`` (asked
        after each frame: the earliest time still needed, None for every frame) the source
        may seek over frames before that time and still yield the first frame at or after
        it. ``Grab.index`` counts the frames yielded.

        A seek decodes from a keyframe, where reading through decodes from the frames before:
        on an intact file the two give the same pixels, but a damaged keyframe can decode
        differently (as reading through a damaged file can with FFmpeg's threads), and a
        damaged stretch a seek jumps over is not decoded, so not in ``skipped``, nor does it
        end decoding. ``wanted=None`` reads every frame.
        """
        index, ok, failures = 0, self._primed, self._leading_failures
        self._primed = False
        while ok:
            gap_start = self._clock.end if self._clock.last is not None else 0.0
            time = self._clock.time_of(self._stream_time(), after_gap=failures > 0)
            if failures and time > gap_start + TIME_TOLERANCE:  # a failed grab that lost no frame is no gap
                self.skipped.append((gap_start, time))
            yield Grab(time, index, self._retrieve)
            index += 1
            target = wanted() if wanted is not None else None
            if target is not None and self._worth_seeking(time, target):
                ok, failures = self._seek(time, target)
            else:
                ok, failures = self._grab_next()
        self._finished = True

    def _worth_seeking(self, last: float, target: float) -> bool:
        expected = self.expected_duration
        return (self._seeking and target - last >= SEEK_MIN_GAP and self._aim(target) > last + self._clock.step
                and expected is not None and target < expected - SEEK_TAIL
                and not self.skipped and self._clock.retimed == 0 and self.ledger.pays())

    def _aim(self, target: float) -> float:
        """Where a seek for ``target`` aims: far enough before it that the frame landed on is before it."""
        return target - max(SEEK_PREROLL, 2 * self._clock.step)

    def _seek(self, last: float, target: float) -> tuple[bool, int]:
        """Jump to just before ``target``: (found, failed grabs before the frame found).

        The frame landed on must lie between ``last`` and ``target`` and be followed by a
        good frame; it only proves the jump (its time goes to the clock, so the next frame's
        interval is measured as reading through measures it), and the frame after it is the
        one found. A seek that lands anywhere else, or next to a damaged frame or the end,
        turns seeking off and goes back to reading every frame after ``last``.
        """
        start = clock.perf_counter()
        try:
            moved = bool(self._cap.set(cv2.CAP_PROP_POS_MSEC, self._aim(target) * 1000.0))
        except cv2.error:
            moved = False
        at = self._stream_time() if moved and self._grab() else math.nan
        if last < at < target - TIME_TOLERANCE and self._grab() and self._stream_time() > at:
            self._clock.time_of(at, after_gap=True)
            self.ledger.seek(clock.perf_counter() - start, (at - last) / self._clock.step - 1)
            return True, 0
        self._seeking = False
        return self._read_on_after(last)

    def _read_on_after(self, last: float) -> tuple[bool, int]:
        """Back on the frame after ``last`` by reading through: (found, failed grabs before it).

        Seeks back to just before ``last`` first; should that not land at or before it, the file
        is opened again and read from its start.
        """
        try:
            back = bool(self._cap.set(cv2.CAP_PROP_POS_MSEC, max(self._aim(last), 0.0) * 1000.0))
        except cv2.error:
            back = False
        if not (back and self._grab() and self._stream_time() <= last + TIME_TOLERANCE):
            self._cap.release()
            self._cap = self._open()
            if self._cap is None:
                return False, 0
        while True:
            ok, failures = self._grab_next()
            if not ok or self._stream_time() > last + TIME_TOLERANCE:
                return ok, failures

    def frames(self, times: Iterable[float] | None = None) -> Iterator[Frame]:
        """The first frame at or after each of the sorted ``times`` (every frame when None)."""
        picker = None if times is None else FramePicker(times)
        for grab in self.grabs(None if picker is None else lambda: picker.next):
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
