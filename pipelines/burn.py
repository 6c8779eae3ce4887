"""A copy of a video with its cues drawn on the frames (``captioner video --burn``).

Every frame is decoded and written again at the input's size and nominal frame rate, so
the copy has the same frame count; which cue a frame shows follows the frame's stream time.
"""

from __future__ import annotations

import functools
import os
import tempfile
from bisect import bisect_right
from pathlib import Path

import cv2
import numpy as np

from captioner.errors import OptionError, VideoReadError, VideoWriteError, printable
from captioner.outputs import check_writable_file, new_file_mode
from captioner.pipelines.cues import Segment
from captioner.pipelines.opencv_files import OpenCVName
from captioner.pipelines.sources import UNFINISHED_PREFIX
from captioner.pipelines.video_source import OpenCVSource

FONT = cv2.FONT_HERSHEY_SIMPLEX  # Hershey fonts draw ASCII only; other characters show as '?'
# Containers the copy can be written in, with the codec OpenCV's FFmpeg writer uses for each:
# MPEG-4 part 2 (which every OpenCV build writes) except AVI, which gets Motion JPEG.
NO_FRAME_RATE = ("cannot burn a copy that keeps time: OpenCV reports no frame rate for this video, or one of 1000 "
                 "per second or more")  # any rate guessed would make the copy play too fast or too slow
FOURCC_BY_EXTENSION = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}


def check_burn_target(out: str | os.PathLike) -> Path:
    """Fail now, before a model loads, if the burned copy could not be written to ``out``.

    Raises:
        OptionError: ``out``'s extension is not a container we write.
        OutputError: ``out`` is a folder or its folder cannot be written.
    """
    out = Path(out)
    if out.suffix.lower() not in FOURCC_BY_EXTENSION:
        raise OptionError(f"{printable(out)}: --burn writes {', '.join(sorted(FOURCC_BY_EXTENSION))} files")
    return check_writable_file(out)


def check_burn_source(video: str | os.PathLike, out: str | os.PathLike) -> None:
    """Fail now, before a model loads, if ``video``'s copy could not keep time (see :data:`NO_FRAME_RATE`).

    A video that cannot be opened passes: the run reports it as it reports any unreadable video.

    Raises:
        VideoWriteError: OpenCV gives the video no usable frame rate.
    """
    try:
        with OpenCVSource(video) as source:
            fps = source.fps
    except VideoReadError:
        return
    if not fps:
        raise VideoWriteError(f"{printable(out)}: {NO_FRAME_RATE}")


def burn_subtitles(video: str | os.PathLike, segments: list[Segment], out: str | os.PathLike) -> int:
    """Write ``out``: ``video`` with the text of the cue current at each frame drawn at the bottom.

    This is a second decode pass, on purpose: the cues exist only once every sampled frame
    has been captioned, and the decoded video cannot be held until then. The copy goes to a
    temporary file beside ``out`` (with an ASCII name, which OpenCV can always take) and is
    renamed over ``out`` when complete, so a failed run leaves no half-written video.

    Returns:
        The number of frames written.

    Raises:
        VideoReadError: ``video`` cannot be opened.
        VideoWriteError: ``out`` cannot be written with this OpenCV build.
    """
    out = Path(out)
    with OpenCVSource(video) as source:
        with _TemporaryVideo(out) as temporary:
            written = _copy_with_cues(source, segments, temporary.name, out)
            temporary.keep()
    return written


def _copy_with_cues(source: OpenCVSource, segments: list[Segment], name: str, out: Path) -> int:
    """Write the copy to ``name`` (OpenCV-safe); ``out`` is the file it becomes, for formats and messages."""
    if not source.fps:  # any rate guessed here would make the copy play too fast or too slow
        raise VideoWriteError(f"{printable(out)}: {NO_FRAME_RATE}")
    fourcc = cv2.VideoWriter_fourcc(*FOURCC_BY_EXTENSION.get(out.suffix.lower(), "mp4v"))
    try:
        writer = cv2.VideoWriter(name, fourcc, source.fps, source.size)
    except cv2.error:
        writer = None
    if writer is None or not writer.isOpened():
        width, height = source.size
        raise VideoWriteError(f"{printable(out)}: OpenCV cannot write a {out.suffix} video of {width}x{height} pixels")
    written, track = 0, CueTrack(segments)
    try:
        for frame in source.frames():
            bgr = cv2.cvtColor(frame.pixels, cv2.COLOR_RGB2BGR)
            if (bgr.shape[1], bgr.shape[0]) != source.size:  # a damaged stream may change size mid-way
                bgr = cv2.resize(bgr, source.size)
            text = track.text_at(frame.time)
            if text:
                draw_caption(bgr, text)
            writer.write(bgr)
            written += 1
    finally:
        writer.release()
    return written


