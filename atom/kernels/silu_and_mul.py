"""SwiGLU's gate: [..., 2d] -> silu(x[..., :d]) * x[..., d:], one read of each half, one write."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from atom.kernels.grid import cdiv, next_power_of_2
from atom.kernels.launch import launch, pdl, pdl_start

_BLOCK = 1024  # output features per program


def silu_and_mul_ref(x: Tensor) -> Tensor:
    """float32 inside, one rounding at the end."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [rows, 2 * d], last dim contiguous
    out_ptr,  # [rows, d] contiguous
    d,
    x_s_row,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * x_s_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_s_row + d + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * d + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_output(x: Tensor) -> Tensor:
    """The launcher's output for x [..., 2 * d], after checking it: new contiguous [..., d] in
    x's dtype (also the opaque op's fake, ops.py)."""
    if x.shape[-1] % 2:
        raise ValueError(f"last dim of silu_and_mul input must be even, got {x.shape[-1]}")
    return torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=x.dtype, device=x.device)


def silu_and_mul(x: Tensor) -> Tensor:
    """x [..., 2 * d] -> new contiguous [..., d]."""
    out = silu_output(x)
    d = out.shape[-1]
    if out.numel() == 0:
        return out
    rows = x.reshape(-1, 2 * d)  # a view for the usual [T, 2d] GEMM output
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    block = min(_BLOCK, next_power_of_2(d))
    grid = (rows.shape[0], cdiv(d, block))
    launch(_silu_and_mul_kernel, grid, rows, out, d, rows.stride(0), BLOCK=block, PDL=pdl(x),
           num_warps=4)  # fmt: skip
    return out


def clamped_swiglu(gate: Tensor, up: Tensor, alpha: float, limit: float) -> Tensor:
    """GPT-OSS's gate: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), with
    g = clamp(gate, max=limit). Torch ops, no host sync: the CPU path and the fused MoE's CUDA
    path alike."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))
