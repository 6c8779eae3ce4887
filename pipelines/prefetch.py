"""Run a producer (video decoding) in a thread so it overlaps the consumer (captioning).

OpenCV's decoding and Pillow's resizing release the GIL, as does torch's compute, so a
thread is enough for the two to run on separate cores.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def in_background(items: Iterable[T], depth: int = 32, finished: threading.Event | None = None) -> Iterator[T]:
    """Yield ``items`` produced by a background thread, at most ``depth`` ahead.

    An exception in the producer is re-raised in the consumer. If the consumer stops early,
    the producer is told to stop and is waited for, so nothing touches a closed resource.
    ``finished`` is set as soon as the producer is done, before the consumer has taken everything.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it
            buffer.put(_Failure(e))
        finally:
            if finished is not None:
                finished.set()
            buffer.put(_DONE)

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not _DONE:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                buffer.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()
