"""Keep freed memory in the process's heap, so a CNN's activations do not page-fault on every batch.

glibc serves large allocations (over 128 KB at first) with fresh ``mmap`` pages and returns
them to the kernel on ``free``; a convolutional encoder allocates and frees tens of such
tensors per batch, and each one is zero-filled by page faults again. Measured here
(EfficientNet-Lite0, batch 32, 2 threads): 27-30 ms per image with glibc's defaults,
13 ms with the thresholds below, for about 300 MB more resident memory. glibc raises its
threshold by itself only after the first large free, which is why an earlier, larger run
(a training step, say) made later ones faster. Other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt parameter numbers in glibc's malloc.h
MMAP_THRESHOLD = 512 << 20  # allocations below this come from the heap, not fresh mmap pages
TRIM_THRESHOLD = 1 << 30  # the heap is trimmed only when this much is free at its top


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds once per process; True when they were set.

    Called by the front doors that run models (``load_model``, training); a no-op on
    non-glibc systems.
    """
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) \
        and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def share_one_arena() -> bool:
    """Make threads started from now on allocate from the main heap; True when set.

    glibc gives each new thread an arena of its own, and those hand large freed blocks back
    to the kernel whatever the thresholds above say: a model run on a second thread then
    pays the page faults again (28.4 against 36.9 images/s at batch 16, see
    :mod:`captioner.torch_threads`). A no-op on non-glibc systems.
    """
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(M_ARENA_MAX, 1))


def _mallopt():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
