"""Encoder cost: images/s of each EfficientNet-Lite on the same photos, interleaved over repeats.

    .venv/bin/python benchmarks/bench_encoders.py --images 128 --repeat 3

Each encoder runs the pipeline's path (its own input size, channels_last, inference mode,
batch 32). Prints a Markdown table: images/s as median (min-max) and the ratio to the first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_pipeline import make_folder, spread  # noqa: E402

from captioner.allocator import keep_freed_memory  # noqa: E402
from captioner.encoders import build_encoder  # noqa: E402
from captioner.images import model_pixels  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=["efficientnet_lite0", "efficientnet_lite1",
                                                          "efficientnet_lite2"])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    keep_freed_memory()
    encoders = [build_encoder(name).eval().to(memory_format=torch.channels_last) for name in args.encoders]
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_folder(args.images, Path(tmp))
        pixels = [torch.from_numpy(np.stack([model_pixels(p, e.preprocess.size) for p in paths])) for e in encoders]
    speeds: list[list[float]] = [[] for _ in encoders]
    for _ in range(args.repeat + 1):  # the first round warms up and is not counted
        for i, (encoder, x) in enumerate(zip(encoders, pixels, strict=True)):
            start = time.perf_counter()
            for s in range(0, len(x), args.batch):
                encoder.encode(x[s : s + args.batch])
            speeds[i].append(len(x) / (time.perf_counter() - start))
    print(f"\n{args.images} images, batch {args.batch}, {torch.get_num_threads()} threads, {args.repeat} repeats\n")
    print("| encoder | input | grid | img/s | ratio to first |")
    print("|---|---|---|---|---|")
    first = statistics.median(speeds[0][1:])
    for encoder, runs in zip(encoders, speeds, strict=True):
        size = encoder.preprocess.size
        grid = (size + 31) // 32
        print(f"| {encoder.name} | {size} px | {grid}x{grid} | {spread(runs[1:])} | "
              f"{statistics.median(runs[1:]) / first:.2f}x |")


if __name__ == "__main__":
    main()
