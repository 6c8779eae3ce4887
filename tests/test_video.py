"""Video subtitles end to end on real files written with cv2.VideoWriter from distinct photos.

Each clip holds a photo for a known time, so shot cuts and cue boundaries are known. The
shipped model's wording is not asserted, only structure and timing.
"""

import json
import re
import shutil

import cv2
import numpy as np
import pytest
import srt
import webvtt
from captioner.pipelines.cli import main
from captioner.pipelines.video import subtitle_video
from captioner.pipelines.video_source import FramePicker, OpenCVSource
from conftest import SHARED_SAMPLES
from PIL import Image

from captioner.errors import VideoReadError

SHOTS = [("chelsea.png", 4.0), ("coffee.png", 4.0), ("rocket.jpg", 4.0)]  # truth: cuts at 4 s and 8 s
CUTS = [0.0, 4.0, 8.0, 12.0]


def write_video(path, shots, *, fps=10.0, fourcc="mp4v", size=(320, 240)):
    """Each photo held for its seconds; frame counts rounded, so cuts fall on frames."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert writer.isOpened()
    for name, seconds in shots:
        rgb = np.array(Image.open(SHARED_SAMPLES / name).convert("RGB").resize(size))
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        for _ in range(round(seconds * fps)):
            writer.write(bgr)
    writer.release()
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return {
        "mp4": write_video(folder / "three.mp4", SHOTS),
        "avi": write_video(folder / "three.avi", SHOTS, fourcc="MJPG"),
    }


def bounds(segments):
    return [segments[0].start] + [s.end for s in segments]


def assert_near(actual, expected, tolerance):
    assert len(actual) == len(expected), (actual, expected)
    for a, e in zip(actual, expected, strict=True):
        assert abs(a - e) <= tolerance, (actual, expected)


def test_frame_times_come_from_the_stream_at_29_97_fps(tmp_path):
    path = write_video(tmp_path / "ntsc.mp4", [("rocket.jpg", 2.5)], fps=30000 / 1001)
    with OpenCVSource(path) as source:
        frames = list(source.frames([0.0, 1.0, 2.0]))
        assert [f.index for f in frames] == [0, 30, 60]
        assert_near([f.time for f in frames], [0.0, 30 * 1001 / 30000, 60 * 1001 / 30000], 0.0005)
        assert frames[2].time > 2.0015  # index / 30 would say 2.000
        assert frames[0].pixels.shape == (240, 320, 3) and frames[0].pixels.dtype == np.uint8
        assert source.end_time == pytest.approx(75 * 1001 / 30000, abs=0.001) and source.stopped_at is None


def test_picker_takes_the_first_frame_at_or_after_each_time_of_an_irregular_stream():
    stream = [0.0, 0.04, 0.9, 2.5, 2.52, 6.0, 6.1]  # variable frame rate: gaps of 40 ms to 3.5 s
    picker = FramePicker(k * 1.0 for k in range(100))
    assert [t for t in stream if picker.wants(t)] == [0.0, 2.5, 6.0]


def make_bad_videos(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, fourcc in (("zero.avi", "MJPG"), ("zero.mp4", "mp4v")):
        cv2.VideoWriter(str(folder / name), cv2.VideoWriter_fourcc(*fourcc), 10, (320, 240)).release()
    (folder / "notes.mp4").write_text("this is not a video\n")
    return {"zero.avi": "no decodable video frames", "zero.mp4": "cannot open", "notes.mp4": "cannot open",
            "missing.mkv": "no such file"}


@pytest.mark.parametrize("name", ["zero.avi", "zero.mp4", "notes.mp4", "missing.mkv"])
def test_unreadable_videos_raise_an_error_naming_the_file(tmp_path, name):
    reasons = make_bad_videos(tmp_path)
    with pytest.raises(VideoReadError, match=re.escape(str(tmp_path / name)) + ".*" + reasons[name]):
        OpenCVSource(tmp_path / name)


def test_every_second_gives_one_cue_per_held_photo(clips, default_model):
    result = subtitle_video(clips["mp4"], model=default_model, every=1.0)
    assert result.frames_captioned == 12 and result.duration == pytest.approx(12.0)
    assert len(result.segments) == 3  # twelve captioned frames, three photos
    assert_near(bounds(result.segments), CUTS, 1.0)
    assert all(s.text and s.score < 0 for s in result.segments)
    assert (result.stopped_at, result.error, result.notes) == (None, None, ())


def test_scenes_give_one_cue_per_shot_with_cut_aligned_bounds(clips, default_model):
    result = subtitle_video(clips["avi"], model=default_model, every=2.0, scenes=True, max_per_scene=2)
    assert len(result.segments) == 3
    assert_near(bounds(result.segments), CUTS, 2.0)
    assert result.frames_captioned <= 3 * 2


def test_failed_scene_detection_falls_back_to_uniform_sampling(clips, default_model, monkeypatch):
    import scenedetect

    def broken(*args, **kwargs):
        raise RuntimeError("codec exploded")

    monkeypatch.setattr(scenedetect, "detect", broken)
    result = subtitle_video(clips["mp4"], model=default_model, every=2.0, scenes=True)
    assert result.notes == (f"{clips['mp4']}: scene detection failed (codec exploded); sampling every 2 s instead",)
    assert result.frames_captioned == 6 and len(result.segments) == 3


def test_cue_bounds_follow_stream_time_at_a_non_integer_frame_rate(tmp_path, default_model):
    path = write_video(tmp_path / "ntsc.mp4", [("chelsea.png", 2.002), ("rocket.jpg", 2.002)], fps=30000 / 1001)
    result = subtitle_video(path, model=default_model, every=1.0)
    assert len(result.segments) == 2
    assert result.segments[0].end == pytest.approx(60 * 1001 / 30000, abs=0.0005)  # frame 60, not 2.000 s
    assert result.segments[1].end == pytest.approx(120 * 1001 / 30000, abs=0.0005)


def test_a_truncated_file_keeps_the_cues_before_the_break_and_says_where(clips, default_model, tmp_path, capsys):
    data = clips["avi"].read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) * 6 // 10])
    whole = subtitle_video(clips["avi"], model=default_model, every=1.0)
    result = subtitle_video(cut, model=default_model, every=1.0)
    assert 4.0 < result.stopped_at < 7.2 and result.duration == pytest.approx(result.stopped_at + 0.1)
    assert result.error.startswith(f"{cut}: decoding stopped at {result.stopped_at:.2f} s of about 12.00 s")
    assert result.segments[0] == whole.segments[0]
    assert result.segments[-1].end <= result.duration
    out = tmp_path / "cut.srt"
    assert main(["video", str(cut), "-o", str(out), "--every", "1"]) == 1
    assert f"warning: {cut}: decoding stopped at" in capsys.readouterr().err
    assert len(list(srt.parse(out.read_text()))) == len(result.segments)


def test_cli_writes_srt_vtt_and_jsonl_that_parse(clips, tmp_path):
    assert main(["video", str(clips["mp4"]), "-o", str(tmp_path / "a.srt")]) == 0
    cues = list(srt.parse((tmp_path / "a.srt").read_text()))
    assert len(cues) == 3 and cues[0].start.total_seconds() == 0.0
    assert_near([c.end.total_seconds() for c in cues], CUTS[1:], 2.0)
    assert main(["video", str(clips["mp4"]), "-o", str(tmp_path / "a.vtt")]) == 0
    vtt = webvtt.read(str(tmp_path / "a.vtt"))
    assert [c.text for c in vtt] == [c.content for c in cues] and vtt[-1].end == "00:00:12.000"
    assert main(["video", str(clips["mp4"]), "--format", "jsonl", "--out-dir", str(tmp_path / "j")]) == 0
    records = [json.loads(line) for line in (tmp_path / "j" / "three.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == [c.content for c in cues] and all(r["score"] < 0 for r in records)


def test_burned_copy_keeps_frame_count_and_fps(clips, tmp_path):
    burned = tmp_path / "burned.mp4"
    assert main(["video", str(clips["mp4"]), "-o", str(tmp_path / "a.srt"), "--burn", str(burned)]) == 0
    before, after = cv2.VideoCapture(str(clips["mp4"])), cv2.VideoCapture(str(burned))
    for prop in (cv2.CAP_PROP_FRAME_COUNT, cv2.CAP_PROP_FPS, cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT):
        assert after.get(prop) == before.get(prop)
    (_, original), (_, drawn) = before.read(), after.read()
    bottom = slice(200, 240)
    assert np.abs(drawn[bottom].astype(int) - original[bottom]).mean() > 5  # text at the bottom
    assert np.abs(drawn[:100].astype(int) - original[:100]).mean() < 5  # the rest untouched


def test_folder_mode_writes_one_file_per_good_video_and_reports_the_bad_one(clips, tmp_path, capsys):
    root = tmp_path / "videos"
    (root / "sub").mkdir(parents=True)
    shutil.copy(clips["mp4"], root / "a.mp4")
    shutil.copy(clips["avi"], root / "sub" / "B.AVI")
    (root / "broken.mov").write_text("not a video\n")
    (root / "notes.txt").write_text("ignored\n")
    assert main(["video", str(root), "--every", "4", "--quiet"]) == 1
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.srt")) == ["a.srt", "sub/B.srt"]
    err = capsys.readouterr().err
    assert f"skipped {root / 'broken.mov'}: cannot open as a video" in err
    assert "2 subtitled, 1 failed" in err
    out_dir = tmp_path / "o"
    assert main(["video", str(root), "--every", "4", "--quiet", "--format", "vtt", "--out-dir", str(out_dir)]) == 1
    assert sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()) == [
        "a.vtt", "sub/B.vtt"]


@pytest.mark.parametrize(
    "argv",
    [["--every", "0"], ["-o", "out.txt"], ["--max-per-scene", "0"], ["--min-duration", "9"]],
)
def test_bad_arguments_exit_2(clips, argv, capsys):
    assert main(["video", str(clips["avi"]), *argv]) == 2
    assert "error" in capsys.readouterr().err


def test_burn_or_output_with_a_folder_exit_2(tmp_path, capsys):
    assert main(["video", str(tmp_path), "--burn", str(tmp_path / "x.mp4")]) == 2
    assert "one video, not a folder" in capsys.readouterr().err
