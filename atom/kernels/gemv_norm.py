"""A linear layer of a decode step with the residual add and the RMSNorm after it in gemv's
epilogue, the norm's 1/rms scale deferred to the GEMM that reads its output.

RMSNorm needs a whole row's sum of squares before it can scale any feature, and a gemv's
programs each own a tile of a row's features. So the norm is split around the GEMM after it
(W the next layer's weight, w the norm's weight, r the row):

    norm(r) @ W^T = rstd(r) * ((r * w) @ W^T),    rstd(r) = 1 / sqrt(mean(r^2) + eps)

The program that ends a tile here (the last of its K splits) adds the residual, stores r (the
next residual), r * w (the next GEMM's x) and its tile's sum of r^2 ([M, parts], one column a
tile); the next GEMM's programs add a row's parts (gemv._row_rstd, before their K loop) and
scale their sums by it before rounding them (gemv's and gemv_rope's ROW_SCALE). One kernel and
one [M, hidden] round trip fewer a norm; its parts are added in column order, so results do not
depend on which tile finished first.

Rounding: the GEMM's sums to the model dtype, the residual sum to it (as fused_add_rms_norm
rounds both), then r * w rounded once; the next GEMM multiplies the rounded r * w and scales its
float32 sums. The unfused norm rounds r * rstd, then times w: the two differ by a rounding of
the model dtype per element (`deferred_norm_ref` is this kernel's arithmetic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from atom.kernels import gemv as _gemv
from atom.kernels.gemv import (
    GemvConfig,
    _add_splits,
    _tile_offsets,
    _tile_sums,
    gemv_ref,
    row_rstd_ref,
)
from atom.kernels.grid import cdiv
from atom.kernels.launch import launch, pdl, pdl_start

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fuses(x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor) -> bool:
    """Whether gemv_add_rms_norm takes x's projection by this weight: no bias, x, the weight and
    the norm's of one dtype gemv takes, the weight's rows contiguous (the half of ops' choice
    that the rows do not make)."""
    return (
        bias is None
        and weight.dim() == 2
        and x.dtype == weight.dtype == norm_weight.dtype
        and x.dtype in DTYPES
        and weight.stride(-1) == 1
    )


def norm_config(weight: Tensor) -> GemvConfig:
    """The tile of a fused launch: the weight's 1-16-row gemv tile (linear_config), or
    gemv_config's rule where the table prefers cuBLAS (this launch saves a kernel besides)."""
    cfg = _gemv.linear_config(_gemv.MAX_M, weight)
    return cfg if cfg is not None else _gemv.gemv_config(*weight.shape)


def part_width(x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor) -> int:
    """Features a column of the sums of squares of a deferred norm after this linear layer
    covers: the fused launch's output tile, or all of them where the norm runs apart
    (rms_norm.py's DEFER)."""
    n, k = weight.shape
    if not fuses(x, weight, bias, norm_weight):
        return n
    return _gemv.tile_sizes(norm_config(weight), 1, n, k)[1]


def parts(x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor) -> int:
    """Columns of the sums of squares a deferred norm after this linear layer writes: one per
    output tile of the fused launch, or 1 where the norm runs apart."""
    return cdiv(weight.shape[0], part_width(x, weight, bias, norm_weight))


def deferred_norm_ref(
    r: Tensor, norm_weight: Tensor, width: int | None = None
) -> tuple[Tensor, Tensor]:
    """(r * w rounded to the dtype rms_norm gives, float32 sums of r^2 [T, parts] over column
    blocks of `width` features, by default one): a deferred RMSNorm's outputs."""
    rows = r.reshape(-1, r.shape[-1]).float()
    width = width or rows.shape[-1]
    num_parts = cdiv(rows.shape[-1], width)
    squares = torch.nn.functional.pad(rows * rows, (0, width * num_parts - rows.shape[-1]))
    sumsq = squares.view(rows.shape[0], num_parts, width).sum(-1)
    dtype = torch.promote_types(r.dtype, norm_weight.dtype)
    return (r.float() * norm_weight.float()).to(dtype), sumsq


