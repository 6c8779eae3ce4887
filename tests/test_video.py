"""Video subtitles end to end on real files written with cv2.VideoWriter from distinct photos.

Each clip holds a photo for a known time, so shot cuts and cue boundaries are known. The
shipped model's wording is not asserted, only structure and timing.
"""

import dataclasses
import inspect
import io
import itertools
import json
import math
import os
import shutil
import threading
import time

import cv2
import numpy as np
import pytest
import srt
import webvtt
from conftest import SAMPLES, bury_too_deep
from test_video_source import PHOTOS, assert_near, count_opencv_calls, damage_middle, write_video

from captioner.errors import OptionError, OutputError, VideoReadError, VideoWriteError
from captioner.pipelines.burn import burn_subtitles
from captioner.pipelines.cli import main
from captioner.pipelines.cues import Segment
from captioner.pipelines.subtitles import WriteSRT, WriteVTT
from captioner.pipelines.video import (
    SAMPLERS,
    ShotFrames,
    _sharing_cores,
    caption_picks,
    open_video,
    sample_frames,
    subtitle_source,
    subtitle_video,
)
from captioner.pipelines.video_batch import VideoJob, VideoRun, plan_jobs, prepare_jobs, run_jobs
from captioner.pipelines.video_options import VideoOptions
from captioner.pipelines.video_source import MAX_FAILED_GRABS, OPEN_HINT

SHOTS = [("chelsea.png", 4.0), ("coffee.png", 4.0), ("rocket.jpg", 4.0)]  # truth: cuts at 4 s and 8 s
CUTS = [0.0, 4.0, 8.0, 12.0]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return {
        "mp4": write_video(folder / "three.mp4", SHOTS),
        "avi": write_video(folder / "three.avi", SHOTS, fourcc="MJPG"),
    }


def bounds(segments):
    return [segments[0].start] + [s.end for s in segments]


def uniform(every, **changes):
    return VideoOptions(every=every, **changes)


# Options


def test_every_video_default_lives_in_video_options_and_each_field_has_help():
    assert list(inspect.signature(subtitle_video).parameters) == ["path", "model", "options", "settings"]
    for field in dataclasses.fields(VideoOptions):
        assert field.metadata["help"], field.name
    mode = {f.name: f for f in dataclasses.fields(VideoOptions)}["mode"]
    assert mode.default == "uniform" and mode.metadata["choices"] == tuple(SAMPLERS) == ("uniform", "scenes")
    assert str(VideoOptions.__dataclass_fields__["every"].metadata["bounds"]) == "[0.01, 3600]"


@pytest.mark.parametrize(
    "name, value",
    [("every", 1e-9), ("every", math.inf), ("every", math.nan), ("every", 0), ("every", 3601), ("every", "2"),
     ("every", True), ("mode", "shots"), ("mode", None), ("max_per_scene", 0), ("max_per_scene", 101),
     ("max_per_scene", 2.0), ("max_per_scene", True), ("min_score", 0.5), ("min_score", math.nan),
     ("min_score", -math.inf), ("min_duration", -1.0), ("min_duration", math.inf), ("max_duration", math.inf),
     ("max_duration", 0.1), ("max_duration", 0.8), ("batch_size", 0), ("batch_size", 257), ("batch_size", "16")],
)
def test_out_of_range_or_mistyped_options_are_refused_naming_the_field(name, value):
    with pytest.raises(OptionError, match=f"^video option {name}=.+ must be"):
        VideoOptions(**{name: value})  # max_duration 0.8 is below the default min_duration of 1


def test_options_at_their_bounds_are_accepted():
    VideoOptions(every=0.01, max_per_scene=100, batch_size=256, min_score=0.0, min_duration=0, max_duration=0.5)
    VideoOptions(every=3600, max_per_scene=1, batch_size=1, min_score=-40, min_duration=60, max_duration=3600)
    assert VideoOptions(every=2).every == 2  # a whole number is a number of seconds too


# Sampling and cues


def test_every_second_gives_one_cue_per_held_photo(clips, default_model):
    result = subtitle_video(clips["mp4"], model=default_model, settings=uniform(1.0))
    assert result.frames_captioned == 12 and result.duration == pytest.approx(12.0)
    assert len(result.segments) == 3  # twelve captioned frames, three photos
    assert_near(bounds(result.segments), CUTS, 1.0)
    assert all(s.text and s.score < 0 for s in result.segments)
    assert (result.stopped_at, result.skipped, result.warnings, result.notes) == (None, (), (), ())


