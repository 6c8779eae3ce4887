"""Dynamic batching: requests that arrive together are captioned as one encoder + search batch.

A server answering one photo per request would run the encoder and the beam search on
batches of one. Here each request's pixels go into a queue; one worker thread takes the
first waiting item, then gathers more for at most ``max_wait`` seconds or until
``max_batch_size`` items, and captions them together (TorchServe's ``batchSize`` and
``maxBatchDelay``, Triton's dynamic batcher). Callers whose batch was just answered usually
come back together (a script's threads, each sending its next photo): for a short while
the next batch waits for as many items as the last one held, and for no more once it has
them. Items asking for different decoding options
are never mixed: a batch holds one set of options. A caller that gives up (a timeout, a
client gone) abandons its items, so that no batch runs on for nobody.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from captioner.api import PathResult, caption_pixel_batch
from captioner.decoding import DecodingOptions
from captioner.model import CaptionModel, gpu_batch_shape


@dataclass(eq=False)  # items are told apart by identity: comparing their pixel arrays would raise
class _Item:
    name: str
    pixels: np.ndarray  # (S, S, 3) uint8
    options: DecodingOptions | None
    future: Future = field(default_factory=Future)


RETURN_WAIT = 0.05  # seconds after a batch is answered during which its callers are expected back


class DynamicBatcher:
    """Captions submitted images in shared batches on one worker thread; ``close`` stops it."""

    def __init__(self, model: CaptionModel, *, max_batch_size: int = 32, max_wait: float = 0.005,
                 torch_threads: int | None = None, return_wait: float = RETURN_WAIT):
        """``torch_threads``: the worker thread's torch thread count, given back after
        :func:`captioner.torch_threads.keep_torch_off_this_thread` (None: leave it as it is).

        ``return_wait``: how long after a batch is answered the next one waits for as many
        items as that batch held. Sixteen clients answered together send their next photos
        over 20-30 ms on 2 CPU cores (the server answers them, then reads and decodes the
        new uploads, one after another); gathering for ``max_wait`` alone split them into
        two batches of about 8, or 15 and 1, and the model gains less from those than from
        one of 16. A lone client, answered alone, is expected alone: its next photo is
        captioned as soon as it comes, without ``max_wait``.
        """
        if torch_threads is not None and torch_threads < 1:
            raise ValueError(f"torch_threads={torch_threads} must be at least 1")
        if max_batch_size < 1 or max_wait < 0 or return_wait < 0:
            raise ValueError(f"max_batch_size={max_batch_size} must be at least 1, and max_wait={max_wait} and "
                             f"return_wait={return_wait} not negative")
        self.model = model
        self.torch_threads = torch_threads
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self.return_wait = return_wait
        self._answered = 0  # items in the last batch, if it was answered (0 after a failed one)
        self._answered_at = -math.inf  # when (time.monotonic())
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # the latest batches' sizes, for tests and benchmarks
        self._closed = False
        self._closing = threading.Lock()  # no item can be queued behind the worker's stop signal
        self._queue: queue.Queue[_Item | None] = queue.Queue()
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
            if first is None:
                closing = True
                continue
            batch = [first]
            try:
                closing = self._gather(batch, closing) or closing
            except Exception as e:  # noqa: BLE001 (a fault here fails these requests, not every later one)
                _fail(batch, e)
                continue
            self._caption(batch)

    def _gather(self, batch: list[_Item], closing: bool) -> bool:
        """Add waiting items with the first one's options until full or past the deadline; True once closed.

        The deadline is ``max_wait`` after the first item, or, shortly after an answered batch,
        the end of ``return_wait``; once the batch holds as many items as the answered one did,
        it takes only what is already queued.
        """
        now = time.monotonic()
        returning = now < self._answered_at + self.return_wait
        expected = self._answered if returning else 0
        deadline = max(now + self.max_wait, self._answered_at + self.return_wait if returning else now)
        options = batch[0].options
        for item in list(self._held):
            if len(batch) < self.max_batch_size and item.options == options:
                self._held.remove(item)
                batch.append(item)
        while not closing and len(batch) < self.max_batch_size:
            if expected and len(batch) >= expected:
                deadline = now  # queue.get(timeout=0) takes an item only if one is waiting
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
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
        self._answered = 0
        try:
            pixels = torch.from_numpy(np.stack([item.pixels for item in batch]))
            results = caption_pixel_batch(self.model, [item.name for item in batch], pixels, batch[0].options,
                                          stop=lambda: all(item.future in self._abandoned for item in batch))
            for item, result in zip(batch, results, strict=True):
                item.future.set_result(result)
            self._answered, self._answered_at = len(batch), time.monotonic()
        except Exception as e:  # noqa: BLE001 (handed to every waiting caller, who reports it; the worker goes on)
            _fail(batch, e)


def _fail(batch: list[_Item], error: Exception) -> None:
    """Hand ``error`` to each caller of ``batch`` still waiting (one that gave up is left as it is)."""
    for item in batch:
        with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
            if not item.future.done():
                item.future.set_exception(error)


__all__ = ["DynamicBatcher", "PathResult"]
