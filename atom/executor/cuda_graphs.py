"""Whole-forward CUDA graphs of decode batches (the model and its LM head), one per padded batch
size and context cap.

All graphs share one memory pool and are captured largest first, so each smaller one reuses the
memory the larger ones already hold. A batch of B decode rows replays a graph of the smallest
captured size >= B; the runner fills rows B.. with padding (slot -1, seq_len 0).

A graph's attention launches are fixed at capture, their KV splits included, which follow the
longest context the graph is captured for (its cap). Any cap gives the right result: the kernels
share the actual context out among the splits. A size may have graphs for several caps (the
runner gives small batches a short one, under which attention runs unsplit and skips the split
reduce); a step replays the one of the smallest cap >= its longest context.

Optionally each size also gets a graph of the sampler's plain draw over the forward's output
(`replay_sample`): a step whose rows need no filter, penalty or logprobs then samples with one
replay instead of the host's launches (~0.15 ms of host time a step, H200 host).
"""

from __future__ import annotations

import bisect
import gc
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import Tensor

from atom.kernels.attention_config import (
    SHORT_CONTEXT,
    DecodeKind,
    LaunchConfig,
    decode_variant,
)
from atom.kernels.gemv import MAX_M

logger = logging.getLogger(__name__)


def context_caps(
    sizes: list[int], max_model_len: int, kinds: set[DecodeKind], num_sms: int
) -> dict[int, list[int]]:
    """Each capture size's context caps: max_model_len and, where decode attention (any of the
    model's layer kinds) would launch differently at SHORT_CONTEXT (decode_variant: its KV splits
    or its tiles), also that: a step of short contexts then runs its own splits (unsplit, or a
    split a tile where its programs are few; a graph for max_model_len splits a 272-token context
    16 ways at batch 1) and the short-context tiles."""
    short = min(max_model_len, SHORT_CONTEXT)

    def variants(size: int, cap: int) -> list[tuple[int, LaunchConfig | None]]:
        return [decode_variant(kind, size, cap, num_sms) for kind in sorted(kinds)]

    return {
        size: [short, max_model_len] if variants(size, short) != variants(size, max_model_len)
        else [max_model_len]
        for size in sizes
    }  # fmt: skip


