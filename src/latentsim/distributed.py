"""Work shared across the processes of `accelerate launch` (torchrun underneath), on one machine or several.

Every stage that shards its work reads its place from the launcher's environment (RANK, WORLD_SIZE,
LOCAL_RANK); run as a plain `python` script it is rank 0 of 1 and nothing below does anything. Work is dealt
out by position in a list every rank computes the same way (shard i goes to rank i % world), so no rank waits
for another to decide what it does, and a rerun gives each rank the unfinished part of its own share.
Ranks meet once, at the end (`wait_for_all`), where the main rank merges. A vLLM engine spanning
`tensor_parallel_size` ranks (vLLM's `external_launcher`) counts as one share: its ranks compute the same
outputs and only the first of them writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta

from latentsim.errors import ConfigError

# Ranks wait at the end for the slowest one, which may be hours behind on a big cache.
BARRIER_TIMEOUT = timedelta(days=2)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    share_index: int = 0  # which share of the work this rank computes
    n_shares: int = 1
    writes: bool = True  # this rank writes its share's outputs

    @classmethod
    def from_env(cls) -> Ranks:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        return cls(rank, world, int(os.environ.get("LOCAL_RANK", 0)), rank, world, True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def with_tensor_parallel(self, tensor_parallel_size: int, key: str = "tensor_parallel_size") -> Ranks:
        """The shares when each vLLM engine spans `tensor_parallel_size` consecutive ranks (vLLM's layout)."""
        if self.world % tensor_parallel_size:
            raise ConfigError(f"config key `{key}`: {tensor_parallel_size} does not divide the {self.world} launched "
                              "processes; launch a multiple of it (accelerate launch --num_processes).")
        return replace(self, share_index=self.rank // tensor_parallel_size, n_shares=self.world // tensor_parallel_size,
                       writes=self.rank % tensor_parallel_size == 0)

    def share(self, items: list) -> list:
        """This rank's share: items[i] for i % n_shares == share_index."""
        return list(items[self.share_index::self.n_shares])

    def device(self, device: str) -> str:
        """One GPU per rank: `auto`/`cuda` become this rank's `cuda:<local_rank>` in a multi-process launch."""
        import torch

        if self.world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device

    def _group(self):
        import torch.distributed as dist

        if not dist.is_initialized():  # a vLLM engine (external_launcher) may have made it already
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
        return dist

    def wait_for_all(self) -> None:
        """Return once every rank has got here (its share written)."""
        if self.world > 1:
            self._group().barrier()

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (small objects: lists of latent ids)."""
        if self.world == 1:
            return [obj]
        dist = self._group()
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out
