"""A self-contained HTML contact sheet of a batch run: thumbnails, captions, confidence, scores, errors.

Captions marked unsure (``--min-confidence``) are greyed.

The caller passes the output's format (the one it was written in), so the page never guesses
it from a file extension. A record that is odd in any way (no thumbnail, a name with control
characters, a missing score) still gets its figure.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os

from captioner.errors import printable
from captioner.finite import is_finite_number
from captioner.images import load_image
from captioner.outputs import write_atomically
from captioner.pipelines.record_formats import RecordFormat, raw_path

THUMB_SIDE = 192  # longest thumbnail side in pixels

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; background: #fafafa; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ width: {side}px; margin: 0; background: #fff; padding: 6px; border: 1px solid #ddd; }}
img {{ max-width: {side}px; max-height: {side}px; display: block; margin: auto; }}
figcaption {{ font-size: 13px; margin-top: 4px; overflow-wrap: anywhere; }}
.meta {{ color: #777; font-size: 11px; }}
.error {{ color: #b00; }}
.unsure {{ opacity: 0.45; }}
.unsure figcaption::before {{ content: "unsure: "; font-weight: bold; }}
</style></head><body>
<h1>{title}</h1><p>{summary}</p><div class="grid">
{figures}
</div></body></html>
"""


def write_contact_sheet(records_path: str | os.PathLike, html_path: str | os.PathLike, fmt: RecordFormat) -> int:
    """Render every record of a batch output, read as ``fmt``, into one HTML file written atomically.

    Returns the number of records shown.

    Raises:
        OutputError: the output cannot be read back, or the page cannot be written.
    """
    records = list(fmt.read(records_path))
    page = render_contact_sheet(records, title=f"Captions: {printable(os.path.basename(records_path))}")
    write_atomically(html_path, lambda file: file.write(page))
    return len(records)


def render_contact_sheet(records: list[dict], *, title: str) -> str:
    """The HTML page of ``records``: one figure each, whatever odd values they hold."""
    failed = sum(1 for r in records if r.get("error"))
    return PAGE.format(
        title=_shown(title),
        summary=f"{len(records) - failed} captioned, {failed} failed",
        side=THUMB_SIDE,
        figures="\n".join(_figure(r) for r in records),
    )


def _figure(record: dict) -> str:
    name = _shown(record.get("path", "?"))
    if record.get("error"):
        return (f'<figure><figcaption class="error">{_shown(record["error"])}'
                f'<div class="meta">{name}</div></figcaption></figure>')
    uri = _thumbnail_data_uri(record)
    image = f'<img src="{uri}" alt="{name}">' if uri else ""
    tags = _tags(record.get("tags"))
    confidence = record.get("confidence")
    shown_confidence = f"confidence {_probability(confidence)}<br>" if confidence is not None else ""
    unsure = ' class="unsure"' if record.get("unsure") is True else ""
    return (
        f"<figure{unsure}>{image}<figcaption>{_shown(record.get('caption', ''))}"
        f'<div class="meta">{name}<br>{shown_confidence}score {_score(record.get("score"))} (mean log-prob)'
        f'{"<br>tags: " + tags if tags else ""}{_model_caption(record)}</div></figcaption></figure>'
    )


def _model_caption(record: dict) -> str:
    """The model's own caption, when a fallback description stands in its place."""
    text = record.get("model_caption")
    return f"<br>the model said: {_shown(text)}" if isinstance(text, str) and text else ""


def _tags(tags: object) -> str:
    """The record's tags as escaped text ("espresso 0.83, cup 0.04"); empty when it has none."""
    if not isinstance(tags, list):
        return ""
    return ", ".join(f"{_shown(t.get('label', '?'))} {_probability(t.get('p'))}" for t in tags if isinstance(t, dict))


def _probability(value: object) -> str:
    return f"{value:.2f}" if is_finite_number(value) else "?"


def _shown(value: object) -> str:
    """Text safe inside HTML: escaped, with control characters (a ``\\r`` in a name) shown as ``\\xNN``."""
    text = "".join(c if c.isprintable() or c == " " else f"\\x{ord(c):02x}" for c in str(value))
    return html.escape(text)


def _score(value: object) -> str:
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "?"
    return "?" if math.isnan(score) else f"{score:.3f}"


def _thumbnail_data_uri(record: dict) -> str | None:
    try:
        image = load_image(raw_path(record), min_side=THUMB_SIDE)  # a large JPEG decoded at 1/8 scale, not whole
        image.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 (a thumbnail is decoration: a file gone or changed since must not stop the page)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
