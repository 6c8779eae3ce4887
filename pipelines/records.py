"""Append-only record files (JSONL or CSV): locked, crash-safe, resumable without duplicates.

Every record is flushed as soon as it is written, so a killed run loses nothing it had
finished. On resume a record cut short by the kill is removed first and the paths already
present are skipped, so the final file equals an uninterrupted run's (order aside). One run
at a time may write a file (an exclusive ``flock``), and paths are compared by their resolved
folder, so ``dir``, ``./dir/../dir`` and ``/abs/dir`` resume one another.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import stat
import sys
import tempfile
import weakref
from pathlib import Path
from typing import BinaryIO, Iterator

from captioner.errors import OutputError, printable
from captioner.outputs import STANDARD_OUTPUT, descriptor_is_at, make_folder
from captioner.pipelines.record_formats import Chunk, RecordFormat, format_for, format_of_first_line, raw_path


class _Keys:
    """Resume keys: a path's resolved folder plus its name, so any spelling of a folder gives one key."""

    def __init__(self) -> None:
        self._folders: dict[str, str] = {}  # folder as written -> resolved

    def __call__(self, path: str | os.PathLike) -> str:
        folder, name = os.path.split(os.fspath(path))
        if folder not in self._folders:
            self._folders[folder] = os.path.realpath(folder or ".")
        return os.path.join(self._folders[folder], name)


