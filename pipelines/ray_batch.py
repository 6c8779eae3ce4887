"""Batch captioning on Ray Data: the folder pipeline's records, from one machine or a cluster.

The dataset is the list of image paths still to do; Ray tasks read their bytes (through
pyarrow's filesystems: a local folder, ``s3://``, ``gs://``, ``file://``), and an actor
pool captions them: each actor loads the model once and runs the same pixel path, encoder
pass and batched search as the local pipeline (:func:`captioner.api.caption_pixel_batch`),
so a photo gets the same record either way. Bad files become error records.

The driver writes the records it receives as shards in OUT (JSONL, or Parquet), each
written whole under a hidden name and renamed into place (an object store's put is whole
by itself). A killed driver loses at most the shard it was filling; running the same
command again lists what the shards hold and captions only the rest, so nothing is
captioned into two shards.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from captioner.errors import ImageReadError, OptionError, OutputError, one_line, printable, reason
from captioner.images import bytes_pixels, check_image_file, is_image_path
from captioner.pipelines.extras import require_extra
from captioner.pipelines.flags import bounded_float, bounded_int
from captioner.pipelines.record_formats import (
    BadRecord,
    Chunk,
    JsonlRecords,
    checked_record,
    earlier_failures,
    raw_path,
    result_record,
)
from captioner.pipelines.sources import OnError, unlisted_line, walk_images

SHARD_FORMATS = ("jsonl", "parquet")
MERGED_NAME = "captions.jsonl"
LOCK_NAME = ".captioner.lock"  # held by the run writing a local OUT
REMOTE_READS = 8  # files fetched at once by one read task from a URI source
GCS_RETRY_SECONDS = 15  # how long an unreachable Google Cloud Storage is retried (pyarrow's own default: 15 minutes)


@dataclass(frozen=True)
class RaySettings:
    """Where Ray runs and how the actor pool is shaped."""

    address: str | None = None  # None: start a local runtime; "auto" or "ray://host:10001": join a cluster
    actors: int = 1  # actors captioning in parallel, each with its own copy of the model
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    batch_size: int = 32  # images per encoder + search batch inside an actor
    shard_size: int = 1000  # records per output shard


@dataclass
class RaySummary:
    captioned: int = 0
    failed: int = 0
    already_done: int = 0
    seconds: float = 0.0  # the whole call
    first_record: float | None = None  # seconds until the first records came back (actors started, model loaded)
    first_records: int = 0  # how many came back then (one batch)
    earlier_failed: int = 0  # files under the source whose record in OUT is an error from an earlier run

    def describe(self) -> str:
        rate = (self.captioned + self.failed) / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.captioned} captioned, {self.failed} failed, {self.already_done} already done, "
                f"{rate:.1f} images/s" + earlier_failures(self.earlier_failed))

    def steady_rate(self) -> float:
        """Images/s after the first batch came back: the rate a long job runs at, start-up left out."""
        later = self.captioned + self.failed - self.first_records
        if self.first_record is None or later < 1 or self.seconds <= self.first_record:
            return 0.0
        return later / (self.seconds - self.first_record)


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a local path or any URI pyarrow reads.

    Raises:
        OptionError: pyarrow cannot reach it (unknown scheme, no credentials, no such bucket).
    """
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), os.path.realpath(uri)
    if uri.split("://", 1)[0] in ("gs", "gcs") and "retry_limit_seconds=" not in uri:
        # pyarrow retries an unreachable Google Cloud Storage for 15 minutes by default, deaf to
        # SIGTERM and Ctrl-C meanwhile; a URI that sets its own limit keeps it
        uri += ("&" if "?" in uri else "?") + f"retry_limit_seconds={GCS_RETRY_SECONDS:g}"
    try:
        return fs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as e:
        raise OptionError(f"{printable(uri)}: cannot open this location: {e}") from e


def local_path(uri: str) -> str:
    """A ``file://`` URI as the local path it names (others unchanged): its folder is walked as a
    local folder is (symlink loops stopped, dangling links reported), and its records are keyed
    as a run on the plain path keys them, so either spelling resumes the other."""
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        parts = urlparse(uri)
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise OptionError(f"{printable(uri)}: a file:// URI names a folder on this machine, as "
                              "file:///absolute/path")
        return unquote(parts.path)
    return uri


