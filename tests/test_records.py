"""Record files: flushed appends, resume without duplicates, recovery from a cut-off last line."""

import csv
import json

import pytest
from captioner.pipelines.records import RecordFile


@pytest.mark.parametrize("name", ["out.jsonl", "out.csv"])
def test_records_are_on_disk_as_soon_as_written_and_resume_knows_them(tmp_path, name):
    path = tmp_path / name
    records = RecordFile(path)
    records.write({"path": "a.jpg", "caption": "a cat", "score": -0.5, "min_prob": 0.2})
    records.write({"path": "b.jpg", "error": "b.jpg: empty file"})
    text = path.read_text()  # read before close: the records must already be flushed
    assert "a cat" in text and "empty file" in text
    records.close()
    again = RecordFile(path)
    assert again.done == {"a.jpg", "b.jpg"}
    again.close()


def test_a_cut_off_jsonl_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps({"path": "a.jpg", "caption": "x"}) + "\n" + '{"path": "b.jpg", "capt')
    with RecordFile(path) as records:
        assert records.done == {"a.jpg"}
        records.write({"path": "b.jpg", "caption": "y"})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["path"] for r in lines] == ["a.jpg", "b.jpg"]


def test_csv_has_one_header_across_resumes(tmp_path):
    path = tmp_path / "out.csv"
    with RecordFile(path) as records:
        records.write({"path": "a.jpg", "caption": "a, quoted \"caption\"", "score": -1.0})
    with RecordFile(path) as records:
        records.write({"path": "b.jpg", "error": "bad"})
    rows = list(csv.DictReader(path.open()))
    assert [r["path"] for r in rows] == ["a.jpg", "b.jpg"]
    assert rows[0]["caption"] == 'a, quoted "caption"'
    assert path.read_text().count("path,caption") == 1