class RecordFile:
    """An output file opened, locked and read: appends records and knows which paths it holds.

    Open it before loading a model, so a bad output fails at once; use it as a context manager.
    The lock is held until :meth:`close` (or the process dies).

    Raises:
        OutputError: the file cannot be opened or written, another run holds it, or a complete
            line in it is not a record (``OUT:LINE: not a captioner record (reason); ...``).
    """

    def __init__(self, path: str | os.PathLike, fmt: RecordFormat | None = None):
        """``path`` ``-`` is standard output: written, never read back (it may be a file the shell
        appends to, or a terminal), so it resumes nothing and is never truncated or rewritten."""
        self._stream = os.fspath(path) == STANDARD_OUTPUT
        self.path = Path("<standard output>" if self._stream else path)
        self.fmt = fmt or format_for(self.path)
        self._keys = _Keys()
        self._latest: dict[str, tuple[int, bool]] = {}  # key -> (ordinal of its latest record, is it an error)
        self._count = 0  # records in the file, superseded ones included
        self.errors = 0  # paths whose latest record is an error
        self._created = False  # this run made the file: removed again if the run fails before any record
        self._header = ""  # written before the first record (standard output: nothing for a run refused later)
        self._file = self._standard_output() if self._stream else self._open_locked()
        _OPEN.add(self)
        try:
            if self._regular:
                for record in self._records(self._file):
                    self._note(record)
                if self.fmt.outdated:
                    self._rewrite()
            if self._stream:  # appended to a file that has records already (``>> all.csv``): no second header
                status = os.fstat(self._file.fileno())
                self._header = "" if stat.S_ISREG(status.st_mode) and status.st_size else self.fmt.header()
            elif not self._regular or self._file.tell() == 0:  # a pipe cannot tell, and starts empty
                self._write(self._file, self.fmt.header())
        except BaseException:
            self.close()
            raise

    def _standard_output(self) -> BinaryIO:
        """A descriptor of its own on standard output (closing it leaves the process's own open)."""
        try:
            return open(os.dup(sys.stdout.fileno()), "wb", buffering=0)  # noqa: SIM115 (closed by close())
        except (AttributeError, ValueError, OSError) as e:  # None (closed: ``>&-``), or no descriptor (a notebook)
            raise OutputError("-: standard output is closed or is not a file descriptor here; "
                              "the records have nowhere to go (give a file name)") from e

    def _release_in_child(self) -> None:
        """In a forked child, point our descriptor at /dev/null: the child must not hold the lock."""
        if self._file.closed:
            return
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, self._file.fileno())
        os.close(devnull)

    def _fail(self, what: str, error: OSError) -> OutputError:
        return OutputError(f"{printable(self.path)}: {what}: {error.strerror or error}")

    def _open_locked(self) -> BinaryIO:
        """Open and lock the file, again if a finishing run renamed a new one over it meanwhile."""
        try:
            make_folder(self.path.parent)
        except OSError as e:
            raise self._fail("cannot create its folder", e) from e
        for _ in range(5):
            try:
                fd, self._created = _create_or_open(self.path)
            except IsADirectoryError as e:
                raise OutputError(f"{printable(self.path)}: is a folder; give a file name") from e
            except OSError as e:
                raise self._fail("cannot open for writing", e) from e
            try:
                lock_file(fd)
                file = open(fd, "r+b", buffering=0)  # noqa: SIM115 (closed by close()); unbuffered: see _write
            except BlockingIOError as e:
                os.close(fd)
                raise OutputError(f"{printable(self.path)}: another captioner run is writing this file") from e
            except OSError as e:
                os.close(fd)
                raise self._fail("cannot use as an output", e) from e
            if descriptor_is_at(fd, self.path):
                return file
            file.close()
        raise OutputError(f"{printable(self.path)}: replaced by another run while opening; try again")

    @property
    def _regular(self) -> bool:
        """A file that can be read back: not standard output, a pipe or a terminal."""
        return not self._stream and stat.S_ISREG(os.fstat(self._file.fileno()).st_mode)

    def _records(self, file: BinaryIO) -> Iterator[dict]:
        """``file``'s records from the start, truncating an incomplete last one; ends positioned at the end."""
        file.seek(0)
        reader = io.BufferedReader(file)  # type: ignore[arg-type]
        ours = False  # a complete record or header read: the file is one this format wrote
        try:
            for chunk in self.fmt.chunks(reader):
                if not chunk.complete:
                    ending = self._unfinished(file, chunk, ours)
                    if ending is not None:
                        yield ending
                    break
                record = self._parsed(chunk)  # a line that is not ours raises here
                ours = ours or bool(chunk.data.strip())  # a record or our header (a blank line proves nothing)
                if record is not None:
                    yield record
        finally:
            reader.detach()  # the file stays open
        file.seek(0, os.SEEK_END)

    def _parsed(self, chunk: Chunk) -> dict | None:
        try:
            return self.fmt.parse_at(chunk, self.path)
        except OutputError:
            other = format_of_first_line(chunk, self.fmt) if chunk.line == 1 else None
            if other is None:
                raise
            raise OutputError(f"{printable(self.path)}: holds captioner's {other} records; give --format {other}, "
                              "or write to a new file") from None

    def _unfinished(self, file: BinaryIO, chunk: Chunk, ours: bool) -> dict | None:
        """The file's unfinished last piece: a whole record missing its newline (kept, the newline
        added), a record cut short by a kill (dropped), or someone else's line (refused).

        Raises:
            OutputError: the piece is not something this format wrote; the file is left as it is.
        """
        record = self.fmt.whole(chunk)
        if record is not None:
            file.seek(0, os.SEEK_END)
            self._write(file, "\n")
            return record
        if not self.fmt.begins_ours(chunk.data, first=not ours):
            if not ours:
                raise OutputError(f"{printable(self.path)}:{chunk.line}: not a file of captioner records; "
                                  "write to a new file")
            raise OutputError(f"{printable(self.path)}:{chunk.line}: not a captioner record, nor one cut short; "
                              "delete that line or write to a new file")
        self._truncate(file, chunk.offset)
        return None

    def _truncate(self, file: BinaryIO, size: int) -> None:
        try:
            file.truncate(size)
        except OSError as e:
            raise self._fail("cannot drop its cut-off last record", e) from e

    def _note(self, record: dict) -> None:
        key = self._keys(raw_path(record))
        failed = bool(record.get("error"))
        previous = self._latest.get(key)
        self.errors += int(failed) - int(previous is not None and previous[1])
        self._latest[key] = (self._count, failed)
        self._count += 1

    def _write(self, file: BinaryIO, text: str) -> None:
        """Write straight to the OS (no buffer: a failed write leaves nothing to fail again at close)."""
        data = memoryview(text.encode("utf-8", "backslashreplace"))
        try:
            while data:
                data = data[file.write(data) :]
        except BrokenPipeError:  # the reader went away (``| head``): the run stops, as a pipeline's writer does
            raise
        except OSError as e:
            raise self._fail("cannot write", e) from e

    def write(self, record: dict) -> None:
        """Append one record and flush it to the OS at once."""
        header, self._header = self._header, ""
        self._write(self._file, header + self.fmt.format(record))
        self._note(record)

    def holds(self, path: str | os.PathLike, *, retry_errors: bool = False) -> bool:
        """True when ``path`` needs no captioning: it has a record (with ``retry_errors``, a caption)."""
        latest = self._latest.get(self._keys(path))
        return latest is not None and not (retry_errors and latest[1])

    def failed(self, path: str | os.PathLike) -> bool:
        """True when the latest record of ``path`` is an error."""
        latest = self._latest.get(self._keys(path))
        return latest is not None and latest[1]

    def __len__(self) -> int:
        """The number of distinct paths held."""
        return len(self._latest)

    @property
    def duplicates(self) -> int:
        """Records superseded by a later record of the same path."""
        return self._count - len(self._latest)

    def latest(self) -> list[dict]:
        """One record per path, the latest, in file order (what a report shows)."""
        if not self._regular:
            return []
        keep = {ordinal for ordinal, _ in self._latest.values()}
        return [record for ordinal, record in enumerate(self._records(self._file)) if ordinal in keep]

    def compact(self) -> None:
        """Rewrite the file atomically with one record per path (the latest), if it holds superseded ones."""
        if self.duplicates and self._regular:
            self._rewrite()

    def _rewrite(self) -> None:
        """Write the latest records into a locked temporary file, then rename it over the output.

        Locking the new file before the rename keeps a run that opens it meanwhile out.
        """
        target = Path(os.path.realpath(self.path))
        keep = {ordinal for ordinal, _ in self._latest.values()}
        state = self._count, self._latest, self.errors
        self._count, self._latest, self.errors = 0, {}, 0
        try:
            fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name[:40]}.", suffix=".tmp")
        except OSError as e:
            self._count, self._latest, self.errors = state
            raise self._fail("cannot rewrite", e) from e
        new = open(fd, "r+b", buffering=0)  # noqa: SIM115 (becomes self._file)
        try:
            lock_file(fd)
            os.fchmod(fd, stat.S_IMODE(os.fstat(self._file.fileno()).st_mode))
            self._write(new, self.fmt.header())
            for ordinal, record in enumerate(self._records(self._file)):
                if ordinal in keep:
                    self._write(new, self.fmt.format(record))
                    self._note(record)
            os.fsync(fd)
            os.replace(name, target)
        except BaseException as e:
            new.close()
            Path(name).unlink(missing_ok=True)
            self._count, self._latest, self.errors = state
            if isinstance(e, OSError):
                raise self._fail("cannot rewrite", e) from e
            raise
        self._file.close()
        self._file = new

    def close(self) -> None:
        _OPEN.discard(self)
        self._file.close()

    def __enter__(self) -> RecordFile:
        return self

    def __exit__(self, error_type, *_) -> None:
        """Close; a file this run created and that holds no record goes again when the run failed
        (a flag refused after the output was opened leaves nothing behind)."""
        if error_type is not None and self._created and self._count == 0 and self._regular:
            Path(os.path.realpath(self.path)).unlink(missing_ok=True)  # through a link: the file it made, not the link
        self.close()


def _create_or_open(path: Path) -> tuple[int, bool]:
    """(descriptor, whether this call created the file): one atomic answer, however others race us.

    A link that points nowhere yet is followed to the file it names: O_EXCL refuses any link.
    """
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
    except FileExistsError:
        if os.path.islink(path) and not os.path.exists(path):
            with contextlib.suppress(FileExistsError):  # made meanwhile: opened below, as any existing file
                return os.open(os.path.realpath(path), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666), False


def lock_file(fd: int) -> None:
    """Take an exclusive lock or raise BlockingIOError at once; released when the file closes (or the run dies)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise BlockingIOError(e.errno, e.strerror) from e
        raise


# Record files open in this process. DataLoader workers are forked children: each inherits the
# locked descriptor, and a flock lasts while any process holds it, so after a kill -9 the
# orphaned workers would keep the output locked for seconds. Children let go of it at once.
_OPEN: weakref.WeakSet[RecordFile] = weakref.WeakSet()


def _release_locks_in_child() -> None:
    for records in list(_OPEN):
        records._release_in_child()


os.register_at_fork(after_in_child=_release_locks_in_child)
