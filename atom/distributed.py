"""Tensor-parallel collectives over torch.distributed (NCCL on GPUs, gloo on CPUs).

The tensor-parallel group is the default process group; with no process group (one device) every
collective is the identity, so single-device code pays nothing.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist


def tp_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def tp_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_world_size() > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's x along the last dimension: [..., n] -> [..., n * world]."""
    world = tp_world_size()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def broadcast_from_first(x: torch.Tensor) -> torch.Tensor:
    """Every rank gets rank 0's x (in place)."""
    if tp_world_size() > 1:
        dist.broadcast(x, src=0)
    return x


def all_reduce_min(value: int, device: torch.device) -> int:
    if tp_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_tensor_parallel(rank: int, world_size: int, port: int, device_type: str) -> None:
    """Join the tensor-parallel group: NCCL on GPUs (one per rank), gloo on CPUs."""
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
    )
