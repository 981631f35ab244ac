"""Where a linear layer picks its kernels (kernels/ops.py's pattern, for the linear layers):
cuBLAS, or gemv.py's small-batch kernel where its tuned table or rule gives a tile; the MLP's
gate/up with SiLU-and-mul fused (gemv's gated launch); the attention's qkv projection with
rotary and the cache write in its epilogue (gemv_rope.py); and RMSNorm deferred into the GEMMs
around it at decode row counts (gemv_norm.py: the linear layer before the norm adds the residual
and writes the sums of squares, the one after scales by 1/rms). On the CPU the torch
references. The linear ops compiled code must call rather than trace (`atom::linear`,
`atom::linear_silu_and_mul`, the deferred norm's) are torch.library custom ops whose fakes
return exactly the launchers' shapes and dtypes.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from atom.kernels import gemv as _gemv
from atom.kernels import gemv_norm as _gemv_norm
from atom.kernels import gemv_rope as _gemv_rope
from atom.kernels import ops
from atom.kernels import rms_norm as _norm
from atom.kernels import rotary as _rotary

# Linear layers of up to gemv.MAX_TUNED_M rows run gemv.py's kernel instead of cuBLAS on CUDA where
# its tuned table has a tile that beat cuBLAS for the weight and row count, and at most gemv.MAX_M
# rows where the table has no entry or does not apply (float32 weights, another GPU generation:
# gemv.linear_config). ATOM_GEMV=0: cuBLAS for every linear layer.
GEMV_ENV = "ATOM_GEMV"
_GEMV = os.environ.get(GEMV_ENV, "1") != "0"
_GEMV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, sumsq: Tensor | None = None, eps: float = 0.0
) -> Tensor:
    """F.linear; on CUDA (unless ATOM_GEMV=0), through the `atom::linear` op, which runs the
    small-batch kernel where gemv.linear_config picks it. An opaque op under torch.compile:
    its row test is no guard on the symbolic token count. sumsq, eps: x is an RMSNorm's rows
    from rms_norm_rows or linear_add_rms_norm, deferred where defers_norm(x) (the sums scaled
    by each row's 1/rms), else normed already."""
    if not x.is_cuda:
        return _linear_ref(x, weight, bias, _row_scale(x, sumsq, eps))
    if not _GEMV:
        return F.linear(x, weight, bias)
    if torch.compiler.is_dynamo_compiling():
        return torch.ops.atom.linear(x, weight, bias, sumsq, eps)
    return small_batch_linear(x, weight, bias, _row_scale(x, sumsq, eps))


def _linear_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None, row_scale: _gemv.RowScale | None
) -> Tensor:
    if row_scale is None:
        return F.linear(x, weight, bias)
    y = F.linear(x.float(), weight.float()) * _gemv.row_rstd_ref(row_scale, x.shape[-1])
    y = y.to(x.dtype)
    return y if bias is None else y + bias


# RMSNorm deferred into the GEMMs around it at decode row counts (kernels/gemv_norm.py): the
# linear layer before it adds the residual and writes r * w with the sums of r^2 in its
# epilogue, the one after it scales its sums by 1/rms in its own; rms_norm_rows writes a
# deferred norm where no GEMM comes before. ATOM_GEMV_NORM=0 turns it off.
NORM_ENV = "ATOM_GEMV_NORM"
_NORM = os.environ.get(NORM_ENV, "1") != "0"


_NORM_DTYPES = (torch.float32, torch.bfloat16)


def defers_norm(x: Tensor) -> bool:
    """Whether an RMSNorm over x's rows leaves its 1/rms to the linear layer after it: 1 to
    gemv.MAX_M rows on CUDA with gemv on, bfloat16 or float32 (a deferred norm stores r * w
    unscaled, which float16's range may not hold). The norms (rms_norm_rows,
    linear_add_rms_norm) and the linear layers after them (linear with sums, the fused qkv
    projection) ask it of the same rows, inside their opaque ops: the answer is no guard on a
    compiled graph."""
    if not (_GEMV and _NORM and x.is_cuda) or x.dtype not in _NORM_DTYPES:
        return False
    return 0 < _num_rows(x) <= _gemv.MAX_M


