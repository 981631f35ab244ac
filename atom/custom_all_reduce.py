"""All-reduce of small tensors through symmetric memory, for the decode steps' all-reduces.

A decode step of a tensor-parallel Llama-3.1-8B makes 64 all-reduces of a few rows of 4,096
values. NCCL takes ~12.6 us for one bf16 row on two H200s; PyTorch's symmetric-memory one-shot
kernel (`torch.ops.symm_mem.one_shot_all_reduce_copy`: copy this rank's tensor into its buffer,
a barrier over every rank's signal pad, each rank sums all the buffers over NVLink, a barrier
so that no buffer is overwritten while a peer still reads it) 7.1 us; at 256 rows 21.6 us
against 36.2, at 512 rows 35.8 against 40.6, at 1,024 rows 61.8 against NCCL's 55.4 (H200 x2,
benchmarks/RESULTS.md, twenty-second sitting). One kernel, no host work, and it replays in a
CUDA graph. From TWO_SHOT_MIN_BYTES (32 rows of 4,096 bf16) the two-shot kernel takes over
(`two_shot_all_reduce_out`: a copy into the buffer, then each rank sums its share of every
buffer and gathers the others' sums; two kernels, 12 us at 128 rows against the one-shot's 15).

Larger tensors (prefill) and dtypes the kernel lacks (float16) go through NCCL. The buffer is
allocated and checked once at start-up by every rank together; a rank that cannot (no
symmetric memory, no peer access, a wrong sum) makes every rank keep NCCL.

One engine per process gets it: a second tensor-parallel engine in one process hung in the
rendezvous (two H200s, twenty-second and twenty-third sittings). PyTorch's source numbers a
process's symmetric-memory exchanges (keys `CUDASymmetricMemory/SEQ/RANK` in the group's store)
from the process's start, so that engine's rank 0 would be at SEQ 1 and its new workers at 0,
each waiting for the other's keys. Later engines in that process keep NCCL.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from atom.distributed import all_reduce_min

logger = logging.getLogger(__name__)
_rendezvoused = False  # this process has exchanged symmetric-memory handles (module doc)

# Per all-reduce, over 2 ranks: one-shot beat NCCL up to 512 rows of 4,096 bf16 values and lost
# at 1,024 (the module doc). Each rank reads every other rank's tensor, so with more ranks the
# limit shrinks in proportion (not measured past 2). The two-shot, which takes the sizes past
# TWO_SHOT_MIN_BYTES, still beat NCCL at 8 MiB (36.6 against 55-56 us): the limit is the
# one-shot's, kept until the two-shot is measured in a decode step.
MAX_BYTES_2_RANKS = 4 << 20
# From this size the two-shot kernel (each rank sums its share of every rank's buffer, then
# gathers the others' shares) beats the one-shot, copy in included: 8.9 against 9.5 us at 32
# rows, 11.7-12.1 against 15.1 at 128, 14.8-15.6 against 21.7-22.4 at 256; 8.7 against 7.1-7.5 at
# 8 rows (bench_all_reduce.py, H200 x2, twenty-third sitting).
TWO_SHOT_MIN_BYTES = 256 << 10
DTYPES = (torch.bfloat16, torch.float32)  # what the symmetric-memory kernel sums
ALIGN = 16  # bytes: the kernel's vector width; the buffer's views start aligned


def max_bytes(world_size: int) -> int:
    return MAX_BYTES_2_RANKS * 2 // world_size


class CustomAllReduce:
    """An 8-bit symmetric buffer of max_bytes, viewed as each all-reduce's dtype. Build it with
    create_custom_all_reduce, which makes every rank's together."""

    def __init__(self, device: torch.device, nbytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        group = dist.group.WORLD
        assert group is not None
        self.group_name = group.group_name
        self.max_bytes = nbytes
        self.buffer = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        # Off where this PyTorch lacks the kernel or its start-up check fails.
        self.two_shot = hasattr(torch.ops.symm_mem, "two_shot_all_reduce_out")

    def rendezvous(self) -> None:
        """Exchanges the buffers' handles (a collective)."""
        import torch.distributed._symmetric_memory as symm_mem

        global _rendezvoused
        _rendezvoused = True
        symm_mem.rendezvous(self.buffer, self.group_name)

    def fits(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return (
            x.dtype in DTYPES
            and 0 < nbytes <= self.max_bytes
            and nbytes % ALIGN == 0
            and (x.storage_offset() * x.element_size()) % ALIGN == 0
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of x, in a new tensor (x is left as it was)."""
        n = x.numel()
        buffer = self.buffer.view(x.dtype)[:n]
        if self.two_shot and n * x.element_size() >= TWO_SHOT_MIN_BYTES:
            buffer.view(x.shape).copy_(x)
            out = torch.empty(n, dtype=x.dtype, device=x.device)
            torch.ops.symm_mem.two_shot_all_reduce_out(buffer, "sum", self.group_name, out)
        else:
            out = torch.ops.symm_mem.one_shot_all_reduce_copy(
                buffer, x.contiguous().view(-1), "sum", self.group_name
            )
        return out.view(x.shape)

    def check(self, sizes: tuple[int, ...], device: torch.device) -> bool:
        """Whether known sums of bf16 vectors of these sizes come out right on this rank, each
        element its own value (a share written or gathered to the wrong place shows): through
        peer memory, so a broken mapping shows too. The sums are small integers, exact in
        bf16."""
        world, rank = dist.get_world_size(), dist.get_rank()
        ok = True
        for n in sizes:
            base = torch.arange(n, device=device) % 64
            x = (base + rank).to(torch.bfloat16)
            want = world * base + world * (world - 1) // 2
            ok &= bool((self(x).float() == want).all())
        return ok


def create_custom_all_reduce(device: torch.device) -> CustomAllReduce | None:
    """Every rank's CustomAllReduce, or None on every rank where one of them could not make or
    check its own. A collective: every rank calls it at the same point, and the ranks agree
    before each step that needs them all (the rendezvous, the check's kernels), so that no rank
    waits there for one that has failed."""
    if not all_reduce_min(not _rendezvoused, device):
        logger.info(
            "custom all-reduce off, NCCL for every all-reduce: this process set one up for an "
            "earlier engine (symmetric memory's exchanges are numbered per process, so a new "
            "worker's would not match this process's)"
        )
        return None
    custom: CustomAllReduce | None = None
    try:
        custom = CustomAllReduce(device, max_bytes(dist.get_world_size()))
    except Exception as exc:  # no symmetric memory here: NCCL everywhere
        logger.warning("custom all-reduce off, NCCL for every all-reduce: %s", exc)
    if not all_reduce_min(custom is not None, device):  # every rank has its buffer
        return None
    assert custom is not None
    two_shot, custom.two_shot = custom.two_shot, False
    try:
        custom.rendezvous()
        ok = custom.check((1024, 3 * 1024 + 8), device)  # the one-shot
    except Exception as exc:
        logger.warning("custom all-reduce off, NCCL for every all-reduce: %s", exc)
        ok = False
    if not all_reduce_min(ok, device):  # every rank's check passed
        return None
    # The two-shot where every rank has it, checked past TWO_SHOT_MIN_BYTES on a size that
    # does not split into whole 16-element pieces per rank.
    if all_reduce_min(two_shot, device):
        try:
            custom.two_shot = True
            two_shot = custom.check((TWO_SHOT_MIN_BYTES // 2 + 8,), device)
        except Exception as exc:
            logger.warning("custom all-reduce: two-shot off, one-shot throughout: %s", exc)
            two_shot = False
        custom.two_shot = bool(all_reduce_min(two_shot, device))
    logger.info(
        "custom all-reduce (symmetric memory) for all-reduces up to %d bytes (%s)",
        custom.max_bytes,
        f"two-shot from {TWO_SHOT_MIN_BYTES} bytes" if custom.two_shot else "one-shot",
    )
    return custom
