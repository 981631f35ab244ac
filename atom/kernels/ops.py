"""The one place where a device picks its kernels: Triton on CUDA, the torch reference elsewhere.

Layers call these functions; each looks at its input's device, so a model built on the CPU runs the
references and the same model on a GPU runs the Triton kernels, with no flag threaded through.
Pattern for a new op: kernels/<op>.py holds `<op>` (Triton launcher) and `<op>_ref` with the same
signature; here, one function that picks between them on the main input's `is_cuda`. An op that
compiled code must call rather than trace (`atom::linear`, the norms, SiLU-and-mul) is also
a torch.library custom op whose fake returns exactly the launcher's shapes, strides and dtypes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from atom.kernels import fused_moe as _moe
from atom.kernels import gemv as _gemv
from atom.kernels import gemv_norm as _gemv_norm
from atom.kernels import gemv_rope as _gemv_rope
from atom.kernels import latent_cache as _latent
from atom.kernels import mla_attention as _mla
from atom.kernels import mla_reference as _mla_ref
from atom.kernels import moe_routing as _routing
from atom.kernels import reshape_and_cache as _cache
from atom.kernels import rms_norm as _norm
from atom.kernels import rotary as _rotary
from atom.kernels import silu_and_mul as _silu
from atom.kernels import unified_attention as _attention
from atom.kernels.paged_attention import paged_attention_ref

if TYPE_CHECKING:
    from atom.executor.forward_context import AttentionMetadata


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
    k = x.shape[-1]
    return 0 < (x.numel() // k if k else 0) <= _gemv.MAX_M


def _row_scale(x: Tensor, sumsq: Tensor | None, eps: float) -> _gemv.RowScale | None:
    """The (sums, eps) of a deferred norm's rows x, or None where x is normed already."""
    return None if sumsq is None or not defers_norm(x) else (sumsq, eps)


def _unused_sums(x: Tensor, parts: int) -> Tensor:
    """The sums output of a norm that did not defer: its shape, never read."""
    k = x.shape[-1]
    return torch.empty((x.numel() // k if k else 0, parts), dtype=torch.float32, device=x.device)


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
        h, r = fused_add_rms_norm(y, residual, norm_weight, eps)
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
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
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
        return silu_and_mul(linear(x, weight, bias, sumsq, eps))
    if torch.compiler.is_dynamo_compiling():
        return torch.ops.atom.linear_silu_and_mul(x, weight, sumsq, eps)
    return small_batch_linear_silu_and_mul(x, weight, _row_scale(x, sumsq, eps))


def small_batch_linear_silu_and_mul(
    x: Tensor, weight: Tensor, row_scale: _gemv.RowScale | None = None
) -> Tensor:
    """gemv's gated launch where gemv.linear_config gives the weight a gated tile, else
    small_batch_linear (gemv or F.linear) and silu_and_mul."""
    if (config := _gemv_config(x, weight, gated=True)) is None:
        return silu_and_mul(small_batch_linear(x, weight, None, row_scale))
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


# Under torch.compile RMSNorm, the fused add + RMSNorm and SiLU-and-mul stay opaque ops
# (`atom::rms_norm`, `atom::fused_add_rms_norm`, `atom::silu_and_mul`): the compiled pieces call
# their launchers, which use programmatic dependent launch (kernels/launch.py), so at the batches
# where gemv runs the linear layers a layer's kernels overlap end to end. Traced in instead, their
# Triton kernels launched plainly: the 0.6B's decode steps took 5-9% longer at batches 8-32 and the
# nano-vllm bench 0.75% (twentieth sitting, benchmarks/RESULTS.md).


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if not x.is_cuda:
        return _norm.rms_norm_ref(x, weight, eps)
    if torch.compiler.is_dynamo_compiling():
        return torch.ops.atom.rms_norm(x, weight, eps)
    return _norm.rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual), x + residual)."""
    if not x.is_cuda:
        return _norm.fused_add_rms_norm_ref(x, residual, weight, eps)
    if torch.compiler.is_dynamo_compiling():
        return torch.ops.atom.fused_add_rms_norm(x, residual, weight, eps)
    return _norm.fused_add_rms_norm(x, residual, weight, eps)


@torch.library.custom_op("atom::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The launcher, called at run time by compiled code."""
    return _norm.rms_norm(x, weight, eps)


