"""PyTorch eager, PyTorch compiled, ONNX Runtime float and ONNX Runtime int8, side by side.

    .venv/bin/python benchmarks/bench_onnx.py --images 256 --repeat 3

Each variant runs in its own process (so its peak memory is its own), repeats interleaved:
the encoder alone on the images' pixels, the search alone on the encoder's grids, then the
whole folder pipeline (read, resize, encode, search, write). Prints images/s as median
(min-max), the ratio to PyTorch eager, peak resident memory, whether every caption equals
PyTorch eager's, and what the fastest exact encoder and search together would give. Images
are Flickr8k dev photos when present, else the bundled examples.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = ("torch eager", "torch compiled", "onnxruntime float", "onnxruntime int8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one measurement, in a child process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, Path(args.folder))))
        return
    from bench_pipeline import make_folder

    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        make_folder(args.images, folder)
        for _ in range(args.repeat):
            for variant in VARIANTS:
                command = [sys.executable, __file__, "--variant", variant, "--folder", str(folder)]
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                runs[variant].append(json.loads(out.strip().splitlines()[-1]))
    report(runs, args)


def measure(variant: str, folder: Path) -> dict:
    from captioner.api import load_model
    from captioner.features import ImageFiles, collate_images
    from captioner.pipelines.folder import caption_folder

    model = load_model()
    if variant == "torch compiled":
        model.compile_encoder()
    elif variant.startswith("onnxruntime"):
        from captioner.model import DEFAULT_MODEL_DIR
        from captioner.onnx_export import export_onnx, quantize_int8
        from captioner.onnx_runtime import load_onnx_model

        export = Path(tempfile.mkdtemp()) / "onnx"
        export_onnx(model, export, calibration_from=DEFAULT_MODEL_DIR)
        if variant.endswith("int8"):
            quantize_int8(export)
        model = load_onnx_model(export)
    paths = sorted(folder.iterdir())
    files = ImageFiles(paths, model.encoder.preprocess.size)
    _, pixels, _ = collate_images([files[i] for i in range(len(paths))])
    model.caption_grid(model.encode(pixels[:32]))  # warm-up
    start = time.perf_counter()
    grids = [model.encode(pixels[s : s + 32]) for s in range(0, len(paths), 32)]
    encoder_rate = len(paths) / (time.perf_counter() - start)
    start = time.perf_counter()
    for grid in grids:
        model.caption_grid(grid)
    search_rate = len(paths) / (time.perf_counter() - start)
    out = Path(tempfile.mkdtemp()) / "captions.jsonl"
    start = time.perf_counter()
    caption_folder(folder, out, model=model, progress=False, num_workers=0)
    pipeline_rate = len(paths) / (time.perf_counter() - start)
    captions = {r["path"]: r["caption"] for r in map(json.loads, out.read_text().splitlines())}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"encoder": encoder_rate, "search": search_rate, "pipeline": pipeline_rate, "peak_mb": peak,
            "captions": captions}


def report(runs: dict[str, list[dict]], args: argparse.Namespace) -> None:
    eager = runs["torch eager"]
    parts = ("encoder", "search", "pipeline")
    base = {k: statistics.median(r[k] for r in eager) for k in parts}
    print(f"{args.images} images, {args.repeat} interleaved runs, each variant in its own process; search: "
          "caption_grid (search, tags, reranking, confidence) on the encoder's grids\n")
    print("| variant | encoder images/s | vs eager | search images/s | vs eager | pipeline images/s | vs eager | "
          "peak memory | captions = eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    exact = []  # the variants whose every run gave eager's captions
    for variant, rows in runs.items():
        cells = []
        for key in parts:
            values = [r[key] for r in rows]
            cells += [f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})",
                      f"{statistics.median(values) / base[key]:.2f}x"]
        same = sum(r["captions"] == eager[0]["captions"] for r in rows) == len(rows)
        exact += [variant] if same else []
        differing = sum(rows[0]["captions"][p] != c for p, c in eager[0]["captions"].items())
        total = len(eager[0]["captions"])
        match = "yes" if same else f"no ({differing} of {total} differ)"
        print(f"| {variant} | {' | '.join(cells)} | {statistics.median(r['peak_mb'] for r in rows):.0f} MB | "
              f"{match} |")
    best_combination(runs, base, exact)


def best_combination(runs: dict[str, list[dict]], base: dict[str, float], exact: list[str]) -> None:
    """The pipeline's best case from its parts: the fastest exact encoder with the fastest exact search.

    Per image, eager's pipeline time less its encoder and search times is what no runtime
    changes (reading, writing; negative where reading overlaps the model).
    """
    median = {v: {k: statistics.median(r[k] for r in runs[v]) for k in ("encoder", "search")} for v in exact}
    encoder = max(exact, key=lambda v: median[v]["encoder"])
    search = max(exact, key=lambda v: median[v]["search"])
    rest = 1 / base["pipeline"] - 1 / base["encoder"] - 1 / base["search"]
    best = 1 / (max(rest, 0.0) + 1 / median[encoder]["encoder"] + 1 / median[search]["search"])
    print(f"\nexact parts at best: the encoder of {encoder} and the search of {search} would make a pipeline of "
          f"{best:.1f} images/s, {best / base['pipeline']:.2f}x eager (what no runtime changes: "
          f"{max(rest, 0.0) * 1000:.2f} ms an image of eager's {1000 / base['pipeline']:.1f} ms)")


if __name__ == "__main__":
    main()
