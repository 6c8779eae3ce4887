"""Dynamic batching: requests that arrive together are captioned as one encoder + search batch.

A server answering one photo per request would run the encoder and the beam search on
batches of one. Here each request's pixels go into a queue; one worker thread takes the
first waiting item, then gathers more for at most ``max_wait`` seconds or until
``max_batch_size`` items, and captions them together (TorchServe's ``batchSize`` and
``maxBatchDelay``, Triton's dynamic batcher). A server also says which requests are on their
way (:meth:`DynamicBatcher.expecting`: received, their images not yet submitted): a batch
being gathered waits for those too, up to ``max_wait_coming``, rather than leaving them to
a second, smaller batch. Items asking for different decoding options
are never mixed: a batch holds one set of options. A caller that gives up (a timeout, a
client gone) abandons its items, so that no batch runs on for nobody.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import weakref
from collections import Counter, deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch

from captioner.api import PathResult, caption_pixel_batch
from captioner.decoding import DecodingOptions
from captioner.model import CaptionModel, gpu_batch_shape

_ARRIVED = object()  # queued when a request announced by expecting() has submitted its images, or failed


@dataclass(eq=False)  # items are told apart by identity: comparing their pixel arrays would raise
class _Item:
    name: str
    pixels: np.ndarray  # (S, S, 3) uint8
    options: DecodingOptions | None
    future: Future = field(default_factory=Future)


class DynamicBatcher:
    """Captions submitted images in shared batches on one worker thread; ``close`` stops it."""

    def __init__(self, model: CaptionModel, *, max_batch_size: int = 32, max_wait: float = 0.005,
                 max_wait_coming: float = 0.05, torch_threads: int | None = None):
        """``max_wait_coming``: how long after its first item a batch may wait for the images
        of requests announced by :meth:`expecting` (0: it never does; it never stops a
        batch that ``max_wait`` would still hold open).
        ``torch_threads``: the worker thread's torch thread count, given back after
        :func:`captioner.torch_threads.keep_torch_off_this_thread` (None: leave it as it is)."""
        if torch_threads is not None and torch_threads < 1:
            raise ValueError(f"torch_threads={torch_threads} must be at least 1")
        if max_batch_size < 1 or max_wait < 0 or max_wait_coming < 0:
            raise ValueError(f"max_batch_size={max_batch_size} must be at least 1, and max_wait={max_wait} and "
                             f"max_wait_coming={max_wait_coming} not negative")
        self.model = model
        self.torch_threads = torch_threads
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self.max_wait_coming = max_wait_coming
        # requests announced by expecting() whose images are not submitted yet, per decoding options
        self._coming: Counter[DecodingOptions | None] = Counter()
        self._coming_lock = threading.Lock()
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # the latest batches' sizes, for tests and benchmarks
        self._closed = False
        self._closing = threading.Lock()  # no item can be queued behind the worker's stop signal
        self._queue: queue.Queue[_Item | object | None] = queue.Queue()  # None: stop; _ARRIVED: look again
        self._held: list[_Item] = []  # taken from the queue, waiting for a batch with their options
        self._abandoned: weakref.WeakSet[Future] = weakref.WeakSet()  # running items whose callers gave up
        self.warmed_sizes = self._warm_up()
        self._thread = threading.Thread(target=self._run, name="captioner-batcher", daemon=True)
        self._thread.start()

    def submit(self, name: str, pixels: np.ndarray, options: DecodingOptions | None = None) -> Future:
        """Queue one image's pixels; the future gives its :class:`PathResult` (or the batch's exception).

        Raises:
            ValueError: ``pixels`` are not the model's (S, S, 3) uint8 input.
            RuntimeError: the batcher is closed.
        """
        size = self.model.encoder.preprocess.size
        if not isinstance(pixels, np.ndarray) or pixels.shape != (size, size, 3) or pixels.dtype != np.uint8:
            # one bad item would fail the whole batch it joins, other callers' images included
            raise ValueError(f"{name}: pixels must be a ({size}, {size}, 3) uint8 array (captioner.images."
                             f"model_pixels), not {getattr(pixels, 'dtype', type(pixels).__name__)} "
                             f"{getattr(pixels, 'shape', '')}")
        item = _Item(name, pixels, options)
        with self._closing:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.put(item)
        return item.future

    @contextlib.contextmanager
    def expecting(self, options: DecodingOptions | None = None) -> Iterator[None]:
        """Around decoding and submitting one received request's images: meanwhile, a batch
        being gathered with the same ``options`` waits for them (up to ``max_wait_coming``
        from its first item).

        Sixteen clients answered together send their next photos within a few milliseconds,
        but the server reads and decodes them one after another, over 20-30 ms on 2 CPU
        cores: gathering for ``max_wait`` alone split them into two batches of about 8 (or
        15 and 1), from which the model gains less than from one of 16. Waiting only for
        requests already received never holds a batch for a client that is not sending.
        """
        with self._coming_lock:
            self._coming[options] += 1
        try:
            yield
        finally:
            with self._coming_lock:
                self._coming[options] -= 1
                if not self._coming[options]:
                    del self._coming[options]  # clients choose options freely: keep only those on their way
            self._queue.put(_ARRIVED)  # a batch waiting for this request looks again

    def abandon(self, futures: Iterable[Future]) -> None:
        """Callers that gave up (a timeout, a closed connection): their items not started are
        skipped, and a running batch that only they wait for stops at its next search step."""
        for future in futures:
            if not future.cancel():  # running (or done): cancel() cannot stop it
                self._abandoned.add(future)

    def close(self) -> None:
        """Caption what is queued, then stop the worker."""
        with self._closing:
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout=30)

    def _warm_up(self) -> tuple[int, ...]:
        """On a GPU, caption a blank batch at every shape the batcher's batches are encoded at.

        CUDA plans the encoder's convolutions the first time it meets a batch shape: on an
        H100 about 1.7 s per shape (then 3 ms a batch). Batches are padded to a few shapes
        (:func:`captioner.model.gpu_batch_shape`; 6 for 32 images at most), each paid for
        here, before any request, instead of by the first requests that form it. The CPU
        has no such cost.
        """
        if self.model.device.type != "cuda":
            return ()
        size = self.model.encoder.preprocess.size
        shapes = tuple(sorted({gpu_batch_shape(count) for count in range(1, self.max_batch_size + 1)}))
        for count in shapes:
            caption_pixel_batch(self.model, ["warm-up"] * count, torch.zeros(count, size, size, 3, dtype=torch.uint8))
        return shapes

    def _run(self) -> None:
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)
        closing = False
        while not closing or self._held:
            first = self._held.pop(0) if self._held else self._queue.get()
            if first is _ARRIVED:
                continue
            if first is None:
                closing = True
                continue
            batch = [first]
            try:
                closing = self._gather(batch, time.monotonic(), closing) or closing
            except Exception as e:  # noqa: BLE001 (a fault here fails these requests, not every later one)
                _fail(batch, e)
                continue
            self._caption(batch)

    def _gather(self, batch: list[_Item], started: float, closing: bool) -> bool:
        """Add waiting items with the first one's options until full, or past ``max_wait`` from
        ``started`` (past ``max_wait_coming`` while requests are on their way); True once closed."""
        options = batch[0].options
        for item in list(self._held):
            if len(batch) < self.max_batch_size and item.options == options:
                self._held.remove(item)
                batch.append(item)
        while not closing and len(batch) < self.max_batch_size:
            wait = max(self.max_wait, self.max_wait_coming) if self._coming[options] > 0 else self.max_wait
            try:
                item = self._queue.get(timeout=max(0.0, started + wait - time.monotonic()))
            except queue.Empty:
                if self._coming[options] > 0 and time.monotonic() < started + self.max_wait_coming:
                    continue  # a request was received during the short wait: wait for it too
                return False
            if item is _ARRIVED:
                continue
            if item is None:
                return True
            (batch if item.options == options else self._held).append(item)
        return False

    def _caption(self, batch: list[_Item]) -> None:
        # a caller that gave up (a timeout, a closed connection) cancelled its future: skip its image
        batch = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if not batch:
            return
        self.batch_sizes.append(len(batch))
        try:
            pixels = torch.from_numpy(np.stack([item.pixels for item in batch]))
            results = caption_pixel_batch(self.model, [item.name for item in batch], pixels, batch[0].options,
                                          stop=lambda: all(item.future in self._abandoned for item in batch))
            for item, result in zip(batch, results, strict=True):
                item.future.set_result(result)
        except Exception as e:  # noqa: BLE001 (handed to every waiting caller, who reports it; the worker goes on)
            _fail(batch, e)


def _fail(batch: list[_Item], error: Exception) -> None:
    """Hand ``error`` to each caller of ``batch`` still waiting (one that gave up is left as it is)."""
    for item in batch:
        with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
            if not item.future.done():
                item.future.set_exception(error)


__all__ = ["DynamicBatcher", "PathResult"]
