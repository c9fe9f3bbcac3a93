"""Process-group set-up shared by single-process runs and the ``deepspeed``/``torchrun`` launchers.

A launcher sets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``; a plain
``python -m train`` run gets the single-process values here, so both go through the same
``deepspeed.init_distributed`` call (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import os
import socket

import torch

from flamingo_kit.distributed import DistInfo


def free_port() -> int:
    """A TCP port that is free right now on this host."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_single_process_env() -> None:
    """Fill in the rendezvous variables a launcher would set, for a one-process run."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(shm_comm: bool = False) -> DistInfo:
    """Initialise the default process group once and return this process's place in it.

    ``shm_comm`` enables DeepSpeed's shared-memory CPU collectives, which compile a C++
    extension (~25 s) at first use; worth it only for long multi-process CPU runs.
    """
    import deepspeed
    import torch.distributed as dist

    set_single_process_env()
    if not shm_comm:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)


def barrier() -> None:
    """Wait for all ranks (no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over all ranks in one collective."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """Add up per-rank ``{name: count}`` dicts whose names may differ between ranks."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(counts)
    gathered: list[dict[str, int]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, dict(counts))
    total: dict[str, int] = {}
    for part in gathered:
        for name, value in part.items():
            total[name] = total.get(name, 0) + int(value)
    return total


def shutdown_distributed() -> None:
    """Tear down the process group so the same process can start another run (tests)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
