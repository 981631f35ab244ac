"""The attention path's and small-batch linear layers' Triton variants, compiled in the
background while the engine starts.

Triton compiles a kernel variant on its first launch, on the launching thread, one after another.
A cold start of the Llama-3.1-8B shape spent 13.5 s in 19 such compiles, 10.5 s of it in five
attention variants met by the CUDA-graph warm-up and the warm-up requests (H200, 2026-11-29).
Here a thread makes, with stand-in tensors, every attention launch those will make: decode with
each power of two of KV splits (its reduce kernel's variants), decode of many sequences over
short and longer contexts (their tiles differ), one q-block per sequence for the short query
lengths, and prefill; each layer kind once (its window, softcap, sinks, rope and
cache dtype pick the variant; MLA layers, another kernel, are left to their first launch) with
its fused qkv projection where it takes one (kernels/gemv_rope.py), then
for each distinct linear weight one gemv launch per row bucket its tuned table gives the weight a
tile for, or, where the table has no entry for 1-16 rows, one of the rule's tile for them
(kernels/gemv.py: one variant per weight shape and tile, 3 s of a cold 8B start otherwise;
none where cuBLAS runs); a gate/up weight whose SiLU is fused (ATOM_GEMV_SILU=1) launches
gated where linear_config gives a gated tile, else plainly for the pair's GEMM; a weight whose
layer an RMSNorm follows or precedes (LinearBase.norm_after / normed_input, kernels/gemv_norm.py)
also launches its 1-16-row fused-norm or row-scaled variant. The
launches are compile-only (`kernels/launch.py`) under Triton's AsyncCompileMode, so the variants
compile in parallel on a thread pool while the main thread profiles memory (Dynamo and Inductor
at work), and the real launches find them compiled. Each pool task also builds its variant's C
launcher (`LaunchersToo`: gcc, in Triton 3.6), and the pool first runs real launches of
the main thread's other eager kernels (norms, SiLU-and-mul, the memory profile's rotary, the
draw: executor/eager_stand_ins.py).

The runner waits for the thread before its first paged-attention launch (`wait`), so no real
launch meets a variant still compiling (Triton's pending kernels are not safe to finish from two
threads; a second engine starting in a process while another runs could meet one). Without
AsyncCompileMode (Triton < 3.4) nothing starts: the variants then compile on first launch, as
before. Not covered: a cache half of more than 2^31 elements passes the rotary and cache-write
kernels and the fused qkv projection an int64 offset where the one-block stand-in passes an int32,
so those three compile their variant on first launch (~0.3 s each).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch

from atom.executor.eager_stand_ins import Task, eager_stand_ins, run_on_side_stream
from atom.executor.forward_context import AttentionMetadata
from atom.kernels import linear_ops
from atom.kernels.attention_config import (
    DESC_PROGRAMS_PER_SM,
    MAX_SPLITS,
    MIN_TOKENS_PER_SPLIT,
    SHORT_CONTEXT,
    num_sms,
)
from atom.kernels.gemv import MAX_M, linear_config, tuned_buckets
from atom.kernels.launch import compile_only
from atom.layers.attention import Attention
from atom.layers.linear import LinearBase
from atom.layers.mlp import GateUpSiluLinear

logger = logging.getLogger(__name__)

# Query lengths of one sequence: 1 (decode), the one-q-block tiles of short queries (the warm-up
# requests' lengths, engine/core.py), and one past them (prefill tiles).
QUERY_LENS = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_WORKERS = 8
ENV = "ATOM_PRECOMPILE"


class Precompile:
    """A running precompile: `wait` joins it (and logs what it compiled, or why it failed)."""

    def __init__(
        self, layers: list[Attention], weights: list[Weight], shapes: StandIn, eager: list[Task]
    ) -> None:
        self._error: BaseException | None = None
        self._eager_error: BaseException | None = None
        self._seconds = 0.0
        self._calls = 0
        self._eager = eager
        # A daemon: an engine that fails before joining it (a worker process of tensor
        # parallelism, say) does not wait for it at exit.
        self._thread = threading.Thread(
            target=self._run, args=(layers, weights, shapes), name="atom-precompile", daemon=True
        )
        self._thread.start()

    def _run(self, layers: list[Attention], weights: list[Weight], shapes: StandIn) -> None:
        from triton.runtime._async_compile import AsyncCompileMode

        start = time.perf_counter()
        try:
            torch.cuda.set_device(shapes.device)  # Triton compiles for the thread's device
            workers = min(MAX_WORKERS, os.cpu_count() or 1)
            with ThreadPoolExecutor(workers, thread_name_prefix="atom-compile") as pool:
                # First in the pool's queue: the main thread meets these kernels soonest.
                eager = [pool.submit(run_on_side_stream, t, shapes.device) for t in self._eager]
                with AsyncCompileMode(LaunchersToo(pool)), compile_only(), torch.inference_mode():
                    self._compile(layers, weights, shapes)
                self._eager_error = next((e for f in eager if (e := f.exception())), None)
        except BaseException as e:  # a failed precompile only costs the compiles it saved
            self._error = e
        self._seconds = time.perf_counter() - start

    def _compile(self, layers: list[Attention], weights: list[Weight], shapes: StandIn) -> None:
        for layer in distinct_kinds(layers):
            for meta in stand_in_steps(shapes.block_size, shapes.device):
                attend_stand_in(layer, meta, shapes)
                self._calls += 1
            self._calls += project_stand_in(layer, shapes)
        for weight, gated, norm_after, normed_input in distinct_weights(weights):
            self._calls += norm_stand_in(weight, norm_after, normed_input, gated)
            buckets = tuned_buckets(weight, gated)  # 16: the variant of 1-16 rows
            for rows in buckets if MAX_M in buckets else (1, *buckets):
                x = torch.empty((rows, weight.shape[1]), dtype=weight.dtype,
                                device=weight.device)  # fmt: skip
                if gated and linear_config(rows, weight, gated=True) is not None:
                    linear_ops.small_batch_linear_silu_and_mul(x, weight)
                elif linear_config(rows, weight) is not None:
                    linear_ops.small_batch_linear(x, weight, None)  # the pair's GEMM too
                else:
                    continue  # cuBLAS
                self._calls += 1

    def wait(self) -> None:
        self._thread.join()
        if self._eager_error is not None:
            logger.warning("eager stand-ins failed (their variants compile on first launch): %r",
                           self._eager_error)  # fmt: skip
        if self._error is not None:
            logger.warning("precompile failed (variants compile on first launch): %r",
                           self._error)  # fmt: skip
        else:
            logger.info(
                "attention and gemv variants precompiled in %.1f s (%d stand-in launches, "
                "%d eager stand-ins)", self._seconds, self._calls, len(self._eager),
            )  # fmt: skip


class LaunchersToo:
    """The executor AsyncCompileMode submits compiles to: each task also builds its variant's
    launcher. Triton 3.6 compiles a C launcher for each kernel signature with gcc (0.3-1 s,
    then cached on disk beside the kernel) when a variant is first launched: in a cold 8B start on
    the H200 that was ~5 s of the main thread's time, serially, while here it runs beside the
    compiles (forty-fifth sitting). Triton 3.9's launcher is generic: there this costs nothing."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool

    def submit(self, compile_fn: Callable[[], Any]) -> Future[Any]:
        return self._pool.submit(_with_launcher, compile_fn)


