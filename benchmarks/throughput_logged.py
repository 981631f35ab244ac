"""`atom.benchmarks.benchmark_throughput` with what the host does between steps logged:
`python benchmarks/throughput_logged.py [benchmark_throughput flags]`.

After each generate of over 100 steps: the median period of the engine's steps by running
requests (1-16, then buckets of 32 keyed by their top: 32 is 17-32; the logs of RESULTS.md's
thirteenth and fourteenth sittings key them by their bottom, 0 holding 17-31) and the longest
periods with their step numbers. At the end:
Python's garbage collections per generation with their total ms, and each one of over 1 ms
(generation, ms, seconds since the start), those of the last 10 s first (the timed run, or the
traced one when the profiler ran last). A trace shows a stall between two steps; these say whether
a collection was in it (RESULTS.md, thirteenth sitting: the full collections were).

`--profile-steps N FILE` (taken before the benchmark's own flags) runs the first N steps of each
generate under cProfile and writes the last such generate's listing (own and cumulative time) to
FILE: the chunked-prefill steps at the start of the bench. `--profile-steps A:B FILE` profiles
steps A to B-1 instead, the host's work between them included (the output processing, the
next schedule): a stall between two decode steps. `--gpu-idle` (also before them)
reports each generate's GPU idle per decode step from CUDA events (gpu_idle.py: no profiler).
"""

from __future__ import annotations

import cProfile
import gc
import io
import itertools
import pstats
import runpy
import sys
import time
from typing import Any

from gpu_idle import GpuIdle  # this script's folder is on sys.path

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
        by.setdefault(n if n <= 16 else 32 * -(-n // 32), []).append(ms)
    medians = {n: (len(v), round(sorted(v)[len(v) // 2], 3)) for n, v in sorted(by.items())}
    print("step period, median ms by running requests (up to):", medians, flush=True)
    longest = [(round(ms, 2), i, n) for ms, i, n in sorted(periods)[-LONGEST:]]
    print("longest step periods (ms, step, running):", longest, flush=True)


def write_profile(profiler: cProfile.Profile, path: str, top: int = 60) -> None:
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    with open(path, "w") as f:
        f.write(text.getvalue())


def main() -> None:
    profile_from, profile_to, profile_out, idle = 0, 0, "", None
    while sys.argv[1:2] in (["--profile-steps"], ["--gpu-idle"]):
        if sys.argv[1] == "--gpu-idle":
            idle = GpuIdle()
            idle.install()
            del sys.argv[1]
        else:
            span, profile_out = sys.argv[2], sys.argv[3]
            first, _, last = span.rpartition(":")
            profile_from, profile_to = int(first or 0), int(last)
            del sys.argv[1:4]
    collections = Collections()
    gc.callbacks.append(collections)
    steps: list[tuple[int, float]] = []
    plain_step, plain_generate = core.EngineCore.step, llm.LLM.generate
    profiler = cProfile.Profile()

    def step(self: core.EngineCore, *args: Any) -> Any:
        # The first N steps: each step's own time; a span A:B: everything from step A to step B
        span = profile_from > 0
        if len(steps) == profile_to and span:
            profiler.disable()
        profiling = profile_from <= len(steps) < profile_to
        if profiling and (not span or len(steps) == profile_from):
            profiler.enable()
        out = plain_step(self, *args)
        if profiling and not span:
            profiler.disable()
        steps.append((len(self.scheduler.running), time.perf_counter()))
        return out

    def generate(self: llm.LLM, *args: Any, **kwargs: Any) -> Any:
        nonlocal profiler
        steps.clear()
        profiler = cProfile.Profile()
        out = plain_generate(self, *args, **kwargs)
        # A span its generate ended before step B (the benchmark's short warm-up generate)
        # stays enabled otherwise, and the next generate's profiler cannot start.
        profiler.disable()
        if len(steps) > 100:
            step_report(steps)
            if profile_to:
                write_profile(profiler, profile_out)
        if idle is not None:
            if len(steps) > 100:
                idle.report()
            idle.steps.clear()
        return out

    core.EngineCore.step, llm.LLM.generate = step, generate  # type: ignore[method-assign]
    sys.argv = ["benchmark_throughput", *sys.argv[1:]]
    try:
        runpy.run_module("atom.benchmarks.benchmark_throughput", run_name="__main__")
    finally:
        collections.report()


if __name__ == "__main__":
    main()
