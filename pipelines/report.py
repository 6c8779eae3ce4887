"""A self-contained HTML contact sheet of a batch run: thumbnails, captions, scores, errors."""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path

from captioner.pipelines.records import format_for

from captioner.errors import ImageReadError
from captioner.images import load_image

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
</style></head><body>
<h1>{title}</h1><p>{summary}</p><div class="grid">
{figures}
</div></body></html>
"""


def _thumbnail_data_uri(path: Path) -> str | None:
    try:
        image = load_image(path)
    except ImageReadError:
        return None
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(record: dict) -> str:
    path = Path(record["path"])
    name = html.escape(str(path))
    if record.get("error"):
        return f'<figure><figcaption class="error">{html.escape(record["error"])}</figcaption></figure>'
    uri = _thumbnail_data_uri(path)
    image = f'<img src="{uri}" alt="{name}">' if uri else ""
    score = float(record.get("score") or math.nan)
    return (
        f"<figure>{image}<figcaption>{html.escape(record.get('caption', ''))}"
        f'<div class="meta">{name}<br>score {score:.3f} (mean log-prob)</div></figcaption></figure>'
    )


def write_contact_sheet(records_path: str | os.PathLike, html_path: str | os.PathLike) -> int:
    """Render every record of a JSONL/CSV batch output into one HTML file; returns the count."""
    records_path = Path(records_path)
    records = list(format_for(records_path).read(records_path))
    failed = sum(1 for r in records if r.get("error"))
    page = PAGE.format(
        title=html.escape(f"Captions: {records_path.name}"),
        summary=f"{len(records) - failed} captioned, {failed} failed",
        side=THUMB_SIDE,
        figures="\n".join(_figure(r) for r in records),
    )
    Path(html_path).write_text(page, encoding="utf-8")
    return len(records)
