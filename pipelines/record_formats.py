"""The record schema and its file formats (JSONL, CSV): one record per captioned file.

A record is the best caption of a file with its confidence, or the reason it was skipped.
Formats are registered by name with their extension; each writes a record as text and
reads a file back in chunks that :class:`captioner.pipelines.records.RecordFile` can cut
at the last complete record after a crash.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator, NamedTuple

from captioner.errors import OptionError, OutputError, count_of, printable
from captioner.finite import is_finite_number
from captioner.tags import TAG_SEPARATOR

if TYPE_CHECKING:
    from captioner.api import PathResult
    from captioner.decoding import Caption

# The record schema: JSONL keys and CSV columns, in this order.
RECORD_FIELDS = (
    "path",  # the file, as printable UTF-8 text (bytes that are not UTF-8 shown as \xNN)
    "caption",  # the best caption (absent when the file could not be read)
    "score",  # the model's mean log-probability per token, <end> included (a number <= 0)
    "min_prob",  # the model's probability of its least likely token
    "error",  # "PATH: reason" when the file could not be read
    "path_hex",  # the path's raw bytes in hex, only when they are not UTF-8 (so resume is exact)
    "tags",  # the encoder's likeliest ImageNet labels: [{"label", "p"}] (in CSV one cell, "label:p; label:p")
    "confidence",  # estimated probability the caption is acceptable (models with a calibration.json)
    "unsure",  # true when confidence was below the run's --min-confidence (absent otherwise)
    "model_caption",  # the model's own caption when --fallback replaced it in "caption" (absent otherwise)
)
NUMERIC_FIELDS = frozenset({"score", "min_prob", "confidence"})
# The columns written by versions before confidence; such files are read as they are and upgraded.
UNCALIBRATED_CSV_FIELDS = RECORD_FIELDS[:7]
FALLBACKS = ("tags",)  # what may stand in for an unsure caption (--fallback)
# The columns written by versions before tags; such files are read as they are and upgraded.
UNTAGGED_CSV_FIELDS = RECORD_FIELDS[:6]
# The columns written by versions before path_hex; such files are read without CSV escapes and upgraded.
LEGACY_CSV_FIELDS = RECORD_FIELDS[:5]
# A text cell starting with one of these is a formula to a spreadsheet; "'" is escaped too so any text round-trips.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def earlier_failures(count: int) -> str:
    """The end of a batch summary when an output still holds errors from earlier runs (else "")."""
    if not count:
        return ""
    return f"; {count_of(count, 'file')} failed in an earlier run (use --retry-errors to try again)"


def check_fallback(fallback: str | None, min_confidence: float | None) -> None:
    """A fallback is one we know, and has unsure captions to replace.

    Raises:
        OptionError: naming the value, or the missing ``min_confidence``.
    """
    if fallback is not None and fallback not in FALLBACKS:
        raise OptionError(f"fallback={fallback!r} must be one of {', '.join(FALLBACKS)}")
    if fallback and min_confidence is None:
        raise OptionError("fallback replaces unsure captions: give min_confidence too")


def result_record(result: PathResult, *, min_confidence: float | None = None, fallback: str | None = None,
                  n_best: bool = False) -> dict:
    """The record of one captioned file: its best caption with confidence, or its error.

    With ``min_confidence``, a caption whose confidence is lower is kept and marked ``"unsure": true``;
    with ``fallback="tags"`` as well, an unsure caption gives way to a description from the tags
    ("a photo of an espresso") and moves to ``"model_caption"``. With ``n_best``, ``"n_best"``
    lists every caption searched, best first, the model's own (never a fallback), each with its
    score, confidence and, under ``min_confidence``, its ``"unsure"``.
    """
    record: dict = {"path": printable(result.path)}
    if result.captions is None:
        record["error"] = printable(result.error)
    else:
        best = result.captions[0]
        record.update(caption=best.text, score=round(best.score, 6), min_prob=round(best.min_prob, 6),
                      tags=[{"label": tag.label, "p": tag.p} for tag in result.tags])
        if best.confidence is not None:
            record["confidence"] = best.confidence
            if min_confidence is not None and best.confidence < min_confidence:
                record["unsure"] = True
                from captioner.tags import tag_description  # here: the CLI reads this module before torch loads

                description = tag_description(result.tags) if fallback == "tags" else None
                if description:
                    record.update(caption=description, model_caption=best.text)
        if n_best:
            record["n_best"] = [_alternative(caption, min_confidence) for caption in result.captions]
    raw = os.fsencode(result.path)
    if printable(result.path).encode("utf-8") != raw:
        record["path_hex"] = raw.hex()
    return record


def _alternative(caption: Caption, min_confidence: float | None) -> dict:
    entry: dict = {"caption": caption.text, "score": round(caption.score, 6)}
    if caption.confidence is not None:  # as in the record itself: no key where the model gives no confidence
        entry["confidence"] = caption.confidence
        if min_confidence is not None and caption.confidence < min_confidence:
            entry["unsure"] = True
    return entry


def raw_path(record: dict) -> str:
    """The file a record names, exact even for names that are not UTF-8 (from ``path_hex`` when present)."""
    if record.get("path_hex"):
        return os.fsdecode(bytes.fromhex(record["path_hex"]))
    return record["path"]


class BadRecord(ValueError):
    """A complete line of an existing output that is not a record (the reason is the message)."""


class BadHeader(BadRecord):
    """The first line of an existing CSV output is not our header: it is some other file."""


def checked_record(record: object) -> dict:
    """``record`` if it has the types of a captioner record, else :class:`BadRecord` saying what is wrong."""
    if not isinstance(record, dict):
        raise BadRecord(f"a JSON {type(record).__name__}, not an object")
    if not isinstance(record.get("path"), str) or not record["path"]:
        raise BadRecord('no "path"')
    if not all(isinstance(record.get(name, ""), str) for name in ("caption", "error", "model_caption")):
        raise BadRecord('"caption", "model_caption" and "error" must be text')
    if "caption" not in record and "error" not in record:
        raise BadRecord('neither "caption" nor "error"')
    for name in NUMERIC_FIELDS & record.keys():
        if not is_finite_number(record[name]):
            raise BadRecord(f'"{name}" is not a number')
    if not _are_tags(record.get("tags", [])):
        raise BadRecord('"tags" must be a list of {"label": text, "p": number}')
    if not isinstance(record.get("unsure", False), bool):
        raise BadRecord('"unsure" must be true or false')
    try:
        raw_path(record)
    except (TypeError, ValueError) as e:
        raise BadRecord('"path_hex" is not hex') from e
    return record


def _are_tags(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(tag, dict) and isinstance(tag.get("label"), str) and is_finite_number(tag.get("p")) for tag in value)


class Chunk(NamedTuple):
    """The bytes of one record (or header) as found in a file."""

    line: int  # 1-based line where it starts
    offset: int  # byte offset where it starts
    data: bytes
    complete: bool  # False for a record cut short by a kill: it is dropped


def _lines(file: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    offset = 0
    for number, line in enumerate(file, start=1):
        yield number, offset, line
        offset += len(line)


class RecordFormat:
    """A record file format: ``chunks`` splits a file into records, ``parse`` reads one, ``format`` writes one."""

    extension = ""  # the file name extension that selects it
    outdated = False  # True after reading a file an older version wrote in a layout that must be upgraded

    def chunks(self, file: BinaryIO) -> Iterator[Chunk]:
        raise NotImplementedError

    def parse(self, chunk: Chunk) -> dict | None:
        """The record in ``chunk`` (None for a blank line or a header); raises :class:`BadRecord`."""
        raise NotImplementedError

    def header(self) -> str:
        return ""

    def format(self, record: dict) -> str:
        raise NotImplementedError

    def whole(self, chunk: Chunk) -> dict | None:
        """The record in an unfinished last chunk that is whole but for its final newline (None: cut short)."""
        return None

    def begins_ours(self, data: bytes, *, first: bool) -> bool:
        """Whether ``data``, a file's unfinished last piece, can be something this format wrote that a
        kill cut short: the start of a file (``first``: nothing of ours before it), else of a record."""
        return not data.strip()

    def parse_at(self, chunk: Chunk, path: str | os.PathLike) -> dict | None:
        """:meth:`parse`, with a bad line reported as ``OutputError`` naming the file, line and a way on."""
        try:
            return self.parse(chunk)
        except BadHeader as e:
            raise OutputError(f"{printable(path)}:{chunk.line}: {e}; write to a new file") from e
        except BadRecord as e:
            raise OutputError(
                f"{printable(path)}:{chunk.line}: not a captioner record ({e}); delete that line or write to a new file"
            ) from e

    def read(self, path: str | os.PathLike) -> Iterator[dict]:
        """Every complete record of ``path``, read only (no lock; a cut-off last record is skipped).

        Raises:
            OutputError: ``path`` cannot be read, or a complete line in it is not a record.
        """
        try:
            with open(path, "rb") as file:
                for chunk in self.chunks(file):
                    record = self.parse_at(chunk, path) if chunk.complete else self.whole(chunk)
                    if record is not None:
                        yield record
        except OSError as e:
            raise OutputError(f"{printable(path)}: cannot read: {e.strerror or e}") from e


class JsonlRecords(RecordFormat):
    """One JSON object per line."""

    extension = ".jsonl"

    def chunks(self, file: BinaryIO) -> Iterator[Chunk]:
        for number, offset, line in _lines(file):
            yield Chunk(number, offset, line, line.endswith(b"\n"))

    def parse(self, chunk: Chunk) -> dict | None:
        text = _utf8(chunk.data)
        if chunk.line == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark (a file saved by Notepad) is not a record
        if not text.strip():
            return None
        try:
            record = json.loads(text.rstrip("\r\n"))
        except (ValueError, RecursionError) as e:
            raise BadRecord(f"bad JSON: {e}") from e
        return checked_record(record)

    def format(self, record: dict) -> str:
        return json.dumps(record, ensure_ascii=False) + "\n"

    def whole(self, chunk: Chunk) -> dict | None:
        # a line cut by a kill is never valid JSON: it loses at least its closing brace
        try:
            return self.parse(chunk)
        except BadRecord:
            return None

    def begins_ours(self, data: bytes, *, first: bool) -> bool:
        data = data.removeprefix(b"\xef\xbb\xbf") if first else data
        if not data.strip():
            return True
        start = b'{"path": '  # every record starts with its path; a kill may cut even that short
        if not (data.startswith(start) or start.startswith(data)):
            return False
        try:  # a line cut by a kill is never valid JSON: one that is, yet is not a record, is someone else's
            json.loads(data)
        except (ValueError, RecursionError):
            return True
        return False


class CsvRecords(RecordFormat):
    """Comma-separated with a header row; every text cell quoted and formula-safe, numbers bare.

    A record may span lines (a name holding a newline), so a record ends at a newline outside
    quotes: an even count of ``"`` so far. A file cut inside a quoted name thus ends with an
    incomplete record, which resume drops.
    """

    extension = ".csv"

    def __init__(self) -> None:
        self._columns: tuple[str, ...] | None = None  # the header of the file being read

    @property
    def outdated(self) -> bool:
        """True when the file read was written by an older version (rewrite it before appending)."""
        return self._columns in (LEGACY_CSV_FIELDS, UNTAGGED_CSV_FIELDS, UNCALIBRATED_CSV_FIELDS)

    @property
    def _unescaped(self) -> bool:
        """Written before text cells were escaped (no quotes around "\r", no "'" before formulas)."""
        return self._columns == LEGACY_CSV_FIELDS

    def chunks(self, file: BinaryIO) -> Iterator[Chunk]:
        """Records from the file's start (the first is its header)."""
        self._columns = None
        first: tuple[int, int] | None = None  # (line, offset) where the record being gathered starts
        parts: list[bytes] = []
        quotes = 0
        for number, offset, line in _lines(file):
            first = first or (number, offset)
            parts.append(line)
            quotes += line.count(b'"')
            if quotes % 2 == 0 and line.endswith(b"\n"):
                yield Chunk(*first, b"".join(parts), True)
                first, parts = None, []
        if first is not None:
            yield Chunk(*first, b"".join(parts), False)

    def parse(self, chunk: Chunk) -> dict | None:
        text = _utf8(chunk.data)
        if self._columns is None:
            self._columns = self._header(text.removeprefix("\ufeff"))
            return None
        if not text.strip():
            return None
        cells = self._cells(text)
        if len(cells) != len(self._columns):
            raise BadRecord(f"{len(cells)} cells, expected {len(self._columns)}")
        return checked_record(self._record(dict(zip(self._columns, cells, strict=True))))

    def _header(self, text: str) -> tuple[str, ...]:
        columns = tuple(next(csv.reader([text]), []))
        if columns not in (RECORD_FIELDS, UNCALIBRATED_CSV_FIELDS, UNTAGGED_CSV_FIELDS, LEGACY_CSV_FIELDS):
            raise BadHeader(f"not a captioner CSV file: its first line is not {','.join(RECORD_FIELDS)}")
        return columns

    def _cells(self, text: str) -> list[str]:
        if not self._unescaped:
            rows = list(csv.reader(io.StringIO(text, newline="")))
            return rows[0] if len(rows) == 1 else []
        # Older versions wrote a "\r" in a name unquoted: hide it from the reader, which ends rows there.
        rows = list(csv.reader(io.StringIO(text.replace("\r", "\ue000"), newline="")))
        return [cell.replace("\ue000", "\r") for cell in rows[0]] if len(rows) == 1 else []

    def _record(self, cells: dict[str, str]) -> dict:
        record: dict = {}
        for name, cell in cells.items():
            if name in NUMERIC_FIELDS:
                if cell:
                    record[name] = _number(name, cell)
            elif name == "tags":
                if cell:  # an empty cell: no tag, or a record from before tags
                    record[name] = _tags(self._text(cell))
            elif name == "unsure":
                if cell.lower() not in ("", "true", "false"):  # any case: a spreadsheet saves TRUE
                    raise BadRecord('"unsure" cell must be empty, true or false')
                if cell.lower() == "true":
                    record[name] = True
            elif cell or (name == "caption" and not cells.get("error")):
                record[name] = self._text(cell)
        return record

    def _text(self, cell: str) -> str:
        """A text cell as written, less the quote that kept it from reading as a formula (see ``_cell``)."""
        return cell[1:] if cell.startswith("'") and not self._unescaped else cell

    def header(self) -> str:
        return self._row(list(RECORD_FIELDS))

    def whole(self, chunk: Chunk) -> dict | None:
        # Our rows are quoted text cells and bare numbers, ending in a quoted cell; a row a kill cut
        # short has an odd count of quotes (cut inside a cell), too few cells, or our cells and no
        # closing quote (cut after a comma). Any other row that parses lacks only its newline, as an
        # editor or a spreadsheet saves it (a spreadsheet leaves empty and plain text cells bare).
        # Rows of the oldest layout were quoted only where needed: theirs is dropped, as it always was.
        data = chunk.data.rstrip(b"\r")
        ours_cut = _our_cells(data) and not data.endswith(b'"')
        if chunk.line == 1 or self._unescaped or ours_cut or data.count(b'"') % 2:
            return None
        try:
            return self.parse(chunk)
        except BadRecord:
            return None

    def begins_ours(self, data: bytes, *, first: bool) -> bool:
        if not data.strip():
            return True
        if first:  # cut inside the header
            return self.header().encode("utf-8").startswith(data.removeprefix(b"\xef\xbb\xbf"))
        return self._unescaped or _our_cells(data)  # a row of ours, cut short

    def format(self, record: dict) -> str:
        return self._row([self._cell(name, record.get(name)) for name in RECORD_FIELDS])

    @staticmethod
    def _cell(name: str, value: object) -> object:
        if value is None:
            return ""
        if name == "unsure":
            return "true" if value is True else ""
        if name in NUMERIC_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if name == "tags":
            text = TAG_SEPARATOR.join(f"{tag['label']}:{tag['p']}" for tag in value)  # type: ignore[union-attr]
        else:
            text = str(value)
        return "'" + text if text.startswith(FORMULA_STARTS) else text

    @staticmethod
    def _row(cells: list) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n").writerow(cells)
        return buffer.getvalue()


