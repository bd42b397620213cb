"""Data parallelism on the launchers of torch.distributed: torchrun, accelerate launch, srun torchrun.

difffeat schedules nothing itself. A launcher starts one process per GPU and sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; each process reads them (:func:`dist_info`),
takes its share of a deterministic plan and writes its own outputs atomically. A plain
``python``/``difffeat`` process is rank 0 of 1, so the same code runs everywhere.

Extraction needs no collective communication, so it creates no process group: ranks
never wait for each other, a slow or restarted rank cannot hang the others, and the
last rank to finish merges the index (:func:`difffeat.shards.merge_index`). Head training
does need gradient all-reduce and gets it from accelerate's DDP (:func:`prepare_ddp`).

Sharding scheme (strided over work units)
------------------------------------------
The sorted item list is cut into consecutive *units* (a batch of ``batch_size`` images for
per-image outputs, a shard of ``shard_size`` images for sharded outputs). Unit ``j`` goes to
rank ``j % world_size``. Hence:

* every item is processed exactly once, for any world size (units partition the list);
* unit boundaries, numbers and contents do not depend on the world size, so every image is
  computed in the same batch (same neighbours, same batch shape) on 1 or 64 GPUs and its
  output is byte-identical; shard ``k`` holds the same images whoever writes it;
* ranks get ``ceil`` or ``floor`` of ``units / world_size`` units. Ranks advance through
  their units in order at similar speeds, so after a crash the finished units are roughly
  the first ones, and striding what is left over a new world size stays balanced.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch

from .errors import BadInputError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, number of processes, rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that shows progress and prints summaries."""
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)  # type: ignore[arg-type]
    except ValueError:
        raise BadInputError(f"environment variable {name}={value!r} is not an integer") from None


