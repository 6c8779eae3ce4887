"""Names for libraries that take a path only as UTF-8 text (OpenCV, safetensors).

Python hands a file name's bytes that are not UTF-8 over as lone surrogates (PEP 383). Such
a library crashes on one (OpenCV: a segfault) or refuses it (safetensors: "not valid
UTF-8"), so a folder a user named in another encoding could not hold a video or a model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from captioner.errors import is_utf8, printable


class Utf8Name:
    """A UTF-8 ``str`` for ``path``: its absolute path, or else a link to it with an ASCII name.

    The link lives in a private temporary folder, removed by :meth:`close` (or on leaving a
    ``with`` block). It may point at a file not yet written; a library that writes by
    renaming a temporary file over the name replaces the link instead (safetensors does).

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
                raise OSError(f"the temporary folder {printable(self._folder)} has a name that is not UTF-8")
            os.symlink(target, self.name)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> str:
        return self.name

    def __exit__(self, *_) -> None:
        self.close()
