"""Append-only record files (JSONL or CSV) that survive a crash and resume without duplicates.

Every record is flushed as soon as it is written, so a killed run loses nothing it had
finished. On resume the paths already present are skipped; a last line cut short by the
kill is removed first, so the final file equals an uninterrupted run's (order aside).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import IO, Iterator

CSV_FIELDS = ("path", "caption", "score", "min_prob", "error")


def drop_partial_last_line(path: Path) -> None:
    """Truncate a file that does not end with a newline back to its last complete line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)


class JsonlRecords:
    """One JSON object per line."""

    extension = ".jsonl"

    def read(self, path: Path) -> Iterator[dict]:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def header(self) -> str:
        return ""

    def format(self, record: dict) -> str:
        return json.dumps(record, ensure_ascii=False) + "\n"


class CsvRecords:
    """Comma-separated with a header row; absent fields are empty cells."""

    extension = ".csv"

    def read(self, path: Path) -> Iterator[dict]:
        with path.open(encoding="utf-8", newline="") as f:
            yield from csv.DictReader(f)

    def header(self) -> str:
        return self._row({field: field for field in CSV_FIELDS})

    def format(self, record: dict) -> str:
        return self._row(record)

    def _row(self, record: dict) -> str:
        buffer = io.StringIO()
        csv.DictWriter(buffer, CSV_FIELDS, extrasaction="ignore", lineterminator="\n").writerow(record)
        return buffer.getvalue()


RECORD_FORMATS = {"jsonl": JsonlRecords, "csv": CsvRecords}


def format_for(path: Path, name: str | None = None):
    """The record format named, or the one matching the file extension (JSONL by default)."""
    if name:
        return RECORD_FORMATS[name]()
    return CsvRecords() if path.suffix.lower() == ".csv" else JsonlRecords()


class RecordFile:
    """An output file opened for appending, knowing which paths it already holds."""

    def __init__(self, path: str | os.PathLike, fmt=None):
        self.path = Path(path)
        self.fmt = fmt or format_for(self.path)
        drop_partial_last_line(self.path)
        self.done: set[str] = set()
        if self.path.exists() and self.path.stat().st_size:
            self.done = {record["path"] for record in self.fmt.read(self.path)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._file: IO[str] = self.path.open("a", encoding="utf-8", newline="")
        if fresh:
            self._write(self.fmt.header())

    def _write(self, text: str) -> None:
        if text:
            self._file.write(text)
            self._file.flush()

    def write(self, record: dict) -> None:
        """Append one record and flush it to the OS at once."""
        self._write(self.fmt.format(record))
        self.done.add(record["path"])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RecordFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
