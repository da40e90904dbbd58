"""Where a training process runs: its device, and its place among ``torchrun``'s DDP processes.

One process is a world of one; under ``torchrun`` the processes join one process group (NCCL on
GPUs, gloo on CPUs), and rank 0 alone writes. The collectives are methods of :class:`Cluster`.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class Cluster:
    """This process's device and its rank among ``world`` processes (``world == 1``: no DDP)."""

    device: torch.device
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0

    def from_rank0(self, values: List[float]) -> List[float]:
        """Rank 0's numbers on every rank: decisions that depend on timing or on evaluation must
        agree, or one rank leaves the loop while the others wait in an all-reduce forever."""
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, 0)
        return tensor.tolist()

    def sum_over_ranks(self, values: List[float]) -> List[float]:
        """The element-wise sum of ``values`` over every rank (float64 all-reduce)."""
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def buffers_from_rank0(self, *models: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm statistics) to every rank: each rank updates them with its
        own shard and an EMA averages them, so without this the replicas drift apart."""
        import torch.distributed as dist

        for model in models:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)

    def replica_digests(self, *models: nn.Module) -> List[Optional[str]]:
        """Every rank's :func:`param_digest` of ``models``, gathered on every rank (rank order)."""
        import torch.distributed as dist

        gathered: List[Optional[str]] = [None] * self.world
        dist.all_gather_object(gathered, param_digest(*models))
        return gathered

    def stop(self) -> None:
        """Wait for every rank, then leave the process group while the interpreter is fully alive.

        The caller drops its DDP wrappers first: a group still held in a reference cycle would be
        destroyed at interpreter shutdown, where gloo's threads can abort the process.
        """
        import gc

        import torch.distributed as dist

        dist.barrier()
        gc.collect()  # the DDP reducer's cycles, and with them the last references to the group
        dist.destroy_process_group()
        gc.collect()


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when visible, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA GPU is visible to torch (use --device cpu or auto)")
    return device


def start_cluster(device_name: str) -> Cluster:
    """Resolve the device and, under ``torchrun``, join the process group (one GPU per local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Cluster(device, world, rank, local_rank)


def param_digest(*models: nn.Module) -> str:
    """SHA-256 over the weights and buffers of ``models`` (the trained model and its EMA)."""
    digest = hashlib.sha256()
    for model in models:
        for key, value in sorted(model.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