def test_uniform_sampling_seeks_over_the_frames_between_and_gets_the_subtitles_reading_through_gets(
        tmp_path, default_model, monkeypatch):
    path = write_video(tmp_path / "long.mp4", [(name, 6.0) for name in PHOTOS], fps=25.0)  # 24 s
    calls = count_opencv_calls(monkeypatch)
    seeking = subtitle_video(path, model=default_model, settings=uniform(3.0))
    seeking_grabs = calls["grab"]
    reading = subtitle_video(path, model=default_model, settings=uniform(3.0, seek=False))
    assert seeking == reading and seeking.frames_captioned == 8 and len(seeking.segments) == 4
    assert calls["grab"] - seeking_grabs == 600 + MAX_FAILED_GRABS  # --no-seek: every frame
    assert seeking_grabs < 600 * 0.2 + MAX_FAILED_GRABS


def test_scenes_decode_the_video_once_and_give_one_cue_per_shot(clips, default_model, monkeypatch):
    import scenedetect

    def second_pass(*args, **kwargs):
        raise AssertionError("scenedetect.detect decodes the file a second time")

    monkeypatch.setattr(scenedetect, "detect", second_pass)
    calls = count_opencv_calls(monkeypatch)
    settings = VideoOptions(mode="scenes", every=2.0, max_per_scene=2)
    result = subtitle_video(clips["avi"], model=default_model, settings=settings)
    assert calls["open"] == 1 and calls["grab"] == 120 + MAX_FAILED_GRABS and calls["retrieve"] == 120
    assert len(result.segments) == 3 and result.notes == ()
    assert_near(bounds(result.segments), CUTS, 0.01)  # cues start and end at the cuts themselves
    assert result.frames_captioned == 3 * 2


@pytest.mark.parametrize("mode", ["scenes", "uniform"])
def test_a_one_frame_video_gives_one_cue(tmp_path, default_model, mode):
    path = write_video(tmp_path / "one.mp4", [("chelsea.png", 0.1)])
    result = subtitle_video(path, model=default_model, settings=VideoOptions(mode=mode))
    assert result.frames_captioned == 1 and len(result.segments) == 1
    assert result.segments[0].start == 0.0 and result.segments[0].end == pytest.approx(0.1)


def test_failed_scene_detection_falls_back_to_uniform_sampling(clips, default_model, monkeypatch):
    from scenedetect import ContentDetector

    def broken(self, timecode, frame):
        raise RuntimeError("codec exploded")

    monkeypatch.setattr(ContentDetector, "process_frame", broken)
    result = subtitle_video(clips["mp4"], model=default_model, settings=VideoOptions(mode="scenes", every=2.0))
    assert result.notes == (f"{clips['mp4']}: scene detection failed (codec exploded); sampling every 2 s instead",)
    assert result.frames_captioned == 6 and len(result.segments) == 3


def test_without_scenedetect_scenes_mode_samples_uniformly(clips, default_model, monkeypatch):
    import captioner.pipelines.video as video

    def missing():
        raise ImportError("No module named 'scenedetect'")

    monkeypatch.setattr(video, "_content_detector", missing)
    result = subtitle_video(clips["mp4"], model=default_model, settings=VideoOptions(mode="scenes", every=4.0))
    assert result.notes == (f"{clips['mp4']}: scene detection failed (No module named 'scenedetect'); "
                            "sampling every 4 s instead",)
    assert result.frames_captioned == 3


def test_a_captioning_error_stops_the_decoding_thread_before_the_file_closes(clips, default_model, monkeypatch):
    calls = []

    def fails_second_time(pixels, options=None):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return real(pixels, options)

    real = default_model.caption_pixels
    monkeypatch.setattr(default_model, "caption_pixels", fails_second_time)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        subtitle_video(clips["mp4"], model=default_model, settings=uniform(0.5, batch_size=2))
    assert calls == [1, 2]  # batches grow from one frame; the second fails
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())


