"""RMSNorm, alone or with the residual add fused in: one read and one write of each row.

DEFER writes a deferred norm instead (kernels/gemv_norm.py): the rows times the weight and each
row's sum of squares, the 1/rms scale left to the GEMM that reads them.

Rows may be the tokens of [T, hidden] or the heads of [T, heads, head_dim] (Qwen3's q_norm/k_norm
on views of the fused qkv output, whose token stride is not heads * head_dim). The kernel takes
the two strides so that such views are read in place, without a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from atom.kernels.grid import cdiv, next_power_of_2
from atom.kernels.launch import launch, pdl, pdl_start

# Elements per program: small rows (head_dim 64..256) are packed several to a program so that a
# launch over T * heads rows is not dominated by tiny programs.
_TILE_ELEMENTS = 4096


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """float32 inside, cast back; multiplies the weight in the input dtype as transformers does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm_ref(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual), x + residual); the sum is rounded to the input dtype first."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual


# The row count is a step's token count: Triton would compile a variant per class of its value
# (1, a multiple of 16, other), and an eager prefill step of a token count of a class no step had
# yet compiled one mid-run (the bench's last prefill step, 16,384 tokens before it and graphs of
# padded sizes: ~120 ms, H200, RESULTS thirty-sixth sitting).
@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(
    x_ptr,
    res_ptr,  # residual in (read only when HAS_RESIDUAL)
    w_ptr,
    out_ptr,  # [num_rows, n] contiguous
    res_out_ptr,  # [num_rows, n] contiguous: x + residual (written only when HAS_RESIDUAL)
    ss_ptr,  # DEFER: [num_rows] float32 sums of squares out
    num_rows,
    n,
    inner,  # rows per outer index: row r lives at (r // inner) * s_outer + (r % inner) * s_inner
    x_s_outer,
    x_s_inner,
    r_s_outer,
    r_s_inner,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
    DEFER: tl.constexpr,  # out = x * w and ss = sum(x^2), the scale left to the next GEMM
):
    pdl_start(PDL)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < num_rows)[:, None] & (cols < n)[None, :]
    outer, in_row = rows // inner, rows % inner
    x_off = (outer * x_s_outer + in_row * x_s_inner)[:, None] + cols[None, :]
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0)
    out_off = rows[:, None] * n + cols[None, :]
    if HAS_RESIDUAL:
        r_off = (outer * r_s_outer + in_row * r_s_inner)[:, None] + cols[None, :]
        r = tl.load(res_ptr + r_off, mask=mask, other=0.0)
        # Round the sum to the input dtype before normalising it, as the reference does.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + out_off, x, mask=mask)
    xf = x.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)
    if DEFER:
        tl.store(ss_ptr + rows, tl.sum(xf * xf, axis=1), mask=rows < num_rows)
        tl.store(out_ptr + out_off, (xf * w[None, :]).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / n + eps)
        # Cast back to the input dtype before the weight multiply, as transformers does.
        y = (xf * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + out_off, (y * w[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


def _rows_view(x: Tensor) -> tuple[Tensor, int, int, int]:
    """(tensor, inner, outer stride, inner stride) addressing x's rows; copies only if it must."""
    if x.stride(-1) != 1 or x.dim() > 3:
        x = x.reshape(-1, x.shape[-1]).contiguous()
    if x.dim() == 3:
        return x, x.shape[1], x.stride(0), x.stride(1)
    if x.dim() == 2:
        return x, 1, x.stride(0), 0
    return x, 1, 0, 0  # 1-D: a single row


def norm_outputs(
    x: Tensor, residual: Tensor | None, weight: Tensor
) -> tuple[Tensor, Tensor | None]:
    """The launchers' outputs, after checking their inputs: the normalised rows, contiguous in
    the promoted dtype of x and the weight (a float32 weight over bf16 rows gives float32), and
    with a residual the contiguous sum in x's dtype. Also the opaque ops' fakes (ops.py,
    linear_ops.py): the dtype a compiled graph assumes must be the one the kernel writes."""
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {n}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {residual.shape}/{residual.dtype} != x {x.shape}/{x.dtype}")
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = (
        torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    )
    return out, res_out


def _launch(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, sumsq: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """The kernel; with sumsq ([rows, 1] float32) a deferred norm."""
    out, res_out = norm_outputs(x, residual, weight)
    n = x.shape[-1]
    num_rows = x.numel() // n if n else 0
    if num_rows == 0:
        return out, res_out
    xv, inner, xs0, xs1 = _rows_view(x)
    rv, rs0, rs1 = xv, xs0, xs1
    if residual is not None:
        rv, r_inner, rs0, rs1 = _rows_view(residual)
        if r_inner != inner:  # differing layouts: give both the flat [rows, n] layout
            xv, rv = xv.reshape(-1, n).contiguous(), rv.reshape(-1, n).contiguous()
            inner, xs0, xs1, rs0, rs1 = 1, n, 0, n, 0
    block_n = next_power_of_2(n)
    # From the row size only: one variant per row size. Rows per program from the row count too
    # (2 x SMs programs where rows allow) changed no decode step on an H200 (twenty-first sitting).
    block_m = max(1, _TILE_ELEMENTS // block_n)
    num_warps = min(max(block_m * block_n // 512, 1), 8)
    launch(
        _rms_norm_kernel,
        (cdiv(num_rows, block_m),),
        xv,
        rv,
        weight,
        out,
        res_out if res_out is not None else out,
        sumsq if sumsq is not None else out,
        num_rows,
        n,
        inner,
        xs0,
        xs1,
        rs0,
        rs1,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PDL=pdl(x),
        DEFER=sumsq is not None,
        num_warps=num_warps,
    )
    return out, res_out


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., n] (last dim contiguous; up to 3 dims read in place) -> contiguous [..., n]."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual), x + residual), both new contiguous tensors; inputs untouched."""
    out, res_out = _launch(x, residual, weight, eps)
    assert res_out is not None
    return out, res_out


def deferred_rms_norm(
    x: Tensor, residual: Tensor | None, weight: Tensor
) -> tuple[Tensor, Tensor | None, Tensor]:
    """A deferred RMSNorm (kernels/gemv_norm.py) of x (+ residual): (r * weight, r = x +
    residual or None without one, float32 sums of r^2 [rows, 1]); x [..., n]; dtypes and
    layouts as rms_norm's."""
    n = x.shape[-1]
    sumsq = torch.empty((x.numel() // n if n else 0, 1), dtype=torch.float32, device=x.device)
    out, res_out = _launch(x, residual, weight, 0.0, sumsq)
    return out, res_out, sumsq
