"""How much of ``subtitle_video`` is decoding and how much is captioning, on a generated 720p clip.

    OMP_NUM_THREADS=1 python benchmarks/bench_video.py --seconds 20   # quick
    python benchmarks/bench_video.py                                   # 2 minutes of 720p, 25 fps
    python benchmarks/bench_video.py --mode scenes                     # with scene detection (same one pass)

The clip holds a few sample photos for ``--hold`` seconds each (mp4v, written with
cv2.VideoWriter into a temporary folder, deleted afterwards). One run prints a table:
decoding every frame (grab + retrieve), reading only the frames ``--every`` needs
(grab, retrieve only those), the full pipeline, its speed in video seconds per wall
second, and how many times the decode of the needed frames the full pipeline takes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from captioner.api import load_model
from captioner.pipelines.video import subtitle_video, uniform_times
from captioner.pipelines.video_options import SAMPLING_MODES, VideoOptions
from captioner.pipelines.video_source import OpenCVSource

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
    """What the pipeline decodes: grab every frame, retrieve and convert to RGB only the sampled ones."""
    with OpenCVSource(path) as source:
        return sum(1 for _ in source.frames(uniform_times(every)))


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
    args = parser.parse_args()

    model = load_model()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(args.video) if args.video else Path(folder) / "clip.mp4"
        if not args.video:
            write_s, _ = timed(write_clip, path, args.seconds, args.hold, args.fps, (1280, 720))
            print(f"wrote {args.seconds:g} s of 1280x720 at {args.fps} fps in {write_s:.1f} s "
                  f"({path.stat().st_size / 1e6:.1f} MB)")
        decode_s, frames = timed(decode_every_frame, path)
        needed_s, needed = timed(read_needed_frames, path, args.every)
        settings = VideoOptions(mode=args.mode, every=args.every)
        total_s, result = timed(subtitle_video, path, model=model, settings=settings)
    length = result.duration
    print(f"threads: torch {torch.get_num_threads()}, opencv {cv2.getNumThreads()}; "
          f"{frames} frames, {length:.1f} s of video, --every {args.every:g}: {needed} frames read, "
          f"{result.frames_captioned} captioned")
    rows = [
        ("bare decode, every frame (grab+retrieve)", decode_s),
        (f"bare read of the {needed} frames needed (grab all, retrieve those)", needed_s),
        (f"full subtitle_video(mode={args.mode}, every={args.every:g}), {len(result.segments)} cues", total_s),
    ]
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:8.2f} s")
    print(f"{'speed (video seconds per wall second)':<{width}}  {length / total_s:8.2f} x real time")
    print(f"{'full / bare read of the needed frames':<{width}}  {total_s / needed_s:8.2f}")


if __name__ == "__main__":
    main()
