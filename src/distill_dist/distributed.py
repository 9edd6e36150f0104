"""Process-group setup shared by every multi-rank stage (torchrun / srun / deepspeed launcher env)."""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A free TCP port on this host, for a rendezvous started here."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def maybe_init_distributed() -> tuple[int, int, int]:
    """Join the process group the launcher describes (WORLD_SIZE > 1); returns (rank, world, local_rank).

    gloo on CPU, nccl on GPU. Slurm `srun` tasks without torchrun are mapped from SLURM_* variables.
    """
    env = os.environ
    if "WORLD_SIZE" not in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1 and "MASTER_ADDR" in env:
        env["WORLD_SIZE"], env["RANK"], env["LOCAL_RANK"] = env["SLURM_NTASKS"], env["SLURM_PROCID"], env["SLURM_LOCALID"]
    world_size = int(env.get("WORLD_SIZE", "1"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    rank, world_size = world()
    return rank, world_size, local_rank


def pick_device(setting: str, local_rank: int = 0) -> torch.device:
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def gather_objects(obj):
    """All ranks' `obj` as a list on every rank (a one-element list when not distributed)."""
    rank, world_size = world()
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
