"""``captioner serve`` on loopback: throughput and latency for 1, 4 and 16 concurrent clients.

    .venv/bin/python benchmarks/bench_serve.py --requests 96 --repeat 3

Starts the server as users do (a uvicorn process), then for each client count sends
``--requests`` one-photo requests spread over the clients, each client waiting for its
answer before sending the next. Prints images/s (median and min-max over the repeats),
p50 and p95 latency, and the folder pipeline's images/s on the same photos in the same
run for comparison. Photos are Flickr8k dev images when present, else the bundled examples.

It also times the model alone (no HTTP, photos already decoded) on batches as large as
each client count, in this process before the server starts: how much batching can gain
at best, which bounds what the server's batcher can gain from concurrent clients.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_pipeline import make_folder  # noqa: E402
from conftest import free_port  # noqa: E402

from captioner.api import caption_pixel_batch, load_model  # noqa: E402
from captioner.images import bytes_pixels  # noqa: E402
from captioner.options import DEFAULT_WORKERS  # noqa: E402
from captioner.pipelines.folder import caption_folder  # noqa: E402

CLIENTS = (1, 4, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=96, help="requests per client count and repeat")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-wait-ms", type=int, default=5, help="the server's --max-wait-ms")
    parser.add_argument("--max-batch-size", type=int, default=32, help="the server's --max-batch-size")
    parser.add_argument("--device", help="torch device for the server and the in-process figures, e.g. cuda")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        photos = [p.read_bytes() for p in make_folder(args.requests, folder)]
        model = load_model(device=args.device)
        folder_rate = pipeline_rate(model, folder, Path(tmp), args.requests)
        size = model.encoder.preprocess.size  # decoded once: the model-alone figures leave decoding out
        pixels = torch.from_numpy(np.stack([bytes_pixels(data, f"photo {i}", size) for i, data in enumerate(photos)]))
        alone = {n: statistics.median(model_rate(model, pixels, n) for _ in range(args.repeat)) for n in CLIENTS}
        del model
        url, server = start_server(photos[0], args.max_wait_ms, args.max_batch_size, args.device)
        try:
            rows = {n: [] for n in CLIENTS}
            for _ in range(args.repeat):
                for clients in CLIENTS:
                    rows[clients].append(load(url, photos, clients))
        finally:
            server.terminate()
            server.wait(timeout=30)
    one = statistics.median(r[0] for r in rows[1])
    print(f"{args.requests} one-photo requests per run, {args.repeat} runs, server --max-wait-ms {args.max_wait_ms} "
          f"--max-batch-size {args.max_batch_size}; "
          "folder pipeline on the same photos: "
          f"{folder_rate:.1f} images/s\n")
    print("| clients | images/s, median (min-max) | vs 1 client | vs folder pipeline | p50 latency | p95 latency "
          "| model alone at batch = clients: images/s, vs batch 1 |")
    print("|---|---|---|---|---|---|---|")
    for clients, runs in rows.items():
        rates = [r[0] for r in runs]
        p50 = statistics.median(r[1] for r in runs)
        p95 = statistics.median(r[2] for r in runs)
        print(f"| {clients} | {statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f}) | "
              f"{statistics.median(rates) / one:.2f}x | {statistics.median(rates) / folder_rate:.2f}x | "
              f"{p50 * 1000:.0f} ms | {p95 * 1000:.0f} ms | {alone[clients]:.1f}, {alone[clients] / alone[1]:.2f}x |")
    print("\nimages/s of each run, in the order they ran: "
          + "; ".join(f"{clients} clients " + ", ".join(f"{r[0]:.1f}" for r in runs) for clients, runs in rows.items()))


def model_rate(model, pixels: torch.Tensor, batch: int) -> float:
    """Images/s of the model alone on ``batch`` of the (N, S, S, 3) decoded photos at a time (no HTTP, no decoding)."""
    caption_pixel_batch(model, list(range(batch)), pixels[:batch])  # warm-up: first batches of a size set up kernels
    start = time.perf_counter()
    for first in range(0, len(pixels), batch):
        chunk = pixels[first : first + batch]
        caption_pixel_batch(model, list(range(len(chunk))), chunk)
    return len(pixels) / (time.perf_counter() - start)


def pipeline_rate(model, folder: Path, tmp: Path, count: int) -> float:
    caption_folder(folder, tmp / "warm.jsonl", model=model, num_workers=DEFAULT_WORKERS, progress=False)
    start = time.perf_counter()
    caption_folder(folder, tmp / "timed.jsonl", model=model, num_workers=DEFAULT_WORKERS, progress=False)
    return count / (time.perf_counter() - start)


def start_server(photo: bytes, max_wait_ms: int, max_batch_size: int,
                 device: str | None = None) -> tuple[str, subprocess.Popen]:
    port = free_port()
    command = [sys.executable, "-m", "captioner.pipelines.cli", "serve", "--port", str(port),
               "--max-wait-ms", str(max_wait_ms), "--max-batch-size", str(max_batch_size)]
    command += ["--device", device] if device else []
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    with httpx.Client() as client:  # warm-up: the first batch pays one-off costs
        client.post(url + "/v1/captions", files=[("images", ("warm.jpg", photo, "image/jpeg"))]).raise_for_status()
    return url, server


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "captioner-bench-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def load(url: str, photos: list[bytes], clients: int) -> tuple[float, float, float]:
    """(images/s, p50 latency, p95 latency) of one run with ``clients`` concurrent clients."""
    latencies: list[float] = []

    host, port = url.removeprefix("http://").split(":")

    def client(index: int) -> None:
        # a plain keep-alive connection and a prebuilt body: the clients share the server's two cores,
        # so they should cost as little of them as a client can
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        for i in range(index, len(photos), clients):
            body, content_type = _multipart(f"{i}.jpg", photos[i])
            start = time.perf_counter()
            connection.request("POST", "/v1/captions", body, {"Content-Type": content_type})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
            latencies.append(time.perf_counter() - start)
        connection.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    latencies.sort()
    return len(photos) / wall, latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.95)]


if __name__ == "__main__":
    main()
