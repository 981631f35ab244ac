"""All-reduce of small tensors through symmetric memory, for the decode steps' all-reduces.

A decode step of a tensor-parallel Llama-3.1-8B makes 64 all-reduces of a few rows of 4,096
values. NCCL takes ~12.6 us for one bf16 row on two H200s; PyTorch's symmetric-memory one-shot
kernel (`torch.ops.symm_mem.one_shot_all_reduce_copy`: copy this rank's tensor into its buffer,
a barrier over every rank's signal pad, each rank sums all the buffers over NVLink, a barrier
so that no buffer is overwritten while a peer still reads it) 6.7 us; at 256 rows 21.5 us
against 39.5 (H200 x2, benchmarks/RESULTS.md, twenty-second sitting). One kernel, no host
work, and it replays in a CUDA graph.

Larger tensors (prefill) and dtypes the kernel lacks (float16) go through NCCL. The buffer is
allocated and checked once at start-up by every rank together; a rank that cannot (no
symmetric memory, no peer access, a wrong sum) makes every rank keep NCCL.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

MAX_BYTES = 8 << 20  # per all-reduce; larger ones take NCCL
DTYPES = (torch.bfloat16, torch.float32)  # what the symmetric-memory kernel sums


class CustomAllReduce:
    def __init__(self, device: torch.device, name: str, max_bytes: int = MAX_BYTES) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        # Symmetric memory keeps a group's store by name for the process's lifetime, and the
        # default group of every engine start is named "0": a second engine in one process
        # would exchange its handles through the first one's store and wait forever. So each
        # start registers a name of its own (every rank's the same), over the group's store.
        store = dist.PrefixStore(name, dist.distributed_c10d._get_default_store())
        symm_mem._SymmetricMemory.set_group_info(
            name, dist.get_rank(), dist.get_world_size(), store
        )
        self.group_name = name
        self.max_bytes = max_bytes
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, name)

    def fits(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return x.dtype in DTYPES and 0 < nbytes <= self.max_bytes and nbytes % 4 == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of x, in a new tensor (x is left as it was)."""
        n = x.numel()
        buffer = self.buffer.view(x.dtype)[:n]
        out = torch.ops.symm_mem.one_shot_all_reduce_copy(
            buffer, x.contiguous().view(-1), "sum", self.group_name
        )
        return out.view(x.shape)


def create_custom_all_reduce(device: torch.device, name: str) -> CustomAllReduce | None:
    """Every rank's CustomAllReduce, or None on every rank where one of them could not make or
    check its own (a collective: every rank calls it at the same point). name: unique to this
    process group, the same on every rank."""
    custom: CustomAllReduce | None = None
    try:
        custom = CustomAllReduce(device, name)
        world, rank = dist.get_world_size(), dist.get_rank()
        for rows in (1, 3):  # a known sum, through peer memory: catches a broken mapping
            x = torch.full((rows, 1024), rank + 1.0, dtype=torch.bfloat16, device=device)
            got = custom(x)
            if not bool((got == world * (world + 1) / 2).all()):
                raise RuntimeError(f"wrong sum over {rows} rows")
    except Exception as exc:  # no symmetric memory or peer access: NCCL everywhere
        logger.warning("custom all-reduce off, NCCL for every all-reduce: %s", exc)
        custom = None
    ok = torch.tensor([custom is not None], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not bool(ok.item()):
        return None
    logger.info("custom all-reduce (symmetric memory) for all-reduces up to %d bytes", MAX_BYTES)
    return custom