def _with_launcher(compile_fn: Callable[[], Any]) -> Any:
    kernel = compile_fn()
    try:
        from triton.runtime import driver

        driver.active.launcher_cls(kernel.src, kernel.metadata)  # built into Triton's cache
    except Exception as e:  # the variant's first launch builds it then, and reports the failure
        logger.debug("launcher of %s not built ahead: %r", getattr(kernel, "name", "?"), e)
    return kernel


@dataclass(frozen=True, slots=True)
class StandIn:
    """What a stand-in launch needs besides the layer: the step's device and dtypes."""

    device: torch.device
    dtype: torch.dtype  # the model's: q, k, v and the output
    kv_dtype: torch.dtype
    block_size: int


def start_precompile(
    model: torch.nn.Module, shapes: StandIn, max_seqs: int = 1
) -> Precompile | None:
    """Starts the precompile thread for the model's attention layers and linear weights, and the
    eager stand-ins (draws of up to max_seqs rows), on a CUDA device whose Triton has
    AsyncCompileMode, unless ATOM_PRECOMPILE=0 (to measure a start without it)."""
    layers = [m for m in model.modules() if type(m) is Attention]  # not MLA
    weights = []
    if linear_ops._GEMV:
        # A gated MLP's gate/up weight launches the fused SiLU variant when that is on.
        fused = linear_ops._GEMV_SILU
        # An attention layer's qkv projection: its row-scaled launch is project_stand_in's.
        projections = {id(layer.qkv[0]) for layer in layers if layer.qkv is not None}
        weights = [Weight(m.weight, fused and isinstance(m, GateUpSiluLinear) and m.bias is None,
                          m.norm_after and m.bias is None,
                          m.normed_input and id(m) not in projections)
                   for m in model.modules() if isinstance(m, LinearBase)]  # fmt: skip
    if shapes.device.type != "cuda" or not (layers or weights) or os.environ.get(ENV) == "0":
        return None
    try:
        import triton.runtime._async_compile  # noqa: F401
    except ImportError:
        return None
    try:
        eager = eager_stand_ins(model, layers, shapes.dtype, max_seqs)
    except Exception as e:  # a model these do not fit: its kernels compile on first launch
        logger.warning("no eager stand-ins (their variants compile on first launch): %r", e)
        eager = []
    return Precompile(layers, weights, shapes, eager)


