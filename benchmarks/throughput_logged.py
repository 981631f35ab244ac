"""`atom.benchmarks.benchmark_throughput` with what the host does between steps logged:
`python benchmarks/throughput_logged.py [benchmark_throughput flags]`.

After each generate of over 100 steps: the median period of the engine's steps by running
requests (1-16, then buckets of 32) and the longest periods with their step numbers. At the end:
Python's garbage collections per generation with their total ms, and each one of over 1 ms
(generation, ms, seconds since the start), those of the last 10 s first (the timed run, or the
traced one when the profiler ran last). A trace shows a stall between two steps; these say whether
a collection was in it (RESULTS.md, thirteenth sitting: the full collections were).
"""

from __future__ import annotations

import gc
import itertools
import runpy
import sys
import time
from typing import Any

import atom.engine.core as core
import atom.engine.llm as llm

T0 = time.perf_counter()
LONGEST = 8


class Collections:
    """gc.callbacks: counts, total ms per generation and the collections of over 1 ms."""

    def __init__(self) -> None:
        self.count, self.total_ms = [0, 0, 0], [0.0, 0.0, 0.0]
        self.slow: list[tuple[int, float, float]] = []
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._began = now
            return
        generation, ms = info["generation"], 1e3 * (now - self._began)
        self.count[generation] += 1
        self.total_ms[generation] += ms
        if ms > 1:
            self.slow.append((generation, round(ms, 1), round(now - T0, 2)))

    def report(self) -> None:
        end = time.perf_counter() - T0
        recent = [c for c in self.slow if c[2] > end - 10]
        print("gc:", self.count, [round(v, 1) for v in self.total_ms],
              "over 1 ms in the last 10 s:", recent, flush=True)  # fmt: skip
        print("gc over 1 ms, all:", self.slow, flush=True)


def step_report(steps: list[tuple[int, float]]) -> None:
    """steps: (running requests after the step, its end time), in order."""
    pairs = enumerate(itertools.pairwise(steps))
    periods = [(1e3 * (t2 - t1), i + 1, n) for i, ((_, t1), (n, t2)) in pairs]
    by: dict[int, list[float]] = {}
    for ms, _, n in periods:
        by.setdefault(n if n <= 16 else 32 * (n // 32), []).append(ms)
    medians = {n: (len(v), round(sorted(v)[len(v) // 2], 3)) for n, v in sorted(by.items())}
    print("step period, median ms by running requests:", medians, flush=True)
    longest = [(round(ms, 2), i, n) for ms, i, n in sorted(periods)[-LONGEST:]]
    print("longest step periods (ms, step, running):", longest, flush=True)


def main() -> None:
    collections = Collections()
    gc.callbacks.append(collections)
    steps: list[tuple[int, float]] = []
    plain_step, plain_generate = core.EngineCore.step, llm.LLM.generate

    def step(self: core.EngineCore) -> Any:
        out = plain_step(self)
        steps.append((len(self.scheduler.running), time.perf_counter()))
        return out

    def generate(self: llm.LLM, *args: Any, **kwargs: Any) -> Any:
        steps.clear()
        out = plain_generate(self, *args, **kwargs)
        if len(steps) > 100:
            step_report(steps)
        return out

    core.EngineCore.step, llm.LLM.generate = step, generate  # type: ignore[method-assign]
    sys.argv = ["benchmark_throughput", *sys.argv[1:]]
    try:
        runpy.run_module("atom.benchmarks.benchmark_throughput", run_name="__main__")
    finally:
        collections.report()


if __name__ == "__main__":
    main()
