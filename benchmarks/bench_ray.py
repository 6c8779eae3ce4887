"""The local folder pipeline against ``batch --ray`` on a local Ray runtime, same images, one run.

    .venv/bin/python benchmarks/bench_ray.py --images 256 --repeat 3

Prints a Markdown table: images/s of each (median and min-max over interleaved repeats),
their ratio, whether the captions are the same, and what starting the Ray runtime costs
once (it is started before the timed runs: a long job pays it once). Images are the
Flickr8k dev photos when present, else copies of the bundled examples.

Then what a Ray call cannot avoid before its first batch, each part measured alone: Ray
Data's own start (the same two steps, doing nothing, until their first batch is back), and
what any fresh process that captions pays (importing torch and captioner, loading the model,
the first batch's one-off set-up). The actor pays them one after another; those plus the
images at the local pipeline's rate give about the best ratio a call of this many images
could reach here. About: in a real call the read workers start beside the actor, so where
their start is the longer one, a little of Ray Data's start is counted with the actor's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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
from captioner.pipelines.ray_batch import RaySettings, blocks_for, caption_with_ray, iter_records  # noqa: E402


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
        noop = [ray_data_start(folder, settings) for _ in range(args.repeat)]
        fresh = [fresh_process_start(folder, args.batch_size) for _ in range(args.repeat)]
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
    parts = {name: [f[name] for f in fresh] for name in fresh[0]}
    # the images at the local pipeline's rate: the same model on the same machine, which the actor's
    # steady rate matched (1.03x) on 256 images; a run of one or two batches has no steady rate to speak of
    floor = [n + sum(f.values()) + args.images / loc for n, f, loc in zip(noop, fresh, local_rates, strict=True)]
    best = [args.images / loc / f for loc, f in zip(local_rates, floor, strict=True)]
    print("\nWhat a Ray call cannot avoid, each part alone (seconds, median (min-max)):\n")
    print("| part | seconds |")
    print("|---|---|")
    print(f"| Ray Data's own start: the same two steps doing nothing, until their first batch | {_spread(noop, 2)} |")
    for name, values in parts.items():
        print(f"| a fresh process: {name} | {_spread(values, 2)} |")
    print(f"| those, plus {args.images} images at the local pipeline's rate | {_spread(floor, 2)} |")
    print(f"\nbest whole-call ratio to the local pipeline a call of {args.images} images could reach here, about: "
          f"{_spread(best, 2)}x")


class _Nothing:
    """An actor that does nothing: what Ray Data's start costs without a model."""

    def __call__(self, batch: dict) -> dict:
        return batch


def _no_read(batch: dict) -> dict:
    return batch


def ray_data_start(folder: Path, settings: RaySettings) -> float:
    """Seconds until the first batch comes back from ``caption_with_ray``'s two steps with nothing in them."""
    import ray

    items = [{"path": str(p), "inside": str(p)} for p in sorted(folder.iterdir())]
    started = time.perf_counter()
    dataset = (ray.data.from_items(items, override_num_blocks=blocks_for(len(items), settings))
               .map_batches(_no_read, batch_size=settings.batch_size, num_cpus=0, concurrency=settings.actors)
               .map_batches(_Nothing, batch_size=settings.batch_size, concurrency=settings.actors,
                            num_cpus=settings.cpus_per_actor))
    batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    next(batches)
    first = time.perf_counter() - started
    for _ in batches:
        pass
    return first


FRESH = """
import json, sys, time
import numpy as np
started = time.perf_counter()
import torch
from captioner.api import caption_pixel_batch, load_model
from captioner.images import bytes_pixels
imported = time.perf_counter()
model = load_model()
loaded = time.perf_counter()
size = model.encoder.preprocess.size
paths = sys.argv[1:]
pixels = torch.from_numpy(np.stack([bytes_pixels(open(p, "rb").read(), p, size) for p in paths]))
times = []
for _ in range(3):
    t = time.perf_counter()
    caption_pixel_batch(model, paths, pixels)
    times.append(time.perf_counter() - t)
print(json.dumps({"importing torch and captioner": imported - started, "loading the model": loaded - imported,
                  "the first batch's one-off set-up (first batch less the later ones')": times[0] - min(times[1:])}))
"""


def fresh_process_start(folder: Path, batch_size: int) -> dict[str, float]:
    """What a new process pays before it captions at the steady rate (the actor's own start, without Ray)."""
    paths = [str(p) for p in sorted(folder.iterdir())[:batch_size]]
    done = subprocess.run([sys.executable, "-c", FRESH, *paths], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def _spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


if __name__ == "__main__":
    main()