def test_uniform_sampling_decodes_on_half_the_cores_and_the_model_takes_the_rest_until_decoding_ends(
        clips, default_model):
    import torch

    full = torch.get_num_threads()
    with open_video(clips["mp4"], uniform(1.0)) as source:
        assert source.threads == max(1, full // 2)
    with open_video(clips["mp4"], VideoOptions(mode="scenes")) as source:
        assert source.threads is None  # scene detection decodes fastest with FFmpeg's own default
    seen, decoded = [], threading.Event()
    try:
        with _sharing_cores(lambda pixels, options: seen.append(torch.get_num_threads()) or [], decoded,
                            1) as caption:
            caption(None, None)
            decoded.set()
            caption(None, None)
            torch.set_num_threads(full + 1)  # whatever happens inside, the count is given back on leaving
        assert torch.get_num_threads() == full
    finally:
        torch.set_num_threads(full)
    assert seen == [max(1, full - 1), full]
    subtitle_video(clips["mp4"], model=default_model, settings=uniform(0.5, batch_size=2))
    assert torch.get_num_threads() == full  # given back after the video


def test_frames_are_captioned_in_batches_growing_from_one_so_the_model_starts_with_the_first_frame(
        clips, default_model):
    sizes = []

    def recording(pixels, options):
        sizes.append(len(pixels))
        return default_model.caption_pixels(pixels, options)

    settings = uniform(0.5, batch_size=4)  # 24 frames of the 12 s clip
    with open_video(clips["mp4"], settings) as source:
        recorded = subtitle_source(source, model=default_model, settings=settings, caption=recording)
    assert sizes == [1, 2, 4, 4, 4, 4, 4, 1]
    plain = subtitle_video(clips["mp4"], model=default_model, settings=settings)
    assert [(s.start, s.end, s.text) for s in recorded.segments] == [(s.start, s.end, s.text) for s in plain.segments]
    sizes.clear()  # without growing (what a model on a GPU gets: each new size stalls it once there)
    with open_video(clips["mp4"], settings) as source:
        frames = sample_frames(source, SAMPLERS["uniform"].from_options(settings, source, 224))
        list(caption_picks(recording, frames, None, 4, grow=False))
    assert sizes == [4, 4, 4, 4, 4, 4]


def test_the_thread_count_is_given_back_when_captioning_fails(clips, default_model, monkeypatch):
    import torch

    full = torch.get_num_threads()

    def changes_threads_then_fails(pixels, options=None):
        torch.set_num_threads(full + 1)
        raise RuntimeError("model gone")

    monkeypatch.setattr(default_model, "caption_pixels", changes_threads_then_fails)
    try:
        with pytest.raises(RuntimeError, match="model gone"):
            subtitle_video(clips["mp4"], model=default_model, settings=uniform(0.5, batch_size=2))
        assert torch.get_num_threads() == full
    finally:
        torch.set_num_threads(full)


def test_scene_detection_failing_part_way_keeps_the_shots_found_and_samples_the_rest(clips, default_model,
                                                                                      monkeypatch):
    from scenedetect import ContentDetector

    real, seen = ContentDetector.process_frame, []

    def fails_at_five_seconds(self, timecode, frame):
        seen.append(timecode)
        if len(seen) > 50:
            raise RuntimeError("out of memory")
        return real(self, timecode, frame)

    monkeypatch.setattr(ContentDetector, "process_frame", fails_at_five_seconds)
    result = subtitle_video(clips["mp4"], model=default_model, settings=VideoOptions(mode="scenes", every=2.0))
    assert result.notes == (f"{clips['mp4']}: scene detection failed (out of memory); sampling every 2 s instead "
                            "from 5.00 s on",)
    assert result.segments[0].end == pytest.approx(4.0, abs=0.01)  # the cut found before the failure
    assert result.segments[-1].end == pytest.approx(12.0)
    assert all(a.end <= b.start + 1e-9 for a, b in itertools.pairwise(result.segments))


def test_shot_candidates_stay_few_and_spread_over_a_long_shot():
    shot, pixels = ShotFrames(start=0.0, step=0.5, capacity=12), np.zeros((2, 2, 3), np.uint8)
    for i in range(25 * 600):  # ten minutes at 25 fps
        if shot.wants(i / 25):
            shot.add(i / 25, pixels)
        assert len(shot.kept) <= 12
    times = [t for t, _ in shot.spread(600.0, every=2.0, most=3)]
    assert_near(times, [100.0, 300.0, 500.0], 600 / 12)
    assert [t for t, _ in ShotFrames(5.0, 0.5, 12).spread(5.1, 2.0, 3)] == []  # no frame seen, none made up


def test_cue_bounds_follow_stream_time_at_a_non_integer_frame_rate(tmp_path, default_model):
    path = write_video(tmp_path / "ntsc.mp4", [("chelsea.png", 2.002), ("rocket.jpg", 2.002)], fps=30000 / 1001)
    result = subtitle_video(path, model=default_model, settings=uniform(1.0))
    assert len(result.segments) == 2
    assert result.segments[0].end == pytest.approx(60 * 1001 / 30000, abs=0.0005)  # frame 60, not 2.000 s
    assert result.segments[1].end == pytest.approx(120 * 1001 / 30000, abs=0.0005)


# Broken files


@pytest.mark.parametrize("mode", ["uniform", "scenes"])
def test_a_damaged_middle_is_skipped_and_the_cues_after_it_are_kept(tmp_path, default_model, mode):
    path = damage_middle(write_video(tmp_path / "damaged.mp4", [(name, 5.0) for name in PHOTOS]))
    result = subtitle_video(path, model=default_model, settings=VideoOptions(mode=mode, every=2.5))
    (start, end), = result.skipped
    assert result.stopped_at is None and result.duration == pytest.approx(20.0)
    assert result.warnings == (f"{path}: skipped undecodable frames at {start:.2f}-{end:.2f} s; "
                               "the cues around them cover the gap",)
    assert [s for s in result.segments if s.start >= end] and result.segments[-1].end == pytest.approx(20.0)
    assert len(result.segments) >= 4  # the photos after the damage are captioned too


def test_a_truncated_file_keeps_the_cues_before_the_break_and_says_where(clips, default_model, tmp_path):
    data = clips["avi"].read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) * 6 // 10])
    whole = subtitle_video(clips["avi"], model=default_model, settings=uniform(1.0))
    result = subtitle_video(cut, model=default_model, settings=uniform(1.0))
    assert 4.0 < result.stopped_at < 7.2 and result.duration == pytest.approx(result.stopped_at + 0.1)
    assert result.warnings == (f"{cut}: decoding stopped at {result.stopped_at:.2f} s of about 12.00 s; "
                               "the file is truncated or corrupt after that point",)
    assert result.segments[0] == whole.segments[0]
    assert result.segments[-1].end <= result.duration


