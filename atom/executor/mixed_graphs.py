"""Whole-forward CUDA graphs of mixed steps: any step that is not decode-only (prefill chunks,
alone or beside decode rows) of up to the largest size's tokens, one graph per token count of
`CompilationConfig.mixed_graph_sizes`. (A decode-only step larger than every decode graph runs
eagerly, as before: a decode's launches differ, split-KV among them.)

Why: an ungraphed step's host work is a fixed cost per layer (Dynamo's frame, the compiled
pieces' wrappers, the custom ops' dispatch, ~0.5-1 ms a layer), not per token. A small model's
mixed step was host-bound 2-4x (Qwen3-0.6B, H200: 3,576 tokens took the host 35 ms against
9.2 ms of GPU work; RESULTS, twenty-seventh sitting): what a server runs whenever a request
arrives, holding every stream's next token. A replay costs the host tens of microseconds.

The graphs cover the whole forward, attention included, not pieces between attention calls (the
issue's "graphs over the pieces", vLLM's piecewise mode): the paged attention kernel's launch
depends only on shapes and Python ints (kernels/unified_attention.py), so one graph serves any
batch of up to T tokens in fewer than S sequences when it is captured for T tokens, S sequences
and a query length of T (S is max_num_seqs + 1):
- tokens past the step's pad to T: id 0, position 0, slot -1 (their K/V is written nowhere);
- sequences past the step's pad to S with seq_len 0, the first of them owning the padding
  tokens: attention writes zeros there, and every other layer works row by row, so padding never
  reaches a real row;
- a query length of T picks a launch whose q-blocks hold any query of the step (its grid,
  T // BLOCK_Q + S programs, covers any split of T tokens into S sequences), and no KV split
  (only decode splits).
The step's logits (and prompt logprobs) are then computed from the graph's output rows eagerly,
as after an ungraphed forward.

A padded step does up to 50% more GPU work (100% below 512 tokens); the host's saving outweighs
it in the steps this covers. Larger steps are GPU-bound and run ungraphed. The graphs share one
memory pool (their own: the decode graphs' outputs stay put), captured largest first.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable

import torch
from torch import Tensor

from atom.executor.cuda_graphs import capturing, destroy_graphs, paused_gc


class MixedGraphs:
    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sorted(sizes)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, Tensor] = {}
        self.warmup_seconds = 0.0
        self.capture_seconds = 0.0

    def __len__(self) -> int:
        return len(self._graphs)

    def padded_size(self, num_tokens: int) -> int | None:
        """The graph that holds num_tokens, None when the step is larger than every graph."""
        i = bisect.bisect_left(self.sizes, num_tokens)
        return self.sizes[i] if i < len(self.sizes) else None

    def capture(self, forward: Callable[[int], Tensor]) -> None:
        """forward(size) runs the model over `size` padded tokens read from the step buffers
        and returns its hidden states; a warm-up run of each size before its capture."""
        pool = None
        stream = torch.cuda.Stream()
        with paused_gc():
            for size in reversed(self.sizes):
                start = time.perf_counter()
                forward(size)  # warm-up: cuBLAS's kernels for the size, Inductor's shapes
                torch.cuda.synchronize()
                self.warmup_seconds += time.perf_counter() - start
                start = time.perf_counter()
                graph = torch.cuda.CUDAGraph()
                with capturing(graph, pool, stream):
                    self._outputs[size] = forward(size)
                pool = graph.pool() if pool is None else pool
                self._graphs[size] = graph
                self.capture_seconds += time.perf_counter() - start
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    def replay(self, size: int) -> Tensor:
        """The hidden states [size, hidden] of the step in the step buffers (padded to size)."""
        self._graphs[size].replay()
        return self._outputs[size]

    def release(self, sync: bool = True) -> None:
        """Destroy every graph now (DecodeGraphs.release says why; sync: wait for the device)."""
        destroy_graphs(list(self._graphs.values()), sync)
        self._graphs.clear()
        self._outputs.clear()
