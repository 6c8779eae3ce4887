"""The process group of a training run under torchrun: who this process is, and the few collectives used.

torchrun sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` for each process; the trainer reads
them here, so the same ``captioner train`` runs alone or as one of N processes on one or
several machines. Without those variables (or with ``WORLD_SIZE=1``) every call here is a
no-op on a group of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from captioner.errors import OptionError


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the run: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        """Rank 0: the one process that logs, evaluates and writes checkpoints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over all processes (a copy; float64 on CPU, whatever the backend)."""
        total = value.detach().double().cpu().clone()
        if self.distributed:
            dist.all_reduce(total)
        return total

    def share(self, value: object) -> object:
        """Rank 0's ``value`` on every process (a picklable Python object: a scores dict, say)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def join(device_type: str) -> ProcessGroup:
    """The group torchrun's environment describes, joined (gloo on CPU, nccl on CUDA); a group of one without it.

    Raises:
        OptionError: torchrun's variables are malformed.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise OptionError(f"torchrun's RANK, LOCAL_RANK and WORLD_SIZE must be whole numbers ({e})") from e
    if world <= 1:
        return ProcessGroup()
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        # gloo for the small CPU tensors (token counts, shared scores), nccl for the gradients on GPUs
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")
    return ProcessGroup(rank, local_rank, world)


def leave(group: ProcessGroup) -> None:
    if group.distributed and dist.is_initialized():
        dist.destroy_process_group()