# Jobs: planning, checking outputs before the model, running a folder


def test_outputs_are_checked_before_any_model_loads(clips, tmp_path):
    started = time.perf_counter()
    video = clips["mp4"]
    (tmp_path / "taken").mkdir()
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match=f"{tmp_path / 'taken'}: is a folder"):
        prepare_jobs(video, "srt", output=tmp_path / "taken")
    with pytest.raises(OutputError, match=f"{tmp_path / 'file' / 'a.srt'}: cannot write here"):
        prepare_jobs(video, "srt", output=tmp_path / "file" / "a.srt")
    with pytest.raises(OptionError, match="--burn writes"):
        prepare_jobs(video, "srt", output=tmp_path / "a.srt", burn=tmp_path / "a.webm")
    with pytest.raises(OptionError, match="would overwrite the input video"):
        prepare_jobs(video, "srt", output=tmp_path / "a.srt", burn=video)
    with pytest.raises(OptionError, match="one video, not a folder"):
        prepare_jobs(tmp_path, "srt", output=tmp_path / "a.srt")
    with pytest.raises(OptionError, match="give one of them"):
        prepare_jobs(video, "srt", output=tmp_path / "a.srt", out_dir=tmp_path / "subs")
    with pytest.raises(OutputError, match=f"{tmp_path / 'file'}: cannot write here: is a file"):
        prepare_jobs(tmp_path, "srt", out_dir=tmp_path / "file")
    with pytest.raises(VideoReadError, match="no such file or folder"):
        prepare_jobs(tmp_path / "gone.mp4", "srt")
    assert prepare_jobs(video, "vtt", out_dir=tmp_path / "new") == [VideoJob(video, tmp_path / "new" / "three.vtt")]
    assert time.perf_counter() - started < 1.0


def test_videos_differing_only_in_extension_get_separate_subtitle_files(tmp_path):
    for name in ("a.mp4", "A.avi", "b.mov"):
        (tmp_path / name).write_bytes(b"")
    assert sorted(j.output.name for j in plan_jobs(tmp_path, "srt")) == ["A.avi.srt", "a.mp4.srt", "b.srt"]


def test_a_video_whose_stem_is_another_videos_name_gets_its_own_subtitle_file(tmp_path):
    for name in ("x.mp4", "x.avi", "x.mp4.mp4"):  # x.mp4.mp4's stem is x.mp4, whose subtitles are x.mp4.srt
        (tmp_path / name).write_bytes(b"")
    assert sorted(j.output.name for j in plan_jobs(tmp_path, "srt")) == ["x.avi.srt", "x.mp4.mp4.srt", "x.mp4.srt"]


