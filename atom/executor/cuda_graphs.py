"""Whole-forward CUDA graphs of decode batches (the model; the LM head runs after the replay),
one per padded batch size.

All graphs share one memory pool and are captured largest first, so each smaller one reuses the
memory the larger ones already hold. A batch of B decode rows replays the graph of the smallest
captured size >= B; the runner fills rows B.. with padding (slot -1, seq_len 0).
"""

from __future__ import annotations

import bisect
import gc
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor


class DecodeGraphs:
    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sorted(sizes)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, Tensor] = {}
        # The last capture()'s seconds: each size's warm-up forward, then the captures together.
        self.warmup_seconds: dict[int, float] = {}
        self.capture_seconds = 0.0

    def __contains__(self, size: int) -> bool:
        return size in self._graphs

    def padded_size(self, num_seqs: int) -> int | None:
        """The graph that fits num_seqs rows, None when the batch is larger than every graph."""
        i = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[i] if i < len(self.sizes) else None

    def capture(
        self,
        forward: Callable[[int], Tensor],
        trace: Callable[[int], AbstractContextManager[None]] | None = None,
    ) -> None:
        """forward(size) runs one decode batch of `size` rows and returns its output tensor.
        trace(size), when given, profiles a second warm-up forward: the same kernels, in the
        same order, as the graph then captured (the first may compile and autotune)."""
        pool = None
        gc.collect()
        gc.freeze()  # no collection (and its frees) in the middle of a capture
        self.warmup_seconds, self.capture_seconds = {}, 0.0
        try:
            for size in reversed(self.sizes):
                start = time.perf_counter()
                forward(size)  # warm-up: compiles, autotunes and allocates outside the capture
                if trace is not None:
                    with trace(size):
                        forward(size)
                torch.cuda.synchronize()
                self.warmup_seconds[size] = time.perf_counter() - start
                start = time.perf_counter()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._outputs[size] = forward(size)
                pool = graph.pool() if pool is None else pool
                self._graphs[size] = graph
                self.capture_seconds += time.perf_counter() - start
        finally:
            gc.unfreeze()
        torch.cuda.synchronize()

    def replay(self, size: int) -> Tensor:
        """The captured output of `size` rows, recomputed from the current step buffers."""
        self._graphs[size].replay()
        return self._outputs[size]
