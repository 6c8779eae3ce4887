"""One error family, so callers can catch everything captioner raises with one clause."""


def printable(value: object) -> str:
    """``str(value)`` with file-name bytes that are not UTF-8 shown as ``\\xNN``.

    Python hands such bytes over as lone surrogates (PEP 383); they cannot be printed to a
    strict UTF-8 stream nor written into UTF-8 JSON or CSV, so every message and record
    that carries a path goes through here.
    """
    text = str(value)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that did not come from a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_utf8(text: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (lone surrogates, PEP 383).

    UTF-8 files (JSON manifests) cannot store such a name, and OpenCV crashes on one.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shortened(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters and marked ``...``: a message never echoes a whole huge value."""
    return text if len(text) <= limit else text[:limit] + "..."


def count_of(n: int, noun: str) -> str:
    """``1 image``, ``3 images``: a count in a message, never "1 images"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
_CONTROLS.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def one_line(value: object) -> str:
    """:func:`printable` with control characters escaped, for a message printed as one line.

    A file name may hold a newline, a carriage return or a terminal escape sequence; printed
    raw, it would split a ``skipped PATH: reason`` line in two or drive the terminal.
    """
    return printable(value).translate(_CONTROLS)


def reason(error: BaseException) -> str:
    """A one-line reason: the OS's words for an OSError, else the first line of the message (else its type)."""
    lines = str(error).splitlines()
    return getattr(error, "strerror", None) or (lines[0] if lines else type(error).__name__)


class CaptionerError(Exception):
    """Base class of every error captioner raises on purpose."""


class ImageReadError(CaptionerError):
    """An image file could not be opened or decoded; the message names the file and reason."""


class ModelLoadError(CaptionerError):
    """A model, its weights or its vocabulary could not be built or loaded."""


class DataError(CaptionerError):
    """A manifest, caption file or dataset is malformed."""


class VideoReadError(CaptionerError):
    """A video could not be opened or decoded."""


class VideoWriteError(CaptionerError):
    """A video file could not be written (e.g. the subtitled copy of ``--burn``)."""


class OptionError(CaptionerError, ValueError):
    """An option value is out of range or of the wrong type; the CLI exits 2 on it."""


class OutputError(CaptionerError):
    """An output cannot be written, or an existing output cannot be resumed."""


class CheckpointError(CaptionerError):
    """A training checkpoint cannot be read back (truncated, foreign or tampered with)."""
