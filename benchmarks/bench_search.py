"""Search benchmark: caption search alone (no image reading, no encoder) per model, beam and weight type.

The grids of the same photos are encoded once; each variant then searches them, interleaved
over repeats, so that the ratios compare like with like on a noisy machine:

    .venv/bin/python benchmarks/bench_search.py --models captioner/default_model --beams 3 5 --repeat 3

Prints a Markdown table: images/s as median (min-max), the ratio to the first row, and how
many first captions match the first row's.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_pipeline import load_pixels, make_folder, spread  # noqa: E402

from captioner.api import load_model  # noqa: E402
from captioner.model import CaptionModel  # noqa: E402
from captioner.quantize import int8_decoder  # noqa: E402


def variants(folders: list[str], beams: list[int], int8: bool) -> list[tuple[str, CaptionModel, int]]:
    """(label, model, beam) for every model folder, beam size and (optionally) int8 decoder."""
    rows = []
    for folder in folders:
        model = load_model(folder)
        kinds = [("float", model)]
        if int8:
            quantized = copy.deepcopy(model)
            quantized.decoder = int8_decoder(model.decoder)
            kinds.append(("int8", quantized))
        for kind, m in kinds:
            rows.extend((f"{folder} ({m.config.ensemble_size} decoder(s), {kind})", m, beam) for beam in beams)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[str(ROOT / "captioner" / "default_model")])
    parser.add_argument("--beams", nargs="+", type=int, default=[5])
    parser.add_argument("--int8", action="store_true", help="also time each model with an int8 decoder")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32, help="images per search batch (the pipeline's default)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    rows = variants(args.models, args.beams, args.int8)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_folder(args.images, Path(tmp))
        grid = rows[0][1].encode(load_pixels(rows[0][1], paths))
    for _, model, beam in rows:  # first calls pay one-off costs (weight packing, allocator growth)
        model.caption_grid(grid[: args.batch], dataclasses.replace(model.config.decoding, beam_size=beam))
    seconds: list[list[float]] = [[] for _ in rows]
    captions: list[list[str]] = [[] for _ in rows]
    for _ in range(args.repeat):
        for i, (_, model, beam) in enumerate(rows):
            options = dataclasses.replace(model.config.decoding, beam_size=beam)
            start = time.perf_counter()
            found = [c[0].text for s in range(0, len(grid), args.batch)
                     for c in model.caption_grid(grid[s : s + args.batch], options)]
            seconds[i].append(time.perf_counter() - start)
            captions[i] = found

    print(f"\n{args.images} images, search batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{args.repeat} repeats\n")
    print("| model | beam | search img/s | ratio to first row | first captions as first row |")
    print("|---|---|---|---|---|")
    first = statistics.median(seconds[0])
    for (label, _, beam), times, found in zip(rows, seconds, captions, strict=True):
        speeds = [args.images / t for t in times]
        same = sum(a == b for a, b in zip(found, captions[0], strict=True))
        print(f"| {label} | {beam} | {spread(speeds)} | {first / statistics.median(times):.2f}x "
              f"| {same}/{len(found)} |")


if __name__ == "__main__":
    main()
