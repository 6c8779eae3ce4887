"""Video sources on real files written with cv2.VideoWriter: stream times, damaged and truncated files, odd names.

No model here: these are the decoding rules the subtitle pipeline stands on.
"""

import math
import os
import random
import re

import cv2
import numpy as np
import pytest
from conftest import SHARED_SAMPLES
from PIL import Image

from captioner.errors import VideoReadError
from captioner.pipelines.video_source import (
    MAX_FAILED_GRABS,
    SEEK_TRIAL,
    FramePicker,
    OpenCVSource,
    SeekLedger,
    StreamClock,
    seekable_container,
)

PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png")


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


def damage_middle(path, start=0.40, stop=0.48, seed=0):
    """Overwrite bytes ``start``..``stop`` of the file (as shares of its size) with noise; the rest stays intact."""
    data = bytearray(path.read_bytes())
    noise = random.Random(seed)
    for i in range(int(len(data) * start), int(len(data) * stop)):
        data[i] = noise.randrange(256)
    path.write_bytes(bytes(data))
    return path


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
        assert source.end_time == pytest.approx(75 * 1001 / 30000, abs=0.001)
        assert (source.stopped_at, source.skipped, source.retimed) == (None, [], 0)


def test_picker_takes_the_first_frame_at_or_after_each_time_of_an_irregular_stream():
    stream = [0.0, 0.04, 0.9, 2.5, 2.52, 6.0, 6.1]  # variable frame rate: gaps of 40 ms to 3.5 s
    picker = FramePicker(k * 1.0 for k in range(100))
    assert [t for t in stream if picker.wants(t)] == [0.0, 2.5, 6.0]


def test_a_frame_that_cannot_be_retrieved_leaves_its_target_to_the_next_frame():
    picker = FramePicker([1.0, 2.0])
    assert picker.due(1.0)  # ... but its pixels never came, so it is not taken
    assert picker.wants(1.1) and not picker.due(1.2) and picker.wants(2.0)


def test_stream_clock_repairs_missing_and_backward_times():
    clock = StreamClock(fps=25.0)
    raw = [0.0, 0.04, 0.0, 0.12, math.nan, 0.3, -1.0]
    times = [clock.time_of(t) for t in raw]
    assert_near(times, [0.0, 0.04, 0.08, 0.12, 0.16, 0.3, 0.44], 1e-9)  # last step seen was 0.14
    assert clock.retimed == 3 and clock.end == pytest.approx(0.58)
    assert StreamClock(fps=0.0).time_of(-3.0) == 0.0  # a first time below zero starts the video at 0
    joined = StreamClock(fps=25.0)  # a second recording whose times start again at 1 s
    assert_near([joined.time_of(t) for t in (5.0, 5.04, 5.08, 1.0, 1.04, 1.08)],
                [5.0, 5.04, 5.08, 5.12, 5.16, 5.20], 1e-9)


@pytest.mark.parametrize("raw, expected", [
    ([9.5, 9.75, 10.0, 10.0, 10.25, 10.5], [9.5, 9.75, 10.0, 10.125, 10.25, 10.5]),  # a frame stored twice
    ([0.0, 0.04, 0.08, 0.04, 0.12, 0.16], [0.0, 0.04, 0.08, 0.10, 0.12, 0.16]),  # one stamped a frame back
    ([0.0, 0.25, 0.5, 0.75, 0.25, 1.0, 1.25], [0.0, 0.25, 0.5, 0.75, 0.875, 1.0, 1.25]),  # two frames back
    ([0.0, 0.1, 0.2, 1.2, 1.2, 1.3, 1.4], [0.0, 0.1, 0.2, 1.2, 1.25, 1.3, 1.4]),  # after a long frame: half a frame
])
def test_a_repeated_or_reordered_time_moves_that_frame_alone(raw, expected):
    """A whole step on would land on the next frame's own time and push every later frame one step on."""
    clock = StreamClock(fps=1 / (raw[1] - raw[0]))
    assert_near([clock.time_of(t) for t in raw], expected, 1e-9)
    assert clock.retimed == 1 and clock.end == pytest.approx(expected[-1] + expected[-1] - expected[-2])


