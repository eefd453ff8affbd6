"""Data-parallel statistics over the processes of an initialised ``torch.distributed`` group.

Under ``accelerate launch`` (once ``accelerate.PartialState()`` or :func:`init_distributed` has run) or ``torchrun``
with an initialised process group of more than one process, every process runs a share of the batches of sampled
texts and the float64 sums and counts are all-reduced.  Every process must make the same calls with the same
arguments (they are collective).  A failure on one process is reported to all of them, so none waits forever on the
others, and nothing is cached.  The statistics cache folder must be visible to every process (one machine, or a
shared file system).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import StatisticsError

__all__ = ["ProcessGroup", "attempt", "current_group", "init_distributed"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def attempt(action: Callable[[], T]) -> tuple[T | None, Exception | None]:
    """``(action(), None)``, or ``(None, the exception)`` if it raised one."""
    try:
        return action(), None
    except Exception as exc:  # noqa: BLE001 (reported to every process by check_all / check_main)
        return None, exc


def _describe(error: Exception | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the default ``torch.distributed`` group (more than one process)."""

    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        """Whether this is process 0, the one that writes files."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether work item ``index`` (counted from 0) is this process's: every ``size``-th, from ``rank`` on."""
        return index % self.size == self.rank

    def check_all(self, error: Exception | None, doing: str, agreed: str | None = None) -> None:
        """Collective: raise on every process if any process failed ``doing`` or if their ``agreed`` values differ.

        A process re-raises its own ``error``; the others raise :class:`StatisticsError` naming the failed process.
        """
        outcomes: list[Any] = [None] * self.size
        dist.all_gather_object(outcomes, (_describe(error), agreed))
        if error is not None:
            raise error
        failed = [(rank, message) for rank, (message, _) in enumerate(outcomes) if message is not None]
        if failed:
            rank, message = failed[0]
            raise StatisticsError(f"Process {rank} of {self.size} failed while {doing} ({message}); nothing was "
                                  "cached.")
        values = [value for _, value in outcomes]
        if any(value != values[0] for value in values):
            raise StatisticsError(
                f"The {self.size} processes disagree while {doing}: {values}. Every process must pass the same "
                "model, tokenizer, data set and settings.")

    def check_main(self, error: Exception | None, doing: str) -> None:
        """Collective: the other processes learn whether the main process succeeded at ``doing`` and raise
        :class:`StatisticsError` if it did not; the main process re-raises its own ``error``."""
        status = [_describe(error)]
        dist.broadcast_object_list(status, src=0)
        if error is not None:
            raise error
        if status[0] is not None:
            raise StatisticsError(f"The main process failed while {doing} ({status[0]}).")

    def from_main(self, value: T) -> T:
        """Collective: the main process's ``value`` on every process."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, total: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
        """Collective: the sums (reduced in float64, returned in ``total``'s dtype and device) and counts of every
        process."""
        device = _collective_device(total.device)
        reduced = total.to(device=device, dtype=torch.float64)
        counts = torch.tensor([int(count)], dtype=torch.int64, device=device)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        return reduced.to(device=total.device, dtype=total.dtype), int(counts.item())


def current_group() -> ProcessGroup | None:
    """The initialised default process group if it has more than one process, else ``None`` (single process)."""
    if dist.is_available() and dist.is_initialized():
        size = dist.get_world_size()
        return ProcessGroup(dist.get_rank(), size) if size > 1 else None
    if _launched_size() > 1:
        logger.warning("WORLD_SIZE=%s but torch.distributed is not initialised: this process computes all the "
                       "statistics alone. Call accelerate.PartialState() or hf_edit.stats.init_distributed() first "
                       "to share the work.", os.environ.get("WORLD_SIZE"))
    return None


def init_distributed() -> int:
    """Initialise the default process group that a launcher (``accelerate launch``, ``torchrun``) describes in the
    environment, if there is one and it is not initialised yet; return the number of processes.

    accelerate's ``PartialState`` does it when accelerate is installed (it picks the backend and this process's
    device); otherwise, or if it did not, ``torch.distributed.init_process_group`` with torch's default backends
    (gloo for CPU tensors, NCCL for CUDA ones).
    """
    if dist.is_available() and not dist.is_initialized() and _launched_size() > 1:
        try:
            from accelerate import PartialState
        except ImportError:
            pass
        else:
            PartialState()
        if not dist.is_initialized():
            dist.init_process_group()
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _launched_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _collective_device(preferred: torch.device) -> torch.device:
    """A device whose tensors the default group's backend can reduce: ``preferred`` if possible, else the CPU, else
    the current device of the backend's device type (``"cuda:nccl,cpu:gloo"`` style backends included; which device
    types a plain backend reduces is torch's own ``Backend.backend_capability``, where third-party backends
    register theirs)."""
    backend = str(dist.get_backend()).lower()
    supported = {device: name for device, name in (part.split(":", 1) for part in backend.split(",") if ":" in part)}
    if not supported:
        supported = dict.fromkeys(dist.Backend.backend_capability.get(backend, ["cpu"]), backend)
    if preferred.type in supported:
        return preferred
    if "cpu" in supported:
        return torch.device("cpu")
    device_type = next(iter(supported))
    return torch.device(device_type, getattr(torch, device_type).current_device())
