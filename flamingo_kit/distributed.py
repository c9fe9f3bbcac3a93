"""Where this process sits in a job: rank, local rank, world size and device.

One description for the trainer (``train.distributed.init_distributed`` starts the process group
and returns it) and the evaluator (which splits queries over ranks and gathers their records).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; the defaults describe a single process on the CPU."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, results, exports and renames checkpoints."""
        return self.rank == 0

    @classmethod
    def current(cls) -> DistInfo:
        """From the initialised torch.distributed process group, else a single process."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return cls(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")),
                   dist.get_world_size(), device)

    def gather(self, records: list) -> list:
        """Every rank's ``records``, concatenated in rank order, on every rank."""
        if self.world_size == 1:
            return records
        parts: list[list] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(parts, records)
        return [record for part in parts for record in part]