def make_bad_videos(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, fourcc in (("zero.avi", "MJPG"), ("zero.mp4", "mp4v")):
        cv2.VideoWriter(str(folder / name), cv2.VideoWriter_fourcc(*fourcc), 10, (320, 240)).release()
    (folder / "notes.mp4").write_text("this is not a video\n")
    (folder / "empty.webm").write_bytes(b"")
    (folder / "folder.mp4").mkdir()
    os.mkfifo(folder / "pipe.mkv")
    return {"zero.avi": "no decodable video frames", "zero.mp4": "cannot open", "notes.mp4": "cannot open",
            "empty.webm": "empty file$", "missing.mkv": "no such file", "folder.mp4": "is a folder",
            "pipe.mkv": "not a regular file"}


@pytest.mark.parametrize("name", ["zero.avi", "zero.mp4", "notes.mp4", "empty.webm", "missing.mkv", "folder.mp4",
                                  "pipe.mkv"])
def test_unreadable_videos_raise_an_error_naming_the_file(tmp_path, name):
    reasons = make_bad_videos(tmp_path)
    with pytest.raises(VideoReadError, match=re.escape(str(tmp_path / name)) + ".*" + reasons[name]):
        OpenCVSource(tmp_path / name)


def test_a_damaged_middle_is_skipped_and_the_frames_after_it_are_read(tmp_path):
    shots = [(name, 5.0) for name in PHOTOS]  # 20 s at 10 fps
    path = damage_middle(write_video(tmp_path / "damaged.mp4", shots))
    with OpenCVSource(path) as source:
        times = [grab.time for grab in source.grabs()]
        assert len(source.skipped) == 1
        start, end = source.skipped[0]
        assert 2.0 < start < end < 18.0 and end - start >= 0.2
        assert times[-1] == pytest.approx(19.9) and len(times) >= 150  # most of the 200 frames after all
        assert not any(start <= t < end for t in times)
        assert source.stopped_at is None and source.end_time == pytest.approx(20.0)


def test_a_truncated_file_says_where_it_stopped(tmp_path):
    whole = write_video(tmp_path / "whole.avi", [(name, 3.0) for name in PHOTOS[:3]], fourcc="MJPG")
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 6 // 10])
    with OpenCVSource(cut) as source:
        assert sum(1 for _ in source.grabs()) < 70
        assert 4.0 < source.stopped_at < 7.2 and source.expected_duration == pytest.approx(9.0)
        assert source.end_time == pytest.approx(source.stopped_at + 0.1)


def test_a_frame_count_a_little_above_what_decodes_is_not_called_truncated(tmp_path):
    """FFmpeg estimates the count for MKV/WebM/VFR: a good file that decodes a few frames short ends on time."""
    path = write_video(tmp_path / "good.mkv", [("chelsea.png", 12.0)])
    with OpenCVSource(path) as source:
        source.frame_count = 125  # an estimate 5 frames high: 12.5 s announced, 12.0 s decoded
        assert sum(1 for _ in source.grabs()) == 120
        assert source.stopped_at is None


def count_opencv_calls(monkeypatch):
    """Counts of VideoCapture opens, grabs and retrieves from now on (a dict that fills in)."""
    calls = {"grab": 0, "retrieve": 0, "open": 0}
    capture = cv2.VideoCapture

    class Counting:  # wraps, not subclasses: OpenCV's classes are not made to be subclassed
        def __init__(self, *args):
            calls["open"] += 1
            self._capture = capture(*args)

        def grab(self):
            calls["grab"] += 1
            return self._capture.grab()

        def retrieve(self, *args):
            calls["retrieve"] += 1
            return self._capture.retrieve(*args)

        def __getattr__(self, name):
            return getattr(self._capture, name)

    monkeypatch.setattr(cv2, "VideoCapture", Counting)
    return calls


def test_one_pass_grabs_each_frame_once_and_retrieves_only_the_picked(tmp_path, monkeypatch):
    path = write_video(tmp_path / "clip.mp4", [("coffee.png", 3.0)])
    calls = count_opencv_calls(monkeypatch)
    with OpenCVSource(path) as source:
        assert len(list(source.frames([0.0, 1.0, 2.0]))) == 3
    assert calls == {"open": 1, "grab": 30 + MAX_FAILED_GRABS, "retrieve": 3}


def test_a_file_name_that_is_not_utf8_is_opened_through_a_link(tmp_path):
    good = write_video(tmp_path / "good.mp4", [("rocket.jpg", 1.0)])
    odd = tmp_path / os.fsdecode(b"clip_\xe9.mp4")
    os.rename(good, odd)
    with OpenCVSource(odd) as source:
        assert sum(1 for _ in source.frames()) == 10
        assert source.path == odd
    with pytest.raises(VideoReadError, match=r"gone_\\xe9\.mp4: no such file"):
        OpenCVSource(tmp_path / os.fsdecode(b"gone_\xe9.mp4"))


# Seeking to the times a caller wants


def read_through(path, times):
    """What ``frames(times)`` must give, found by grabbing every frame: (time, pixels) pairs and how the read ended."""
    picker, frames = FramePicker(times), []
    with OpenCVSource(path) as source:
        for grab in source.grabs():
            if picker.due(grab.time) and (pixels := grab.rgb()) is not None:
                picker.take(grab.time)
                frames.append((grab.time, pixels))
        return frames, (source.end_time, source.skipped, source.stopped_at)


def assert_same_frames(actual, expected):
    assert [t for t, _ in actual] == [t for t, _ in expected]
    assert all(np.array_equal(a, e) for (_, a), (_, e) in zip(actual, expected, strict=True))


@pytest.mark.parametrize("name, fourcc, fps", [("pal.mp4", "mp4v", 25.0), ("ntsc.mp4", "mp4v", 30000 / 1001),
                                               ("clip.mkv", "mp4v", 10.0), ("clip.avi", "MJPG", 10.0)])
def test_seeking_to_wanted_times_gives_the_frames_reading_through_gives(tmp_path, monkeypatch, name, fourcc, fps):
    path = write_video(tmp_path / name, [(photo, 5.0) for photo in PHOTOS], fps=fps, fourcc=fourcc)
    times = [3.0 * k for k in range(7)]  # 0 to 18 s of 20
    expected, ending = read_through(path, times)
    calls = count_opencv_calls(monkeypatch)
    with OpenCVSource(path) as source:
        frames = [(frame.time, frame.pixels) for frame in source.frames(times)]
        assert (source.end_time, source.skipped, source.stopped_at) == ending
        seeks = source.ledger.seeks
    assert_same_frames(frames, expected)
    if name.endswith(".avi"):  # an AVI index may call every frame a keyframe: read through
        assert seeks == 0 and calls["grab"] == 20 * fps + MAX_FAILED_GRABS
    else:
        assert seeks >= SEEK_TRIAL  # each seek tried at least until the ledger may judge
        assert calls["grab"] < 20 * fps * 0.8 + MAX_FAILED_GRABS


def test_only_mp4_and_matroska_files_are_seeked_in(tmp_path):
    """MPEG-TS times restart where two recordings were joined: a seek by time would land in the wrong one."""
    first = write_video(tmp_path / "a.ts", [(PHOTOS[0], 5.0), (PHOTOS[1], 5.0)], fps=25.0)
    second = write_video(tmp_path / "b.ts", [(PHOTOS[2], 5.0), (PHOTOS[3], 5.0)], fps=25.0)
    joined = tmp_path / "joined.mp4"  # FFmpeg reads the content, whatever the name says
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    assert [seekable_container(p) for p in (joined, first)] == [False, False]
    assert seekable_container(write_video(tmp_path / "c.mp4", [(PHOTOS[0], 1.0)]))
    assert seekable_container(write_video(tmp_path / "c.mkv", [(PHOTOS[0], 1.0)]))
    times = [6.0 * k for k in range(5)]
    expected, ending = read_through(joined, times)
    with OpenCVSource(joined) as source:
        assert_same_frames([(frame.time, frame.pixels) for frame in source.frames(times)], expected)
        assert (source.end_time, source.ledger.seeks) == (ending[0], 0)
    assert len(expected) == 4 and ending[0] == pytest.approx(20.0)  # both recordings, retimed one after the other


def test_seeking_near_damage_or_into_a_truncated_end_still_gives_the_frames_and_the_breaks(tmp_path):
    damaged = damage_middle(write_video(tmp_path / "damaged.mp4", [(name, 5.0) for name in PHOTOS]))
    whole = write_video(tmp_path / "whole.mkv", [(name, 3.0) for name in PHOTOS[:3]] * 3)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 6 // 10])  # claims 27 s, breaks off at 14.9 s
    for path in (damaged, cut):
        for every in (2.0, 3.0):
            times = [every * k for k in range(20)]
            expected, ending = read_through(path, times)
            with OpenCVSource(path) as source:
                assert_same_frames([(frame.time, frame.pixels) for frame in source.frames(times)], expected)
                assert (source.end_time, source.skipped, source.stopped_at) == ending
    assert ending[2] == pytest.approx(14.9) and read_through(damaged, [0.0])[1][1]  # both breaks are there


@pytest.mark.parametrize("misplace", ["past the target", "to the start", "refused"])
def test_a_seek_that_lands_off_course_turns_seeking_off_and_reads_on_from_the_last_frame(tmp_path, monkeypatch,
                                                                                         misplace):
    """Seeks a backend misplaces (as a badly indexed file can make FFmpeg's) cost time, never frames."""
    path = write_video(tmp_path / "clip.mp4", [(name, 5.0) for name in PHOTOS], fps=25.0)
    times = [3.0 * k for k in range(7)]
    expected, ending = read_through(path, times)
    capture = cv2.VideoCapture

    class Misplacing:
        def __init__(self, *args):
            self._capture = capture(*args)

        def set(self, prop, value):
            if prop != cv2.CAP_PROP_POS_MSEC:
                return self._capture.set(prop, value)
            if misplace == "refused":
                return False
            return self._capture.set(prop, value + 1500 if misplace == "past the target" else 0)

        def __getattr__(self, name):
            return getattr(self._capture, name)

    monkeypatch.setattr(cv2, "VideoCapture", Misplacing)
    with OpenCVSource(path) as source:
        frames = [(frame.time, frame.pixels) for frame in source.frames(times)]
        assert (source.end_time, source.skipped, source.stopped_at) == ending
        assert source.ledger.seeks == 0  # the first seek missed, and none came after it
    assert_same_frames(frames, expected)


def test_seeking_stops_once_its_seeks_cost_more_than_reading_through_would():
    """Keyframes 10 s apart make each seek decode more than it skips: the ledger calls it after the trial."""
    dear, cheap = SeekLedger(), SeekLedger()
    for ledger in (dear, cheap):
        for _ in range(100):
            ledger.read(0.002)  # 2 ms a frame
    for _ in range(SEEK_TRIAL - 1):
        dear.seek(0.150, frames_skipped=40)  # 150 ms to skip 80 ms of reading
        cheap.seek(0.030, frames_skipped=40)
    assert dear.pays() and cheap.pays()  # still on trial
    dear.seek(0.150, frames_skipped=40)
    cheap.seek(0.030, frames_skipped=40)
    assert not dear.pays() and cheap.pays()


def test_a_photo_given_as_a_video_is_refused_and_an_animation_is_not(tmp_path):
    photo = tmp_path / "holiday.mp4"  # a JPEG, whatever its name says
    Image.open(SHARED_SAMPLES / "chelsea.png").convert("RGB").save(photo, "JPEG")
    with pytest.raises(VideoReadError, match=rf"^{photo}: a JPEG photo, not a video \(captioner caption captions"):
        OpenCVSource(photo)
    frames = [Image.open(SHARED_SAMPLES / name).convert("RGB").resize((64, 48)) for name in PHOTOS]
    animation = tmp_path / "clip.gif"
    frames[0].save(animation, save_all=True, append_images=frames[1:], duration=500)
    with OpenCVSource(animation) as source:
        assert len(list(source.frames())) == len(PHOTOS)
