"""Linear layers of a few rows (decode at small batches): y = x @ W^T read at the weights'
bandwidth.

At batch 1 an 8B decode step is its weights read once, and cuBLAS reads the smaller ones below the
bandwidth (H200: qkv 3.3 TB/s, o_proj 3.1, against 4.1 for gate/up; RESULTS.md, tenth sitting).
Here one program computes BLOCK_N output features of every row, streaming its [BLOCK_N, K] slab
of W in [BLOCK_N, BLOCK_K] tiles through a pipelined tl.dot; rows are padded to BLOCK_M >= 16 for
tl.dot, M <= MAX_M. The row count is not specialised: one variant per weight shape. The torch
reference (`gemv_ref`) is float32.

Fusing the RMSNorm or SiLU-and-mul before the GEMM into this kernel's prologue was measured and
dropped (eleventh sitting): their input loads feed arithmetic before the dot, which Triton does
not pipeline, and the fused kernels ran 1.1-2.2x slower than the pairs they replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from atom.kernels.grid import cdiv, next_power_of_2
from atom.kernels.launch import launch, pdl, pdl_start

MAX_M = 16


@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4


def gemv_config(n: int, k: int) -> GemvConfig:
    """The tile for an [n, k] weight: the best of bench_gemv.py's sweep for the Llama-3.1-8B GEMMs
    at one row (H200, 2026-11-29): 64 output features for the wide ones (qkv, gate/up), 32 for
    4096; 512-element K tiles for a long K (down's 14336)."""
    return GemvConfig(64 if n >= 6144 else 32, 512 if k >= 8192 else 256, 4, 4)


def gemv_ref(x: Tensor, weight: Tensor) -> Tensor:
    return F.linear(x.float(), weight.float())


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr,  # [M, K], last dim contiguous
    w_ptr,  # [N, K], last dim contiguous
    y_ptr,  # [M, N] contiguous
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    for k0 in range(0, K, BLOCK_K):  # the compiler pipelines both loads into the dot
        kk = k0 + offs_k
        k_ok = kk < K
        w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


def gemv(x: Tensor, weight: Tensor, config: GemvConfig | None = None) -> Tensor:
    """x [M, K] @ weight [N, K]^T -> [M, N] in x's dtype, M <= MAX_M."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit")
    (m, k), n = x.shape, weight.shape[0]
    if m > MAX_M:
        raise ValueError(f"gemv takes at most {MAX_M} rows, got {m}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x {x.dtype} and weight {weight.dtype} differ")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    cfg = config or gemv_config(n, k)
    block_n = min(cfg.block_n, max(16, next_power_of_2(n)))
    block_k = min(cfg.block_k, max(16, next_power_of_2(k)))
    launch(
        _gemv_kernel, (cdiv(n, block_n),),
        x, weight, y, m, n, k, x.stride(0), weight.stride(0),
        BLOCK_M=max(16, next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", PDL=pdl(x),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y