def distinct_kinds(layers: Iterable[Attention]) -> Iterator[Attention]:
    """One layer per set of the attributes that pick a variant."""
    seen = set()
    for layer in layers:
        rope = None
        if layer.rope is not None:
            rotary, q_norm, k_norm = layer.rope
            rope = (rotary.rotary_dim, rotary.is_neox_style, q_norm is None, k_norm is None)
        key = (
            type(layer), layer.num_heads, layer.num_kv_heads, layer.head_dim,
            layer.sliding_window, layer.softcap is None, layer.sinks is None, rope,
        )  # fmt: skip
        if key not in seen:
            seen.add(key)
            yield layer


class Weight(NamedTuple):
    """A linear layer's weight, whether its launches are gemv's gated (SiLU-fused) ones, and
    whether they take the deferred norm after it or the one before it (gemv_norm.py)."""

    weight: torch.Tensor
    gated: bool
    norm_after: bool = False
    normed_input: bool = False


def distinct_weights(weights: Iterable[Weight]) -> Iterator[Weight]:
    """One weight per (shape, dtype, gated, norm roles): what picks gemv's variants."""
    seen = set()
    for item in weights:
        key = (tuple(item.weight.shape), item.weight.dtype, *item[1:])
        if key not in seen:
            seen.add(key)
            yield item


def norm_stand_in(
    weight: torch.Tensor, norm_after: bool, normed_input: bool, gated: bool = False
) -> int:
    """The deferred norm's 1-16-row launches of this weight on stand-ins of one row (one variant
    serves 1-16 rows): with the residual add and norm in its epilogue (norm_after), and its sums
    scaled by a norm's 1/rms (normed_input; gated: the SiLU-fused launch where it takes one).
    How many launched."""
    x = torch.empty((1, weight.shape[1]), dtype=weight.dtype, device=weight.device)
    launched = 0
    if norm_after and linear_ops.defers_norm(x):
        residual = torch.empty((1, weight.shape[0]), dtype=weight.dtype, device=weight.device)
        norm_weight = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device)
        linear_ops.linear_add_rms_norm(x, weight, None, residual, norm_weight, 1e-6)
        launched += 1
    if normed_input and linear_ops.defers_norm(x):
        sumsq = torch.empty((1, 1), dtype=torch.float32, device=weight.device)
        if gated and linear_config(1, weight, gated=True) is not None:
            linear_ops.small_batch_linear_silu_and_mul(x, weight, (sumsq, 1e-6))
        elif linear_config(1, weight) is not None:
            linear_ops.small_batch_linear(x, weight, None, (sumsq, 1e-6))
        else:
            return launched
        launched += 1
    return launched


