"""How much of ``subtitle_video`` is decoding and how much is captioning, on a generated 720p clip.

    OMP_NUM_THREADS=1 python benchmarks/bench_video.py --seconds 20   # quick
    python benchmarks/bench_video.py                                   # 2 minutes of 720p, 25 fps
    python benchmarks/bench_video.py --mode scenes                     # with scene detection (same one pass)
    python benchmarks/bench_video.py --device cuda                     # the model on a GPU

The clip holds a few sample photos for ``--hold`` seconds each (mp4v, written with
cv2.VideoWriter into a temporary folder, deleted afterwards). One run prints a table:
decoding every frame (grab + retrieve), reading only the frames ``--every`` needs by
reading through (grab all, retrieve those) and as the pipeline reads them (seeking over
long stretches when that pays), the full pipeline, its speed in video seconds per wall
second, and how many times each read of the needed frames the full pipeline takes.
The pipeline runs once untimed first (the model's first batch pays one-off set-up costs,
as in the other benchmarks); then the three are timed ``--repeat`` times, interleaved,
and each figure is the median (min-max), ratios taken within each repeat.

In uniform mode it also times the model alone on the frames the pipeline captions (already
decoded and resized, in the pipeline's batches), on all torch threads and on one, and the
processor time of the full run and of the pipeline's own decoding thread's work (decoding
with the pipeline's FFmpeg threads, and resizing to the model's size). Those bound the speed
on this machine: that decoding work and the model on one thread (the least processor time
it takes) spread perfectly over every core is about the fastest any schedule could run.
With ``--device cuda`` the model alone is timed on the GPU, and that CPU bound is not printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from captioner.api import load_model
from captioner.pipelines.video import (
    UniformSampler,
    caption_picks,
    open_video,
    sample_frames,
    subtitle_video,
    uniform_times,
)
from captioner.pipelines.video_options import SAMPLING_MODES, VideoOptions
from captioner.pipelines.video_source import FramePicker, OpenCVSource

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png")


def write_clip(path: Path, seconds: float, hold: float, fps: int, size: tuple[int, int]) -> int:
    """Cycle the photos, each held ``hold`` seconds, for ``seconds`` in all; returns the frame count."""
    frames = [cv2.cvtColor(np.array(Image.open(SAMPLES / name).convert("RGB").resize(size)), cv2.COLOR_RGB2BGR)
              for name in PHOTOS]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    total = round(seconds * fps)
    for i in range(total):
        writer.write(frames[int(i / fps // hold) % len(frames)])
    writer.release()
    return total


def decode_every_frame(path: Path) -> int:
    """Bare decode: grab and retrieve (convert to BGR) every frame."""
    cap, count = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG), 0
    while cap.grab():
        cap.retrieve()
        count += 1
    cap.release()
    return count


def read_needed_frames(path: Path, every: float) -> int:
    """What the pipeline decodes: the sampled frames, seeking when it pays, converted to RGB."""
    with OpenCVSource(path) as source:
        return sum(1 for _ in source.frames(uniform_times(every)))


def read_through_needed_frames(path: Path, every: float) -> int:
    """Without seeking: grab every frame, retrieve and convert to RGB only the sampled ones."""
    picker, count = FramePicker(uniform_times(every)), 0
    with OpenCVSource(path) as source:
        for grab in source.grabs():
            if picker.due(grab.time) and grab.rgb() is not None:
                picker.take(grab.time)
                count += 1
    return count


def picked_frames(path: Path, settings: VideoOptions, size: int) -> list:
    """The frames the pipeline captions, decoded (with its FFmpeg threads) and resized, as its decoding thread does."""
    with open_video(path, settings) as source:
        return list(sample_frames(source, UniformSampler(settings.every, size)))


def caption_alone(model, picks: list, threads: int) -> float:
    """Seconds the model takes on ``picks`` in the pipeline's batches, on ``threads`` torch threads."""
    full = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seconds, _ = timed(lambda: list(caption_picks(model.caption_pixels, picks, None, VideoOptions().batch_size)))
    finally:
        torch.set_num_threads(full)
    return seconds


