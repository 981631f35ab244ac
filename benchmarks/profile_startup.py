"""Where an engine's start-up goes: `python benchmarks/profile_startup.py OUT_DIR [engine flags]`.

Times the imports and the LLM constructor from the process's birth and writes OUT_DIR/
startup_<n>.txt: Dynamo's per-phase compile times and the Triton kernels this process compiled
(a warm start should compile none), and OUT_DIR/triton_compiles_<n>.jsonl: every Triton compile
call with its cache-key parts and seconds (a key that differs between two starts of the same code
shows why the second missed the cache). With CPROFILE=1 the
constructor runs under cProfile (OUT_DIR/startup_<n>.prof, pstats, and the slowest calls in the
text; it distorts: about 1.4x, and Dynamo-traced frames drop out of it). Run it twice with the
same compile cache to see a cold and a warm start. Default model: the Llama-3.1-8B shape with
random weights, as benchmark_latency.
"""

from __future__ import annotations

import cProfile
import hashlib
import io
import json
import os
import pstats
import sys
import threading
import time
from pathlib import Path
from typing import Any

from atom.process_age import seconds_since_process_start

CACHE_HIT_SECONDS = 0.05  # a compile call that loads from Triton's disk cache: milliseconds


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
    n = 1 + len(list(out_dir.glob("startup_*.txt")))
    compiles = _log_triton_compiles(out_dir / f"triton_compiles_{n}.jsonl")
    engine_args = engine_args_from(args)
    profiler = cProfile.Profile() if os.environ.get("CPROFILE") == "1" else None
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    llm = LLM(**dataclasses.asdict(engine_args))
    if profiler is not None:
        profiler.disable()
    engine = time.perf_counter() - start
    ready = seconds_since_process_start() or 0.0
    llm.shutdown()

    text = io.StringIO()
    text.write(
        f"process start to ready {ready:.1f} s: {begin:.1f} s before main, imports {imports:.1f} "
        f"s, LLM() {engine:.1f} s{' under cProfile' if profiler else ''} "
        f"(torch {torch.__version__})\n\n"
    )
    missed = [c for c in compiles if c["seconds"] > CACHE_HIT_SECONDS]
    on_main = [c["name"] for c in missed if c["thread"] == "MainThread"]
    text.write(
        f"Triton: {len(compiles)} compile calls, {len(missed)} compiled (not a disk-cache hit), "
        f"{sum(c['seconds'] for c in missed):.1f} s of compiling (side by side on the "
        f"precompile's threads); on the main thread "
        f"{sum(c['seconds'] for c in missed if c['thread'] == 'MainThread'):.1f} s: "
        f"{', '.join(sorted(on_main))}\n\n"
    )
    if profiler is not None:
        profiler.dump_stats(out_dir / f"startup_{n}.prof")
        for key in ("cumulative", "tottime"):
            pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(60)
    text.write(torch._dynamo.utils.compile_times(repr="str"))
    (out_dir / f"startup_{n}.txt").write_text(text.getvalue())
    print(text.getvalue()[:3000])


def _log_triton_compiles(path: Path) -> list[dict[str, Any]]:
    """Every Triton compile of this process, one JSON line each (and in the list returned, which
    fills as the process compiles): the parts of its cache key, when the call began and how long
    it took."""
    try:
        import triton
        import triton.compiler
        import triton.compiler.compiler as compiler
        import triton.runtime.cache as cache
    except ImportError:
        return []
    records: list[dict[str, Any]] = []
    original_key, original_compile = compiler.get_cache_key, compiler.compile
    # Per thread: the precompile's pool compiles side by side, each computing its key on its own
    # thread just before compiling.
    local = threading.local()

    def key_logged(src: Any, backend: Any, options: Any, env_vars: Any) -> str:
        local.parts = dict(
            name=getattr(src, "name", ""),
            triton=_digest(cache.triton_key()),
            src=src.hash(),
            backend=_digest(backend.hash()),
            options=options.hash(),
            options_repr=repr(options),
            env=str(sorted(env_vars.items())),
            hook=repr(triton.knobs.runtime.add_stages_inspection_hook),
            # What picks the variant: argument types and specialisations, constexpr values.
            signature=repr(getattr(src, "signature", "")),
            constants=repr(getattr(src, "constants", "")),
            attrs=repr(getattr(src, "attrs", "")),
        )
        return original_key(src, backend, options, env_vars)

    def compile_logged(src: Any, target: Any = None, options: Any = None, **kwargs: Any) -> Any:
        at, start = seconds_since_process_start(), time.perf_counter()
        result = original_compile(src, target, options, **kwargs)
        record = {
            "seconds": round(time.perf_counter() - start, 4),
            "at": None if at is None else round(at, 2),  # since the process started
            **getattr(local, "parts", {}),
            "name": getattr(src, "name", ""),
            "thread": threading.current_thread().name,
        }
        records.append(record)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return result

    compiler.get_cache_key = key_logged
    compiler.compile = triton.compiler.compile = triton.compile = compile_logged
    return records


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


if __name__ == "__main__":
    main(sys.argv[1:])