def test_subtitle_names_stay_apart_however_video_names_overlap(tmp_path):
    for name in ("a.mp4", "a.mkv", "a.mkv.mp4", "a.mkv.mp4.avi", "A.mov", "a.mov", "b.mp4"):
        (tmp_path / name).write_bytes(b"")
    names = [j.output.name for j in plan_jobs(tmp_path, "jsonl")]
    assert len({n.casefold() for n in names}) == 7  # as a Mac or Windows disk tells them apart
    assert sorted(names) == ["A.mov.jsonl", "a.mkv.jsonl", "a.mkv.mp4.avi.jsonl", "a.mkv.mp4.jsonl",
                             "a.mov.2.jsonl", "a.mp4.jsonl", "b.jsonl"]
    for name in ("A.mp4", "a.mp4.2.mp4"):  # a number must not take another video's name
        (tmp_path / name).write_bytes(b"")
    names = [j.output.name for j in plan_jobs(tmp_path, "jsonl")]
    assert len({n.casefold() for n in names}) == 9 and {"a.mp4.2.jsonl", "a.mp4.3.jsonl"} <= set(names)


def test_a_folder_too_deep_to_list_fails_the_folder_run_in_one_line(clips, tmp_path, capsys):
    root = tmp_path / "videos"
    shutil.copy(clips["mp4"], bury_too_deep(root, "deep.mp4", clips["mp4"].read_bytes()).parents[17] / "top.mp4")
    assert main(["video", str(root), "--quiet"]) == 1
    err = capsys.readouterr().err.splitlines()
    skipped = [line for line in err if line.startswith("skipped ")]
    assert len(skipped) == 1 and skipped[0].endswith(": cannot list this folder: File name too long")
    assert err[-1] == "1 subtitled, 1 failed"
    assert [p.name for p in root.glob("*.srt")] == ["top.srt"]


def test_a_subtitle_file_that_links_to_a_video_of_the_run_is_not_written_through(clips, tmp_path, capsys,
                                                                                  default_model):
    root = tmp_path / "videos"
    root.mkdir()
    shutil.copy(clips["mp4"], root / "clip.mp4")
    shutil.copy(clips["mp4"], root / "other.mp4")
    (root / "other.srt").symlink_to(root / "clip.mp4")
    before = (root / "clip.mp4").read_bytes()
    jobs = prepare_jobs(root, "srt")
    assert run_jobs(jobs, model=default_model, writer=WriteSRT(), settings=uniform(4.0), progress=False) \
        == VideoRun(failed=1)
    assert (root / "clip.mp4").read_bytes() == before and len(list(srt.parse((root / "clip.srt").read_text()))) == 3
    assert capsys.readouterr().err == (f"skipped {root / 'other.mp4'}: {root / 'other.srt'}: is a video of this run "
                                       "(or a link to one); not overwritten\n")


def folder_of_videos(root, clips):
    (root / "sub").mkdir(parents=True)
    shutil.copy(clips["mp4"], root / "a.mp4")
    shutil.copy(clips["avi"], root / "sub" / "B.AVI")
    shutil.copy(clips["mp4"], root / os.fsdecode(b"clip_\xe9.mp4"))  # a name that is not UTF-8
    (root / "broken.mov").write_text("not a video\n")
    (root / "notes.txt").write_text("ignored\n")
    return root


def test_folder_mode_subtitles_every_good_video_and_reports_the_bad_one(clips, tmp_path, capsys, default_model):
    root = folder_of_videos(tmp_path / "videos", clips)
    (root / os.fsdecode(b"bad_\xe9.avi")).write_bytes(b"RIFF")
    jobs = prepare_jobs(root, "srt")
    assert run_jobs(jobs, model=default_model, writer=WriteSRT(), settings=uniform(4.0), progress=False) \
        == VideoRun(failed=2)
    written = sorted(os.fsencode(p.relative_to(root)) for p in root.rglob("*.srt"))
    assert written == [b"a.srt", b"clip_\xe9.srt", b"sub/B.srt"]
    assert len(list(srt.parse((root / os.fsdecode(b"clip_\xe9.srt")).read_text()))) == 3
    hint = f"cannot open as a video ({OPEN_HINT})"
    err = capsys.readouterr().err
    assert err == f"skipped {root}/bad_\\xe9.avi: {hint}\nskipped {root / 'broken.mov'}: {hint}\n"
    err.encode("utf-8")  # printable: no lone surrogates from the file name


def test_a_subtitle_path_that_is_a_folder_skips_that_video_and_the_rest_go_on(clips, tmp_path, capsys,
                                                                               default_model):
    root = folder_of_videos(tmp_path / "videos", clips)
    (root / "broken.mov").unlink()
    out = tmp_path / "out"
    (out / "a.vtt").mkdir(parents=True)
    jobs = prepare_jobs(root, "vtt", out_dir=out)
    assert run_jobs(jobs, model=default_model, writer=WriteVTT(), settings=uniform(4.0), progress=False) \
        == VideoRun(failed=1)
    assert sorted(os.fsencode(p.relative_to(out)) for p in out.rglob("*.vtt") if p.is_file()) == [
        b"clip_\xe9.vtt", b"sub/B.vtt"]
    assert capsys.readouterr().err == f"skipped {root / 'a.mp4'}: {out / 'a.vtt'}: is a folder; give a file name\n"


