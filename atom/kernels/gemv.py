"""Linear layers of a few rows (decode at small batches): y = x @ W^T read at the weights'
bandwidth, with the op before the GEMM fused into its prologue.

At batch 1 an 8B decode step is its weights read once, and cuBLAS reads the smaller ones below the
bandwidth (H200: qkv 3.3 TB/s, o_proj 3.1, against 4.1 for gate/up), while each layer also
launches two RMSNorms and a SiLU-and-mul whose outputs only feed the next GEMM (RESULTS.md, tenth
sitting). Here one program computes BLOCK_N output features of every row, streaming its
[BLOCK_N, K] slab of W in [BLOCK_N, BLOCK_K] tiles, and builds the matching x tile itself:

    PROLOGUE 0  x as given
    PROLOGUE 1  RMSNorm(x [+ residual]) * gamma, rounded as rms_norm.py rounds it; x + residual is
                written once (program 0) as the next residual. Each program first sums the
                squares of its rows over all of K (rows of K elements come from L2).
    PROLOGUE 2  silu(gate) * up of a [M, 2K] gate/up output, rounded as silu_and_mul.py does

so the fused op's output equals the unfused pair's up to the GEMM's summation order (and the
norm's: its sum of squares goes tile by tile, so rstd may differ in the last bit). Rows are padded
to BLOCK_M >= 16 for tl.dot; M <= MAX_M. The torch reference (`*_ref`) is float32. The residual
out must not alias x or the residual in: program 0 writes it while the others read those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from atom.kernels.grid import cdiv, next_power_of_2
from atom.kernels.launch import launch
from atom.kernels.rms_norm import fused_add_rms_norm_ref, rms_norm_ref
from atom.kernels.silu_and_mul import silu_and_mul_ref

MAX_M = 16
NONE, RMS_NORM, SILU_MUL = 0, 1, 2


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


def rms_norm_gemv_ref(
    x: Tensor, residual: Tensor | None, gamma: Tensor, eps: float, weight: Tensor
) -> tuple[Tensor, Tensor | None]:
    """(rms_norm(x [+ residual]) @ weight^T in float32, x + residual or None)."""
    if residual is None:
        return gemv_ref(rms_norm_ref(x, gamma, eps), weight), None
    normed, new_residual = fused_add_rms_norm_ref(x, residual, gamma, eps)
    return gemv_ref(normed, weight), new_residual


def silu_mul_gemv_ref(gate_up: Tensor, weight: Tensor) -> Tensor:
    return gemv_ref(silu_and_mul_ref(gate_up), weight)


@triton.jit
def _load_raw(
    x_ptr, res_ptr, gamma_ptr, offs_m, m_ok, kk, stride_xm, stride_rm, K,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """The loads behind the input's columns kk: (x or gate, residual or up, gamma); masked past
    K (zeros), so the loop may fetch one tile ahead."""
    k_ok = kk < K
    mask = m_ok[:, None] & k_ok[None, :]
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    a = tl.load(x_rows + kk[None, :], mask=mask, other=0.0)
    b = a
    g = tl.zeros([kk.shape[0]], dtype=tl.float32)
    if PROLOGUE == 2:
        b = tl.load(x_rows + K + kk[None, :], mask=mask, other=0.0)
    if PROLOGUE == 1:
        if HAS_RESIDUAL:
            r_rows = res_ptr + offs_m[:, None].to(tl.int64) * stride_rm
            b = tl.load(r_rows + kk[None, :], mask=mask, other=0.0)
        g = tl.load(gamma_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
    return a, b, g


@triton.jit
def _prologue(a, b, g, rstd, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """The GEMM's input tile from _load_raw's tiles, rounded as the unfused kernels round."""
    if PROLOGUE == 2:
        gate = a.to(tl.float32)
        return (gate / (1.0 + tl.exp(-gate)) * b.to(tl.float32)).to(a.dtype)
    x = a
    if HAS_RESIDUAL:
        x = (a.to(tl.float32) + b.to(tl.float32)).to(a.dtype)
    normed = (x.to(tl.float32) * rstd[:, None]).to(a.dtype).to(tl.float32)
    return (normed * g[None, :]).to(a.dtype)


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K] ([M, 2K] gate/up for PROLOGUE 2), last dim contiguous
    res_ptr,  # [M, K] residual (PROLOGUE 1 with HAS_RESIDUAL)
    gamma_ptr,  # [K] norm weight (PROLOGUE 1)
    w_ptr,  # [N, K], last dim contiguous
    y_ptr,  # [M, N] contiguous
    h_ptr,  # [M, K] contiguous: x + residual (PROLOGUE 1 with HAS_RESIDUAL)
    M,
    N,
    K,
    stride_xm,
    stride_rm,
    stride_wn,
    eps,
    PROLOGUE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    if PROLOGUE == 0:
        for k0 in range(0, K, BLOCK_K):  # the compiler pipelines both loads into the dot
            kk = k0 + offs_k
            k_ok = kk < K
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x_off = offs_m[:, None].to(tl.int64) * stride_xm + kk[None, :]
            x = tl.load(x_ptr + x_off, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    else:
        rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
        if PROLOGUE == 1:  # sum of squares of x (+ residual) over all of K, a tile ahead
            squares = tl.zeros([BLOCK_M], dtype=tl.float32)
            a, b, g = _load_raw(x_ptr, res_ptr, gamma_ptr, offs_m, m_ok, offs_k, stride_xm,
                                stride_rm, K, PROLOGUE, HAS_RESIDUAL)  # fmt: skip
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                a_next, b_next, g_next = _load_raw(
                    x_ptr, res_ptr, gamma_ptr, offs_m, m_ok, kk + BLOCK_K, stride_xm, stride_rm,
                    K, PROLOGUE, HAS_RESIDUAL,
                )  # fmt: skip
                x = a
                if HAS_RESIDUAL:
                    x = (a.to(tl.float32) + b.to(tl.float32)).to(a.dtype)
                    if pid == 0:
                        h_mask = m_ok[:, None] & (kk < K)[None, :]
                        tl.store(h_ptr + offs_m[:, None].to(tl.int64) * K + kk[None, :], x,
                                 mask=h_mask)  # fmt: skip
                xf = x.to(tl.float32)
                squares += tl.sum(xf * xf, axis=1)
                a, b, g = a_next, b_next, g_next
            rstd = tl.rsqrt(squares / K + eps)
        # The input's loads feed arithmetic, not the dot, so the compiler does not pipeline them:
        # fetched a tile ahead by hand (each otherwise waited out its latency: 2-4x slower).
        a, b, g = _load_raw(x_ptr, res_ptr, gamma_ptr, offs_m, m_ok, offs_k, stride_xm,
                            stride_rm, K, PROLOGUE, HAS_RESIDUAL)  # fmt: skip
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & (kk < K)[None, :], other=0.0)
            a_next, b_next, g_next = _load_raw(
                x_ptr, res_ptr, gamma_ptr, offs_m, m_ok, kk + BLOCK_K, stride_xm, stride_rm, K,
                PROLOGUE, HAS_RESIDUAL,
            )  # fmt: skip
            x = _prologue(a, b, g, rstd, PROLOGUE, HAS_RESIDUAL)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
            a, b, g = a_next, b_next, g_next
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


def _launch(
    x: Tensor,
    weight: Tensor,
    prologue: int,
    residual: Tensor | None = None,
    gamma: Tensor | None = None,
    eps: float = 0.0,
    config: GemvConfig | None = None,
) -> tuple[Tensor, Tensor | None]:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must be 2-D")
    (m, width), (n, k) = x.shape, weight.shape
    if width != (2 * k if prologue == SILU_MUL else k):
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit")
    if m > MAX_M:
        raise ValueError(f"gemv takes at most {MAX_M} rows, got {m}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x {x.dtype} and weight {weight.dtype} differ")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {residual.shape}/{residual.dtype} != x {x.shape}/{x.dtype}")
    if gamma is not None and (gamma.dtype != x.dtype or gamma.device != x.device):
        raise ValueError(f"norm weight {gamma.dtype} on {gamma.device}: x is {x.dtype}")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:  # no program runs: the residual out, if any, from torch
        return y, None if residual is None else x + residual
    h = torch.empty((m, k), dtype=x.dtype, device=x.device) if residual is not None else None
    if residual is not None:
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
    if gamma is not None:
        gamma = gamma.contiguous()
    cfg = config or gemv_config(n, k)
    block_n = min(cfg.block_n, max(16, next_power_of_2(n)))
    block_k = min(cfg.block_k, max(16, next_power_of_2(k)))
    launch(
        _gemv_kernel, (cdiv(n, block_n),),
        x, residual if residual is not None else x, gamma if gamma is not None else x, weight, y,
        h if h is not None else y, m, n, k, x.stride(0),
        residual.stride(0) if residual is not None else 0, weight.stride(0), eps,
        PROLOGUE=prologue, HAS_RESIDUAL=residual is not None,
        BLOCK_M=max(16, next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y, h


def gemv(x: Tensor, weight: Tensor, config: GemvConfig | None = None) -> Tensor:
    """x [M, K] @ weight [N, K]^T -> [M, N] in x's dtype, M <= MAX_M."""
    return _launch(x, weight, NONE, config=config)[0]


def rms_norm_gemv(
    x: Tensor,
    residual: Tensor | None,
    gamma: Tensor,
    eps: float,
    weight: Tensor,
    config: GemvConfig | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(rms_norm(x [+ residual]) * gamma @ weight^T, x + residual or None): one kernel."""
    if gamma.shape != (x.shape[-1],):
        raise ValueError(f"norm weight {tuple(gamma.shape)} for rows of {x.shape[-1]}")
    return _launch(x, weight, RMS_NORM, residual, gamma, eps, config)


def silu_mul_gemv(gate_up: Tensor, weight: Tensor, config: GemvConfig | None = None) -> Tensor:
    """silu(gate_up[:, :K]) * gate_up[:, K:] @ weight [N, K]^T: one kernel."""
    if gate_up.shape[-1] != 2 * weight.shape[1]:
        raise ValueError(f"gate/up {tuple(gate_up.shape)} for weight {tuple(weight.shape)}")
    return _launch(gate_up, weight, SILU_MUL, config=config)[0]
