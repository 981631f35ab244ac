"""Where an engine's start-up goes: `python benchmarks/profile_startup.py OUT_DIR [engine flags]`.

Times the imports and the LLM constructor from the process's birth, runs the constructor under
cProfile and writes OUT_DIR/startup_<n>.prof (pstats, to read anywhere) and startup_<n>.txt (the
slowest calls by cumulative and own time, and Dynamo's per-phase compile times). Run it twice
with the same compile cache to see a cold and a warm start. Default model: the Llama-3.1-8B
shape with random weights, as benchmark_latency.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

from atom.process_age import seconds_since_process_start


def main(argv: list[str]) -> None:
    out_dir = Path(argv[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    begin = seconds_since_process_start() or 0.0
    start = time.perf_counter()
    import dataclasses
    import logging

    import torch

    from atom import LLM
    from atom.benchmarks.benchmark_latency import build_latency_parser
    from atom.benchmarks.common import engine_args_from

    imports = time.perf_counter() - start
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_latency_parser().parse_args(argv[1:])
    engine_args = engine_args_from(args)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    llm = LLM(**dataclasses.asdict(engine_args))
    profiler.disable()
    engine = time.perf_counter() - start
    ready = seconds_since_process_start() or 0.0
    llm.shutdown()

    n = 1 + len(list(out_dir.glob("startup_*.prof")))
    profiler.dump_stats(out_dir / f"startup_{n}.prof")
    text = io.StringIO()
    text.write(
        f"process start to ready {ready:.1f} s: {begin:.1f} s before main, imports {imports:.1f} "
        f"s, engine {engine:.1f} s under cProfile (torch {torch.__version__})\n\n"
    )
    for key in ("cumulative", "tottime"):
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(60)
    text.write(torch._dynamo.utils.compile_times(repr="str"))
    (out_dir / f"startup_{n}.txt").write_text(text.getvalue())
    print(text.getvalue()[:400])


if __name__ == "__main__":
    main(sys.argv[1:])
