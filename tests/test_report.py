"""The HTML contact sheet: self-contained, shows errors and odd names, never fails on a record."""

import json
import os
import re
import shutil

import pytest
from conftest import SHARED_SAMPLES

from captioner.errors import OutputError
from captioner.pipelines.record_formats import CsvRecords, JsonlRecords, format_for
from captioner.pipelines.records import RecordFile
from captioner.pipelines.report import render_contact_sheet, write_contact_sheet


def photo(folder, name, sample="chelsea.png"):
    folder.mkdir(parents=True, exist_ok=True)
    path = os.path.join(os.fsdecode(folder), name)
    shutil.copy(SHARED_SAMPLES / sample, path)
    return path


def test_the_page_is_self_contained_with_thumbnails_captions_and_scores(tmp_path):
    out, page = tmp_path / "out.jsonl", tmp_path / "report.html"
    with RecordFile(out) as records:
        records.write({"path": photo(tmp_path, "cat.png"), "caption": "a cat on a bed", "score": -0.9123,
                       "min_prob": 0.1})
        records.write({"path": photo(tmp_path, "cup.jpg", "coffee.png"), "caption": "a cup", "score": -1.5,
                       "min_prob": 0.2, "tags": [{"label": "espresso", "p": 0.8312}, {"label": "<cup>", "p": 0.1}]})
    assert write_contact_sheet(out, page, JsonlRecords()) == 2
    html = page.read_text()
    assert html.count("<figure>") == 2 and html.count('src="data:image/jpeg;base64,') == 2
    assert "a cat on a bed" in html and "score -0.912 (mean log-prob)" in html and "2 captioned, 0 failed" in html
    assert "tags: espresso 0.83, &lt;cup&gt; 0.10" in html and html.count("tags:") == 1  # escaped; none for the cat
    assert "<title>Captions: out.jsonl</title>" in html
    assert "http://" not in html and "https://" not in html


def test_error_records_odd_names_and_odd_values_all_get_a_figure(tmp_path):
    odd = photo(tmp_path, os.fsdecode(b"b_\xe9.png"))  # the thumbnail is found through path_hex
    records = [
        {"path": "/p/gone.jpg", "error": "/p/gone.jpg: <b>No such file</b>"},
        {"path": odd.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), "caption": "a cat",
         "score": -1.0, "min_prob": 0.1, "path_hex": os.fsencode(odd).hex()},
        {"path": "/p/a\rb\x1b<script>.jpg", "caption": "<i>x</i>"},  # no score, no file, control characters
        {"path": "/p/c.jpg", "caption": "y", "score": "high", "path_hex": "zz"},  # a bad value and bad hex
        {"caption": "no path"},
    ]
    html = render_contact_sheet(records, title="odd <one>")
    assert html.count("<figure>") == 5 and html.count('src="data:image/jpeg;base64,') == 1
    assert "4 captioned, 1 failed" in html and "<h1>odd &lt;one&gt;</h1>" in html
    assert '<figcaption class="error">/p/gone.jpg: &lt;b&gt;No such file&lt;/b&gt;' in html
    assert "b_\\xe9.png" in html and "/p/a\\x0db\\x1b&lt;script&gt;.jpg" in html and "&lt;i&gt;x&lt;/i&gt;" in html
    assert "<script>" not in html and "\r" not in html and "\x1b" not in html
    assert re.findall(r"score (\S+) \(mean", html) == ["-1.000", "?", "?", "?"]


def test_a_csv_output_with_any_extension_gets_its_report(tmp_path):
    out, page = tmp_path / "x.txt", tmp_path / "r.html"  # batch -o x.txt --format csv --html r.html
    fmt = format_for(out, "csv")
    with RecordFile(out, fmt) as records:
        records.write({"path": photo(tmp_path, "=cat\r.png"), "caption": "a cat", "score": -0.5, "min_prob": 0.2})
        records.write({"path": str(tmp_path / "bad.jpg"), "error": f"{tmp_path / 'bad.jpg'}: truncated"})
    assert write_contact_sheet(out, page, fmt) == 2
    html = page.read_text()
    assert "1 captioned, 1 failed" in html and "=cat\\x0d.png" in html and "bad.jpg: truncated" in html
    assert html.count('src="data:image/jpeg;base64,') == 1


def test_a_corrupt_output_or_an_unwritable_page_is_an_output_error(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"path": "/a.jpg", "caption": "x"}) + "\n{\"foo\": 1}\n")
    with pytest.raises(OutputError, match=f"^{out}:2: not a captioner record"):
        write_contact_sheet(out, tmp_path / "r.html", JsonlRecords())
    with pytest.raises(OutputError, match=f"^{tmp_path / 'gone.csv'}: cannot read: No such file"):
        write_contact_sheet(tmp_path / "gone.csv", tmp_path / "r.html", CsvRecords())
    out.write_text(json.dumps({"path": "/a.jpg", "caption": "x"}) + "\n")
    (tmp_path / "r.html").mkdir()
    with pytest.raises(OutputError, match="r.html: cannot write: Is a directory"):
        write_contact_sheet(out, tmp_path / "r.html", JsonlRecords())
    with pytest.raises(OutputError, match="^/dev/full/r.html: cannot write"):
        write_contact_sheet(out, "/dev/full/r.html", JsonlRecords())
    assert not list(tmp_path.glob(".*.tmp"))
