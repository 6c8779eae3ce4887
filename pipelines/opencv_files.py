"""Handing files to OpenCV: names it can take without crashing, and its own log lines kept quiet."""

from __future__ import annotations

import os

import cv2

from captioner.utf8_names import Utf8Name


def quiet_ffmpeg() -> None:
    """Silence FFmpeg's and OpenCV's own log lines (``header damaged`` for every broken packet,
    ``[ WARN ] ... can't be used to capture by name`` before a file we then report as unreadable).

    We report damaged spans and unreadable files ourselves, in one line. It must run before
    OpenCV's FFmpeg backend first opens a file; a value the user set (e.g. 24 to debug) is kept.
    """
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


class OpenCVName(Utf8Name):
    """A ``str`` for ``path`` that OpenCV can be handed without misreading it or crashing.

    OpenCV turns the str into UTF-8 and crashes (a segfault, not an exception) on a file
    name that is not valid UTF-8: such a path is reached through a link
    (:class:`captioner.utf8_names.Utf8Name`). Paths are absolute, so FFmpeg never reads a
    name such as ``pipe:0.mp4`` as a protocol (that one would read standard input).
    """
