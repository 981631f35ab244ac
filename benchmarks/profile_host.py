"""Where the host's time goes in a decode step, on the real engine: `python
benchmarks/profile_host.py [OUT_DIR] [engine and workload flags of benchmark_latency]`.

`bench_host_overhead.py` times the engine's own phases with a stub forward; this one keeps the
device work (CUDA graph replays, the LM head, the sampler, the uploads) and runs cProfile over
one generate per batch size (default: Qwen3-0.6B's shape, batches 1 and 8, 256 tokens). The
step's wait for the device is the time inside `Event.synchronize`: the rest of a step is the
host's own work, which bounds the step whenever it outlasts the device's. Prints, per batch,
ms per step (wall, waiting, host) and the functions of most own time; writes each profile's text
(by own and by cumulative time) to OUT_DIR/host_profile_bs<N>.txt and its pstats file to
OUT_DIR/host_profile_bs<N>.prof.
"""

from __future__ import annotations

import cProfile
import io
import logging
import pstats
import sys
import time
from pathlib import Path

from atom.benchmarks.benchmark_latency import build_latency_parser, prompts_for
from atom.benchmarks.common import engine_args_from, start_engine
from atom.sampling_params import SamplingParams

TOKENS = 256
TOP = 30


def wait_seconds(stats: pstats.Stats) -> float:
    """Own time of the functions that block on the device."""
    return sum(
        tt
        for (_, _, name), (_, _, tt, _, _) in stats.stats.items()  # type: ignore[attr-defined]
        if "synchronize" in name
    )


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    out = Path(argv[0]) if argv and not argv[0].startswith("-") else None
    parser = build_latency_parser()
    parser.set_defaults(model="qwen3-0.6b", batch_sizes=[1, 8])
    args = parser.parse_args(argv[1:] if out else argv)
    llm, startup = start_engine(engine_args_from(args))
    print(f"engine ready in {startup:.1f} s")
    try:
        for bs in args.batch_sizes:
            prompts = prompts_for(bs, args.input_len)
            params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=TOKENS)
            llm.generate(prompts, params, use_tqdm=False)  # warm
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            plain = (time.perf_counter() - start) / TOKENS
            profiler = cProfile.Profile()
            start = time.perf_counter()
            profiler.runcall(llm.generate, prompts, params, use_tqdm=False)
            traced = (time.perf_counter() - start) / TOKENS
            text = io.StringIO()
            stats = pstats.Stats(profiler, stream=text)
            waited = wait_seconds(stats) / TOKENS
            stats.sort_stats("tottime").print_stats(TOP)
            own = text.getvalue()
            stats.sort_stats("cumulative").print_stats(2 * TOP)
            print(
                f"batch {bs:4d}: {plain * 1e3:.3f} ms/step untraced; under cProfile "
                f"{traced * 1e3:.3f} ms/step, {waited * 1e3:.3f} waiting on the device, "
                f"{(traced - waited) * 1e3:.3f} host"
            )
            lines = [line for line in own.splitlines() if line.strip()]
            print("\n".join(lines[-TOP - 1 :]))
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                (out / f"host_profile_bs{bs}.txt").write_text(text.getvalue())
                profiler.dump_stats(out / f"host_profile_bs{bs}.prof")
    finally:
        llm.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
