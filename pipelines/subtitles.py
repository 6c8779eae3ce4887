"""Subtitle writers: SRT, WebVTT and JSONL, chosen by format name (the cue type, Segment, is in cues.py).

SRT and WebVTT share one writer class and differ only in attributes (header, decimal
marker, escaping), so a fix to one is a fix to both.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable, TextIO

from captioner.errors import OptionError, printable
from captioner.outputs import STANDARD_OUTPUT, write_atomically
from captioner.pipelines.cues import Segment


def format_timestamp(seconds: float, *, decimal_marker: str = ".") -> str:
    """``HH:MM:SS.mmm`` with hours always present (both SRT and WebVTT accept that form)."""
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"timestamp {seconds!r} must be finite and >= 0")
    milliseconds = round(seconds * 1000)
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    secs, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{milliseconds:03d}"


def _escape_vtt(text: str) -> str:
    # WebVTT cue text is HTML-like: & and < start entities and tags; "-->" may not appear.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class CueWriter:
    """Numbered cues separated by blank lines; subclasses set the attributes below."""

    extension = ""
    header = ""  # written once before the first cue
    decimal_marker = "."  # between seconds and milliseconds
    escape = staticmethod(lambda text: text)  # makes caption text safe for the format

    def write(self, segments: Iterable[Segment], file: TextIO) -> None:
        file.write(self.header)
        for number, segment in enumerate(segments, start=1):
            start = format_timestamp(segment.start, decimal_marker=self.decimal_marker)
            end = format_timestamp(segment.end, decimal_marker=self.decimal_marker)
            text = self.escape(" ".join(segment.text.split()))  # one line: a blank line would end the cue
            file.write(f"{number}\n{start} --> {end}\n{text}\n\n")


class WriteSRT(CueWriter):
    extension = "srt"
    decimal_marker = ","


class WriteVTT(CueWriter):
    extension = "vtt"
    header = "WEBVTT\n\n"
    escape = staticmethod(_escape_vtt)


class WriteJSONL:
    """One JSON object per cue: start, end (seconds), text, score, confidence; for scripts, not players."""

    extension = "jsonl"

    def write(self, segments: Iterable[Segment], file: TextIO) -> None:
        for s in segments:
            file.write(json.dumps(cue_record(s), ensure_ascii=False) + "\n")


def cue_record(segment: Segment) -> dict:
    """One cue as JSON: start and end in seconds (ms precision), text, score, and confidence where the model has it."""
    record = {"start": round(segment.start, 3), "end": round(segment.end, 3), "text": segment.text,
              "score": round(segment.score, 6)}
    if segment.confidence is not None:
        record["confidence"] = round(segment.confidence, 4)
    return record


WRITERS = {"srt": WriteSRT, "vtt": WriteVTT, "jsonl": WriteJSONL}


def writer_for(path: str | os.PathLike | None = None, name: str | None = None) -> CueWriter | WriteJSONL:
    """The writer named, else the one matching ``path``'s extension, else SRT.

    Raises:
        OptionError: the name or extension is not a subtitle format we write (a ValueError too),
            or the name contradicts an extension that names another one (SRT text in ``x.vtt``).
    """
    extension = Path(path).suffix.lower().lstrip(".") if path is not None else ""
    if name is not None and extension in WRITERS and extension != name:
        raise OptionError(f"--format {name} would write {name} into {printable(path)}, which players read as "
                          f"{extension}: name the file .{name}, or leave --format out")
    if name is None and path is not None:
        name = extension
    name = name or "srt"
    if name not in WRITERS:
        raise OptionError(f"subtitle format {name!r} must be one of {sorted(WRITERS)} (or use --format)")
    return WRITERS[name]()


def write_subtitles(segments: Iterable[Segment], path: str | os.PathLike, writer: CueWriter | WriteJSONL) -> None:
    """Write ``segments`` to ``path`` as UTF-8 with LF line ends, creating its folder (``-``: standard output).

    The file is replaced whole or not at all, so a player never reads half a file and a
    failed run leaves the previous subtitles in place.

    Raises:
        OutputError: ``path`` cannot be written (a folder, no permission, a full disk).
    """
    segments = list(segments)
    if os.fspath(path) == STANDARD_OUTPUT:
        writer.write(segments, sys.stdout)
        sys.stdout.flush()
        return
    write_atomically(path, lambda file: writer.write(segments, file))
