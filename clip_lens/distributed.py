"""Several processes (``torchrun``, any launcher that sets ``RANK``/``WORLD_SIZE``) sharing one job.

[`launched`][clip_lens.distributed.launched] reads the standard environment variables;
[`process_group`][clip_lens.distributed.process_group] initialises ``torch.distributed`` (gloo on CPU, nccl on
CUDA) for the duration of a command when more than one process was launched, and does nothing for a
plain run. [`Ranks`][clip_lens.distributed.Ranks] is what [`collect`][clip_lens.collect.collect] needs from the group:
its rank and size, and small object exchanges (which also act as barriers).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from clip_lens.errors import InputError

ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Launch:
    """The process's place in a launched job: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int
    world_size: int
    local_rank: int


def launched() -> Optional[Launch]:
    """The job this process was launched in (None: a plain run, or ``WORLD_SIZE`` 1).

    Raises:
        InputError: ``WORLD_SIZE`` > 1 but the other variables are missing or not integers.
    """
    size = os.environ.get("WORLD_SIZE")
    if size is None or size.strip() == "1":
        return None
    missing = [name for name in ENVIRONMENT if not os.environ.get(name)]
    if missing:
        raise InputError(
            f"WORLD_SIZE={size} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: launch with "
            "`torchrun --nproc_per_node N clip-lens ...` (which sets them all), or unset WORLD_SIZE for a single process."
        )
    try:
        rank, world, local = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise InputError(
            f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {os.environ['RANK']!r}, {size!r}, "
            f"{os.environ['LOCAL_RANK']!r}; launch with torchrun, which sets them."
        ) from None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise InputError(f"RANK={rank} is not a rank of WORLD_SIZE={world} (0 to {world - 1}); launch with torchrun.")
    return Launch(rank, world, local)


@contextlib.contextmanager
def process_group(device: str = "cpu") -> Iterator[Optional[Launch]]:
    """Initialise ``torch.distributed`` for a launched job (gloo; nccl when ``device`` is CUDA, each
    process on GPU ``LOCAL_RANK``), and destroy it on exit. Yields the `Launch`, or None (nothing done)
    for a plain run or when the caller already initialised a group."""
    job = launched()
    if job is None:
        yield None
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        yield job
        return
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(job.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield job
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class Ranks:
    """The initialised default process group, as [`collect`][clip_lens.collect.collect] uses it."""

    rank: int
    size: int

    @classmethod
    def current(cls) -> Optional["Ranks"]:
        """The default group when ``torch.distributed`` is initialised with more than one process, else None."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return cls(dist.get_rank(), dist.get_world_size())

    def broadcast(self, value: Any = None) -> Any:
        """Rank 0's ``value`` on every rank (a barrier: returns once rank 0 has sent it)."""
        import torch.distributed as dist

        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list:
        """Every rank's ``value``, by rank, on every rank (a barrier)."""
        import torch.distributed as dist

        values: list = [None] * self.size
        dist.all_gather_object(values, value)
        return values
