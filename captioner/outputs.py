"""Where outputs go: checked before any work is done, and written whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, TextIO

from captioner.errors import OutputError, printable

# The output name that means standard output (``captioner video clip.mp4 -o - | player``, ``batch -o -``).
STANDARD_OUTPUT = "-"


def _reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


def _target(path: Path) -> Path:
    """Where writing ``path`` lands: a symbolic link is written through (the link stays a link)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """``a`` and ``b`` name one file: the same inode when both exist, else the same absolute path.

    An output must never be written over an input (or over another output of the same run).
    """
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.abspath(a) == os.path.abspath(b)


def file_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """(device, inode) of the file ``path`` leads to, links followed; None where there is none.

    Two paths with one identity are one file, whether by ``..``, a symbolic link or a hard link.
    """
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def descriptor_is_at(fd: int, path: str | os.PathLike) -> bool:
    """The file open as ``fd`` is still the one at ``path``: a lock taken on it guards that path.

    Another process may have removed or replaced the file between our open and our lock.
    """
    try:
        here = os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == file_identity(path)


def make_folder(folder: Path) -> None:
    """``folder`` and its missing parents, created; where part of the path is a file, the error names it
    (``mkdir`` says only "File exists", for ``-o notes.txt/out.srt``).

    Raises:
        OSError: as ``mkdir``; NotADirectoryError naming the part that is a file.
    """
    for part in (folder, *folder.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                kind = "a broken link" if not part.exists() else "a file" if part.is_file() else "something else"
                raise NotADirectoryError(20, f"{printable(part)} is {kind}, not a folder")
            break
    folder.mkdir(parents=True, exist_ok=True)


def check_writable_file(path: str | os.PathLike) -> Path:
    """Fail now, before a model loads, if ``path`` could not be written later.

    Creates the missing folders and a throwaway file beside ``path`` (permissions checks
    alone lie for root, read-only mounts and immutable files). An existing ``path`` is
    left as it is.

    Raises:
        OutputError: ``path`` is a folder, a device, pipe or socket, or its folder cannot be
            created or written.
    """
    given = Path(path)
    if given.exists() and not given.is_file() and not given.is_dir():  # named as given: /dev/stdout, not /proc/...
        raise OutputError(f"{printable(given)}: not a regular file (a device, pipe or socket); give a file name")
    path = _target(given)
    if path.is_dir():
        raise OutputError(f"{printable(path)}: is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise OutputError(f"{printable(path)}: not a regular file (a device, pipe or socket); give a file name")
    try:
        make_folder(path.parent)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".captioner-check-"):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise OutputError(f"{printable(path)}: cannot write here: {_reason(e)}") from e
    return path


def check_writable_folder(folder: str | os.PathLike) -> Path:
    """Fail now if files cannot be created in ``folder`` (created here when missing).

    Raises:
        OutputError: it is a file, or it cannot be created or written.
    """
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(20, "is a file, not a folder")
        make_folder(folder)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".captioner-check-"):
            pass
    except OSError as e:
        raise OutputError(f"{printable(folder)}: cannot write here: {_reason(e)}") from e
    return folder


def new_file_mode() -> int:
    """The mode a plainly created file gets (0666 less the umask); temporary files start private."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomically(path: str | os.PathLike, write: Callable[[TextIO], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, then rename it over ``path``.

    A reader never sees half a file, and a failed write leaves the old one in place.

    Raises:
        OutputError: the file cannot be written (full disk, no permission, a folder there).
    """
    path = _target(Path(path))
    tmp: Path | None = None
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory")
        if path.exists() and not path.is_file():
            raise OSError(22, "not a regular file (a device, pipe or socket)")
        make_folder(path.parent)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:40]}.", suffix=".tmp")
        tmp = Path(name)
        os.fchmod(fd, new_file_mode())  # mkstemp makes 0600; a written file gets the usual mode
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as file:
            write(file)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise OutputError(f"{printable(path)}: cannot write: {_reason(e)}") from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