_OUR_CELL = re.compile(rb'"(?:[^"]|"")*"?|-?[0-9][0-9.e+-]*')  # a quoted text (maybe cut short) or a bare number


def _our_cells(row: bytes) -> bool:
    """Whether every cell of ``row`` is one :class:`CsvRecords` writes: a quoted text or a bare number
    (a spreadsheet leaves empty and plain text cells bare). The last cell may be cut short, or empty."""
    cells, start, quoted = [], 0, False
    for i, byte in enumerate(row):
        if byte == 0x22:  # '"': doubled ones inside a cell toggle twice
            quoted = not quoted
        elif byte == 0x2C and not quoted:  # ','
            cells.append(row[start:i])
            start = i + 1
    return bool(row.startswith(b'"')) and all(_OUR_CELL.fullmatch(cell) for cell in cells)


def _utf8(data: bytes) -> str:
    if b"\0" in data:
        raise BadRecord("NUL bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("not UTF-8 text") from e


def _tags(cell: str) -> list[dict]:
    """A CSV tags cell ("label:p; label:p") -> [{"label", "p"}]."""
    tags = []
    for part in filter(None, cell.split(TAG_SEPARATOR)):
        label, _, p = part.rpartition(":")
        if not label:
            raise BadRecord(f'"tags" cell part {part!r} is not label:probability')
        tags.append({"label": label, "p": _number("tags", p)})
    return tags


def _number(name: str, cell: str) -> float:
    try:
        return float(cell)
    except ValueError as e:
        raise BadRecord(f'"{name}" is not a number') from e


# The format registry: names (the CLI's --format choices) -> format classes, each with its extension.
RECORD_FORMATS: dict[str, type[RecordFormat]] = {"jsonl": JsonlRecords, "csv": CsvRecords}


def format_of_first_line(chunk: Chunk, besides: RecordFormat) -> str | None:
    """The name of another record format whose first line ``chunk`` is (our CSV header, a JSONL
    record), so a file of ours written in one format and opened in the other is named as such."""
    for name, kind in RECORD_FORMATS.items():
        if isinstance(besides, kind) or not chunk.data.strip():
            continue
        try:
            kind().parse(chunk)
        except BadRecord:
            continue
        return name
    return None


def format_for(path: str | os.PathLike, name: str | None = None) -> RecordFormat:
    """The record format named, else the one whose extension ``path`` has (JSONL by default).

    Raises:
        OptionError: ``name`` is not a registered format, or ``path``'s extension names another one.
    """
    suffix = Path(path).suffix.lower()
    if name is not None:
        if name not in RECORD_FORMATS:
            raise OptionError(f"format: {name!r} is not one of {', '.join(RECORD_FORMATS)}")
        named = next((other for other, fmt in RECORD_FORMATS.items() if fmt.extension == suffix), name)
        if named != name:
            raise OptionError(f"format {name} would write {name} records into {printable(path)}, which reads as "
                              f"{named}: name the file {RECORD_FORMATS[name].extension}, or leave the format out")
        return RECORD_FORMATS[name]()
    for fmt in RECORD_FORMATS.values():
        if fmt.extension == suffix:
            return fmt()
    return JsonlRecords()