class _TemporaryVideo:
    """A temporary file beside ``out``, named so OpenCV can take it, renamed over ``out`` by :meth:`keep`."""

    def __init__(self, out: Path):
        self.out, self._kept = out, False
        self._folder: OpenCVName | None = None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            self._folder = OpenCVName(out.parent)  # a link when the folder's name is not valid UTF-8
            suffix = out.suffix.lower() if out.suffix.isascii() else ".mp4"
            fd, self.name = tempfile.mkstemp(dir=self._folder.name, prefix=f"{UNFINISHED_PREFIX}burn-", suffix=suffix)
            os.close(fd)
        except OSError as e:
            if self._folder is not None:
                self._folder.close()
            raise VideoWriteError(f"{printable(out)}: cannot write: {e.strerror or e}") from e
        self._path = out.parent / os.path.basename(self.name)

    def keep(self) -> None:
        try:
            if self._path.stat().st_size == 0:
                raise OSError(28, "nothing was written (is the disk full?)")
            os.chmod(self._path, new_file_mode())  # mkstemp makes it private; a video is as readable as any
            os.replace(self._path, self.out)
        except OSError as e:
            raise VideoWriteError(f"{printable(self.out)}: cannot write: {e.strerror or e}") from e
        self._kept = True

    def __enter__(self) -> "_TemporaryVideo":
        return self

    def __exit__(self, *exc) -> None:
        if not self._kept:
            self._path.unlink(missing_ok=True)
        if self._folder is not None:
            self._folder.close()


class CueTrack:
    """Which cue shows at a given time; cues sorted once, looked up by bisection."""

    def __init__(self, segments: list[Segment]):
        self._cues = sorted(segments, key=lambda s: s.start)
        self._starts = [c.start for c in self._cues]

    def text_at(self, time: float) -> str | None:
        """Text of the cue showing at ``time`` seconds, or None between cues."""
        i = bisect_right(self._starts, time) - 1
        return self._cues[i].text if i >= 0 and time < self._cues[i].end else None


def draw_caption(bgr: np.ndarray, text: str) -> None:
    """Draw ``text`` centred at the bottom of the (H, W, 3) frame, wrapped to its width, white on a black rim."""
    top, text_alpha, rim_alpha = _caption_overlay(text, bgr.shape[1], bgr.shape[0])
    band = bgr[top:].astype(np.float32)
    band *= 1.0 - rim_alpha
    band += (255.0 - band) * text_alpha
    bgr[top:] = band.round().astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _caption_overlay(text: str, width: int, height: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(first row, text opacity, rim opacity) of a caption at the bottom of a ``width`` x ``height`` frame.

    The rim is the text's own shape grown by a few pixels, not the text drawn thicker in black:
    with OpenCV 5 a thicker stroke also widens each glyph's advance, so a thick black copy ran
    off to the right of the white text ("toyoy") at 320x240 and vanished at 720p. A cue shows on
    many frames in a row, so its overlay is drawn once. Opacities are (rows, W, 1) in [0, 1].
    """
    scale = max(0.4, height / 720)
    thickness = max(1, round(scale * 2))
    rim = max(1, thickness)
    line_height = int(cv2.getTextSize("Ag", FONT, scale, thickness)[0][1] * 1.8)
    lines = wrap_words(text, int(width * 0.92), scale, thickness)
    y = height - int(line_height * 0.8) - line_height * (len(lines) - 1)
    top = max(0, y - line_height - rim)
    mask = np.zeros((height - top, width), np.uint8)
    for line in lines:
        line_width = cv2.getTextSize(line, FONT, scale, thickness)[0][0]
        cv2.putText(mask, line, (max(0, (width - line_width) // 2), y - top), FONT, scale, 255, thickness,
                    cv2.LINE_AA)
        y += line_height
    grown = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rim + 1, 2 * rim + 1)))
    return top, (mask / 255.0).astype(np.float32)[..., None], (grown / 255.0).astype(np.float32)[..., None]


def wrap_words(text: str, max_width: int, scale: float, thickness: int) -> list[str]:
    """Greedy word wrap by rendered width; a single word wider than the frame gets a line of its own."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and cv2.getTextSize(candidate, FONT, scale, thickness)[0][0] <= max_width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines
