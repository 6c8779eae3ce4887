"""Handing files to OpenCV: names it can take without crashing, and its own log lines kept quiet."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import cv2

from captioner.errors import is_utf8, printable


def quiet_ffmpeg() -> None:
    """Silence FFmpeg's and OpenCV's own log lines (``header damaged`` for every broken packet,
    ``[ WARN ] ... can't be used to capture by name`` before a file we then report as unreadable).

    We report damaged spans and unreadable files ourselves, in one line. It must run before
    OpenCV's FFmpeg backend first opens a file; a value the user set (e.g. 24 to debug) is kept.
    """
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


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
        if is_utf8(target):
            self.name = target
            return
        suffix = Path(target).suffix
        self._folder = tempfile.mkdtemp(prefix="captioner-")
        self.name = os.path.join(self._folder, "link" + (suffix if suffix.isascii() and is_utf8(suffix) else ""))
        try:
            if not is_utf8(self.name):
                raise OSError(f"the temporary folder {printable(self._folder)} has a name OpenCV cannot take")
            os.symlink(target, self.name)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
