"""Several processes (``torchrun``, any launcher that sets ``RANK``/``WORLD_SIZE``) sharing one job.

[`launched`][clip_lens.distributed.launched] reads and checks the standard environment variables (one
`InputError` naming the variable for a value out of range: ``MASTER_PORT=abc``, ``RANK`` ≥
``WORLD_SIZE``, sizes beyond 32 bits); [`process_group`][clip_lens.distributed.process_group] initialises
``torch.distributed`` (gloo on CPU, nccl on CUDA) for the duration of a command when more than one process
was launched, and does nothing for a plain run. Its rendezvous waits at most `rendezvous_timeout` seconds
(``CLIP_LENS_RENDEZVOUS_TIMEOUT``, default 60) for every rank to arrive, then raises `RendezvousError`
naming the address and what to check: an unreachable ``MASTER_ADDR`` or a rank launched without its peers
never waits silently. [`Ranks`][clip_lens.distributed.Ranks] is what [`collect`][clip_lens.collect.collect]
needs from the group: its rank and size, and small object exchanges (which also act as barriers).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Optional

from clip_lens.errors import ClipLensError, InputError

ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_VARIABLE = "CLIP_LENS_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT = 60.0
_MAX_PROCESSES = 2**31 - 1  # torch.distributed keeps ranks and sizes in 32-bit ints
_LAUNCH_HINT = "launch with `torchrun --nproc_per_node N clip-lens ...`, which sets them all"
_rendezvous_count = itertools.count()  # keys of this process's successive rendezvous (same order on every rank)


class RendezvousError(ClipLensError, TimeoutError):
    """The ranks of a launched job did not all meet within the rendezvous timeout (an unreachable
    ``MASTER_ADDR``, a closed port, a rank launched without its peers); the message names the address."""


@dataclass(frozen=True)
class Launch:
    """The process's place in a launched job: ``rank`` of ``world_size``, ``local_rank`` on its node,
    and the rendezvous address ``master_addr:master_port``."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str = ""
    master_port: int = 0


def _integer(name: str, low: int, high: int) -> int:
    """The environment variable ``name`` as an integer in ``low..high`` (else an InputError naming it)."""
    text = os.environ[name].strip()
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"{name}={os.environ[name]!r} is not an integer; {_LAUNCH_HINT}.") from None
    if not low <= value <= high:
        raise InputError(f"{name}={value} is out of range: it must lie in {low}..{high}; {_LAUNCH_HINT}.")
    return value


def launched() -> Optional[Launch]:
    """The job this process was launched in (None: a plain run, or ``WORLD_SIZE`` 1).

    Raises:
        InputError: ``WORLD_SIZE`` > 1 but the other variables are missing, not integers or out of
            range (``MASTER_PORT`` 1..65535; ``RANK`` and ``LOCAL_RANK`` below ``WORLD_SIZE``, and
            ``LOCAL_RANK`` below ``LOCAL_WORLD_SIZE`` when it is set; sizes below 2**31).
    """
    size = os.environ.get("WORLD_SIZE")
    if size is None or size.strip() == "1":
        return None
    missing = [name for name in ENVIRONMENT if not os.environ.get(name, "").strip()]
    if missing:
        raise InputError(
            f"WORLD_SIZE={size} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
            f"{_LAUNCH_HINT}, or unset WORLD_SIZE for a single process."
        )
    world = _integer("WORLD_SIZE", 1, _MAX_PROCESSES)
    rank = _integer("RANK", 0, _MAX_PROCESSES)
    if rank >= world:
        raise InputError(f"RANK={rank} is not a rank of WORLD_SIZE={world} (0 to {world - 1}); launch with torchrun.")
    local = _integer("LOCAL_RANK", 0, world - 1)
    if os.environ.get("LOCAL_WORLD_SIZE", "").strip():
        local_world = _integer("LOCAL_WORLD_SIZE", 1, world)
        if local >= local_world:
            raise InputError(f"LOCAL_RANK={local} is not below LOCAL_WORLD_SIZE={local_world}; launch with torchrun.")
    port = _integer("MASTER_PORT", 1, 65535)
    return Launch(rank, world, local, os.environ["MASTER_ADDR"].strip(), port)