def dist_info() -> DistInfo:
    """Rank and world size of this process.

    Read from an initialised ``torch.distributed`` process group if there is one, else from
    the variables that ``torchrun`` and ``accelerate launch`` set (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``). Without them the process is rank 0 of 1. Slurm's own ``SLURM_PROCID`` is
    deliberately ignored: a batch script runs once with ``SLURM_NTASKS`` > 1, and reading it
    would silently process a fraction of the data; use ``srun torchrun`` (docs/scaling.md).
    """
    local = _env_int("LOCAL_RANK")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return DistInfo(rank, world, rank if local is None else local)
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if world is None or world == 1:
        return DistInfo(0, 1, 0)
    if rank is None:
        raise BadInputError(f"WORLD_SIZE={world} is set but RANK is not; launch with torchrun or accelerate launch")
    if world < 1 or not 0 <= rank < world:
        raise BadInputError(f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={world}")
    return DistInfo(rank, world, rank if local is None else local)


def rank_device(device: str | None, info: DistInfo | None = None) -> str | None:
    """The device this rank should use: ``cuda:LOCAL_RANK`` when several ranks share a node.

    An explicit index (``cuda:1``) or ``cpu`` is kept. When each process sees a single GPU
    (Slurm ``--gpus-per-task=1`` sets ``CUDA_VISIBLE_DEVICES`` per task) that GPU is used.
    """
    info = info or dist_info()
    if info.world_size == 1 or device not in (None, "cuda") or not torch.cuda.is_available():
        return device
    count = torch.cuda.device_count()
    if count == 1:
        return "cuda:0"
    if info.local_rank >= count:
        raise BadInputError(f"LOCAL_RANK={info.local_rank} but only {count} GPUs are visible; start one process per GPU")
    return f"cuda:{info.local_rank}"


def resolve_device(device: str | torch.device | None = None, info: DistInfo | None = None) -> torch.device:
    """The one place a device is chosen; every model loader goes through it.

    ``None`` means CUDA if available, else CPU. Under a launcher (``WORLD_SIZE`` > 1) a bare
    ``cuda`` (or ``None``) becomes ``cuda:LOCAL_RANK`` (:func:`rank_device`), so every path
    (extraction, heads, detectors, probes) puts each rank on its own GPU by construction.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(rank_device(device, info))  # type: ignore[arg-type]
    except RuntimeError as e:
        raise BadInputError(f"unknown device {device!r} ({str(e).splitlines()[0]}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    return dev


def shard_items(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s items of ``items`` under strided assignment: ``items[rank::world_size]``.

    Over all ranks every item appears exactly once; rank sizes differ by at most one.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise BadInputError(f"rank {rank} is not in a world of size {world_size}")
    return list(items[rank::world_size])


def rank_units(items: Sequence[T], unit: int, info: DistInfo | None = None, blocks: bool = False) -> list[Sequence[T]]:
    """This rank's units of ``items``: consecutive slices of ``unit`` items, unit ``j`` to rank
    ``j % world_size`` (see the module docstring). ``blocks`` instead cuts the list into one
    contiguous block per rank (neighbouring pairs of ``correspond --pairs`` share images)."""
    info = info or dist_info()
    if unit < 1:
        raise BadInputError(f"batch size must be >= 1, got {unit}")
    if blocks:
        unit = max(1, -(-len(items) // info.world_size))
    units = [items[i : i + unit] for i in range(0, len(items), unit)]
    return shard_items(units, info.rank, info.world_size)


def rank_share(items: Sequence[T], batch_size: int, info: DistInfo | None = None) -> list[T]:
    """This rank's items when ``items`` (in a deterministic order, e.g. sorted) is processed in batches.

    ``items`` is cut into global batches of ``batch_size``; batch ``j`` goes to rank
    ``j % world_size`` (see the module docstring). The result is those batches concatenated,
    so chunking it by ``batch_size`` again yields exactly the global batches: only the very
    last global batch can be short, and it is the last one of whichever rank owns it.
    """
    return [item for batch in rank_units(items, batch_size, info) for item in batch]


def progress_bar(total: int, desc: str, info: DistInfo | None = None, unit: str = "img", enabled: bool = True,
                 **kwargs: Any) -> Any:
    """A tqdm bar shown on rank 0 only (and hidden when ``DIFFFEAT_NO_PROGRESS=1`` or not ``enabled``).

    The one place difffeat decides whether a progress bar is shown.
    """
    from tqdm import tqdm

    info = info or dist_info()
    hidden = not enabled or not info.is_main or os.environ.get("DIFFFEAT_NO_PROGRESS") == "1" or total == 0
    label = desc if info.world_size == 1 else f"{desc} (rank 0 of {info.world_size})"
    return tqdm(total=total, desc=label, unit=unit, disable=hidden, **kwargs)


def prepare_ddp(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader | None = None,
    *,
    find_unused_parameters: bool = False,
    **accelerator_kwargs: Any,
) -> tuple[Any, torch.nn.Module, torch.optim.Optimizer, torch.utils.data.DataLoader | None]:
    """Wrap a head's training objects for DDP with :class:`accelerate.Accelerator`.

    Under ``torchrun``/``accelerate launch`` the model becomes a DDP module (gradients are
    averaged over ranks in ``backward``), the loader yields each rank its part of every
    epoch, and the optimizer steps in sync; in one process everything is returned as is
    (placed on the accelerator's device). A trainer uses it like this::

        acc, model, opt, loader = prepare_ddp(head, opt, loader)
        for x, y in loader:
            opt.zero_grad()
            acc.backward(loss_fn(model(x), y))
            opt.step()
        if acc.is_main_process:
            save_checkpoint(acc.unwrap_model(model), ...)   # same format as one process

    A trainer that draws its own batches instead of a DataLoader passes ``loader=None`` and
    gives each rank ``shard_items(global_batch, acc.process_index, acc.num_processes)``;
    every rank must get at least one sample per step (drop a last batch smaller than the
    world size), or DDP waits forever. Heads whose forward skips some parameters need
    ``find_unused_parameters=True``.

    The effective batch is ``world_size`` times the per-rank batch; scale the learning rate
    (or the per-rank batch) accordingly. ``accelerator_kwargs`` go to ``Accelerator``
    (e.g. ``mixed_precision="bf16"``, ``cpu=True``, ``kwargs_handlers=[...]``).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    handlers = list(accelerator_kwargs.pop("kwargs_handlers", None) or [])
    if find_unused_parameters:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    acc = Accelerator(kwargs_handlers=handlers, **accelerator_kwargs)
    if loader is None:
        model, optimizer = acc.prepare(model, optimizer)
    else:
        model, optimizer, loader = acc.prepare(model, optimizer, loader)
    return acc, model, optimizer, loader