def stand_in_steps(block_size: int, device: torch.device) -> Iterator[AttentionMetadata]:
    """The metadata of steps covering every launch configuration: one-sequence decodes at
    contexts that pick 1, 2, 4, ... MAX_SPLITS KV splits, decodes whose programs cover every SM
    twice (never split) over short and longer contexts (attention_config.short_decode_tiles), over
    longer contexts from the programs that take descriptor tiles (descriptor_decode),
    decodes of few sequences over short contexts (split or not, 64- or 128-key tiles), then one
    sequence of each of QUERY_LENS. Slots are -1 (nothing would be written) and the
    block tables zeros: nothing runs anyway."""
    splits = [1 << i for i in range(MAX_SPLITS.bit_length())]  # 1, 2, 4, ... MAX_SPLITS
    # A context of (s + 1) * MIN_TOKENS_PER_SPLIT - 1 tokens picks s splits at batch 1 when s is a
    # power of two (attention_config.choose_num_splits): its reduce kernel is the SPLITS_P = s one.
    contexts = [(s + 1) * MIN_TOKENS_PER_SPLIT - 1 if s > 1 else 1 for s in splits]
    many = 2 * num_sms(device)  # sequences: programs enough at any number of KV heads
    steps = [(1, 1, c) for c in contexts] + [(many, 1, 1)]
    # Longer contexts, unsplit: pointer tiles from twice the SMs' programs, descriptor tiles from
    # DESC_PROGRAMS_PER_SM times (attention_config.descriptor_decode), for 1-16 KV heads.
    for per_sm in (2, DESC_PROGRAMS_PER_SM):
        steps += [(-(-per_sm * num_sms(device) // kv_heads), 1, SHORT_CONTEXT + 1)
                  for kv_heads in (1, 2, 4, 8, 16)]  # fmt: skip
    # A short decode's tiles, split and not (attention_config.short_split_tokens): one sequence
    # (the fewest programs: the shortest splits and tiles); for 1-16 KV heads, sequences whose
    # programs fill just over an eighth of the SMs (longer splits); unsplit, a quarter of the SMs'
    # count of sequences (128-key tiles at any number of KV heads that takes short tiles).
    eighth = num_sms(device) // 8
    steps += [(1, 1, SHORT_CONTEXT)]
    steps += [(eighth // kv_heads + 1, 1, SHORT_CONTEXT) for kv_heads in (1, 2, 4, 8, 16)]
    steps.append((num_sms(device) // 4, 1, 1))
    steps += [(1, q, q) for q in QUERY_LENS if q > 1]
    for seqs, q, context in steps:
        blocks = -(-context // block_size)
        tokens = seqs * q
        meta = AttentionMetadata(
            slot_mapping=torch.full((tokens,), -1, dtype=torch.int64, device=device),
            block_tables=torch.zeros((seqs, blocks), dtype=torch.int32, device=device),
            seq_lens=torch.full((seqs,), context, dtype=torch.int32, device=device),
            query_start_loc=torch.arange(0, tokens + 1, q, dtype=torch.int32, device=device),
            seq_lens_cpu=[context] * seqs,
            query_start_loc_cpu=list(range(0, tokens + 1, q)),
            max_query_len=q,
            max_seq_len=context,
        )
        yield meta


def attend_stand_in(layer: Attention, meta: AttentionMetadata, shapes: StandIn) -> None:
    """The layer's step path on stand-ins shaped as a real step's: q, k and v views of one fused
    projection output, as the models split it, and a one-block cache of the real dtype. A real
    launch (the graphs' warm-up) must pass padding rows only: seq_lens 0, slots -1."""
    h, h_kv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    tokens, device = meta.slot_mapping.shape[0], shapes.device
    qkv = torch.empty((tokens, (h + 2 * h_kv) * d), dtype=shapes.dtype, device=device)
    q, k, v = qkv.split([h * d, h_kv * d, h_kv * d], -1)
    q, k, v = q.view(-1, h, d), k.view(-1, h_kv, d), v.view(-1, h_kv, d)
    positions = None
    if layer.rope is not None:
        positions = torch.zeros(tokens, dtype=torch.int64, device=device)
    shape = layer.kv_cache_shape(1, shapes.block_size)
    cache = torch.empty(shape, dtype=shapes.kv_dtype, device=device)
    out = torch.empty(q.shape, dtype=shapes.dtype, device=device)
    layer.attend(q, k, v, positions, out, cache, meta)


def project_stand_in(layer: Attention, shapes: StandIn) -> bool:
    """The layer's fused qkv projection (gemv with rotary and the cache write) on stand-ins of
    one row, where it takes one: one variant serves 1-16 rows; with the input norm's deferred
    scale where the model defers it (normed_input), and then the row-scaled plain launch where
    the projection does not fuse. Whether it launched."""
    if layer.qkv is None:
        return False
    x = torch.empty((1, layer.qkv[0].weight.shape[1]), dtype=shapes.dtype, device=shapes.device)
    if not layer.fuses_projection(x):
        return norm_stand_in(layer.qkv[0].weight, False, layer.qkv[0].normed_input) > 0
    cache = torch.empty(layer.kv_cache_shape(1, shapes.block_size), dtype=shapes.kv_dtype,
                        device=shapes.device)  # fmt: skip
    positions = torch.zeros(1, dtype=torch.int64, device=shapes.device)
    slots = torch.full((1,), -1, dtype=torch.int64, device=shapes.device)
    sumsq = None  # the input norm's deferred scale, where the model defers it
    if layer.qkv[0].normed_input:
        sumsq = torch.empty((1, 1), dtype=torch.float32, device=shapes.device)
    layer.project_into_cache(x, positions, cache, slots, sumsq, 1e-6)
    return True


def attend_padding_rows(
    layers: Iterable[Attention], meta: AttentionMetadata, shapes: StandIn
) -> None:
    """Real launches, one per layer kind, of a step shaped as meta (its rows, its longest context),
    every row padding (no key read, no slot written): the variants a CUDA graph of such a step
    launches get loaded before its capture (DecodeGraphs.capture's warm_attention). The block
    table is meta's (its stride picks no variant)."""
    rows, seqs = meta.slot_mapping.shape[0], meta.seq_lens.shape[0]
    padding = replace(
        meta,
        slot_mapping=torch.full((rows,), -1, dtype=torch.int64, device=shapes.device),
        seq_lens=torch.zeros(seqs, dtype=torch.int32, device=shapes.device),
    )
    for layer in distinct_kinds(layers):
        attend_stand_in(layer, padding, shapes)
