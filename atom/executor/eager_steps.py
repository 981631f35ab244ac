"""Token counts of ungraphed steps. A step that is not decode-only and larger than every mixed
graph (mixed_graphs.py) runs eagerly, its layers' GEMMs through cuBLAS at the step's token count.
cuBLAS picks its kernel by row count (137 distinct kernels over the Qwen3-0.6B's row counts
17-16,384, the choice flipping every few rows: RESULTS, twenty-eighth sitting), and the process's
first launch of a kernel loads it, which waits until the device has run everything queued
before it. The bench's last prefill step, of a token count of its own, held the host 66-69 ms
against its 37-39 ms of GPU work that way, and a server meets a new count at every odd-sized
prefill.

So such a step pads its tokens up to the next of a few sizes, 16 an octave (at most 1/16 more
tokens, which only pad rows compute), as a mixed graph's padding does (id 0, position 0, slot
-1, owned by one padding sequence of seq_len 0: input_batch.build_step_inputs), and the start-up
runs each layer GEMM once at every size (load_gemm_kernels), so no step loads a kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from atom.layers.linear import LinearBase

SIZES_PER_OCTAVE = 16
MIN_STEP = 16  # tokens: the finest grid, below 512 tokens


def eager_step_size(num_tokens: int, cap: int) -> int:
    """The size a step of num_tokens tokens pads to: the next multiple of 1/16 of its octave's
    lower end (2^(k-1) < num_tokens <= 2^k), at least MIN_STEP, at most cap (the token budget,
    which no step exceeds)."""
    step = max(MIN_STEP, (1 << max(num_tokens - 1, 1).bit_length()) // (2 * SIZES_PER_OCTAVE))
    return min(math.ceil(num_tokens / step) * step, cap)


def eager_step_sizes(low: int, cap: int) -> list[int]:
    """Every size a step of low + 1 .. cap tokens pads to, ascending."""
    sizes, n = [], low + 1
    while n <= cap:
        sizes.append(eager_step_size(n, cap))
        n = sizes[-1] + 1
    return sizes


@torch.inference_mode()
def load_gemm_kernels(model: nn.Module, sizes: list[int]) -> int:
    """Each distinct layer GEMM of the model (weight shape, dtype, bias) once at every token
    count in sizes, as an eager step runs it (F.linear: kernels/linear_ops.py past gemv's rows),
    largest first (each output fits the block the one before freed); the number of GEMMs run."""
    gemms: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for module in model.modules():
        if isinstance(module, LinearBase):
            w, b = module.weight, module.bias
            key = (tuple(w.shape), w.dtype, None if b is None else b.dtype)
            gemms.setdefault(key, (w, b))
    if not gemms or not sizes:
        return 0
    # Contiguous rows, as a step's activations are (cuBLAS's choice may follow the leading
    # dimension): one flat buffer a dtype, viewed per GEMM.
    flat: dict[torch.dtype, torch.Tensor] = {}
    for w, _ in gemms.values():
        n = max(sizes) * w.shape[1]
        if w.dtype not in flat or flat[w.dtype].numel() < n:
            flat[w.dtype] = torch.zeros(n, dtype=w.dtype, device=w.device)
    for rows in sorted(sizes, reverse=True):
        for w, b in gemms.values():
            x = flat[w.dtype][: rows * w.shape[1]].view(rows, w.shape[1])
            F.linear(x, w, b)
    return len(sizes) * len(gemms)
