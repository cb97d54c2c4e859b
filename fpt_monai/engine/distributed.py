"""Multi-process training with ``torchrun``: process group, devices, samplers and DDP over what learns.

The bundle's ``configs/multi_gpu_train.json`` and ``configs/multi_gpu_evaluate.json`` call these functions; they
do not launch anything. ``torchrun`` (alone, or under SLURM/Kubernetes) starts one process per GPU and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` joins
the process group from them, NCCL on GPUs and Gloo on CPUs.

What is synchronised: FPT trains the side network, prompts and fusion module (1-2% of the weights) on
preloaded keys/values, so :func:`wrap_ddp` wraps the network in ``DistributedDataParallel`` with the frozen
backbone excluded: its ~86 M parameters are neither broadcast when DDP starts nor part of any gradient bucket.
Every rank builds the backbone from the same weights itself, and :func:`wrap_ddp` checks that by digest.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TypeVar

import ignite.distributed as idist
import torch
import torch.distributed as dist
import torch.nn as nn
from monai.data import DistributedSampler
from torch.nn.parallel import DistributedDataParallel

from fpt_monai._compat import ddp_ignore
from fpt_monai.utils import weights_digest

__all__ = [
    "TORCHRUN_VARIABLES",
    "barrier",
    "destroy_distributed",
    "distributed_backend",
    "distributed_device",
    "distributed_sampler",
    "init_distributed",
    "is_distributed",
    "per_rank_batch_size",
    "rank_and_world_size",
    "rank_zero_first",
    "wrap_ddp",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_quieted = False  # whether init_distributed turned INFO logs off on this rank

#: Environment variables that ``torchrun`` sets for every process and :func:`init_distributed` needs.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world_size() -> tuple[int, int]:
    """(rank, number of processes): from the process group if one is initialised, else from ``torchrun``'s
    ``RANK``/``WORLD_SIZE`` environment variables (a command sharding its work without a process group),
    else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size}).")
        return rank, world_size
    return 0, 1


