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

from captioner.errors import CaptionerError, OptionError


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

    def my_slices(self, batches: list[list[int]]) -> list[list[int]]:
        """This process's slice of each global batch; a batch too small to give every process
        one item is dropped by all of them alike (each process builds the same ``batches``)."""
        if not self.distributed:
            return batches
        return [ids[self.rank :: self.world] for ids in batches if len(ids) >= self.world]

    def sum_gradients(self, module: torch.nn.Module) -> None:
        """Add up ``module``'s parameter gradients over all processes, in place.

        For steps that do not run through DistributedDataParallel's forward (self-critical
        sampling drives the decoder step by step), whose gradient hooks then stay idle.
        """
        if not self.distributed:
            return
        parameters = list(module.parameters())
        # which gradients any process has: those every process joins (as zeros where it has none);
        # one that no process has stays None, so the optimizer skips it as it would in one process
        present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float64)
        dist.all_reduce(present)
        for parameter, anywhere in zip(parameters, present.tolist(), strict=True):
            if not anywhere:
                continue
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad)

    def broadcast(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers of ``module`` on every process, in place."""
        if self.distributed:
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def same_everywhere(self, module: torch.nn.Module) -> bool:
        """Whether ``module``'s parameters agree on every process (compared by per-tensor sums)."""
        if not self.distributed:
            return True
        sums = torch.stack([p.detach().double().sum() for p in module.parameters()])
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        return bool(torch.equal(low, high))

    def gather(self, value: object) -> list[object]:
        """Every process's ``value`` (picklable), in rank order, on every process."""
        if not self.distributed:
            return [value]
        values: list[object] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def share(self, value: object) -> object:
        """Rank 0's ``value`` on every process (a picklable Python object: a scores dict, say)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def described() -> ProcessGroup:
    """The group torchrun's environment describes, not joined: who this process will be.

    Raises:
        OptionError: torchrun's variables are malformed.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise OptionError(f"torchrun's RANK, LOCAL_RANK and WORLD_SIZE must be whole numbers ({e})") from e
    return ProcessGroup(rank, local_rank, world) if world > 1 else ProcessGroup()


def join(device_type: str) -> ProcessGroup:
    """The group torchrun's environment describes, joined (gloo on CPU, nccl on CUDA); a group of one without it.

    Raises:
        OptionError: torchrun's variables are malformed.
        CaptionerError: the rendezvous they name cannot be made (no MASTER_ADDR, a port in use,
            the others never came).
    """
    group = described()
    if group.distributed and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(group.local_rank)
        try:  # gloo for the small CPU tensors (token counts, shared scores), nccl for the gradients on GPUs
            dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")
        except (ValueError, RuntimeError) as e:  # DistNetworkError is a RuntimeError
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise CaptionerError(f"cannot join the training processes that RANK={group.rank} and "
                                 f"WORLD_SIZE={group.world} describe ({reason}); start them with torchrun (and "
                                 "check its --master-addr and --master-port), or unset RANK and WORLD_SIZE for "
                                 "one process") from e
    return group


def peer_lost(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another process of the run went away.

    That process printed its own reason (a bad photo, a full disk, a kill); this one only lost
    it. gloo raises a plain RuntimeError naming the closed connection; nccl a DistBackendError.
    """
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(
        sign in str(error) for sign in ("Connection closed by peer", "Connection reset by peer",
                                        "remote process exited"))


def leave(group: ProcessGroup) -> None:
    if group.distributed and dist.is_initialized():
        dist.destroy_process_group()