def test_a_burn_that_cannot_be_written_is_reported_after_the_subtitles(clips, tmp_path, capsys, default_model):
    (tmp_path / "file").write_text("")
    job = VideoJob(clips["mp4"], tmp_path / "a.srt", burn=tmp_path / "file" / "burned.mp4")
    assert run_jobs([job], model=default_model, writer=WriteSRT(), settings=uniform(4.0), progress=False) \
        == VideoRun(failed=1)
    assert len(list(srt.parse((tmp_path / "a.srt").read_text()))) == 3
    assert capsys.readouterr().err.startswith(f"skipped {clips['mp4']}: {tmp_path / 'file' / 'burned.mp4'}: "
                                              "cannot write: ")


def test_a_burn_of_a_video_whose_frame_rate_is_unknown_is_refused_not_mistimed(tmp_path):
    fast = tmp_path / "fast.mp4"
    writer = cv2.VideoWriter(str(fast), cv2.VideoWriter_fourcc(*"mp4v"), 1000, (64, 48))  # OpenCV: implausible
    for i in range(30):
        writer.write(np.full((48, 64, 3), i * 8, np.uint8))
    writer.release()
    with pytest.raises(VideoWriteError, match="burned.mp4: cannot burn a copy that keeps time"):
        burn_subtitles(fast, [Segment(0.0, 0.03, "a grey wall", -1.0)], tmp_path / "burned.mp4")
    assert sorted(os.listdir(tmp_path)) == ["fast.mp4"]


def test_a_burn_that_cannot_keep_time_is_refused_before_captioning_and_writes_nothing(tmp_path, capsys):
    fast = tmp_path / "fast.mp4"
    writer = cv2.VideoWriter(str(fast), cv2.VideoWriter_fourcc(*"mp4v"), 1000, (64, 48))
    for i in range(30):
        writer.write(np.full((48, 64, 3), i * 8, np.uint8))
    writer.release()
    out = tmp_path / "new" / "burned.mp4"
    assert main(["video", str(fast), "-o", str(tmp_path / "a.srt"), "--burn", str(out)]) == 1
    assert capsys.readouterr().err == (f"captioner: error: {out}: cannot burn a copy that keeps time: OpenCV reports "
                                       "no frame rate for this video, or one of 1000 per second or more\n")
    assert sorted(os.listdir(tmp_path)) == ["fast.mp4"]  # no subtitles, no folder for the copy


def test_burned_copy_of_an_oddly_named_video_keeps_frame_count_and_fps(clips, tmp_path):
    odd = tmp_path / os.fsdecode(b"\xe9t\xe9")
    odd.mkdir()
    video, burned = odd / os.fsdecode(b"v\xe9.mp4"), odd / os.fsdecode(b"burned_\xe9.mp4")
    shutil.copy(clips["mp4"], video)
    cues = [Segment(0.0, 4.0, "a cat on a couch", -1.0), Segment(8.0, 12.0, "a rocket", -1.0)]
    assert burn_subtitles(video, cues, burned) == 120
    assert sorted(os.listdir(odd)) == sorted([video.name, burned.name])  # no temporary file left
    assert burned.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    shutil.copy(burned, tmp_path / "burned.mp4")
    before, after = cv2.VideoCapture(str(clips["mp4"])), cv2.VideoCapture(str(tmp_path / "burned.mp4"))
    for prop in (cv2.CAP_PROP_FRAME_COUNT, cv2.CAP_PROP_FPS, cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT):
        assert after.get(prop) == before.get(prop)
    (_, original), (_, drawn) = before.read(), after.read()
    bottom = slice(200, 240)
    assert np.abs(drawn[bottom].astype(int) - original[bottom]).mean() > 5  # text at the bottom
    assert np.abs(drawn[:100].astype(int) - original[:100]).mean() < 5  # the rest untouched