@_rms_norm_op.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _norm.norm_outputs(x, None, weight)[0]


@torch.library.custom_op("atom::fused_add_rms_norm", mutates_args=())
def _fused_add_rms_norm_op(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """The launcher, called at run time by compiled code."""
    return _norm.fused_add_rms_norm(x, residual, weight, eps)


@_fused_add_rms_norm_op.register_fake
def _(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    out, res_out = _norm.norm_outputs(x, residual, weight)
    assert res_out is not None
    return out, res_out


def rotary_embedding(
    positions: Tensor,
    q: Tensor,
    k: Tensor,
    cos_sin_cache: Tensor,
    rotary_dim: int,
    is_neox_style: bool,
    norm: _rotary.Norm | None = None,
) -> tuple[Tensor, Tensor]:
    """(q_out, k_out), new tensors; q [T, H, D], k [T, H_kv, D]; with `norm` (q and k weights,
    eps), of their per-head RMSNorm: one kernel on CUDA."""
    fn = _rotary.rotary_embedding if q.is_cuda else _rotary.rotary_embedding_ref
    return fn(positions, q, k, cos_sin_cache, rotary_dim, is_neox_style, norm)


def rotary_and_cache(
    positions: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
    cos_sin_cache: Tensor,
    rotary_dim: int,
    is_neox_style: bool,
    k_scale: float,
    v_scale: float,
    norm: _rotary.Norm | None,
) -> Tensor:
    """The rotated q (after the per-head q/k norms when given); rotated k and v go into kv_cache
    at slot_mapping as reshape_and_cache writes them. One kernel on CUDA."""
    fn = _rotary.rotary_and_cache if q.is_cuda else _rotary.rotary_and_cache_ref
    args = (cos_sin_cache, rotary_dim, is_neox_style, k_scale, v_scale, norm)
    return fn(positions, q, k, v, kv_cache, slot_mapping, *args)


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


def silu_and_mul(x: Tensor) -> Tensor:
    """[..., 2d] -> silu(x[..., :d]) * x[..., d:]."""
    if not x.is_cuda:
        return _silu.silu_and_mul_ref(x)
    if torch.compiler.is_dynamo_compiling():
        return torch.ops.atom.silu_and_mul(x)
    return _silu.silu_and_mul(x)


@torch.library.custom_op("atom::silu_and_mul", mutates_args=())
def _silu_and_mul_op(x: Tensor) -> Tensor:
    """The launcher, called at run time by compiled code."""
    return _silu.silu_and_mul(x)


@_silu_and_mul_op.register_fake
def _(x: Tensor) -> Tensor:
    return _silu.silu_output(x)


def softmax_topk(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """Router logits [T, E] -> (weights [T, top_k] float32, expert ids [T, top_k] int64): softmax,
    top_k, optionally renormalised (Qwen3-MoE's norm_topk_prob)."""
    fn = _routing.softmax_topk if router_logits.is_cuda else _routing.softmax_topk_ref
    return fn(router_logits, top_k, renormalize)


def topk_softmax(router_logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """GPT-OSS's router: top_k of the raw logits [T, E], then a softmax over those k ->
    (weights [T, top_k] float32, expert ids [T, top_k] int64)."""
    fn = _routing.topk_softmax if router_logits.is_cuda else _routing.topk_softmax_ref
    return fn(router_logits, top_k)


def fused_experts(
    hidden_states: Tensor,
    w13: Tensor,
    w2: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w13_bias: Tensor | None = None,
    w2_bias: Tensor | None = None,
    activation: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """Routed experts: hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_* [T, K], optional
    biases [E, 2I] / [E, H] -> [T, H]. activation(gate, up) -> [S, I], default SiLU-and-mul.

    CUDA: the sync-free grouped-GEMM kernels; elsewhere the torch expert loop in atom.layers.moe.
    """
    if hidden_states.is_cuda:
        act = _silu.silu_and_mul
        if activation is not None:
            inter = w2.shape[2]

            def act(gate_up: Tensor) -> Tensor:
                return activation(gate_up[:, :inter], gate_up[:, inter:])

        return _moe.fused_experts(
            hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, act
        )
    from atom.layers.moe import fused_experts as fused_experts_ref  # layers import ops: no cycle

    args = (hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias)
    return fused_experts_ref(*args) if activation is None else fused_experts_ref(*args, activation)


def reshape_and_cache(
    key: Tensor,
    value: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """key/value [T, H_kv, D] into kv_cache at slot_mapping [T], in place; slots < 0 skipped."""
    fn = _cache.reshape_and_cache if key.is_cuda else _cache.reshape_and_cache_ref
    fn(key, value, kv_cache, slot_mapping, k_scale, v_scale)


def paged_attention(
    query: Tensor,
    kv_cache: Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: float,
    v_scale: float,
    sliding_window: int | None,
    softcap: float | None,
    out: Tensor,
    sinks: Tensor | None = None,
) -> None:
    """Attention of query [T, H, D] over the paged cache (its own K/V already written) into out.

    sinks [H] float32 (GPT-OSS): raw logits that join each head's softmax denominator.
    """
    if query.is_cuda:
        _attention.unified_attention(
            query,
            kv_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            meta.max_query_len,
            meta.max_seq_len,
            scale,
            k_scale,
            v_scale,
            sliding_window,
            softcap,
            out,
            sinks,
        )
        return
    out.copy_(
        paged_attention_ref(
            query,
            kv_cache,
            meta.block_tables,
            meta.seq_lens_cpu,
            meta.query_start_loc_cpu,
            scale,
            k_scale,
            v_scale,
            sliding_window,
            softcap,
            sinks,
        )
    )


def write_latent_cache(
    latent: Tensor, kv_cache: Tensor, slot_mapping: Tensor, kv_scale: float = 1.0
) -> None:
    """MLA: latent [T, kv_lora_rank + rope] into kv_cache [1, blocks, block_size, 1, row] at
    slot_mapping [T], in place; slots < 0 skipped."""
    fn = _latent.write_latent_cache if latent.is_cuda else _latent.write_latent_cache_ref
    fn(latent, kv_cache, slot_mapping, kv_scale)


def mla_attention(
    q: Tensor,
    kv_cache: Tensor,
    meta: AttentionMetadata,
    w_kv_b: Tensor,
    nope_dim: int,
    v_dim: int,
    scale: float,
    kv_scale: float,
    out: Tensor,
) -> None:
    """MLA of q [T, H, nope + rope] over the paged latent cache (this step's rows already
    written) into out [T, H, v]; w_kv_b is kv_b_proj's weight [H * (nope + v), kv_lora_rank].

    CUDA: the absorbed Triton kernel for every row, no host sync (CUDA-graph safe). Elsewhere the
    torch loop over sequences: absorbed for a decode row, expanded for a prefill.
    """
    if q.is_cuda:
        _mla.mla_paged_attention(
            q,
            kv_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            meta.max_query_len,
            meta.max_seq_len,
            w_kv_b,
            nope_dim,
            v_dim,
            scale,
            kv_scale,
            out,
        )
        return
    out.copy_(
        _mla_ref.mla_paged_attention_ref(
            q,
            kv_cache,
            meta.block_tables,
            meta.seq_lens_cpu,
            meta.query_start_loc_cpu,
            w_kv_b,
            nope_dim,
            v_dim,
            scale,
            kv_scale,
        )
    )