def gemv_add_rms_norm_ref(
    x: Tensor, weight: Tensor, residual: Tensor, norm_weight: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """gemv_add_rms_norm in float32 sums: (r * w, r, sums of squares), r = the projection
    rounded plus the residual, rounded."""
    r = gemv_ref(x, weight).to(x.dtype) + residual
    h, sumsq = deferred_norm_ref(r, norm_weight, part_width(x, weight, None, norm_weight))
    return h, r, sumsq


def deferred_rows_ref(h: Tensor, sumsq: Tensor, eps: float) -> Tensor:
    """A deferred norm's rows made whole: h times each row's 1/rms, rounded (what a consumer
    that cannot scale its sums reads)."""
    return (h.float() * row_rstd_ref((sumsq, eps), h.shape[-1])).to(h.dtype)


@triton.jit(do_not_specialize=["M"])
def _gemv_add_norm_kernel(
    x,  # [M, K], last dim contiguous: a pointer, or (X_DESC) a descriptor of its tiles
    w,  # [N, K], last dim contiguous: a pointer, or (W_DESC) a descriptor
    h_ptr,  # [M, N] contiguous out: r * w
    res_ptr,  # [M, N] contiguous: the residual in
    res_out_ptr,  # [M, N] contiguous out: r = x W^T + residual
    nw_ptr,  # [N]: the norm's weight
    ss_ptr,  # [M, num output tiles] float32 out: each tile's sum of r^2
    ws_ptr,  # SPLIT_K > 1: [SPLIT_K, M, N] float32 partial sums
    count_ptr,  # SPLIT_K > 1: int32 per output tile, 0 between launches
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    W_DESC: tl.constexpr,
    X_DESC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    offs_m, offs_n = _tile_offsets(BLOCK_M, BLOCK_N)
    m_ok = offs_m < M
    ok = m_ok[:, None] & (offs_n < N)[None, :]
    tile = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    # The epilogue's inputs asked for before the K loop, used after it.
    res = tl.load(res_ptr + tile, mask=ok, other=0.0)
    nw = tl.load(nw_ptr + offs_n, mask=offs_n < N, other=0.0)
    acc, up = _tile_sums(
        x, w, offs_m, offs_n, M, N, K, stride_xm, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K,
        W_DESC, X_DESC, DOT_PRECISION, False,
    )  # fmt: skip
    acc, up, last = _add_splits(
        acc, up, offs_m, offs_n, ws_ptr, count_ptr, M, N, BLOCK_M, BLOCK_N, SPLIT_K, False
    )
    if last:
        ty = h_ptr.dtype.element_ty
        r = (acc.to(ty).to(tl.float32) + res.to(tl.float32)).to(ty)
        tl.store(res_out_ptr + tile, r, mask=ok)
        rf = r.to(tl.float32)  # zero past M and N: x and the residual read zeros there
        ss = ss_ptr + offs_m.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
        tl.store(ss, tl.sum(rf * rf, axis=1), mask=m_ok)
        tl.store(h_ptr + tile, (rf * nw.to(tl.float32)[None, :]).to(ty), mask=ok)


def gemv_add_rms_norm(
    x: Tensor,
    weight: Tensor,
    residual: Tensor,
    norm_weight: Tensor,
    config: GemvConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """x [M, K] (M <= gemv.MAX_M) @ weight [N, K]^T + residual [M, N] = r, then a deferred
    RMSNorm of r by norm_weight [N]: returns (r * w, r, float32 sums of r^2 [M, parts]), one
    column a tile of the launch (parts). config: the tile (default norm_config's)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit")
    (m, k), n = x.shape, weight.shape[0]
    if not 0 < m <= _gemv.MAX_M:
        raise ValueError(f"{m} rows: the fused norm takes 1-{_gemv.MAX_M}")
    if residual.shape != (m, n) or residual.dtype != x.dtype or norm_weight.shape != (n,):
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} and norm weight "
            f"{tuple(norm_weight.shape)} do not fit [{m}, {n}] {x.dtype}"
        )
    if not fuses(x, weight, None, norm_weight):
        raise ValueError(f"x {x.dtype}, weights {weight.dtype}, {norm_weight.dtype}: not fused")
    x = x if x.stride(-1) == 1 else x.contiguous()
    residual = residual.contiguous()
    cfg = config or norm_config(weight)
    block_m, block_n, block_k, split_k = _gemv.tile_sizes(cfg, m, n, k)
    grid = (cdiv(m, block_m), cdiv(n, block_n), split_k)
    w_desc = _gemv.tile_descriptor(weight, block_n, block_k) if cfg.descriptor else None
    x_desc = None
    if w_desc is not None and block_m >= _gemv.X_DESC_ROWS:
        x_desc = _gemv.tile_descriptor(x, block_m, block_k)
    h = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(h)
    sumsq = torch.empty((m, grid[1]), dtype=torch.float32, device=x.device)
    ws, counters = _gemv.split_buffers(split_k, m, n, grid[0] * grid[1], h)
    launch(
        _gemv_add_norm_kernel, grid,
        x if x_desc is None else x_desc, weight if w_desc is None else w_desc, h, residual,
        res_out, norm_weight, sumsq, ws, counters, m, n, k, x.stride(0), weight.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        W_DESC=w_desc is not None, X_DESC=x_desc is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", PDL=pdl(x),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return h, res_out, sumsq
