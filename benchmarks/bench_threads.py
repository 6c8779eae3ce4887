"""The model on the main thread, on a second thread, and on a second thread after
``keep_torch_off_this_thread``: the case behind ``captioner/torch_threads.py``.

    .venv/bin/python benchmarks/bench_threads.py --repeat 3

The server and Ray Data's actors run the model on a thread other than the one that loaded
it. Each case runs in a fresh process (the settings are per process), interleaved with
the others in each repeat; the table gives images/s of ``caption_pixel_batch`` at batch 1
and batch 16 (median and min-max) and the ratio to the main thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CASES = ("main thread", "second thread", "second thread, main kept off torch")
BATCHES = (1, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--images", type=int, default=48, help="images captioned per batch size")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one measurement, in a child process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, Path(args.folder))))
        return
    from bench_pipeline import make_folder

    rates: dict[str, dict[int, list[float]]] = {case: {b: [] for b in BATCHES} for case in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        make_folder(args.images, Path(tmp))
        for _ in range(args.repeat):
            for case in CASES:
                out = subprocess.run([sys.executable, __file__, "--case", case, "--folder", tmp],
                                     capture_output=True, text=True, check=True).stdout
                for batch, rate in json.loads(out.splitlines()[-1]).items():
                    rates[case][int(batch)].append(rate)
    print(f"{args.images} images per batch size, {args.repeat} interleaved runs, a fresh process per case and run\n")
    print("| where the model runs | " + " | ".join(f"batch {b}: images/s | vs main" for b in BATCHES) + " |")
    print("|---|" + "---|---|" * len(BATCHES))
    for case in CASES:
        cells = []
        for b in BATCHES:
            runs = rates[case][b]
            ratio = statistics.median(runs) / statistics.median(rates[CASES[0]][b])
            cells.append(f"{statistics.median(runs):.1f} ({min(runs):.1f}-{max(runs):.1f}) | {ratio:.2f}x")
        print(f"| {case} | " + " | ".join(cells) + " |")


def measure(case: str, folder: Path) -> dict[int, float]:
    """Images/s per batch size, with the model loaded on the main thread and run where ``case`` says."""
    import numpy as np
    import torch

    from captioner.api import caption_pixel_batch, load_model
    from captioner.images import bytes_pixels
    from captioner.torch_threads import keep_torch_off_this_thread

    threads = keep_torch_off_this_thread() if case == CASES[2] else torch.get_num_threads()
    model = load_model()
    size = model.encoder.preprocess.size
    pixels = torch.from_numpy(np.stack([bytes_pixels(p.read_bytes(), p.name, size)
                                        for p in sorted(folder.iterdir())]))
    caption_pixel_batch(model, ["warm"] * 4, pixels[:4], None)  # what a server does once it has loaded the model
    rates: dict[int, float] = {}

    def run() -> None:
        torch.set_num_threads(threads)
        for batch in BATCHES:
            caption_pixel_batch(model, ["warm"] * batch, pixels[:batch], None)
            start = time.perf_counter()
            for i in range(0, len(pixels), batch):
                chunk = pixels[i:i + batch]
                caption_pixel_batch(model, ["x"] * len(chunk), chunk, None)
            rates[batch] = len(pixels) / (time.perf_counter() - start)

    if case == CASES[0]:
        run()
    else:
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
    return rates


if __name__ == "__main__":
    main()
