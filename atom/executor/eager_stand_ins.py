"""The main thread's eager Triton kernels outside attention and gemv, launched for real on
stand-ins of a row or two by the start-up precompile's threads (executor/precompile.py).

RMSNorm (plain, with the residual add, deferred), SiLU-and-mul, the memory profile's rotary (no
cache) and the draw compile their variants at their first launch, on the main thread: in a cold
8B start on the H200 ~1.5 s of compiles and C launchers (Triton 3.6) after the precompile had
finished (forty-fifth sitting). Each task here makes the launches a real step makes, with the
model's sizes and dtypes, so the main thread finds them compiled and loaded.

These are real launches, not compile-only ones: the main thread launches some of these variants
while the precompile runs (the memory profile's first norm), and a variant compiled under
AsyncCompileMode is not safe to finish from two threads. A real launch compiles synchronously in
its worker thread (Triton's async mode is a context variable the pool's threads do not have); a
variant the main thread meets at the same time is compiled and loaded by both (in Triton 3.6 its
launch then loads the module itself: one module loaded twice), which is only waste. Each task
runs on a stream of its own and waits for it, so none of its kernels is left running when the
precompile is joined (before the CUDA graphs' captures). The tensors are a row or two (the
draw's rows overlap): KiBs to a few MiB beside the memory profile's peak, which they may overlap.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from atom.distributed import tp_world_size
from atom.kernels.linear_ops import defers_norm
from atom.kernels.rms_norm import deferred_rms_norm, fused_add_rms_norm, rms_norm
from atom.kernels.sampling import draw_variant_rows, gumbel_argmax
from atom.kernels.silu_and_mul import silu_and_mul
from atom.layers.attention import Attention
from atom.layers.mlp import GateUpSiluLinear
from atom.layers.norm import RMSNorm

Task = Callable[[], None]


def eager_stand_ins(
    model: torch.nn.Module, layers: list[Attention], dtype: torch.dtype, max_seqs: int
) -> list[Task]:
    """One task per distinct kernel use: each RMSNorm weight outside the attention layers' ropes
    (their q/k norms run inside the rotary kernel), each gate/up width, each rope's shape (the
    layers' heads, head size, rotary size and style, q/k norms or not), the LM head's draw."""
    rope_norms = {id(n) for layer in layers if layer.rope for n in layer.rope[1:] if n is not None}
    norms = {}
    for m in model.modules():
        if type(m) is RMSNorm and id(m) not in rope_norms:
            norms.setdefault((tuple(m.weight.shape), m.weight.dtype), m.weight)
    widths = {m.weight.shape[0]: m.weight.device
              for m in model.modules() if isinstance(m, GateUpSiluLinear)}  # fmt: skip
    ropes = {}
    for layer in layers:
        if layer.rope is not None:
            rotary, q_norm, _ = layer.rope
            key = (layer.num_heads, layer.num_kv_heads, layer.head_dim, rotary.rotary_dim,
                   rotary.is_neox_style, q_norm is None)  # fmt: skip
            ropes.setdefault(key, layer)
    tasks: list[Task] = [partial(_norms, weight, dtype) for weight in norms.values()]
    tasks += [partial(_silu, width, dtype, device) for width, device in widths.items()]
    tasks += [partial(_rotary, layer, dtype) for layer in ropes.values()]
    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(head, "padded_vocab_size"):
        vocab, width = head.vocab_size, head.padded_vocab_size
        for rows in draw_variant_rows(vocab, max_seqs):
            tasks.append(partial(_draw, head.weight.device, head.weight.dtype, rows, vocab, width))
            tasks.append(partial(_draw, head.weight.device, torch.float32, rows, vocab, vocab))
    return tasks


def run_on_side_stream(task: Task, device: torch.device) -> None:
    """A task's launches on a stream of its own, finished before it returns."""
    torch.cuda.set_device(device)
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream), torch.inference_mode():
        task()
    stream.synchronize()


def _norms(weight: torch.Tensor, dtype: torch.dtype) -> None:
    """Plain, with the residual add, and deferred where norms defer (linear_ops.defers_norm):
    alone, and over several ranks also with the residual add (add_rms_norm_rows, after the
    all-reduce)."""
    x = torch.empty((1, weight.shape[0]), dtype=dtype, device=weight.device)
    rms_norm(x, weight, 1e-6)
    fused_add_rms_norm(x, torch.empty_like(x), weight, 1e-6)
    if defers_norm(x):
        deferred_rms_norm(x, None, weight)
        if tp_world_size() > 1:
            deferred_rms_norm(x, torch.empty_like(x), weight)


def _silu(width: int, dtype: torch.dtype, device: torch.device) -> None:
    silu_and_mul(torch.empty((1, width), dtype=dtype, device=device))


def _rotary(layer: Attention, dtype: torch.dtype) -> None:
    """forward_into's rotary with no cache (the memory profile): q and k views of a fused
    projection's rows, as the layer splits it (two: a view of one row may take other strides)."""
    assert layer.rope is not None
    rotary, q_norm, k_norm = layer.rope
    h, h_kv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    device = rotary.cos_sin_cache.device
    qkv = torch.empty((2, (h + 2 * h_kv) * d), dtype=dtype, device=device)
    q, k, _ = qkv.split([h * d, h_kv * d, h_kv * d], -1)
    positions = torch.zeros(2, dtype=torch.int64, device=device)
    rotary(positions, q.view(-1, h, d), k.view(-1, h_kv, d), q_norm, k_norm)


def _draw(device: torch.device, dtype: torch.dtype, rows: int, vocab: int, row_stride: int) -> None:
    """The draw over [rows, vocab] logits whose rows lie row_stride apart: the LM head's (a view
    of its padded-width output) or the filtered path's float32 copy. The rows overlap here (the
    kernel only reads them): a stride of 16, or 17 where the real one is no multiple of 16, picks
    the same variant, and the stand-in holds a row's worth of logits, not rows x vocab (~0.9 GB
    for Qwen3's vocabulary at 1,024 rows)."""
    stride = 16 if row_stride % 16 == 0 else 17
    flat = torch.empty((rows - 1) * stride + vocab, dtype=dtype, device=device)
    logits = flat.as_strided((rows, vocab), (stride, 1))
    temperature = torch.ones(rows, dtype=torch.float32, device=device)
    seeds = torch.zeros(rows, dtype=torch.int64, device=device)
    gumbel_argmax(logits, temperature, seeds)