def _num_rows(x: Tensor) -> int:
    """Rows of x's last dimension (0 where it is empty)."""
    k = x.shape[-1]
    return x.numel() // k if k else 0


def _row_scale(x: Tensor, sumsq: Tensor | None, eps: float) -> _gemv.RowScale | None:
    """The (sums, eps) of a deferred norm's rows x, or None where x is normed already."""
    return None if sumsq is None or not defers_norm(x) else (sumsq, eps)


def _unused_sums(x: Tensor, parts: int) -> Tensor:
    """The sums output of a norm that did not defer: its shape, never read."""
    return torch.empty((_num_rows(x), parts), dtype=torch.float32, device=x.device)


def rms_norm_rows(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(RMSNorm's rows of x, float32 sums [rows, 1]) for a linear layer after it (linear's
    sumsq): x normed, or where defers_norm(x) x * weight and the rows' sums of squares."""
    if not x.is_cuda:
        if not defers_norm(x):
            return _norm.rms_norm_ref(x, weight, eps), _unused_sums(x, 1)
        return _gemv_norm.deferred_norm_ref(x, weight)
    if torch.compiler.is_dynamo_compiling():
        return torch.ops.atom.rms_norm_rows(x, weight, eps)
    return _rms_norm_rows(x, weight, eps)


def _rms_norm_rows(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    if not defers_norm(x):
        return _norm.rms_norm(x, weight, eps), _unused_sums(x, 1)
    h, _, sumsq = _norm.deferred_rms_norm(x, None, weight)
    return h, sumsq


@torch.library.custom_op("atom::rms_norm_rows", mutates_args=())
def _rms_norm_rows_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _rms_norm_rows(x, weight, eps)


@_rms_norm_rows_op.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _norm.norm_outputs(x, None, weight)[0], _unused_sums(x, 1)


def add_rms_norm_rows(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(h, r, sums [rows, 1]): r = x + residual and its RMSNorm's rows as rms_norm_rows gives
    them (after a linear layer whose epilogue cannot take the norm: several ranks)."""
    if not x.is_cuda:
        if not defers_norm(x):
            return (*_norm.fused_add_rms_norm_ref(x, residual, weight, eps), _unused_sums(x, 1))
        r = x + residual
        h, sumsq = _gemv_norm.deferred_norm_ref(r, weight)
        return h, r, sumsq
    if torch.compiler.is_dynamo_compiling():
        return torch.ops.atom.add_rms_norm_rows(x, residual, weight, eps)
    return _add_rms_norm_rows(x, residual, weight, eps)


def _add_rms_norm_rows(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    if not defers_norm(x):
        return (*_norm.fused_add_rms_norm(x, residual, weight, eps), _unused_sums(x, 1))
    h, r, sumsq = _norm.deferred_rms_norm(x, residual, weight)
    assert r is not None
    return h, r, sumsq


@torch.library.custom_op("atom::add_rms_norm_rows", mutates_args=())
def _add_rms_norm_rows_op(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    return _add_rms_norm_rows(x, residual, weight, eps)


@_add_rms_norm_rows_op.register_fake
def _(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    h, r = _norm.norm_outputs(x, residual, weight)
    assert r is not None
    return h, r, _unused_sums(x, 1)


def linear_add_rms_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor,
    norm_weight: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(h, r, sums): r = linear(x, weight, bias) + residual and its RMSNorm's rows for a linear
    layer after it, normed, or where defers_norm(x) deferred (rms_norm_rows): in the linear
    layer's gemv epilogue where gemv_norm.fuses, with sums [rows, gemv_norm.parts]."""
    if not x.is_cuda:
        return _linear_add_rms_norm_ref(x, weight, bias, residual, norm_weight, eps)
    if torch.compiler.is_dynamo_compiling():
        return torch.ops.atom.linear_add_rms_norm(x, weight, bias, residual, norm_weight, eps)
    return _linear_add_rms_norm(x, weight, bias, residual, norm_weight, eps)


def _linear_add_rms_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor,
    norm_weight: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    if not defers_norm(x):
        y = linear(x, weight, bias)
        h, r = ops.fused_add_rms_norm(y, residual, norm_weight, eps)
        return h, r, _unused_sums(x, _gemv_norm.parts(x, weight, bias, norm_weight))
    if not _gemv_norm.fuses(x, weight, bias, norm_weight):
        h, r, sumsq = _norm.deferred_rms_norm(linear(x, weight, bias), residual, norm_weight)
        assert r is not None
        return h, r, sumsq
    shape = (*x.shape[:-1], weight.shape[0])
    h, r, sumsq = _gemv_norm.gemv_add_rms_norm(
        x.reshape(-1, x.shape[-1]), weight, residual.reshape(-1, shape[-1]), norm_weight
    )
    return h.view(shape), r.view(shape), sumsq


def _linear_add_rms_norm_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor,
    norm_weight: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    r = F.linear(x, weight, bias) + residual
    if not defers_norm(x):
        parts = _gemv_norm.parts(x, weight, bias, norm_weight)
        return _norm.rms_norm_ref(r, norm_weight, eps), r, _unused_sums(x, parts)
    width = _gemv_norm.part_width(x, weight, bias, norm_weight)
    h, sumsq = _gemv_norm.deferred_norm_ref(r, norm_weight, width)
    return h, r, sumsq


@torch.library.custom_op("atom::linear_add_rms_norm", mutates_args=())
def _linear_add_rms_norm_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor,
    norm_weight: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return _linear_add_rms_norm(x, weight, bias, residual, norm_weight, eps)


@_linear_add_rms_norm_op.register_fake
def _(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor,
    norm_weight: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    h, r = _norm.norm_outputs(residual, residual, norm_weight)
    assert r is not None
    return h, r, _unused_sums(x, _gemv_norm.parts(x, weight, bias, norm_weight))


def _gemv_config(x: Tensor, weight: Tensor, gated: bool = False) -> _gemv.GemvConfig | None:
    """gemv's tile for x's rows of this weight (gemv.linear_config), or None: F.linear."""
    rows = _num_rows(x)
    if rows == 0 or x.dtype not in _GEMV_DTYPES or weight.dtype != x.dtype:
        return None
    return _gemv.linear_config(rows, weight, gated)


def small_batch_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, row_scale: _gemv.RowScale | None = None
) -> Tensor:
    """gemv where gemv.linear_config gives a tile (the tuned table's on CUDA; up to gemv.MAX_M
    rows its rule, on any device: the interpreter without a GPU), else F.linear. row_scale: x
    is a deferred norm's rows, scaled in gemv's epilogue (F.linear: made whole first)."""
    if (config := _gemv_config(x, weight)) is None:
        if row_scale is not None:
            x = _gemv_norm.deferred_rows_ref(x, *row_scale)
        return F.linear(x, weight, bias)
    y = _gemv.gemv(x.reshape(-1, x.shape[-1]), weight, config, row_scale=row_scale)
    y = y.view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y.add_(bias)


@torch.library.custom_op("atom::linear", mutates_args=())
def _linear_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, sumsq: Tensor | None = None, eps: float = 0.0
) -> Tensor:
    return small_batch_linear(x, weight, bias, _row_scale(x, sumsq, eps))


@_linear_op.register_fake
def _(
    x: Tensor, weight: Tensor, bias: Tensor | None, sumsq: Tensor | None = None, eps: float = 0.0
) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# SwiGLU's gate/up GEMM and SiLU-and-mul in one gemv launch where gemv.linear_config gives a
# gated tile (each program reads a tile of the gate rows and of the up rows and writes
# silu(gate) * up): one kernel and one [T, 2I] round trip less a layer. ATOM_GEMV_SILU=1 turns it
# on. Off by default: with the plain tiles halved along K, on the H200 it saved the SiLU kernel's
# ~1.5 us a layer at 8-16 rows on one machine (8B -1.1 to -1.4%) and lost as much on another
# (+0.2 to +0.9%), the 0.6B within 1% either way; the 8B's gated gate/up took 57.3 us at one row
# against 55.2 (RESULTS, thirty-first sitting). With gated tiles of their own (the table's "+silu"
# entries, `bench_gemv.py --tune --silu-only`) the 8B's step was flat at batch 1 and 0.7-0.9%
# shorter at 8-16, the 0.6B's 0.4-0.5% longer at 1-8 and its bench not faster (thirty-second
# sitting): still off.
GEMV_SILU_ENV = "ATOM_GEMV_SILU"
_GEMV_SILU = os.environ.get(GEMV_SILU_ENV, "0") == "1"


def linear_silu_and_mul(
    x: Tensor, weight: Tensor, bias: Tensor | None, sumsq: Tensor | None = None, eps: float = 0.0
) -> Tensor:
    """silu_and_mul(linear(x, weight, bias, sumsq, eps)) for a weight of gate rows, then up rows
    [2I, H] -> [..., I]; on CUDA with ATOM_GEMV_SILU=1 (and no bias) through the
    `atom::linear_silu_and_mul` op, one gemv launch where small_batch_linear would run gemv."""
    if not (_GEMV and _GEMV_SILU) or not x.is_cuda or bias is not None:
        return ops.silu_and_mul(linear(x, weight, bias, sumsq, eps))
    if torch.compiler.is_dynamo_compiling():
        return torch.ops.atom.linear_silu_and_mul(x, weight, sumsq, eps)
    return small_batch_linear_silu_and_mul(x, weight, _row_scale(x, sumsq, eps))


def small_batch_linear_silu_and_mul(
    x: Tensor, weight: Tensor, row_scale: _gemv.RowScale | None = None
) -> Tensor:
    """gemv's gated launch where gemv.linear_config gives the weight a gated tile, else
    small_batch_linear (gemv or F.linear) and silu_and_mul."""
    if (config := _gemv_config(x, weight, gated=True)) is None:
        return ops.silu_and_mul(small_batch_linear(x, weight, None, row_scale))
    y = _gemv.gemv(x.reshape(-1, x.shape[-1]), weight, config, gated=True, row_scale=row_scale)
    return y.view(*x.shape[:-1], weight.shape[0] // 2)


@torch.library.custom_op("atom::linear_silu_and_mul", mutates_args=())
def _linear_silu_and_mul_op(
    x: Tensor, weight: Tensor, sumsq: Tensor | None = None, eps: float = 0.0
) -> Tensor:
    return small_batch_linear_silu_and_mul(x, weight, _row_scale(x, sumsq, eps))


@_linear_silu_and_mul_op.register_fake
def _(x: Tensor, weight: Tensor, sumsq: Tensor | None = None, eps: float = 0.0) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))


# The attention layer's qkv projection of 1-16 rows with rotary (after Qwen3's q/k norms) and the
# KV-cache write in gemv's epilogue (kernels/gemv_rope.py): one launch and one [T, (H + 2 H_kv) D]
# round trip fewer a layer. ATOM_GEMV_ROPE=0 turns it off. H200: the 8B's batch-1 step 4.362 ->
# 4.339 ms, the 0.6B's batch 16 1.253 -> 1.176 ms (RESULTS, thirty-fourth sitting).
def fuses_qkv_rope(
    x: Tensor, weight: Tensor, head_dim: int, rotary_dim: int, is_neox: bool
) -> bool:
    """Whether gemv_rope_and_cache takes x's projection by this qkv weight (CUDA, gemv on:
    gemv_rope.fuses); else the projection, then rotary_and_cache."""
    if not _GEMV or not x.is_cuda or x.dtype not in _GEMV_DTYPES or weight.dtype != x.dtype:
        return False
    return _gemv_rope.fuses(x.shape[0], weight, head_dim, rotary_dim, is_neox)


def gemv_rope_and_cache(
    x: Tensor,
    weight: Tensor,
    positions: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
    cos_sin_cache: Tensor,
    num_heads: int,
    num_kv_heads: int,
    k_scale: float,
    v_scale: float,
    norm: _rotary.Norm | None,
    sumsq: Tensor | None = None,
    eps: float = 0.0,
) -> Tensor:
    """The rotated q [T, H, D] of x's qkv projection, rotated k and v written into kv_cache at
    slot_mapping: one gemv launch on CUDA (where fuses_qkv_rope), the chain of references
    elsewhere. sumsq, eps: x is an RMSNorm's rows, as linear's."""
    fn = _gemv_rope.gemv_rope_and_cache if x.is_cuda else _gemv_rope.gemv_rope_and_cache_ref
    args = (cos_sin_cache, num_heads, num_kv_heads, k_scale, v_scale, norm)
    row_scale = _row_scale(x, sumsq, eps)
    return fn(x, weight, positions, kv_cache, slot_mapping, *args, row_scale=row_scale)