@pytest.mark.parametrize("size", [(320, 240), (1280, 720)])
@pytest.mark.parametrize("grey", [255, 128])
def test_burned_text_is_white_on_a_black_rim_that_hugs_it(size, grey):
    """With OpenCV 5 a thick black copy of the text ran right of the white text at 320x240 and left no rim at 720p."""
    from captioner.pipelines.burn import draw_caption

    frame = np.full((size[1], size[0], 3), grey, np.uint8)
    draw_caption(frame, "a cat is playing with a toy")
    white = (frame >= 200).all(axis=2) if grey != 255 else None
    dark = (frame <= 40).all(axis=2)
    assert dark.sum() > size[0] // 4
    changed = (frame != grey).any(axis=2)
    dark_columns = np.flatnonzero(dark.any(axis=0))
    if white is not None:  # the rim starts just left of the text and ends just right of it, never further
        text_columns = np.flatnonzero(white.any(axis=0))
        rim = 8 if size[1] == 720 else 4
        assert text_columns.min() - rim <= dark_columns.min() <= text_columns.min()
        assert text_columns.max() <= dark_columns.max() <= text_columns.max() + rim
        assert white.sum() > size[0] // 4
    assert not changed[: size[1] // 2].any()  # the top half untouched


def current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# The command line (needs cli.py's video flags built from VideoOptions: --mode, --every, ...)


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
    assert all(0 < r["confidence"] < 1 for r in records)  # the shipped model is calibrated


def test_cli_scenes_mode_and_a_truncated_file(clips, tmp_path, capsys):
    out = tmp_path / "s.srt"
    assert main(["video", str(clips["avi"]), "-o", str(out), "--mode", "scenes", "--max-per-scene", "1"]) == 0
    assert_near([c.end.total_seconds() for c in srt.parse(out.read_text())], CUTS[1:], 0.01)
    data = clips["avi"].read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) * 6 // 10])
    assert main(["video", str(cut), "-o", str(tmp_path / "cut.srt"), "--every", "1"]) == 1
    assert f"warning: {cut}: decoding stopped at" in capsys.readouterr().err
    assert len(list(srt.parse((tmp_path / "cut.srt").read_text()))) == 2


def test_a_folder_run_counts_a_video_subtitled_in_part_apart_from_the_failed_ones(clips, tmp_path, capsys):
    root = tmp_path / "videos"
    root.mkdir()
    (root / "whole.avi").write_bytes(clips["avi"].read_bytes())
    data = clips["avi"].read_bytes()
    (root / "cut.avi").write_bytes(data[: len(data) * 6 // 10])
    (root / "text.mp4").write_text("not a video")
    assert main(["video", str(root), "--every", "1", "--quiet"]) == 1  # scripts still notice
    err = capsys.readouterr().err
    assert err.endswith("2 subtitled (1 only in part), 1 failed\n")
    assert (root / "cut.srt").exists() and (root / "whole.srt").exists() and not (root / "text.srt").exists()


def test_cli_burned_copy_keeps_frame_count(clips, tmp_path):
    burned = tmp_path / "burned.mp4"
    assert main(["video", str(clips["mp4"]), "-o", str(tmp_path / "a.srt"), "--burn", str(burned)]) == 0
    assert cv2.VideoCapture(str(burned)).get(cv2.CAP_PROP_FRAME_COUNT) == 120


def test_max_per_scene_without_scenes_mode_is_refused_not_ignored(clips, capsys):
    assert main(["video", str(clips["avi"]), "--max-per-scene", "1"]) == 2
    assert "video option max_per_scene applies to mode 'scenes' only, not 'uniform'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["--every", "0"], ["--every", "1e-9"], ["--every", "inf"], ["--every", "nan"], ["-o", "out.txt"],
     ["--max-per-scene", "0"], ["--min-duration", "9"], ["--batch-size", "100000"], ["--mode", "shots"],
     ["--burn", "x.webm"]],
)
def test_bad_arguments_exit_2(clips, argv, capsys):
    try:
        code = main(["video", str(clips["avi"]), *argv])
    except SystemExit as e:  # argparse's own refusals (a value not among the choices)
        code = e.code
    assert code == 2
    assert "error" in capsys.readouterr().err


def test_burn_or_output_with_a_folder_exit_2(tmp_path, capsys):
    assert main(["video", str(tmp_path), "--burn", str(tmp_path / "x.mp4")]) == 2
    assert "one video, not a folder" in capsys.readouterr().err


def test_a_bad_output_fails_before_the_model_loads(clips, tmp_path, capsys, monkeypatch):
    import captioner.api

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(captioner.api, "load_model", no_model)
    (tmp_path / "taken.srt").mkdir()
    assert main(["video", str(clips["mp4"]), "-o", str(tmp_path / "taken.srt")]) != 0
    assert f"{tmp_path / 'taken.srt'}: is a folder" in capsys.readouterr().err


