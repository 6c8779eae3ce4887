"""Subtitle writers: timestamps, and SRT / WebVTT / JSONL output that real parsers accept."""

import io
import json
from datetime import timedelta

import pytest
import srt
import webvtt

from captioner.errors import OptionError, OutputError
from captioner.pipelines.cues import Segment
from captioner.pipelines.subtitles import (
    CueWriter,
    WriteJSONL,
    WriteSRT,
    WriteVTT,
    format_timestamp,
    write_subtitles,
    writer_for,
)

SEGMENTS = [
    Segment(0.0, 2.5, "a cat sitting on a couch", -0.9),
    Segment(2.5, 61.0016, "a man & a dog <outside>", -1.25),
    Segment(3725.25, 3730.0, "two\nlines  of text", -2.0),
]


def written(writer, segments=SEGMENTS):
    buffer = io.StringIO()
    writer.write(segments, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "seconds, marker, expected",
    [
        (0.0, ",", "00:00:00,000"),
        (3661.5, ".", "01:01:01.500"),
        (1.9996, ",", "00:00:02,000"),  # rounds to the millisecond, carrying into seconds
        (59.9999, ".", "00:01:00.000"),
        (360000.001, ".", "100:00:00.001"),  # hours always present, never wrapped
    ],
)
def test_format_timestamp_always_has_hours_and_rounds_to_milliseconds(seconds, marker, expected):
    assert format_timestamp(seconds, decimal_marker=marker) == expected


@pytest.mark.parametrize("seconds", [-1.0, float("nan"), float("inf")])
def test_format_timestamp_refuses_negative_and_non_finite_times(seconds):
    with pytest.raises(ValueError, match=f"{seconds!r} must be finite and >= 0"):
        format_timestamp(seconds)


def test_srt_parses_with_the_srt_library():
    cues = list(srt.parse(written(WriteSRT())))
    assert [c.index for c in cues] == [1, 2, 3]
    assert [c.start for c in cues] == [timedelta(0), timedelta(seconds=2.5), timedelta(seconds=3725.25)]
    assert cues[1].end == timedelta(seconds=61.002)
    assert [c.content for c in cues] == ["a cat sitting on a couch", "a man & a dog <outside>", "two lines of text"]
    assert "00:00:02,500 --> 00:01:01,002" in written(WriteSRT())


def test_vtt_parses_with_webvtt_and_escapes_markup():
    text = written(WriteVTT())
    assert text.startswith("WEBVTT\n\n")
    cues = list(webvtt.from_string(text))
    assert [(c.start, c.end) for c in cues] == [
        ("00:00:00.000", "00:00:02.500"), ("00:00:02.500", "00:01:01.002"), ("01:02:05.250", "01:02:10.000")]
    assert cues[1].text == "a man &amp; a dog &lt;outside&gt;"
    assert cues[2].text == "two lines of text"


def test_srt_and_vtt_differ_only_in_attributes():
    assert WriteSRT.write is WriteVTT.write is CueWriter.write
    srt_text, vtt_text = written(WriteSRT()), written(WriteVTT(), SEGMENTS[:1])
    assert vtt_text.removeprefix("WEBVTT\n\n").replace(".", ",") == written(WriteSRT(), SEGMENTS[:1])
    assert srt_text.count("\n\n") == len(SEGMENTS)


def test_jsonl_has_one_record_per_cue():
    records = [json.loads(line) for line in written(WriteJSONL()).splitlines()]
    assert records[1] == {"start": 2.5, "end": 61.002, "text": "a man & a dog <outside>", "score": -1.25}
    assert len(records) == len(SEGMENTS)
    sure = Segment(0.0, 2.0, "a cat", -0.5, confidence=0.71234)  # a calibrated model's cue says how sure it is
    assert json.loads(written(WriteJSONL(), [sure]))["confidence"] == 0.7123


def test_writer_is_chosen_by_name_then_extension_then_srt():
    assert isinstance(writer_for("out.VTT"), WriteVTT)
    assert isinstance(writer_for("out.log", "jsonl"), WriteJSONL)
    assert isinstance(writer_for("out.VTT", "vtt"), WriteVTT)
    with pytest.raises(OptionError, match="--format srt would write srt into out.vtt, which players read as vtt"):
        writer_for("out.vtt", "srt")  # SRT text under a WebVTT name: no player would read it
    assert isinstance(writer_for(None), WriteSRT)
    assert {w().extension for w in (WriteSRT, WriteVTT, WriteJSONL)} == {"srt", "vtt", "jsonl"}
    with pytest.raises(OptionError, match="'txt'"):
        writer_for("out.txt")


def test_subtitles_are_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "deep" / "a.srt"
    write_subtitles(SEGMENTS, path, WriteSRT())
    assert path.read_text() == written(WriteSRT())

    class Failing(WriteSRT):
        def write(self, segments, file):
            file.write("1\n00:00:00,000 --> ")
            raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match=f"{path}: cannot write: No space left on device"):
        write_subtitles(SEGMENTS[:1], path, Failing())
    assert path.read_text() == written(WriteSRT())  # the old file, untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.srt"]  # no temporary file left


def test_a_subtitle_path_that_is_a_folder_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match=f"{tmp_path}: cannot write: Is a directory"):
        write_subtitles(SEGMENTS, tmp_path, WriteVTT())
