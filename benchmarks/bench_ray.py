"""The local folder pipeline against ``batch --ray`` on a local Ray runtime, same images, one run.

    .venv/bin/python benchmarks/bench_ray.py --images 256 --repeat 3

Prints a Markdown table: images/s of each (median and min-max over interleaved repeats),
their ratio, whether the captions are the same, and what starting the Ray runtime costs
once (it is started before the timed runs: a long job pays it once). Images are the
Flickr8k dev photos when present, else copies of the bundled examples.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_pipeline import make_folder  # noqa: E402

from captioner.api import load_model  # noqa: E402
from captioner.options import DEFAULT_WORKERS  # noqa: E402
from captioner.pipelines.folder import caption_folder  # noqa: E402
from captioner.pipelines.ray_batch import RaySettings, caption_with_ray, iter_records  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import ray

    from captioner.pipelines.ray_batch import start_ray

    cpus = os.cpu_count() or 1
    started = time.perf_counter()
    start_ray(None, cpus)
    startup = time.perf_counter() - started
    model = load_model()
    settings = RaySettings(actors=1, cpus_per_actor=cpus, batch_size=args.batch_size, shard_size=1000)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        make_folder(args.images, folder)
        local_rates, ray_rates, steady, first, same = [], [], [], [], True
        for run in range(args.repeat):
            local_out, ray_out = Path(tmp) / f"local{run}.jsonl", Path(tmp) / f"ray{run}"
            t = time.perf_counter()
            caption_folder(folder, local_out, model=model, batch_size=args.batch_size,
                           num_workers=DEFAULT_WORKERS, progress=False)
            local_rates.append(args.images / (time.perf_counter() - t))
            t = time.perf_counter()
            summary = caption_with_ray(str(folder), str(ray_out), settings=settings)
            ray_rates.append(args.images / (time.perf_counter() - t))
            steady.append(summary.steady_rate())
            first.append(summary.first_record)
            local = {r["path"]: r["caption"] for r in map(json.loads, local_out.read_text().splitlines())}
            remote = {r["path"]: r["caption"] for r in iter_records(str(ray_out))}
            same = same and local == remote
    ray.shutdown()
    ratios = [r / loc for r, loc in zip(ray_rates, local_rates, strict=True)]
    print(f"{args.images} images, batch {args.batch_size}, {cpus} CPUs, {args.repeat} interleaved runs\n")
    print("| path | images/s, median (min-max) | vs local |")
    print("|---|---|---|")
    print(f"| local folder pipeline | {_spread(local_rates)} | 1.00x |")
    print(f"| --ray, local runtime, 1 actor x {cpus} CPUs, whole call | {_spread(ray_rates)} | {_spread(ratios, 2)}x |")
    steady_ratios = [r / loc for r, loc in zip(steady, local_rates, strict=True)]
    print(f"| same, after its first batch (the actor up, its model loaded) | {_spread(steady)} | "
          f"{_spread(steady_ratios, 2)}x |")
    print(f"\ncaptions identical: {same}; first batch back after {_spread(first)} s of each Ray call; "
          f"starting the local Ray runtime (once per process): {startup:.1f} s")


def _spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


if __name__ == "__main__":
    main()