def record_key(record: dict) -> str:
    """The file a record names, exactly (two names may print alike: a byte 0xff, the text ``\\xff``),
    as this version names it: an older one wrote a ``file://`` source's files as ``file://`` plus
    the raw path (not an encoded URI, so no unquoting: ``a#1.jpg`` stays itself)."""
    path = raw_path(record)
    return path[len("file://"):] if path.startswith("file:///") else path


def list_images(source: str, on_error: OnError | None = None) -> list[tuple[str, str]]:
    """(record path, path inside the source's filesystem) of the image files under ``source``, sorted.

    Local folders (``file://`` URIs too) are walked as the local pipeline walks them (both paths
    the same; ``on_error``: see :func:`captioner.pipelines.sources.walk_files`); other URIs'
    files are named ``scheme://path`` in records, without the URI's query options.

    Raises:
        OptionError: ``source`` is not a folder, or cannot be listed.
    """
    from pyarrow import fs as pafs

    source = local_path(source)
    if "://" not in source:
        if not os.path.isdir(source):
            raise OptionError(f"{printable(source)}: not a folder")
        return [(str(p), str(p)) for p in walk_images(os.path.realpath(source), on_error)]
    filesystem_, root = filesystem(source)
    try:
        infos = filesystem_.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as e:
        raise OptionError(f"{printable(source)}: cannot list: {e}") from e
    scheme = source.split("://", 1)[0]
    return sorted((f"{scheme}://{i.path}", i.path) for i in infos
                  if i.type == pafs.FileType.File and is_image_path(i.path))


