"""A copy of a video with its cues drawn on the frames (``captioner video --burn``).

Every frame is decoded and written again at the input's size and nominal frame rate, so
the copy has the same frame count; which cue a frame shows follows the frame's stream time.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from pathlib import Path

import cv2
import numpy as np
from captioner.pipelines.subtitles import Segment
from captioner.pipelines.video_source import OpenCVSource

from captioner.errors import VideoWriteError

FONT = cv2.FONT_HERSHEY_SIMPLEX  # Hershey fonts draw ASCII only; other characters show as '?'
FOURCC_BY_EXTENSION = {".avi": "MJPG"}  # everything else: MPEG-4 part 2, which every OpenCV build writes


def burn_subtitles(video: str | os.PathLike, segments: list[Segment], out: str | os.PathLike) -> int:
    """Write ``out``: ``video`` with the text of the cue current at each frame drawn at the bottom.

    Returns:
        The number of frames written.

    Raises:
        VideoReadError: ``video`` cannot be opened.
        VideoWriteError: ``out`` cannot be written with this OpenCV build.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with OpenCVSource(video) as source:
        fourcc = cv2.VideoWriter_fourcc(*FOURCC_BY_EXTENSION.get(out.suffix.lower(), "mp4v"))
        writer = cv2.VideoWriter(str(out), fourcc, source.fps, source.size)
        if not writer.isOpened():
            raise VideoWriteError(f"{out}: cannot write a video here (OpenCV refused the file name or codec)")
        written, track = 0, CueTrack(segments)
        try:
            for frame in source.frames():
                bgr = cv2.cvtColor(frame.pixels, cv2.COLOR_RGB2BGR)
                text = track.text_at(frame.time)
                if text:
                    draw_caption(bgr, text)
                writer.write(bgr)
                written += 1
        finally:
            writer.release()
    return written


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
    height, width = bgr.shape[:2]
    scale = max(0.4, height / 720)
    thickness = max(1, round(scale * 2))
    line_height = int(cv2.getTextSize("Ag", FONT, scale, thickness)[0][1] * 1.8)
    lines = wrap_words(text, int(width * 0.92), scale, thickness)
    y = height - int(line_height * 0.8) - line_height * (len(lines) - 1)
    for line in lines:
        line_width = cv2.getTextSize(line, FONT, scale, thickness)[0][0]
        origin = (max(0, (width - line_width) // 2), y)
        cv2.putText(bgr, line, origin, FONT, scale, (0, 0, 0), thickness + 2 * max(1, thickness), cv2.LINE_AA)
        cv2.putText(bgr, line, origin, FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)
        y += line_height


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
