"""Where the host's time goes in a decode step, on the real engine: `python
benchmarks/profile_host.py [OUT_DIR] [engine and workload flags of benchmark_latency]`.

`bench_host_overhead.py` times the engine's own phases with a stub forward; this one keeps the
device work (CUDA graph replays, the LM head, the sampler, the uploads). Per batch size (default:
Qwen3-0.6B's shape, batches 1 and 8, 256 tokens, greedy; --temperature draws; --max-tokens 1 with
a batch of long prompts profiles chunked prefill steps instead) one generate runs
with perf_counter wrappers around the step's phases (inclusive times: `submit_model` holds the
inputs, the forward and the sampler; `Event.synchronize`, the step's wait and the staging
buffers' wait_writable, is the wait for the device; the rest of a step is the host's own work,
which bounds the step whenever it outlasts the device's), then one under cProfile, whose pstats
file goes to OUT_DIR/host_profile_bs<N>.prof with its listing by own and cumulative time
in host_profile_bs<N>.txt.
"""

from __future__ import annotations

import collections
import cProfile
import io
import logging
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_host_overhead import timed  # this script's folder is on sys.path

import atom.engine.core as core
import atom.engine.output_processor as output_processor
import atom.engine.scheduler as scheduler
import atom.executor.cuda_graphs as cuda_graphs
import atom.executor.model_runner as model_runner
import atom.executor.sampler as sampler
from atom.benchmarks.benchmark_latency import build_latency_parser, prompts_for
from atom.benchmarks.common import engine_args_from, start_engine
from atom.sampling_params import SamplingParams

TOKENS = 256
TOP = 40
# (owner, attribute) timed inclusively; module functions are wrapped where their callers look.
PHASES: list[tuple[Any, str]] = [
    (core.EngineCore, "step"),
    (scheduler.Scheduler, "schedule"),
    (scheduler.Scheduler, "update_from_output"),
    (output_processor.OutputProcessor, "process"),
    (model_runner.ModelRunner, "submit_model"),
    (model_runner.ModelRunner, "_update_states"),
    (model_runner, "build_step_inputs"),
    (model_runner.ModelRunner, "_fill_pending_inputs"),
    (model_runner, "build_sampling_metadata"),
    (model_runner.ModelRunner, "_forward"),
    (cuda_graphs.DecodeGraphs, "replay"),
    (cuda_graphs.DecodeGraphs, "replay_sample"),
    (sampler.Sampler, "forward"),
    (model_runner, "record_samples"),
    (torch.cuda.Event, "synchronize"),
]


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    out = Path(argv[0]) if argv and not argv[0].startswith("-") else None
    parser = build_latency_parser()
    parser.set_defaults(model="qwen3-0.6b", batch_sizes=[1, 8])
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="the throughput benchmark's is 0.6 (a draw)")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=TOKENS,
                        help="tokens per request (1: prefill steps only)")  # fmt: skip
    args = parser.parse_args(argv[1:] if out else argv)
    llm, startup = start_engine(engine_args_from(args))
    print(f"engine ready in {startup:.1f} s")
    totals: dict[str, float] = collections.defaultdict(float)
    steps = [0]
    plain_step = core.EngineCore.step

    def counted_step(self: core.EngineCore, *args: Any) -> Any:
        steps[0] += 1
        return plain_step(self, *args)

    core.EngineCore.step = counted_step  # type: ignore[method-assign]
    originals = [(owner, name, getattr(owner, name)) for owner, name in PHASES]
    try:
        for bs in args.batch_sizes:
            prompts = prompts_for(bs, args.input_len)
            params = SamplingParams(
                temperature=args.temperature, ignore_eos=True, max_tokens=args.max_tokens
            )
            llm.generate(prompts, params, use_tqdm=False)  # warm
            steps[0] = 0
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            n = max(steps[0], 1)  # steps of one generate
            plain = 1e3 * (time.perf_counter() - start) / n
            for owner, name, fn in originals:
                label = f"{owner.__name__.rsplit('.', 1)[-1]}.{name}"
                setattr(owner, name, timed(fn, label, totals))
            totals.clear()
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            phased = 1e3 * (time.perf_counter() - start) / n
            for owner, name, fn in originals:
                setattr(owner, name, fn)
            phases = {k: 1e3 * v / n for k, v in totals.items()}
            waited = phases.get("Event.synchronize", 0.0)
            print(
                f"batch {bs:4d}, {n} steps: {plain:.3f} ms/step; with phase timers "
                f"{phased:.3f} ms/step, {waited:.3f} waiting on the device, "
                f"{phased - waited:.3f} host"
            )
            print("  " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
            profiler = cProfile.Profile()
            profiler.runcall(llm.generate, prompts, params, use_tqdm=False)
            if out is not None:
                text = io.StringIO()
                stats = pstats.Stats(profiler, stream=text)
                stats.sort_stats("tottime").print_stats(TOP)
                stats.sort_stats("cumulative").print_stats(TOP)
                out.mkdir(parents=True, exist_ok=True)
                (out / f"host_profile_bs{bs}.txt").write_text(text.getvalue())
                profiler.dump_stats(out / f"host_profile_bs{bs}.prof")
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
        core.EngineCore.step = plain_step  # type: ignore[method-assign]
        llm.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
