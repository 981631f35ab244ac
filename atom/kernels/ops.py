"""The one place where a device picks its kernels: Triton on CUDA, the torch reference elsewhere.

Layers call these functions; each looks at its input's device, so a model built on the CPU runs the
references and the same model on a GPU runs the Triton kernels, with no flag threaded through.
Pattern for a new op: kernels/<op>.py holds `<op>` (Triton launcher) and `<op>_ref` with the same
signature; here, one function that picks between them on the main input's `is_cuda`. An op that
compiled code must call rather than trace (the norms, SiLU-and-mul) is also a torch.library
custom op whose fake returns exactly the launcher's shapes, strides and dtypes. The linear
layers' choices (gemv or cuBLAS, the fused qkv projection, the deferred norm) are
`linear_ops.py`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from atom.kernels import fused_moe as _moe
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