def rendezvous_timeout() -> float:
    """Seconds a rank waits for the others at the rendezvous: ``CLIP_LENS_RENDEZVOUS_TIMEOUT`` (a
    positive number) or `DEFAULT_RENDEZVOUS_TIMEOUT`."""
    text = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_RENDEZVOUS_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{TIMEOUT_VARIABLE}={text!r} must be a positive number of seconds (default "
                         f"{DEFAULT_RENDEZVOUS_TIMEOUT:g}).")
    return value


def _rendezvous_error(job: Launch, seconds: float, reason: BaseException, store_up: bool) -> RendezvousError:
    """The message for a rendezvous that failed: who waited where, for what, and what to check."""
    where = f"MASTER_ADDR={job.master_addr} MASTER_PORT={job.master_port}"
    cause = " ".join(str(reason).split())[:200] or type(reason).__name__
    if store_up or job.rank == 0:
        what = (f"rank {job.rank} of {job.world_size} waited {seconds:g} s at {where} and not every rank arrived "
                f"({cause}): launch all {job.world_size} ranks with the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
    else:
        what = (f"rank {job.rank} of {job.world_size} could not reach rank 0 at {where} within {seconds:g} s ({cause}): "
                "check that rank 0 is running, that this address and port can be reached from this machine "
                "(firewall, the address of rank 0's machine, not 127.0.0.1 across machines)")
    return RendezvousError(f"{what}; set {TIMEOUT_VARIABLE}=SECONDS to wait longer.")


@contextlib.contextmanager
def _stderr_held() -> Iterator[None]:
    """Hold what is written to file descriptor 2 meanwhile (torch's C++ store logs each failed connection
    attempt with a stack trace) and write it out afterwards, unless an exception leaves: its message then
    says what happened, in one line."""
    import sys
    import tempfile

    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        os.write(2, held.read())


def _meet(job: Launch, seconds: float) -> Any:
    """The job's store once every rank has reached it (``torch.distributed.rendezvous`` from the
    environment, then a barrier on the store), waiting at most ``seconds``; its timeout is then
    reset to torch's default for the collectives that follow."""
    import torch.distributed as dist
    from torch.distributed.constants import default_pg_timeout

    timeout = timedelta(seconds=seconds)
    store = None
    try:
        with _stderr_held():
            store, _, _ = next(dist.rendezvous("env://", rank=job.rank, world_size=job.world_size, timeout=timeout))
            key = f"clip_lens/rendezvous/{next(_rendezvous_count)}"
            if store.add(f"{key}/arrived", 1) == job.world_size:  # the last to arrive opens the barrier
                store.set(f"{key}/all", b"1")
            store.wait([f"{key}/all"], timeout)
    except (RuntimeError, OSError, ValueError) as exc:  # torch's DistError types are RuntimeErrors
        raise _rendezvous_error(job, seconds, exc, store is not None) from exc
    store.set_timeout(default_pg_timeout)
    return store


@contextlib.contextmanager
def process_group(device: str = "cpu", timeout: Optional[float] = None) -> Iterator[Optional[Launch]]:
    """Initialise ``torch.distributed`` for a launched job (gloo; nccl when ``device`` is CUDA, each
    process on GPU ``LOCAL_RANK``), and destroy it on exit. Yields the `Launch`, or None (nothing done)
    for a plain run or when the caller already initialised a group.

    Args:
        device: the model's device.
        timeout: seconds to wait for every rank at the rendezvous (default: `rendezvous_timeout`).

    Raises:
        InputError: a bad launch environment (`launched`).
        RendezvousError: the ranks did not all meet within ``timeout``.
    """
    job = launched()
    if job is None:
        yield None
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        yield job
        return
    seconds = rendezvous_timeout() if timeout is None else timeout
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(job.local_rank)
    store = _meet(job, seconds)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=job.rank, world_size=job.world_size)
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