def distributed_backend() -> str:
    """``"nccl"`` when CUDA GPUs are available, else ``"gloo"`` (CPUs)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def distributed_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` (made the current CUDA device) when CUDA is available, else CPU.

    Raises:
        RuntimeError: when the node has fewer GPUs than processes.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"local rank {local_rank} has no GPU of its own: this node has {count}; start at most one process per "
            f"GPU (torchrun --nproc_per_node={count})."
        )
    # NCCL collectives run on the current device; without this every process of a node would use GPU 0
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(
    backend: str | None = None, timeout_minutes: float | None = None, quiet_other_ranks: bool = True
) -> None:
    """Join the process group that ``torchrun`` describes in the environment (no-op if already joined).

    Args:
        backend: ``"nccl"``, ``"gloo"``, or ``None`` for :func:`distributed_backend` (NCCL on GPUs, Gloo on CPUs).
        timeout_minutes: how long a collective (a barrier, a gradient all-reduce) may wait for the slowest rank
            before failing; ``None`` keeps PyTorch's default (10 minutes for NCCL, 30 for Gloo).
        quiet_other_ranks: ranks other than 0 log warnings and errors only, so that the log reads like the log
            of a one-process run instead of repeating every line once per process.

    Raises:
        RuntimeError: when the process was not started by ``torchrun`` (the variables of
            :data:`TORCHRUN_VARIABLES` are missing) or NCCL is asked for without GPUs.
    """
    if dist.is_initialized():
        return
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"the multi-process configs need the environment that torchrun sets up ({', '.join(missing)} missing): "
            "start with `torchrun --nproc_per_node=N -m monai.bundle run ...`; for one process, leave "
            "multi_gpu_train.json / multi_gpu_evaluate.json out."
        )
    backend = backend or distributed_backend()
    options: dict = {"timeout": timedelta(minutes=float(timeout_minutes))} if timeout_minutes else {}
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("the NCCL backend needs CUDA GPUs and none is available; use backend 'gloo' on CPUs.")
        options["device_id"] = distributed_device()  # binds the group to this process's GPU
    dist.init_process_group(backend=backend, **options)
    _register_with_ignite()

    logger.info(  # the local rank as ignite sees it: it picks the device of ignite's metric collectives
        "process %d of %d (local rank %d on %s), backend %s",
        dist.get_rank(),
        dist.get_world_size(),
        idist.get_local_rank(),
        os.uname().nodename,
        backend,
    )
    if quiet_other_ranks and dist.get_rank() > 0:
        logging.disable(logging.INFO)  # every logger, whatever its own level: INFO and below are dropped
        global _quieted
        _quieted = True


def _register_with_ignite() -> None:
    """Hand the new process group to ignite (metrics, handlers) now, at the same point on every rank.

    ignite sets itself up on first use, with collectives, so that first use must not happen on some ranks only.
    And with ``SLURM_JOB_ID`` set, ignite takes the local rank from ``SLURM_LOCALID`` and writes it over
    ``LOCAL_RANK``; under ``srun torchrun`` that is the index of the torchrun task on its node (0), not of this
    process, which would put every process of a node on one GPU. Hidden from ignite, the variable leaves it
    ``torchrun``'s ``LOCAL_RANK``.
    """
    slurm_job = os.environ.pop("SLURM_JOB_ID", None)
    try:
        idist.sync()
    finally:
        if slurm_job is not None:
            os.environ["SLURM_JOB_ID"] = slurm_job


def destroy_distributed() -> None:
    """Leave the process group (no-op when there is none) and log as before :func:`init_distributed`."""
    global _quieted
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        idist.sync()  # ignite forgets the group it was given
    if _quieted:
        logging.disable(logging.NOTSET)
        _quieted = False


def barrier() -> None:
    """Wait until every process of the group gets here (no-op without a group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank_zero_first(function: Callable[..., T], *args, **kwargs) -> T:
    """``function(*args, **kwargs)`` on rank 0, then on the other ranks once rank 0 has returned.

    For work that every rank needs but one should do, where a second call reuses the first's result: creating
    the sample dataset (``configs/demo.json``), a download. Called at once when not distributed.
    """
    if not is_distributed():
        return function(*args, **kwargs)
    if dist.get_rank() == 0:
        result = function(*args, **kwargs)
        barrier()
        return result
    barrier()
    return function(*args, **kwargs)


def per_rank_batch_size(batch_size: int) -> int:
    """The batch each process loads so that the processes together make a global batch of ``batch_size``.

    DDP averages the gradients of the processes, so with a mean-reduced loss one step on ``world_size`` batches
    of ``batch_size / world_size`` is one step on a batch of ``batch_size``: the learning rate and schedule of
    a one-process run stay valid.

    Raises:
        ValueError: when ``batch_size`` is not a multiple of the number of processes.
    """
    _, world_size = rank_and_world_size()
    batch_size = int(batch_size)
    if batch_size < world_size or batch_size % world_size:
        raise ValueError(
            f"batch_size {batch_size} is the global batch and must be a multiple of the {world_size} processes; "
            f"use e.g. --batch_size {max(1, round(batch_size / world_size)) * world_size}."
        )
    return batch_size // world_size


def distributed_sampler(dataset, shuffle: bool, even_divisible: bool, seed: int = 0) -> DistributedSampler:
    """MONAI's ``DistributedSampler`` giving this process its share of ``dataset``.

    Args:
        dataset: the dataset to share.
        shuffle: a new permutation every epoch (the same on every rank, from ``seed`` and the epoch, which
            MONAI's engines set); without shuffling rank ``r`` gets items ``r, r + world_size, ...``.
        even_divisible: every rank gets the same number of items, padding with repeated items (training: DDP
            needs the same number of steps on every rank); ``False`` gives every item exactly once
            (evaluation: exact metrics).
        seed: seed of the shuffling.

    Raises:
        ValueError: when the dataset has fewer items than there are processes.
    """
    rank, world_size = rank_and_world_size()
    if len(dataset) < world_size:
        raise ValueError(
            f"a dataset of {len(dataset)} items cannot be shared among {world_size} processes; use fewer processes."
        )
    return DistributedSampler(
        dataset, even_divisible=even_divisible, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=int(seed)
    )


def wrap_ddp(
    network: nn.Module, device: torch.device | str | None = None, frozen: Sequence[str] = ("backbone",), **ddp_options
) -> DistributedDataParallel:
    """Wrap ``network`` in ``DistributedDataParallel`` for what learns; the frozen submodules stay out of DDP.

    The parameters and buffers of the submodules named in ``frozen`` (FPT's backbone) are not broadcast when
    DDP starts and take no part in gradient synchronisation; the trainable parameters are broadcast from rank 0
    (so every rank starts from the same weights) and their gradients are averaged after each backward pass.
    Since nothing keeps the frozen weights in step, their digests are compared across ranks first.

    Use the returned module as the trainer's network and keep ``network`` itself for everything else
    (evaluators, checkpoints, ``trainable_parameters()``): it is the same object, and its ``state_dict`` has no
    ``module.`` prefix, so checkpoints load into a one-process network unchanged.

    Args:
        network: the network (on ``device``), e.g. an :class:`~fpt_monai.networks.FPTNet`.
        device: this process's device; on CUDA it becomes DDP's ``device_ids``.
        frozen: names of the submodules to leave out; each must have no trainable parameter. A name whose
            attribute is ``None`` (an FPTNet built from a ``BackboneShape``) is skipped.
        ddp_options: other ``DistributedDataParallel`` arguments.

    Raises:
        RuntimeError: without an initialised process group.
        ValueError: when a ``frozen`` submodule has trainable parameters, or its weights differ between ranks.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("wrap_ddp needs an initialised process group: call init_distributed() first.")
    ignored: list[str] = []
    digests: dict[str, str] = {}
    for name in frozen:
        module = network.get_submodule(name) if getattr(network, name, None) is not None else None
        if module is None:
            continue
        learning = [n for n, p in module.named_parameters() if p.requires_grad]
        if learning:
            raise ValueError(
                f"submodule {name!r} is not frozen ({len(learning)} trainable tensors, e.g. {learning[0]!r})."
            )
        ignored += [f"{name}.{n}" for n, _ in module.named_parameters()]
        ignored += [f"{name}.{n}" for n, _ in module.named_buffers()]
        digests[name] = weights_digest(module)
    every_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, digests)
    differing = sorted({name for other in every_rank for name in digests if other.get(name) != digests[name]})
    if differing:
        raise ValueError(
            f"the frozen {differing} weights differ between ranks (SHA-256 per rank: "
            f"{[{n: d.get(n, '')[:12] for n in differing} for d in every_rank]}); every process must build them "
            "from the same file (same preset and `pretrained`), and random weights need the same seed."
        )
    ddp_ignore(network, ignored)
    device = torch.device(device) if device is not None else None
    device_ids = [device] if device is not None and device.type == "cuda" else None
    return DistributedDataParallel(network, device_ids=device_ids, **ddp_options)
