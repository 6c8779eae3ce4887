"""Command-line flags generated from options dataclasses, so each option is listed in one place.

A field ``beam_size: int`` with ``metadata={"help": ...}`` becomes ``--beam-size N``; a
``bool`` field becomes ``--name/--no-name``; ``metadata["choices"]`` limits the values and
``metadata["aliases"]`` adds shorter spellings (``--out`` for ``out_dir``).
Every flag defaults to "not given" (None), so the object's own defaults (or a model's
tuned ones) apply unless the user says otherwise. A number out of its field's range is a
usage error that names the flag (exit 2); rules across fields are checked by the dataclass
itself when it is built, and exit 2 the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import types
import typing
from typing import Any, Iterable, TypeVar

from captioner.options import Bounds

T = TypeVar("T")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _value_type(annotation: Any) -> type:
    """``int | None`` -> int; plain types as they are."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner
    return annotation


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, resolved once per class: it evaluates every annotation's
    text anew, which was a quarter of the server's event-loop time per request."""
    return typing.get_type_hints(cls)


def exposed_fields(cls: type, exclude: tuple[str, ...] = ()) -> list[dataclasses.Field]:
    """The fields of ``cls`` that carry a help text (the user-facing ones), minus ``exclude``."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata and f.name not in exclude]


def add_dataclass_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    exclude: tuple[str, ...] = (),
    show_defaults: bool = True,
) -> None:
    """Add one flag per exposed field of the options dataclass ``cls``.

    ``show_defaults=False`` where the defaults shown would mislead (a model's tuned
    decoding defaults replace the dataclass's).
    """
    hints = _type_hints(cls)
    for field in exposed_fields(cls, exclude):
        kind = _field_kind(field, hints)
        default = field.default if field.default is not dataclasses.MISSING else None
        bounds = field.metadata.get("bounds")
        help_text = field.metadata["help"] + (f"; in {bounds}" if bounds is not None else "")
        if show_defaults and default is not None:
            help_text += f" (default: {default})"
        names = (flag_name(field.name), *field.metadata.get("aliases", ()))
        if kind is bool:
            parser.add_argument(*names, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
            continue
        parser.add_argument(*names, dest=field.name, type=_number_in(kind, bounds) if kind in (int, float) else kind,
                            default=None, choices=field.metadata.get("choices"),
                            metavar=field.name.upper() if "choices" not in field.metadata else None, help=help_text)


def _number_in(kind: type, bounds: Any):
    """An argparse type for a whole number or a finite number inside ``bounds`` (None: any)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {KIND_NAMES[kind]}") from None
        if (kind is float and not math.isfinite(value)) or (bounds is not None and value not in bounds):
            raise argparse.ArgumentTypeError(f"{text} is not in {bounds}" if bounds else f"{text} is not finite")
        return value

    return parse


def dataclass_from_args(args: argparse.Namespace, defaults: T, *, exclude: tuple[str, ...] = ()) -> T:
    """``defaults`` with every flag the user gave applied (raises the dataclass's own OptionError)."""
    given = {f.name: getattr(args, f.name) for f in exposed_fields(type(defaults), exclude)
             if getattr(args, f.name, None) is not None}
    return _with_given(defaults, given)


def _with_given(defaults: T, given: dict[str, Any]) -> T:
    """``defaults`` with ``given`` applied: by the class's own ``with_given(given)`` where it has one
    (rules on what a caller names that the values alone cannot show), else field by field."""
    if hasattr(defaults, "with_given"):
        return defaults.with_given(given)
    return dataclasses.replace(defaults, **given)


def bounded_int(low: int, high: int):
    """An argparse type for whole numbers in [low, high]; anything else is a usage error (exit 2)."""
    return _number_in(int, Bounds(low, high))


def bounded_float(low: float, high: float, *, open_low: bool = False):
    """An argparse type for finite numbers in [low, high] (``open_low``: (low, high]); else a usage error."""
    return _number_in(float, Bounds(low, high, open_low=open_low))


def probability(text: str) -> float:
    """An argparse type for a number in [0, 1] (a confidence threshold); anything else is a usage error."""
    return _number_in(float, Bounds(0, 1))(text)


def options_from_text(defaults: T, given: dict[str, str], *, exclude: tuple[str, ...] = (),
                      others: Iterable[str] = ()) -> T:
    """``defaults`` with text values (an HTTP query or form) applied, each converted by its field's type.

    The HTTP counterpart of :func:`dataclass_from_args`: the same fields, the same checks.
    ``others``: names the caller reads itself, listed with the fields when a name is unknown.

    Raises:
        OptionError: an unknown name, a value that is not of the field's type, or one out of range.
    """
    from captioner.errors import OptionError, shortened

    cls = type(defaults)
    hints = _type_hints(cls)
    fields = {f.name: f for f in exposed_fields(cls, exclude)}
    values: dict[str, Any] = {}
    for name, text in given.items():
        if name not in fields:
            raise OptionError(f"unknown option {name!r}; options are {', '.join(sorted({*fields, *others}))}")
        kind = _field_kind(fields[name], hints)
        try:
            values[name] = _parse_text(kind, text)
        except ValueError:
            raise OptionError(f"{name}={shortened(text, 40)!r} is not {KIND_NAMES.get(kind, kind.__name__)}") from None
    return _with_given(defaults, values)


KIND_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


def _field_kind(field: dataclasses.Field, hints: dict[str, Any]) -> type:
    """The type a flag or a text value of ``field`` is parsed as."""
    return field.metadata.get("type") or _value_type(hints[field.name])


def _parse_text(kind: type, text: str) -> Any:
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "1")
    return kind(text)
