"""Linear layers of tens to hundreds of rows: y = x @ W^T as a persistent stream-K GEMM.

At 128 decode rows the 8B's GEMMs are still bound by their weight bytes, yet cuBLAS reads them at
2.4-3.3 TB/s of the H200's ~4.2 (RESULTS.md, twenty-fourth sitting): its [128, N] tiles are too
few, or leave a partial last wave (o_proj 4096 x 4096 has 32 output tiles of 128 columns for 132
SMs; gate/up's 224 are 1.7 waves). Stream-K (Osama et al., PPoPP 2023) gives every SM the same
work: the K iterations of all output tiles form one sequence, cut into `programs` equal ranges,
one program each. A range covers whole tiles, which the program stores, and at its ends parts of
tiles; a part goes to a float32 workspace slot of its program (0: its first tile, 1: its last),
and the last of a tile's programs to arrive (an atomic counter per tile) adds the parts in
program order, so a result never depends on arrival order, and stores the tile.

Weights and rows are read through TMA descriptors made on the host (`TMA`; Hopper), else through
pipelined pointer loads. The torch reference is gemv.gemv_ref (float32).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from atom.kernels.grid import cdiv
from atom.kernels.launch import INTERPRET, compiling_only, launch, pdl, pdl_start
from atom.kernels.tile_counters import tile_counters


@dataclass(frozen=True, slots=True)
class StreamKConfig:
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 4
    programs: int = 0  # 0: one per SM
    tma: bool = True  # TMA descriptors (CUDA, sm90+), else pointer loads


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def _partial(ws_ptr, program, slot, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] float32 workspace slot of (program, slot)."""
    base = ws_ptr + (tl.full([], program, tl.int64) * 2 + slot) * BLOCK_M * BLOCK_N
    return base + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]


@triton.jit(do_not_specialize=["M"])
def _streamk_kernel(
    x_ptr,  # [M, K], last dim contiguous (or its TMA descriptor)
    w_ptr,  # [N, K], last dim contiguous (or its TMA descriptor)
    y_ptr,  # [M, N] contiguous
    ws_ptr,  # [PROGRAMS, 2, BLOCK_M, BLOCK_N] float32 parts of tiles
    count_ptr,  # int32 per output tile, 0 between launches
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    iters = tl.cdiv(K, BLOCK_K)  # K iterations of one output tile
    total = tiles_m * tl.cdiv(N, BLOCK_N) * iters
    per = tl.cdiv(total, programs)
    start = pid * per
    end = tl.minimum(start + per, total)
    first_tile = start // iters
    offs_k = tl.arange(0, BLOCK_K)
    it = start
    while it < end:
        tile = it // iters
        k_lo = it - tile * iters
        k_hi = tl.minimum(iters, k_lo + end - it)
        # row tiles fastest: the programs over one slab of W are neighbours in the sequence
        off_m = (tile % tiles_m) * BLOCK_M
        off_n = (tile // tiles_m) * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for ki in range(k_lo, k_hi):
            if TMA:
                x = x_ptr.load([off_m, ki * BLOCK_K])
                w = w_ptr.load([off_n, ki * BLOCK_K])
            else:
                kk = ki * BLOCK_K + offs_k
                k_ok = kk < K
                x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + kk[None, :],
                            mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)  # fmt: skip
                w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + kk[None, :],
                            mask=(offs_n[:, None] < N) & k_ok[None, :], other=0.0)  # fmt: skip
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        out = y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if k_lo == 0 and k_hi == iters:  # a whole tile
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=ok)
        else:
            slot = (tile != first_tile).to(tl.int32)
            tl.store(_partial(ws_ptr, pid, slot, BLOCK_M, BLOCK_N), acc)
            tl.debug_barrier()  # every thread's part stored before the release below
            lo = tile * iters // per  # the tile's programs: lo..hi
            hi = ((tile + 1) * iters - 1) // per
            if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu") == hi - lo:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for q in range(lo, hi + 1):
                    q_slot = (tile != q * per // iters).to(tl.int32)
                    part = _partial(ws_ptr, q, q_slot, BLOCK_M, BLOCK_N)
                    acc += tl.load(part, volatile=True)
                tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=ok)
                tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")
        it += k_hi - k_lo


def _descriptor(t: Tensor, block: list[int]) -> object:
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block)


def _tma_ready(t: Tensor) -> bool:
    """TMA reads from 16-byte aligned addresses and row strides."""
    return t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0


def streamk_gemm(x: Tensor, weight: Tensor, config: StreamKConfig | None = None) -> Tensor:
    """x [M, K] @ weight [N, K]^T -> [M, N] in x's dtype."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit")
    if x.dtype != weight.dtype:
        raise ValueError(f"x {x.dtype} and weight {weight.dtype} differ")
    cfg = config or StreamKConfig()
    (m, k), n = x.shape, weight.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    total = tiles * cdiv(k, cfg.block_k)
    programs = cfg.programs or (_num_sms(x.device.index or 0) if x.is_cuda else 4)
    programs = min(programs, total)
    per = cdiv(total, programs)
    programs = cdiv(total, per)  # none left without work
    ws = torch.empty((programs, 2, cfg.block_m, cfg.block_n), dtype=torch.float32, device=x.device)
    counters = (torch.empty(1, dtype=torch.int32, device=x.device) if compiling_only()
                else tile_counters(x.device, tiles))  # fmt: skip
    tma = cfg.tma and (x.is_cuda or INTERPRET) and _tma_ready(x) and _tma_ready(weight)
    xa = _descriptor(x, [cfg.block_m, cfg.block_k]) if tma else x
    wa = _descriptor(weight, [cfg.block_n, cfg.block_k]) if tma else weight
    launch(
        _streamk_kernel, (programs,),
        xa, wa, y, ws, counters, m, n, k, x.stride(0), weight.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, TMA=tma,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", PDL=pdl(x),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y