class ShardWriter:
    """Writes records into OUT as whole shard files; reads back which paths OUT already holds."""

    def __init__(self, out: str, fmt: str, shard_size: int, *, lock: bool = True):
        if fmt not in SHARD_FORMATS:
            raise OptionError(f"format: {fmt!r} is not one of {', '.join(SHARD_FORMATS)} for --ray")
        self.fs, self.root = filesystem(out)
        self.out, self.fmt, self.shard_size = out, fmt, shard_size
        self.run = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        self.pending: list[dict] = []
        self.written = 0
        try:
            self.fs.create_dir(self.root, recursive=True)
        except OSError as e:
            raise OutputError(f"{printable(out)}: cannot create the output folder: {e}") from e
        self._lock = self._lock_local_folder() if lock else None
        other = next((n for n in self.shard_names(any_format=True) if not n.endswith("." + fmt)), None)
        if other is not None:
            self.close()
            raise OptionError(f"{printable(out)} holds {other.rsplit('.', 1)[-1]} shards; resume with that --format, "
                              "or write to a new folder")

    def _lock_local_folder(self):
        """A local OUT is locked while a run writes it: a second run would caption everything again beside
        the first (object stores have no locks: give each job its own OUT there)."""
        from pyarrow import fs as pafs

        from captioner.pipelines.records import lock_file

        if not isinstance(self.fs, pafs.LocalFileSystem):
            return None
        lock = None
        try:
            lock = open(os.path.join(self.root, LOCK_NAME), "a+b")  # noqa: SIM115 (held until close())
            lock_file(lock.fileno())
            return lock
        except OSError as e:  # taken by another run, or a file system without locks
            if lock is not None:
                lock.close()
            why = "another captioner run is writing this folder" if isinstance(e, BlockingIOError) \
                else f"cannot lock the output folder: {reason(e)}"
            raise OutputError(f"{printable(self.out)}: {why}") from e

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def remove_staging(self) -> None:
        """Delete shards a killed run left half-written (their records are captioned again)."""
        from pyarrow import fs as pafs

        for info in self.fs.get_file_info(pafs.FileSelector(self.root)):
            name = os.path.basename(info.path)
            if name.startswith(".part-") and name.endswith(".tmp"):
                self.fs.delete_file(info.path)

    def shard_names(self, *, any_format: bool = False) -> list[str]:
        from pyarrow import fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root))
        except OSError as e:
            raise OutputError(f"{printable(self.out)}: cannot list the output folder: {e}") from e
        formats = SHARD_FORMATS if any_format else (self.fmt,)
        suffixes = tuple(f".{f}" for f in formats)
        return sorted(i.path for i in infos if i.type == pafs.FileType.File
                      and os.path.basename(i.path).startswith("part-") and i.path.endswith(suffixes))

    def records(self) -> Iterator[dict]:
        """Every record of every shard, oldest shard first.

        Raises:
            OutputError: a shard cannot be read or holds something that is not a record.
        """
        for name in self.shard_names():
            try:
                yield from (_read_parquet(self.fs, name) if self.fmt == "parquet" else _read_jsonl(self.fs, name))
            except (OSError, BadRecord, ValueError) as e:
                raise OutputError(f"{printable(name)}: not a readable shard of captioner records: {e}") from e

    def add(self, record: dict) -> None:
        self.pending.append(record)
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the pending records as one shard: under a hidden name first, then renamed."""
        if not self.pending:
            return
        name = f"{self.root}/part-{self.run}-{self.written:06d}.{self.fmt}"
        data = _parquet_bytes(self.pending) if self.fmt == "parquet" else _jsonl_bytes(self.pending)
        staging = f"{self.root}/.{os.path.basename(name)}.tmp"
        try:
            with self.fs.open_output_stream(staging) as stream:
                stream.write(data)
            self.fs.move(staging, name)
        except OSError as e:
            raise OutputError(f"{printable(name)}: cannot write shard: {e}") from e
        self.written += 1
        self.pending = []

    def merge(self) -> Path:
        """One ``captions.jsonl`` beside the shards (local outputs): one record per path, its caption
        if any run captioned it (a retry), else its latest error."""
        latest: dict[str, dict] = {}
        for record in self.records():
            path = record_key(record)
            if "error" not in latest.get(path, {"error": ""}) and "error" in record:
                continue  # a caption is never superseded by an error
            latest[path] = record
        target = Path(self.root) / MERGED_NAME
        from captioner.outputs import write_atomically

        lines = JsonlRecords()
        write_atomically(target, lambda f: f.writelines(lines.format(r) for r in latest.values()))
        return target


def _jsonl_bytes(records: list[dict]) -> bytes:
    lines = JsonlRecords()  # the local pipeline's JSONL line, so a shard reads like its output
    return "".join(lines.format(r) for r in records).encode("utf-8")


def _parquet_bytes(records: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"path": r["path"], "record": json.dumps(r, ensure_ascii=False)} for r in records]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def _read_jsonl(fs, name: str) -> Iterator[dict]:
    with fs.open_input_stream(name) as stream:
        # lines end at "\n" alone: str.splitlines() also breaks at U+2028 and U+0085, which a file name
        # may hold and the JSON text carries unescaped
        for line in stream.read().split(b"\n"):
            if line.strip():
                yield checked_record(json.loads(line.decode("utf-8")))


def _read_parquet(fs, name: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with fs.open_input_file(name) as file:
        table = pq.read_table(file)
    if "record" not in table.column_names:
        raise BadRecord(f'no "record" column (its columns: {", ".join(table.column_names)})')
    for text in table.column("record").to_pylist():
        if not isinstance(text, str):
            raise BadRecord(f'a "record" cell holds {type(text).__name__}, not JSON text')
        yield checked_record(json.loads(text))


def read_bytes(batch: dict[str, np.ndarray], source: str) -> dict[str, list]:
    """A Ray task: each file's bytes, or the reason they cannot be read (the job goes on).

    ``source`` is the SOURCE as given: a URI's filesystem (with its query options, such as
    an endpoint) is made once per batch from it, and its files are fetched on a few threads
    at once, since a remote read waits on the network rather than on a CPU.
    """
    paths, insides = [str(p) for p in batch["path"]], [str(p) for p in batch["inside"]]
    if "://" in source:
        fs = filesystem(source)[0]
        with ThreadPoolExecutor(max_workers=REMOTE_READS) as pool:
            read = list(pool.map(lambda pair: _read_one(pair[0], pair[1], fs), zip(paths, insides, strict=True)))
    else:
        read = [_read_one(path, inside, None) for path, inside in zip(paths, insides, strict=True)]
    return {"path": paths, "data": [data for data, _ in read], "error": [error for _, error in read]}


def _read_one(path: str, inside: str, fs) -> tuple[bytes, str]:
    """(bytes, "") or (b"", the reason naming the file)."""
    try:
        if fs is not None:
            with fs.open_input_stream(inside) as stream:
                return stream.read(), ""
        return check_image_file(inside).read_bytes(), ""  # refused before opening, as the local pipeline refuses it
    except ImageReadError as e:  # its message names the file already
        return b"", str(e)
    except OSError as e:
        return b"", f"{printable(path)}: {reason(e)}"


class Captioner:
    """A Ray actor: loads the model once, then captions batches of image bytes into JSON records."""

    def __init__(self, model_dir: str | None, options, min_confidence: float | None, fallback: str | None,
                 threads: int, device: str | None = None):
        import torch

        from captioner.api import load_model
        from captioner.torch_threads import keep_torch_off_this_thread

        # Ray Data calls __call__ on a thread of its own, not on this one: see captioner.torch_threads
        keep_torch_off_this_thread()
        self.threads = max(1, threads)
        self.model = load_model(model_dir, device=device or ("cuda" if torch.cuda.is_available() else None))
        self.options, self.min_confidence, self.fallback = options, min_confidence, fallback

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import torch

        from captioner.api import PathResult, caption_pixel_batch

        if torch.get_num_threads() != self.threads:  # the calling thread's own setting
            torch.set_num_threads(self.threads)

        size = self.model.encoder.preprocess.size
        results: dict[int, PathResult] = {}
        good, pixels = [], []
        for i, (path, data, error) in enumerate(zip(batch["path"], batch["data"], batch["error"], strict=True)):
            path = str(path)
            try:
                if error:
                    raise ImageReadError(str(error))
                pixels.append(bytes_pixels(bytes(data), path, size))
                good.append(i)
            except ImageReadError as e:
                results[i] = PathResult(path, None, str(e))
        if good:
            captioned = caption_pixel_batch(self.model, [str(batch["path"][i]) for i in good],
                                            torch.from_numpy(np.stack(pixels)), self.options)
            results.update(zip(good, captioned, strict=True))
        records = [result_record(results[i], min_confidence=self.min_confidence, fallback=self.fallback)
                   for i in range(len(results))]
        return {"record": [json.dumps(r, ensure_ascii=False) for r in records]}


def start_ray(address: str | None, cpus: float | None = None, *, quiet: bool = False) -> None:
    """``ray.init()`` for a local runtime (``address`` None) or to join a cluster; ``quiet``: errors only.

    Raises:
        OptionError: Ray is not installed, or the cluster cannot be reached.
    """
    require_extra("ray", "--ray")
    import ray
    if ray.is_initialized():
        return
    level = logging.ERROR if quiet else logging.INFO
    # ray.init puts in its own SIGTERM handler (exit code 15, and a C-level stack dump): a handler
    # of the caller's own, as the command's (its cleanups, "terminated", exit 143), is put back after
    terminate = signal.getsignal(signal.SIGTERM)
    try:
        if address is None:
            # Ray runs its workers at nice 15 by default, behind everything else on the machine;
            # a local batch job is the machine's main work (1.3x the images/s here at nice 0)
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=level)
        else:
            ray.init(address=address, log_to_driver=False, logging_level=level)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise OptionError(f"--ray {address or ''}: cannot start or join Ray: {e}".replace("  ", " ")) from e
    finally:
        if callable(terminate) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, terminate)


def quiet_ray() -> None:
    """Ray Data without progress bars, its plans or notes: errors only (``batch --quiet``).

    After ``ray.init``, which sets these loggers up. For the rest of the process: a library
    caller who wants them back sets the ``ray`` loggers' level and Ray Data's progress bars again.
    """
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def caption_with_ray(
    source: str,
    out: str,
    *,
    model_dir: str | None = None,
    options=None,
    settings: RaySettings = RaySettings(),
    fmt: str = "jsonl",
    min_confidence: float | None = None,
    fallback: str | None = None,
    merge: bool = False,
    retry_errors: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> RaySummary:
    """Caption every image under ``source`` into shards in ``out`` with Ray Data; resumable.

    Args:
        source: a local folder or a URI pyarrow reads (``s3://bucket/prefix``, ``gs://...``, ``file://...``).
        out: a local folder or a URI for the shards (``part-*.jsonl`` or ``part-*.parquet``).
        merge: also write ``out/captions.jsonl`` with one record per path (local outputs).
        retry_errors: caption again the files whose record in ``out`` is an error.
        progress: Ray Data's progress bars and Ray's notes (off: errors only, and the skipped files).
        device: the torch device each actor captions on (None: a GPU where its machine has one, else the CPU).

    Raises:
        OptionError: Ray is not installed; bad source, format or Ray address.
        OutputError: the output cannot be read back or written.
    """
    require_extra("ray", "--ray")
    import ray

    started = time.time()
    source, out = local_path(source), local_path(out)
    unlisted: list[str] = []  # folders whose images cannot be found: each a failure of the run
    # a bad source is refused before OUT is made
    paths = list_images(source, lambda folder, error: unlisted.append(unlisted_line(folder, error)))
    if merge:
        _check_merge_target(Path(out) / MERGED_NAME)
    with ShardWriter(out, fmt, settings.shard_size) as writer:
        writer.remove_staging()
        todo, summary = _still_to_do(writer, paths, retry_errors)
        for line in unlisted:
            print(line, file=sys.stderr)
        summary.failed += len(unlisted)
        if todo:
            start_ray(settings.address, quiet=not progress)
            if not progress:
                quiet_ray()
            _check_resources(settings)
            threads = max(1, int(settings.cpus_per_actor))
            dataset = (
                ray.data.from_items([{"path": p, "inside": inside} for p, inside in todo],
                                    override_num_blocks=blocks_for(len(todo), settings))
                # I/O: no CPUs reserved, so the actors keep them; as many read tasks at a time as actors,
                # since without a bound Ray starts a worker process per waiting task, and on a small machine
                # those starts slow the actor's own (the whole call on 256 images: 0.38x -> 0.50x the local pipeline)
                .map_batches(read_bytes, fn_kwargs={"source": source}, batch_size=settings.batch_size,
                             num_cpus=0, concurrency=settings.actors)
                .map_batches(Captioner, batch_size=settings.batch_size, concurrency=settings.actors,
                             num_cpus=settings.cpus_per_actor, num_gpus=settings.gpus_per_actor or None,
                             fn_constructor_kwargs={"model_dir": model_dir, "options": options,
                                                    "min_confidence": min_confidence, "fallback": fallback,
                                                    "threads": threads, "device": device})
            )
            try:
                for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    if summary.first_record is None:
                        summary.first_record, summary.first_records = time.time() - started, len(batch["record"])
                    for text in batch["record"]:
                        record = json.loads(str(text))
                        writer.add(record)
                        if "error" in record:
                            summary.failed += 1
                            print(f"skipped {one_line(record['error'])}", file=sys.stderr)
                        else:
                            summary.captioned += 1
            finally:
                writer.flush()  # what came back is kept, even when Ray fails or Ctrl-C stops the job
        if merge:
            writer.merge()
        summary.seconds = time.time() - started
        return summary


def _check_merge_target(target: Path) -> None:
    """``--merge`` rewrites ``OUT/captions.jsonl``: only if it holds captioner records (an earlier merge) or nothing.

    Raises:
        OutputError: it holds something else, or cannot be read.
    """
    try:
        with open(target, "rb") as file:
            first = file.readline()
    except FileNotFoundError:
        return
    except OSError as e:
        raise OutputError(f"{printable(target)}: cannot read it before --merge rewrites it: {reason(e)}") from e
    try:
        JsonlRecords().parse(Chunk(1, 0, first, True))  # a record of ours, or an empty file
    except BadRecord as e:
        raise OutputError(f"{printable(target)}: exists and holds no captioner records, and --merge would replace "
                          "it; move it away or give another -o") from e


def _check_resources(settings: RaySettings) -> None:
    """A local runtime with fewer CPUs or GPUs than an actor reserves would wait for them for ever.

    Raises:
        OptionError: ``--cpus-per-actor`` or ``--gpus-per-actor`` asks for more than this machine's Ray runtime has.
    """
    import ray

    if settings.address is not None:  # a cluster may grow (autoscaling) to what an actor asks for
        return
    resources = ray.cluster_resources()
    for flag, kind, wanted in (("--cpus-per-actor", "CPU", settings.cpus_per_actor),
                               ("--gpus-per-actor", "GPU", settings.gpus_per_actor)):
        have = resources.get(kind, 0)
        if wanted > have:
            raise OptionError(f"{flag} {wanted:g}: the local Ray runtime has {have:g} {kind}s; an actor would wait "
                              "for them for ever")


def _still_to_do(writer: ShardWriter, paths: list[tuple[str, str]],
                 retry_errors: bool) -> tuple[list[tuple[str, str]], RaySummary]:
    """The paths OUT does not hold (with ``retry_errors``: or holds only errors for), and the summary so far."""
    failed: dict[str, bool] = {}  # path -> only errors recorded for it (a retry's caption supersedes them)
    for record in writer.records():
        path = record_key(record)
        failed[path] = failed.get(path, True) and "error" in record
    todo = [(p, inside) for p, inside in paths if p not in failed or (retry_errors and failed[p])]
    earlier = 0 if retry_errors else sum(failed.get(p, False) for p, _ in paths)
    return todo, RaySummary(already_done=len(paths) - len(todo), earlier_failed=earlier)


def blocks_for(count: int, settings: RaySettings) -> int:
    """Enough blocks for every actor to stay busy, each a few batches long."""
    return max(1, min(count // settings.batch_size + 1, settings.actors * 8))


def iter_records(out: str, fmt: str = "jsonl") -> Iterable[dict]:
    """Every record in ``out``'s shards (for callers and tests)."""
    return ShardWriter(local_path(out), fmt, 1, lock=False).records()


def add_ray_flags(parser) -> None:
    """``batch``'s flags for the Ray path."""
    group = parser.add_argument_group("Ray Data (pip install 'captioner[ray]')")
    group.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                       help="caption with Ray Data: alone, on a local runtime; 'auto' or ray://HOST:10001 joins a "
                            "cluster. FOLDER may then be a URI (s3://bucket/prefix, gs://..., file://...) and -o a "
                            "folder (or URI) of record shards")
    group.add_argument("--actors", type=bounded_int(1, 4096), default=1,
                       help="captioning actors, each loading the model once")
    group.add_argument("--cpus-per-actor", type=bounded_float(0, 1024, open_low=True), help="CPUs each actor "
                       "reserves (default: all CPUs of this machine shared among the actors)")
    group.add_argument("--gpus-per-actor", type=bounded_float(0, 64), default=0.0,
                       help="GPUs each actor reserves (e.g. 1)")
    group.add_argument("--shard-size", type=bounded_int(1, 10_000_000), default=1000, help="records per output shard")
    group.add_argument("--merge", action="store_true", help=f"also write OUT/{MERGED_NAME}, one record per path")


