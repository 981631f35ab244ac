"""Tensor-parallel collectives over torch.distributed (NCCL on GPUs, gloo on CPUs).

The tensor-parallel group is the default process group; with no process group (one device) every
collective is the identity, so single-device code pays nothing. On GPUs the small all-reduces of
decode steps go through custom_all_reduce.py unless --disable-custom-all-reduce.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from atom.custom_all_reduce import CustomAllReduce

logger = logging.getLogger(__name__)
_custom: CustomAllReduce | None = None
_abandoned: list[CustomAllReduce] = []  # buffers of groups left by abort (leave_tensor_parallel)


def tp_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def tp_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce(x: Tensor) -> Tensor:
    """The sum of x over the ranks: x itself, summed in place by NCCL or gloo, or a new tensor
    from the custom all-reduce. Under torch.compile the custom one is the opaque op
    `atom::all_reduce`, which picks at run time, so the token count gets no guard."""
    if tp_world_size() == 1:
        return x
    if _custom is None:
        dist.all_reduce(x)
        return x
    if torch.compiler.is_dynamo_compiling():
        return torch.ops.atom.all_reduce(x)
    return _all_reduce(x)


def _all_reduce(x: Tensor) -> Tensor:
    assert _custom is not None
    if _custom.fits(x):
        return _custom(x)
    dist.all_reduce(x)
    return x


@torch.library.custom_op("atom::all_reduce", mutates_args=())
def _all_reduce_op(x: Tensor) -> Tensor:
    """The run-time pick of all_reduce for compiled code (a new tensor: x is not mutated)."""
    assert _custom is not None
    if _custom.fits(x):
        return _custom(x)
    out = x.clone(memory_format=torch.contiguous_format)  # the layout the fake gives
    dist.all_reduce(out)
    return out


@_all_reduce_op.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


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


def init_tensor_parallel(
    rank: int, world_size: int, port: int, device_type: str, custom_all_reduce: bool = True
) -> None:
    """Join the tensor-parallel group: NCCL on GPUs (one per rank), with the custom all-reduce
    for small tensors unless custom_all_reduce is False; gloo on CPUs."""
    global _custom
    _custom = None
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
    )
    if device_type == "cuda" and custom_all_reduce:
        from atom.custom_all_reduce import create_custom_all_reduce  # it uses this module

        _custom = create_custom_all_reduce(torch.device("cuda", rank))


def leave_tensor_parallel(abort: bool = False) -> None:
    """Drop the custom all-reduce's buffer, then the process group (where one was joined).

    The caller destroys its CUDA graphs first (ModelRunner.shutdown): NCCL's finalize and its
    abort both wait until every graph that captured one of the communicator's collectives is
    gone (commDestroySync in NCCL's init.cc), which hung the finalize and then the abort of a
    compiled tp engine on two H200s (twenty-second to twenty-fourth sittings). NCCL's
    communicators are aborted, once the device has finished its work, rather than finalized:
    a finalize waits forever for a rank that died. gloo's group is destroyed unless abort (a
    rank has died). On abort the custom all-reduce's buffer is kept, not freed: freeing a
    symmetric buffer synchronizes the device, where a kernel may wait for the dead rank
    forever."""
    global _custom
    joined = dist.is_initialized()
    nccl = joined and dist.get_backend() == "nccl"
    if nccl and not abort:
        try:
            torch.cuda.synchronize()
        except Exception:  # a device error: nothing to finish, leave without waiting
            logger.warning("tensor-parallel shutdown: the device failed", exc_info=True)
            abort = True
    if abort and _custom is not None:
        _abandoned.append(_custom)
    _custom = None
    if joined and (abort or nccl):
        try:
            dist.distributed_c10d._abort_process_group()  # leaves no group behind
        except Exception:  # a private API: where it fails, destroy as usual
            logger.warning("aborting the process group failed", exc_info=True)
    if dist.is_initialized():
        dist.destroy_process_group()
