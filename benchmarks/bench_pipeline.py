"""Image pipeline benchmark: encoder paths, folder pipeline vs bare encoder and vs an earlier default.

Everything is measured in one run on the same images, so the ratios compare like with like:

    .venv/bin/python benchmarks/bench_pipeline.py --images 256 --repeat 3

Prints a Markdown table. Images are the Flickr8k dev photos when present (else copies of
the bundled examples), written to a temporary folder. The earlier default model (the
three-decoder ensemble of commit a530fb7) is taken from git history into a temporary
folder, so the comparison needs no saved copy. Pipeline figures are repeated
(interleaved) and given as median (min-max).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner.api import load_model  # noqa: E402
from captioner.data import read_manifest  # noqa: E402
from captioner.decoding import DecodingOptions  # noqa: E402
from captioner.features import ImageFiles, collate_images  # noqa: E402
from captioner.model import CaptionModel  # noqa: E402
from captioner.options import DEFAULT_WORKERS  # noqa: E402
from captioner.pipelines.folder import caption_folder  # noqa: E402


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def make_folder(count: int, folder: Path) -> list[Path]:
    dev = ROOT / "data_manifests" / "flickr8k_dev.jsonl"
    sources = [e.image for e in read_manifest(dev)] if dev.exists() else []
    sources = [p for p in sources if p.exists()] or sorted((ROOT / "captioner" / "examples").glob("*.png"))
    paths = []
    for i in range(count):
        src = sources[i % len(sources)]
        dst = folder / f"{i:05d}{src.suffix}"
        shutil.copy(src, dst)
        paths.append(dst)
    return paths


def load_pixels(model, paths: list[Path]) -> torch.Tensor:
    _, pixels, errors = collate_images([ImageFiles(paths, model.encoder.preprocess.size)[i] for i in range(len(paths))])
    assert not errors
    return pixels


def encoder_variants(model, pixels: torch.Tensor, batch: int) -> list[tuple[str, float]]:
    """Images/s of the encoder alone under each CPU execution choice."""
    rows = []
    enc = model.encoder
    images = enc.preprocess.normalize(pixels)

    def run(module, x, grad=False):
        ctx = torch.enable_grad() if grad else torch.inference_mode()
        with ctx:
            for s in range(0, len(x), batch):
                module(x[s : s + batch])

    contiguous = images.contiguous()
    channels_last = images.contiguous(memory_format=torch.channels_last)
    plain = copy.deepcopy(enc).to(memory_format=torch.contiguous_format)
    rows.append(("encoder, NCHW, autograd on", len(images) / timed(lambda: run(plain, contiguous, grad=True), 2)))
    rows.append(("encoder, NCHW, inference_mode", len(images) / timed(lambda: run(plain, contiguous), 2)))
    rows.append(("encoder, channels_last, inference_mode", len(images) / timed(lambda: run(enc, channels_last), 2)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows.append(("encoder, channels_last, 1 thread", len(images) / timed(lambda: run(enc, channels_last), 2)))
    torch.set_num_threads(threads)
    try:
        compiled = torch.compile(enc)
        run(compiled, channels_last[:batch])  # compile outside the timing
        speed = len(images) / timed(lambda: run(compiled, channels_last), 2)
        rows.append(("encoder, channels_last, torch.compile", speed))
    except Exception as e:  # noqa: BLE001 - a missing compiler toolchain is a result, not a crash
        rows.append((f"encoder, torch.compile failed: {type(e).__name__}", float("nan")))
    return rows


def beam_comparison(model, pixels: torch.Tensor, batch: int, beam: int) -> tuple[float, float, bool]:
    """Seconds for batched beam search vs a per-image loop over the same grids; same captions?"""
    options = DecodingOptions(beam_size=beam)
    grid = model.encode(pixels[:batch])
    batched_captions: list = []
    per_image_captions: list = []
    batched = timed(lambda: batched_captions.__setitem__(slice(None), model.caption_grid(grid, options)))
    per_image = timed(
        lambda: per_image_captions.__setitem__(
            slice(None), [model.caption_grid(grid[i : i + 1], options)[0] for i in range(len(grid))]
        )
    )
    same = [c[0].text for c in batched_captions] == [c[0].text for c in per_image_captions]
    return batched, per_image, same


def model_from_git(rev: str, folder: Path) -> CaptionModel:
    """The default model as shipped at commit ``rev``, read from git history."""
    folder.mkdir(parents=True)
    for name in ("config.json", "vocab.json", "model.safetensors"):
        blob = subprocess.run(["git", "show", f"{rev}:captioner/default_model/{name}"], cwd=ROOT, check=True,
                              capture_output=True).stdout
        (folder / name).write_bytes(blob)
    return load_model(folder)


RELEASE_RUN = """
import sys, time
sys.path.insert(0, {tree!r})
from captioner.api import load_model
from captioner.pipelines.folder import caption_folder
import captioner
assert captioner.__file__.startswith({tree!r}), captioner.__file__
model = load_model()
start = time.perf_counter()
caption_folder({folder!r}, {out!r}, model=model, batch_size={batch}, num_workers={workers}, progress=False)
print({images} / (time.perf_counter() - start))
"""


class Release:
    """The folder pipeline as released at a commit: its code and its default model, in a git worktree.

    What users had before: unlike the baseline model run by today's code, this also
    carries the search code of that commit. Runs in a subprocess; model loading is not timed.
    """

    def __init__(self, rev: str, tmp: Path):
        self.rev, self.tree = rev, tmp / "release"
        subprocess.run(["git", "worktree", "add", "--detach", str(self.tree), rev], cwd=ROOT, check=True,
                       capture_output=True)
        (self.tree / "captioner" / "pipelines").symlink_to(self.tree / "pipelines")  # installed as captioner.pipelines

    def images_per_second(self, folder: Path, out: Path, images: int, batch: int, workers: int) -> float:
        out.unlink(missing_ok=True)
        code = RELEASE_RUN.format(tree=str(self.tree), folder=str(folder), out=str(out), batch=batch,
                                  workers=workers, images=images)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return float(done.stdout.split()[-1])

    def remove(self) -> None:
        subprocess.run(["git", "worktree", "remove", "--force", str(self.tree)], cwd=ROOT, capture_output=True)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def captions_of(records: Path) -> dict[str, str]:
    return {r["path"]: r.get("caption", "") for r in map(json.loads, records.read_text().splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32, help="encoder and pipeline batch size")
    parser.add_argument("--beam-batch", type=int, default=64)
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each pipeline figure")
    parser.add_argument("--baseline-rev", default="a530fb7", help="commit whose default model is the comparison")
    parser.add_argument("--release-rev", default="e4f2e42",
                        help="commit whose code and default model (as released) are also compared; '' to skip")
    args = parser.parse_args()

    model = load_model()
    with tempfile.TemporaryDirectory() as tmp:
        baseline = model_from_git(args.baseline_rev, Path(tmp) / "baseline")
        folder = Path(tmp) / "photos"
        folder.mkdir()
        paths = make_folder(args.images, folder)
        pixels = load_pixels(model, paths)
        rows = encoder_variants(model, pixels, args.batch)
        bare = next(v for name, v in rows if name == "encoder, channels_last, inference_mode")  # the pipeline's path

        def pipeline_run(name: str, captioner: CaptionModel) -> float:
            out = Path(tmp) / name
            out.unlink(missing_ok=True)
            return args.images / timed(lambda: caption_folder(folder, out, model=captioner, batch_size=args.batch,
                                                              num_workers=args.workers, progress=False))

        release = Release(args.release_rev, Path(tmp)) if args.release_rev else None
        runs: dict[str, list[float]] = {"default": [], "baseline": [], "release": []}
        try:
            for _ in range(args.repeat):
                runs["default"].append(pipeline_run("default.jsonl", model))
                runs["baseline"].append(pipeline_run("baseline.jsonl", baseline))
                if release:
                    runs["release"].append(release.images_per_second(folder, Path(tmp) / "release.jsonl",
                                                                     args.images, args.batch, args.workers))
        finally:
            if release:
                release.remove()
        ratios = [d / b for d, b in zip(runs["default"], runs["baseline"], strict=True)]
        release_ratios = [d / r for d, r in zip(runs["default"], runs["release"], strict=False)]
        batched, per_image, same = beam_comparison(model, pixels, args.beam_batch, args.beam)
        compile_seconds = timed(lambda: (model.compile_encoder(), model.encode(pixels[: args.batch])))
        compiled_pipeline = pipeline_run("compiled.jsonl", model)
        compiled_same = captions_of(Path(tmp) / "default.jsonl") == captions_of(Path(tmp) / "compiled.jsonl")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    decoding = model.config.decoding

    print(f"\n{args.images} images, batch {args.batch}, {torch.get_num_threads()} threads\n")
    print("| measurement | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.1f} img/s |")
    print(f"| folder pipeline, default (read, resize, encode, beam {decoding.beam_size}, write) "
          f"| {spread(runs['default'])} img/s |")
    print(f"| folder pipeline, {args.baseline_rev} default ({baseline.config.ensemble_size} decoders, beam "
          f"{baseline.config.decoding.beam_size}) | {spread(runs['baseline'])} img/s |")
    print(f"| default / {args.baseline_rev} default, same run | {spread(ratios)}x |")
    if release_ratios:
        print(f"| folder pipeline as released at {args.release_rev} (its code and default model) "
              f"| {spread(runs['release'])} img/s |")
        print(f"| default / {args.release_rev} release, same run | {spread(release_ratios)}x |")
    to_bare = statistics.median(runs["default"]) / bare
    print(f"| default pipeline / bare encoder (same eager encoder) | {to_bare:.2f}x |")
    print(f"| folder pipeline with --compile ({compile_seconds:.0f} s compile first) | {compiled_pipeline:.1f} img/s |")
    print(f"| --compile captions identical to eager | {compiled_same} |")
    print(f"| beam {args.beam}, batch {args.beam_batch}: batched search | {batched:.3f} s |")
    print(f"| same, per-image loop | {per_image:.3f} s |")
    print(f"| batched speed-up | {per_image / batched:.1f}x |")
    print(f"| batched captions identical to per-image | {same} |")
    print(f"| peak RSS | {peak_mb:.0f} MB |")


if __name__ == "__main__":
    main()
