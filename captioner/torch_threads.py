"""Running the model on a worker thread as fast as on the main thread.

A server runs its event loop on the main thread and the model on a batcher thread. Done
naively that costs a third of the speed: on 2 cores the default model captioned 10.7
images/s at batch 1 and 28.4 at batch 16 on a second thread, against 18.6 and 43.7 on the
main thread. There were two causes, each with its fix:

- OpenMP. Each thread that has run a parallel torch op keeps its own pool of OpenMP workers.
  With both the main thread's pool and the batcher's alive, libgomp manages more threads than
  there are cores and stops spinning between parallel regions, so each of the beam search's
  many small ops waits for a worker to wake. So the main thread runs torch on one thread
  (it never builds a pool), and the batcher thread gets the process's thread count back.
  This alone gave 18.6 images/s at batch 1.
- malloc. glibc gives each new thread its own arena, which hands large freed blocks back to
  the kernel, so every batch faults its activations in again. With one arena shared by all
  threads, and the OpenMP fix, batch 16 ran at 43.7 images/s.

``benchmarks/bench_threads.py`` measures the three cases side by side;
``benchmarks/bench_serve.py`` shows the effect on the server.
"""

from __future__ import annotations

import torch

from captioner.allocator import share_one_arena


def keep_torch_off_this_thread() -> int:
    """Make the calling thread run torch single-threaded, and all threads share one malloc arena.

    Call it on the main thread before anything runs a torch op (before loading the model);
    then give the returned thread count to the thread that runs the model
    (:class:`captioner.batching.DynamicBatcher`'s ``torch_threads``).

    Returns:
        The number of threads torch used before the call.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    share_one_arena()
    return threads