class DecodeGraphs:
    def __init__(self, caps: dict[int, list[int]]) -> None:
        """caps: each batch size's context caps; every list ends with the longest context any
        step may have."""
        self.sizes = sorted(caps)
        self._caps = {size: sorted(set(c)) for size, c in caps.items()}
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._outputs: dict[tuple[int, int], Tensor] = {}
        self._samplers: dict[int, torch.cuda.CUDAGraph] = {}
        self._sampled: dict[int, Tensor] = {}
        # The last capture()'s seconds: each graph's warm-up, then the captures together.
        self.warmup_seconds: dict[tuple[int, int], float] = {}
        self.capture_seconds = 0.0

    def __contains__(self, size: int) -> bool:
        return size in self._caps and (size, self._caps[size][-1]) in self._graphs

    def __len__(self) -> int:
        """Forward graphs (the draw's graphs apart)."""
        return len(self._graphs)

    @property
    def draw_graphs(self) -> int:
        """Graphs of the plain draw (capture's `sample`): one per size, or none."""
        return len(self._samplers)

    def padded_size(self, num_seqs: int) -> int | None:
        """The graph that fits num_seqs rows, None when the batch is larger than every graph."""
        i = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[i] if i < len(self.sizes) else None

    def capture(
        self,
        forward: Callable[[int, int], Tensor],
        trace: Callable[[int], AbstractContextManager[None]] | None = None,
        sample: Callable[[int], Tensor] | None = None,
        warm_attention: Callable[[int, int], None] | None = None,
    ) -> None:
        """forward(size, cap) runs one decode batch of `size` rows whose attention is set up for
        contexts up to cap, and returns its output tensor; a warm-up forward before a capture
        compiles, autotunes and loads what the graph will launch. trace(size), when given,
        profiles a second warm-up forward of the size's longest cap: the same kernels, in the
        same order, as the graph then captured, then the draw. sample(size), when given, draws
        from the size's forward output (every cap's output must be one tensor) and returns the
        sampled ids.

        warm_attention(size, cap), when given, launches the attention of (size, cap) alone. It
        replaces the warm-up forward of a size's shorter caps (their graphs differ from the
        longest cap's in attention alone), and of every size but the largest and those of
        MAX_M rows or fewer. The largest size's forward settles what is the same at every size
        (Inductor's one dynamic-shape compile and its autotuning, cuBLAS's handles, the
        allocations); the small ones meet gemv's per-bucket variants and Triton's
        specialisation of 1; the rest launch those kernels again with other sizes, the variants
        compiled by the precompile, so their captures load them at most (8B, H200: warm-ups 1.2-1.6
        s -> 0.2-0.3 s of a warm start, twenty-sixth sitting)."""
        pool = None
        stream = torch.cuda.Stream()
        whole = {self.sizes[-1], *(s for s in self.sizes if s <= MAX_M)}  # forward warm-ups
        self.warmup_seconds, self.capture_seconds = {}, 0.0
        with paused_gc():
            for size in reversed(self.sizes):
                for cap in reversed(self._caps[size]):
                    key = (size, cap)
                    start = time.perf_counter()
                    if warm_attention is not None and (
                        cap != self._caps[size][-1] or (trace is None and size not in whole)
                    ):
                        warm_attention(size, cap)
                    else:
                        forward(size, cap)  # warm-up: compiles, autotunes, allocates
                    if trace is not None and cap == self._caps[size][-1]:
                        with trace(size):  # the kernels the size's replays run, in their order
                            forward(size, cap)
                            if sample is not None:
                                sample(size)
                    torch.cuda.synchronize()
                    self.warmup_seconds[key] = time.perf_counter() - start
                    start = time.perf_counter()
                    graph = torch.cuda.CUDAGraph()
                    with capturing(graph, pool, stream):
                        self._outputs[key] = forward(size, cap)
                    pool = graph.pool() if pool is None else pool
                    self._graphs[key] = graph
                    self.capture_seconds += time.perf_counter() - start
                if sample is not None:
                    sample(size)  # warm-up
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    graph = torch.cuda.CUDAGraph()
                    with capturing(graph, pool, stream):
                        self._sampled[size] = sample(size)
                    self._samplers[size] = graph
                    self.capture_seconds += time.perf_counter() - start
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-ups' blocks, kept between captures (capturing)

    def release(self, sync: bool = True) -> None:
        """Destroy every graph now, not when the last reference goes: NCCL's communicators
        cannot be finalized or aborted while a graph that captured one of their collectives
        lives (ncclCommDestroy and ncclCommAbort wait for those graphs to die), so a
        tensor-parallel engine hung in leaving its group (twenty-fourth sitting).

        sync waits for the device first, so that no replay still writes the graphs' pool when
        it is given back; without it (a tp rank died: a replay may wait for it forever) CUDA
        frees a graph in flight when it completes."""
        destroy_graphs([*self._graphs.values(), *self._samplers.values()], sync)
        self._graphs.clear()
        self._samplers.clear()
        self._outputs.clear()
        self._sampled.clear()

    def replay(self, size: int, max_seq_len: int) -> Tensor:
        """The captured output of `size` rows, recomputed from the current step buffers by the
        graph of the smallest cap >= max_seq_len (the step's longest context)."""
        caps = self._caps[size]
        key = (size, caps[min(bisect.bisect_left(caps, max_seq_len), len(caps) - 1)])
        self._graphs[key].replay()
        return self._outputs[key]

    def replay_sample(self, size: int) -> Tensor:
        """The plain draw's ids [size] from the last replayed forward output of `size` rows and
        the sampling buffers sample() read at capture. Valid until the next replay of any graph:
        the pool may place them in memory another size's forward uses as scratch."""
        self._samplers[size].replay()
        return self._sampled[size]


@contextmanager
def paused_gc() -> Iterator[None]:
    """No automatic collection (and its frees) in the middle of a capture until the block ends.
    Pausing the collector, not freezing what is alive: a freeze needed a full collection first
    (0.2-0.3 s of each start-up's captures on the H200's host, twenty-ninth sitting), and the
    engine freezes its long-lived objects once after start-up anyway."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def destroy_graphs(graphs: list[torch.cuda.CUDAGraph], sync: bool) -> None:
    """Reset every graph now (DecodeGraphs.release says why), after the device has run them
    when sync."""
    if graphs and sync:
        try:
            torch.cuda.synchronize()
        except Exception:  # a device error: nothing runs any more
            logger.warning("releasing the CUDA graphs: the device failed", exc_info=True)
    for graph in graphs:
        graph.reset()


@contextmanager
def capturing(
    graph: torch.cuda.CUDAGraph, pool: object, stream: torch.cuda.Stream
) -> Iterator[None]:
    """torch.cuda.graph without its empty_cache: that gives the allocator's cached blocks back to
    the driver before every capture, and the next size's warm-up allocates them again."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool)
        try:
            yield
        finally:
            graph.capture_end()
