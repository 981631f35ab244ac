"""Attention over the paged KV cache; the runner binds each layer's cache tensor to `kv_cache`.

Under torch.compile the layer calls `torch.ops.atom.attention`, an opaque custom op that finds the
layer by its index in the forward context: compiled graphs split at it (level 3), and the cache
writes and Triton launches inside stay out of Dynamo's sight. A layer given its qkv projection
(`qkv=`, Llama and Qwen3) takes the hidden states instead (`project_and_attend`,
`torch.ops.atom.qkv_attention`): the projection runs inside the op, so that at decode row counts
its gemv can rotate q and k and write K/V into the cache in its epilogue
(kernels/gemv_rope.py), one launch where there were two. The index is a CPU tensor, not a
Python int or string: Dynamo would guard on a constant's value and trace every layer apart, while
a tensor is an input, so all layers of a class share one compiled graph.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from atom.distributed import tp_rank, tp_world_size
from atom.executor.forward_context import (
    AttentionMetadata,
    context_layer,
    get_attention_metadata,
)
from atom.kernels import linear_ops, ops
from atom.kernels.attention_config import DecodeKind, padded_head_dim
from atom.kernels.paged_attention import sdpa
from atom.layers.norm import NormedRows, RMSNorm
from atom.layers.rotary import RotaryEmbedding

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def sliding_window_of(config: Any, layer_idx: int) -> int | None:
    """The layer's attention window from an HF config, None for full attention."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if not getattr(config, "use_sliding_window", True):
        return None
    return window


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int,
        sliding_window: int | None = None,
        softcap: float | None = None,
        sinks: bool = False,
        rope: RotaryEmbedding | None = None,
        qk_norm: tuple[RMSNorm, RMSNorm] | None = None,
        qkv: nn.Module | None = None,
    ) -> None:
        """num_heads / num_kv_heads: this rank's; sinks: a learned per-head logit [num_heads]
        joins each softmax denominator (GPT-OSS), loaded from the full [total heads] tensor;
        rope (and qk_norm, Qwen3's per-head q/k RMSNorm, before it): the layer rotates q and k
        itself, in the kernel that writes K/V into the cache (one launch where there were two),
        so forward takes q and k unrotated, and the positions; qkv: the layer's fused q/k/v
        projection (QKVParallelLinear), for project_and_attend."""
        super().__init__()
        # A plain tuple: the projection stays registered where the model has it.
        self.qkv: tuple[nn.Module] | None = None if qkv is None else (qkv,)
        # A plain tuple: the modules stay registered (and named) where the checkpoint has them.
        self.rope: tuple[RotaryEmbedding, RMSNorm | None, RMSNorm | None] | None = None
        if rope is not None:
            self.rope = (rope, *(qk_norm or (None, None)))
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        # Its position in the forward context's layers, set by the runner: a 0-d int64 tensor
        # that stays on the CPU (reading it in the op is no device sync).
        self.layer_index = torch.zeros((), dtype=torch.int64, device="cpu")
        # --mark-trace: the profiler range of a compiled forward's call into the layer's op (the
        # module-forward tags of executor/profiling.py are left out of compiled code).
        self.trace_tag: str | None = None
        # fp8 KV stores k / k_scale; the runner calibrates the scales (1.0 for other dtypes).
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.kv_amax: tuple[float, float] | None = None  # set while calibrating: max |k|, |v|
        self.kv_cache = torch.empty(0)  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        self.sinks: nn.Parameter | None = None
        if sinks:  # float32 whatever the model dtype: they are softmax logits
            self.sinks = nn.Parameter(
                torch.empty(num_heads, dtype=torch.float32), requires_grad=False
            )
            self.sinks.weight_loader = self._load_sinks

    def _load_sinks(self, param: Tensor, loaded: Tensor, shard_id: object = None) -> int:
        if loaded.shape != (self.num_heads * (tp := tp_world_size()),):
            raise ValueError(f"sinks {tuple(loaded.shape)} for {self.num_heads * tp} heads")
        param.data.copy_(loaded.narrow(0, tp_rank() * self.num_heads, self.num_heads))
        return param.numel()

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """This layer's cache tensor; layers with another layout (MLA latents) override it."""
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def decode_kind(self) -> DecodeKind:
        """What picks this layer's decode launches (the graphs' context caps follow it); MLA's
        latent kernel overrides it."""
        group = self.num_heads // self.num_kv_heads
        return DecodeKind(self.num_kv_heads, group, padded_head_dim(self.head_dim))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor | None = None) -> Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] (views are fine), positions [T]
        with a rope -> [T, heads, head_dim]."""
        if (positions is None) != (self.rope is None):
            raise ValueError("positions go with a rope, and only with one")
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if torch.compiler.is_compiling():
            torch.ops.atom.attention(q, k, v, positions, out, self.layer_index)
        else:  # eager: skip the dispatcher, ~10 us per call
            self.forward_into(q, k, v, positions, out)
        return out

    def project_and_attend(self, x: Tensor | NormedRows, positions: Tensor | None = None) -> Tensor:
        """x [T, hidden] (or an RMSNorm's rows of it) through the layer's qkv projection, then
        forward: -> [T, heads, head_dim]. The projection runs inside the op (at decode row
        counts with rotary and the cache write in its epilogue)."""
        if self.qkv is None:
            raise ValueError("project_and_attend needs the layer's qkv projection (qkv=)")
        x, sumsq, eps = x if isinstance(x, NormedRows) else (x, None, 0.0)
        out = torch.empty((x.shape[0], self.num_heads, self.head_dim), dtype=x.dtype,
                          device=x.device)  # fmt: skip
        if torch.compiler.is_compiling():
            torch.ops.atom.qkv_attention(x, sumsq, eps, positions, out, self.layer_index)
        else:  # the module tag forward would have (--mark-trace): this is called instead
            with self.trace_scope():
                self.project_into(x, positions, out, sumsq, eps)
        return out

    def project_into(
        self,
        x: Tensor,
        positions: Tensor | None,
        out: Tensor,
        sumsq: Tensor | None = None,
        eps: float = 0.0,
    ) -> None:
        """project_and_attend's work, into out: the fused projection where it applies (a step
        with a cache), else the projection module, then forward_into. sumsq, eps: x is an
        RMSNorm's rows (NormedRows)."""
        assert self.qkv is not None
        meta = get_attention_metadata()
        if meta is not None and self.kv_cache.numel() and self.fuses_projection(x):
            assert positions is not None
            q = self.project_into_cache(x, positions, self.kv_cache, meta.slot_mapping, sumsq, eps)
            self.attend_cached(q, out, self.kv_cache, meta)
            return
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        rows = x if sumsq is None else NormedRows(x, sumsq, eps)
        q, k, v = self.qkv[0](rows).split([q_size, kv_size, kv_size], -1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        self.forward_into(q, k, v, positions, out)

    def fuses_projection(self, x: Tensor) -> bool:
        """Whether the projection of x takes gemv's rotary-and-cache epilogue: a bias-free
        projection, a rope over whole heads, q/k norms it can fuse (one eps and dtype)."""
        if self.qkv is None or self.rope is None or getattr(self.qkv[0], "bias", None) is not None:
            return False
        rotary, q_norm, k_norm = self.rope
        if (q_norm is None) != (k_norm is None):
            return False
        if q_norm is not None and (
            q_norm.eps != k_norm.eps or not q_norm.weight.dtype == k_norm.weight.dtype == x.dtype
        ):
            return False
        return linear_ops.fuses_qkv_rope(
            x, self.qkv[0].weight, self.head_dim, rotary.rotary_dim, rotary.is_neox_style
        )

    def project_into_cache(
        self,
        x: Tensor,
        positions: Tensor,
        kv_cache: Tensor,
        slot_mapping: Tensor,
        sumsq: Tensor | None = None,
        eps: float = 0.0,
    ) -> Tensor:
        """The fused projection (where fuses_projection): rotated q [T, heads, head_dim]; k and
        v into kv_cache (the layer's own in a step, a stand-in in the start-up precompile)."""
        assert self.qkv is not None and self.rope is not None
        rotary, q_norm, k_norm = self.rope
        norm = None if q_norm is None else (q_norm.weight, k_norm.weight, q_norm.eps)
        return linear_ops.gemv_rope_and_cache(
            x, self.qkv[0].weight, positions, kv_cache, slot_mapping, rotary.cos_sin_cache,
            self.num_heads, self.num_kv_heads, self.k_scale, self.v_scale, norm, sumsq, eps,
        )  # fmt: skip

    def trace_scope(self) -> AbstractContextManager[Any]:
        return record_function(self.trace_tag) if self.trace_tag else nullcontext()

    def forward_into(
        self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor | None, out: Tensor
    ) -> None:
        meta = get_attention_metadata()
        if meta is None or self.kv_cache.numel() == 0:
            # A forward with no cache (memory profile, fp8 calibration): one causal sequence.
            if self.rope is not None:
                rotary, q_norm, k_norm = self.rope
                q, k = rotary(positions, q, k, q_norm, k_norm)
            if self.kv_amax is not None:
                self.kv_amax = (
                    max(self.kv_amax[0], k.abs().max().item()),
                    max(self.kv_amax[1], v.abs().max().item()),
                )
            out.copy_(sdpa(q, k, v, self.scale, self.sliding_window, self.softcap, self.sinks))
            return
        self.attend(q, k, v, positions, out, self.kv_cache, meta)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        positions: Tensor | None,
        out: Tensor,
        kv_cache: Tensor,
        meta: AttentionMetadata,
    ) -> None:
        """This step's K/V into kv_cache (rotated, with a rope), then paged attention over it:
        the layer's own cache in a step, a stand-in in the start-up precompile."""
        scales = (self.k_scale, self.v_scale)
        if self.rope is None:
            ops.reshape_and_cache(k, v, kv_cache, meta.slot_mapping, *scales)
        else:
            rotary, q_norm, k_norm = self.rope
            assert positions is not None
            q = rotary.forward_into_cache(
                positions, q, k, v, kv_cache, meta.slot_mapping, *scales, q_norm, k_norm
            )
        self.attend_cached(q, out, kv_cache, meta)

    def attend_cached(
        self, q: Tensor, out: Tensor, kv_cache: Tensor, meta: AttentionMetadata
    ) -> None:
        """Paged attention of q (rotated) over kv_cache, this step's K/V already in it."""
        ops.paged_attention(
            q,
            kv_cache,
            meta,
            self.scale,
            self.k_scale,
            self.v_scale,
            self.sliding_window,
            self.softcap,
            out,
            self.sinks,
        )

    def set_kv_scales_from_amax(self, margin: float = 2.0) -> None:
        """fp8 scales from the calibrated maxima; the margin keeps unseen larger values unclipped
        at no cost in relative precision (e4m3 has 3 mantissa bits at any scale)."""
        assert self.kv_amax is not None
        self.k_scale = max(self.kv_amax[0] * margin / FP8_MAX, 1e-6)
        self.v_scale = max(self.kv_amax[1] * margin / FP8_MAX, 1e-6)
        self.kv_amax = None


@torch.library.custom_op("atom::attention", mutates_args=("out",))
def _attention_op(
    q: Tensor, k: Tensor, v: Tensor, positions: Tensor | None, out: Tensor, layer_index: Tensor
) -> None:
    layer = context_layer(layer_index, "atom.attention")
    with layer.trace_scope():
        layer.forward_into(q, k, v, positions, out)


@_attention_op.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, positions: Tensor | None, out: Tensor, layer_index: Tensor
) -> None:
    return None


@torch.library.custom_op("atom::qkv_attention", mutates_args=("out",))
def _qkv_attention_op(
    x: Tensor,
    sumsq: Tensor | None,
    eps: float,
    positions: Tensor | None,
    out: Tensor,
    layer_index: Tensor,
) -> None:
    layer = context_layer(layer_index, "atom.qkv_attention")
    with layer.trace_scope():
        layer.project_into(x, positions, out, sumsq, eps)


@_qkv_attention_op.register_fake
def _(
    x: Tensor,
    sumsq: Tensor | None,
    eps: float,
    positions: Tensor | None,
    out: Tensor,
    layer_index: Tensor,
) -> None:
    return None