def check_ray_args(args) -> None:
    """The ``batch --ray`` flags that cannot go together, refused before the model loads (or is exported).

    Raises:
        OptionError: a flag the Ray path has no use for, or an output it cannot write.
    """
    if args.html or args.compile or args.backend != "torch":
        raise OptionError("--html, --compile and --backend are not available with --ray")
    if args.workers is not None:
        raise OptionError("--workers sets the local pipeline's reading processes; with --ray, Ray's read tasks read "
                          "the files (as many at a time as --actors)")
    if args.format == "csv" or Path(args.output).suffix.lower() == ".csv":
        raise OptionError("--ray writes a folder of JSONL or Parquet shards, not CSV: give -o a folder name")
    if args.merge and "://" in local_path(args.output):
        raise OptionError("--merge writes a local captions.jsonl: give a local -o, or merge the shards yourself")


def run_from_args(args, model_dir: str | None, options) -> RaySummary:
    """The ``batch --ray`` command's work, flags already parsed and checked (:func:`check_ray_args`)."""
    cpus = args.cpus_per_actor if args.cpus_per_actor is not None else max(1.0, (os.cpu_count() or 1) // args.actors)
    settings = RaySettings(address=None if args.ray == "local" else args.ray, actors=args.actors,
                           cpus_per_actor=cpus, gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size,
                           shard_size=args.shard_size)
    return caption_with_ray(args.folder, args.output, model_dir=model_dir, options=options, settings=settings,
                            fmt=args.format or ("parquet" if names_parquet(args.output) else "jsonl"),
                            min_confidence=args.min_confidence, fallback=args.fallback,
                            merge=args.merge, retry_errors=args.retry_errors, progress=not args.quiet,
                            device=args.device)


def names_parquet(output: str) -> bool:
    """``-o name.parquet`` (any case, a trailing slash too) asks for Parquet shards."""
    return Path(output).suffix.lower() == ".parquet"
