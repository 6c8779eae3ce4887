"""Reading video frames with their stream timestamps, behind one small source interface.

Times always come from the stream (``CAP_PROP_POS_MSEC`` after each grab), never from a
frame index divided by a nominal frame rate, so variable-frame-rate files stay in sync.
Frames nobody asked for are only grabbed (demuxed and decoded, but never converted to
RGB); only the frames that will be captioned are retrieved and converted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import cv2
import numpy as np

from captioner.errors import VideoReadError

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"})

# Frame times are milliseconds rounded by the container; a frame this close before a target counts as at it.
TIME_TOLERANCE = 0.001

# Decoding counts as complete when it got this close to the container's frame count (estimates can be short).
MISSING_FRAMES_ALLOWED = 2

OPEN_HINT = "is it a video in a container and codec that this OpenCV build's FFmpeg backend reads?"


def is_video_path(path: str | os.PathLike) -> bool:
    """True when the file name has a video extension (case-insensitive)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    time: float  # presentation time in seconds, read from the stream
    index: int  # position in decode order, for messages only (never used for timing)
    pixels: np.ndarray  # (H, W, 3) uint8 RGB


class VideoSource(Protocol):
    """What the subtitle pipeline needs from a video, whatever decodes it."""

    path: Path
    fps: float  # nominal frames per second (for writing copies; never used for timing)
    size: tuple[int, int]  # (width, height) in pixels
    end_time: float  # seconds just past the last frame decoded so far
    stopped_at: float | None  # time of the last good frame when decoding broke off early
    expected_duration: float | None  # length the container claims, in seconds

    def frames(self, times: Iterable[float] | None = None) -> Iterator[Frame]:
        """The first frame at or after each of the sorted ``times`` (every frame when None)."""
        ...

    def close(self) -> None: ...


class FramePicker:
    """Decides, frame by frame, whether a frame is the first one at or after the next wanted time.

    ``times`` must be sorted and may be infinite (uniform sampling). One frame serves every
    target time it reaches, so a target never gets two frames and frames are never revisited.
    """

    def __init__(self, times: Iterable[float]):
        self._times = iter(times)
        self._next = next(self._times, None)

    def wants(self, time: float) -> bool:
        if self._next is None or time < self._next - TIME_TOLERANCE:
            return False
        while self._next is not None and self._next <= time + TIME_TOLERANCE:
            self._next = next(self._times, None)
        return True


class _EveryFrame:
    def wants(self, time: float) -> bool:
        return True


class OpenCVSource:
    """A video file decoded with OpenCV's FFmpeg backend; a context manager.

    Raises:
        VideoReadError: the file is missing, cannot be opened, or has no decodable frame.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise VideoReadError(f"{self.path}: no such file")
        self._cap = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)
        if not self._cap.isOpened():
            raise VideoReadError(f"{self.path}: cannot open as a video ({OPEN_HINT})")
        self.fps = self._cap.get(cv2.CAP_PROP_FPS) or 0.0
        self.size = (int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        self.frame_count = max(int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0)  # container's figure, may be estimated
        self.end_time = 0.0
        self.stopped_at: float | None = None
        self._primed = self._grab()  # fail now, before anyone spends time on scene detection or a model
        if not self._primed:
            self.close()
            raise VideoReadError(f"{self.path}: no decodable video frames (empty file or no video stream)")

    def _grab(self) -> bool:
        try:
            return bool(self._cap.grab())
        except cv2.error:
            return False

    def _grabbed_frames(self) -> Iterator[tuple[int, float]]:
        """(index, time) of each frame grabbed; records the end time and any early stop afterwards."""
        index, time, step = 0, 0.0, 1.0 / self.fps if self.fps > 0 else 0.0
        ok = self._primed
        while ok:
            previous, time = time, self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            step = time - previous if index and time > previous else step
            yield index, time
            index += 1
            ok = self._grab()
        self._primed = False
        self.end_time = time + step
        if index < self.frame_count - MISSING_FRAMES_ALLOWED:
            self.stopped_at = time

    def frames(self, times: Iterable[float] | None = None) -> Iterator[Frame]:
        """The first frame at or after each of the sorted ``times`` (every frame when None).

        The file is read to its end once (a source is single-pass), so that afterwards
        ``end_time`` is the video's length and ``stopped_at`` tells whether it broke off.
        """
        picker = _EveryFrame() if times is None else FramePicker(times)
        for index, time in self._grabbed_frames():
            if picker.wants(time):
                pixels = self._retrieve()
                if pixels is not None:
                    yield Frame(time, index, pixels)

    def _retrieve(self) -> np.ndarray | None:
        try:
            ok, bgr = self._cap.retrieve()
        except cv2.error:
            return None
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if ok and bgr is not None else None

    @property
    def expected_duration(self) -> float | None:
        """Length the container claims, in seconds (None when it does not say)."""
        return self.frame_count / self.fps if self.frame_count and self.fps > 0 else None

    def close(self) -> None:
        self._cap.release()

    def __enter__(self) -> "OpenCVSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