def test_subtitles_go_to_standard_output_for_a_dash(clips, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["video", str(clips["mp4"]), "-o", "-", "--format", "vtt", "--every", "2"]) == 0
    cues = webvtt.from_string(capsys.readouterr().out)
    assert len(cues) == 3 and cues[-1].end == "00:00:12.000"
    assert list(tmp_path.iterdir()) == []  # no file named "-"


def test_a_threshold_that_drops_every_cue_says_so(clips, tmp_path, capsys):
    out = tmp_path / "none.vtt"
    assert main(["video", str(clips["mp4"]), "-o", str(out), "--min-confidence", "1.0"]) == 0
    assert out.read_text() == "WEBVTT\n\n"
    assert capsys.readouterr().err == (f"note: {clips['mp4']}: no cue left: every caption was below "
                                       "--min-confidence\n")


def test_a_folder_without_videos_is_named_with_the_extensions_looked_for(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no video here\n")
    assert main(["video", str(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr().err == ("0 subtitled, 0 failed\nwarning: no videos under "
                                       f"{tmp_path} (files named .avi, .m4v, .mkv, .mov, .mp4, .webm)\n")


def test_a_dash_with_standard_output_closed_is_one_line_before_the_model_loads(clips):
    import subprocess
    import sys

    command = [sys.executable, "-m", "captioner.pipelines.cli", "video", str(clips["mp4"]), "-o", "-"]
    done = subprocess.run(command, stderr=subprocess.PIPE, text=True, timeout=120, preexec_fn=lambda: os.close(1))
    assert done.stderr == "captioner: error: -o -: standard output is closed; give a file name\n"
    assert done.returncode == 1


def test_a_damaged_picture_named_as_a_video_does_not_stop_the_folder_run(clips, tmp_path, capsys, default_model):
    """Pillow's frame count of a cut multi-page TIFF raises TypeError, which stopped the whole run;
    FFmpeg reads the pages it can (a photo Pillow cannot tell as one is let through as a video)."""
    from PIL import Image

    root = tmp_path / "videos"
    root.mkdir()
    cat = Image.open(SAMPLES / "chelsea.png").convert("RGB")
    pages = io.BytesIO()
    cat.save(pages, "TIFF", save_all=True, append_images=[cat.rotate(90), cat.rotate(180)])
    (root / "a_scan.mp4").write_bytes(pages.getvalue()[: len(pages.getvalue()) // 3])
    shutil.copy(clips["mp4"], root / "b_good.mp4")
    shutil.copy(clips["mp4"], root / ".captioner-burn-x1y2.mp4")  # a burned copy a killed run left: not a video
    jobs = prepare_jobs(root, "srt")
    assert [job.video.name for job in jobs] == ["a_scan.mp4", "b_good.mp4"]
    assert run_jobs(jobs, model=default_model, writer=WriteSRT(), settings=uniform(4.0), progress=False) == VideoRun()
    assert sorted(p.name for p in root.glob("*.srt")) == ["a_scan.srt", "b_good.srt"]
    assert capsys.readouterr().err == ""


def test_a_model_that_fails_on_every_picture_stops_a_folder_run_in_one_line(clips, tmp_path, default_model):
    import copy

    broken = copy.deepcopy(default_model).half()  # half precision on a CPU: fails on any picture
    root = folder_of_videos(tmp_path / "videos", clips)
    with pytest.raises(Exception, match="the model fails to caption any picture, a blank one too"):
        run_jobs(prepare_jobs(root, "srt"), model=broken, writer=WriteSRT(), settings=uniform(4.0), progress=False)
    assert not list(root.rglob("*.srt"))


def test_cue_times_are_whole_milliseconds_and_no_cue_is_empty():
    from captioner.pipelines.cues import in_milliseconds

    cues = in_milliseconds([Segment(0.0, 0.000156, "a", -1.0), Segment(0.0015, 0.0025, "b", -1.0),
                            Segment(1 / 3, 2 / 3, "c", -1.0)])
    assert [(c.start, c.end) for c in cues] == [(0.0, 0.001), (0.002, 0.003), (0.333, 0.667)]
    crowded = in_milliseconds([Segment(1.0, 1.0004, "a", -1.0), Segment(1.0004, 1.0007, "b", -1.0),
                               Segment(1.0007, 3.0, "c", -1.0)])  # three starts within one millisecond
    assert [(c.start, c.end) for c in crowded] == [(1.0, 1.001), (1.001, 1.002), (1.002, 3.0)]
    out = io.StringIO()
    WriteSRT().write(cues[:1], out)
    assert "00:00:00,000 --> 00:00:00,001" in out.getvalue()  # frames 0.16 ms apart: a cue of 1 ms, not 0