def processor_time(function, *args, **kwargs):
    """(wall seconds, processor seconds of this process, all threads, result) of one call."""
    cpu = time.process_time()
    wall, result = timed(function, *args, **kwargs)
    return wall, time.process_time() - cpu, result


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="clip length (default: 120)")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between captioned frames (default: 2)")
    parser.add_argument("--hold", type=float, default=15.0, help="seconds each photo is held (default: 15)")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--mode", choices=SAMPLING_MODES, default="uniform", help="frame sampling mode")
    parser.add_argument("--video", help="benchmark this file instead of generating a clip")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each figure (default: 3)")
    parser.add_argument("--device", help="torch device for the model, e.g. cuda (default: cpu)")
    args = parser.parse_args()

    model = load_model(device=args.device)
    on_cpu = model.device.type == "cpu"
    settings = VideoOptions(mode=args.mode, every=args.every)
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(args.video) if args.video else Path(folder) / "clip.mp4"
        if not args.video:
            write_s, _ = timed(write_clip, path, args.seconds, args.hold, args.fps, (1280, 720))
            print(f"wrote {args.seconds:g} s of 1280x720 at {args.fps} fps in {write_s:.1f} s "
                  f"({path.stat().st_size / 1e6:.1f} MB)")
        subtitle_video(path, model=model, settings=settings)  # warm-up, untimed
        size = model.encoder.preprocess.size
        picks = picked_frames(path, settings, size) if args.mode == "uniform" else []
        threads = torch.get_num_threads()
        for _ in range(args.repeat):
            decode_s, frames = timed(decode_every_frame, path)
            through_s, _ = timed(read_through_needed_frames, path, args.every)
            needed_s, needed_cpu, needed = processor_time(read_needed_frames, path, args.every)
            total_s, total_cpu, result = processor_time(subtitle_video, path, model=model, settings=settings)
            for name, seconds in (("decode", decode_s), ("through", through_s), ("needed", needed_s),
                                  ("full", total_s), ("needed cpu", needed_cpu), ("full cpu", total_cpu)):
                runs.setdefault(name, []).append(seconds)
            if picks:
                _, picks_cpu, _ = processor_time(picked_frames, path, settings, size)
                runs.setdefault("picks cpu", []).append(picks_cpu)
                runs.setdefault("model", []).append(caption_alone(model, picks, threads))
                if on_cpu:
                    runs.setdefault("model 1", []).append(caption_alone(model, picks, 1))
    length = result.duration
    print(f"model on {model.device}; threads: torch {torch.get_num_threads()}, opencv {cv2.getNumThreads()}; "
          f"{frames} frames, {length:.1f} s of video, --every {args.every:g}: {needed} frames read, "
          f"{result.frames_captioned} captioned; median (min-max) of {args.repeat} runs")
    rows = [
        ("bare decode, every frame (grab+retrieve)", runs["decode"], "s"),
        (f"bare read of the {needed} frames needed, reading through (grab all, retrieve those)", runs["through"],
         "s"),
        (f"bare read of the {needed} frames needed, as the pipeline reads (seeking when it pays)", runs["needed"],
         "s"),
        (f"full subtitle_video(mode={args.mode}, every={args.every:g}), {len(result.segments)} cues", runs["full"],
         "s"),
        ("speed (video seconds per wall second)", [length / t for t in runs["full"]], "x real time"),
        ("full / bare read of the needed frames, as the pipeline reads",
         [full / needed for full, needed in zip(runs["full"], runs["needed"], strict=True)], "x"),
        ("full / bare read of the needed frames, reading through",
         [full / through for full, through in zip(runs["full"], runs["through"], strict=True)], "x"),
    ]
    if picks:
        rows += [
            (f"processor time of the full run, all threads (machine: {os.cpu_count()} cores)", runs["full cpu"], "s"),
            (f"model alone on the {len(picks)} captioned frames, on {model.device}, {threads} torch threads",
             runs["model"], "s"),
            ("processor time of the bare read (as the pipeline reads)", runs["needed cpu"], "s"),
            ("processor time of the pipeline's decoding thread's work (its FFmpeg threads, resizing)",
             runs["picks cpu"], "s"),
        ]
    if picks and on_cpu:
        cores = os.cpu_count() or 1
        floor = [(read + alone) / cores for read, alone in zip(runs["picks cpu"], runs["model 1"], strict=True)]
        rows += [
            (f"model alone on the {len(picks)} captioned frames, 1 torch thread", runs["model 1"], "s"),
            ("fastest possible, about: (that work + model on 1 thread) / cores", floor, "s"),
            ("... as speed (video seconds per wall second)", [length / f for f in floor], "x real time"),
        ]
    width = max(len(name) for name, _, _ in rows)
    for name, values, unit in rows:
        print(f"{name:<{width}}  {statistics.median(values):6.2f} ({min(values):.2f}-{max(values):.2f}) {unit}")


if __name__ == "__main__":
    main()
