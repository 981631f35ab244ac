"""Decode latency against the roofline: `python -m atom.benchmarks.benchmark_latency`.

The method of `peer_latency.py` (the vLLM side): per batch size, prompts of 128 tokens
(`(7 * i + j) % 1000 + 1`), greedy, ignore_eos; a warm-up generate of 8 tokens, then the best of
2 generates of 16 tokens and the best of 2 of 272; one decode step = the difference / 256, so
prefill and fixed costs cancel. Achieved bandwidth = (streamed weight bytes + KV bytes of the
average context) / step time; the roofline percentage is against the copy bandwidth measured in
this process once the engine is ready (start-up, timed from the process's birth, holds only what
a user of the engine waits for). A MoE's weight bytes depend on the batch (the experts its
tokens route to, taken as uniform: model_cost.py), so each batch size records its own.
Default: the Llama-3.1-8B shape with random weights. With --torch-profiler-dir, after the timed
runs, each batch size generates PROFILE_TOKENS tokens once more under the profiler (a prefill and
PROFILE_TOKENS - 1 decode steps, not timed): one trace per batch size, whose decode steps show
where a step's time goes against the roofline.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch

from atom.benchmarks.common import (
    build_parser,
    emit,
    engine_args_from,
    engine_record,
    environment_info,
    start_engine,
)
from atom.benchmarks.roofline import (
    engine_itemsizes,
    engine_model_cost,
    kv_bytes_per_step,
    measure_device,
)
from atom.process_age import seconds_since_process_start
from atom.sampling_params import SamplingParams

WARMUP_TOKENS = 8
PROFILE_TOKENS = 32  # tokens per traced batch: enough decode steps to average, a small trace


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.replace(" ", "").split(",") if v]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,8,32, got {text!r}")
    return values


def build_latency_parser() -> argparse.ArgumentParser:
    parser = build_parser(__doc__, model="llama-3.1-8b", load_format="dummy", max_model_len=4096)
    group = parser.add_argument_group("workload")
    group.add_argument(
        "--batch-sizes", type=int_list, default=[1, 8, 32, 128], help="default: 1,8,32,128"
    )
    group.add_argument("--input-len", type=int, default=128, help="prompt tokens per sequence")
    group.add_argument(
        "--output-lens",
        type=int_list,
        default=[16, 272],
        help="short,long max_tokens (default: 16,272); a step is the time difference over "
        "long - short",
    )
    group.add_argument("--num-iters", type=int, default=2, help="timed runs per length (best)")
    return parser


def prompts_for(batch: int, input_len: int) -> list[dict[str, list[int]]]:
    return [
        {"prompt_token_ids": [(7 * i + j) % 1000 + 1 for j in range(input_len)]}
        for i in range(batch)
    ]


def time_decode_step(
    llm: Any, batch: int, input_len: int, short: int, long: int, iters: int, device: str
) -> float:
    """Seconds per decode step at `batch` sequences: (best long run - best short run) / steps."""
    prompts = prompts_for(batch, input_len)

    def run(max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    run(min(WARMUP_TOKENS, short))
    t_short = min(run(short) for _ in range(iters))
    t_long = min(run(long) for _ in range(iters))
    return (t_long - t_short) / (long - short)


def profile_decode(llm: Any, batch: int, input_len: int) -> None:
    """One traced generate of PROFILE_TOKENS tokens at `batch` sequences (not timed)."""
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=PROFILE_TOKENS)
    llm.start_profile()
    try:
        llm.generate(prompts_for(batch, input_len), params, use_tqdm=False)
    finally:
        llm.stop_profile()
    print(f"batch {batch:4d}: profiled {PROFILE_TOKENS} tokens")


def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    short, long = _check_lengths(args)
    engine_args = engine_args_from(args)
    device = engine_args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine_config = engine_args.create_engine_config()
    cost = engine_model_cost(engine_config)  # unsharded: before the engine starts TP here
    _, kv_itemsize = engine_itemsizes(engine_config)
    llm, startup = start_engine(engine_args)
    since_start = seconds_since_process_start()
    print(f"engine ready in {startup:.1f} s ({since_start or 0:.1f} s since process start)")
    try:
        bandwidth, flops = measure_device(device)  # after start-up, which it is no part of
        context = args.input_len + (short + long) / 2  # the average context of the timed steps
        # Tensor parallelism splits the bytes over tp devices of the measured bandwidth each.
        roofline_bandwidth = bandwidth * llm.config.parallel.tensor_parallel_size
        record: dict[str, Any] = {
            "benchmark": "latency",
            **engine_record(llm, engine_args, args.model, args.tag),
            "copy_GBps": round(bandwidth / 1e9, 1),
            "matmul_TFLOPs": round(flops / 1e12, 3),
            "startup_s": round(startup, 1),
            "process_start_to_ready_s": since_start and round(since_start, 1),
            "input_len": args.input_len,
            "output_lens": [short, long],
            "params_total": cost.total_params,
            "params_active": cost.active_params,
            "weight_bytes": cost.max_weight_bytes,  # every expert: a dense model's at any batch
            "kv_dtype_bytes": kv_itemsize,
            "avg_context_len": context,
        }
        for bs in args.batch_sizes:
            step = time_decode_step(llm, bs, args.input_len, short, long, args.num_iters, device)
            weight_bytes = cost.weight_bytes(bs)
            kv_bytes = kv_bytes_per_step(cost, bs, context, kv_itemsize)
            record |= _batch_record(bs, step, weight_bytes + kv_bytes, roofline_bandwidth)
            record[f"bs{bs}_weight_bytes"] = weight_bytes
            record[f"bs{bs}_kv_bytes"] = kv_bytes
        if engine_args.torch_profiler_dir:
            for bs in args.batch_sizes:
                profile_decode(llm, bs, args.input_len)
    finally:
        llm.shutdown()
    return record | environment_info(record["device"])


def _batch_record(bs: int, step: float, step_bytes: int, bandwidth: float) -> dict[str, float]:
    achieved = step_bytes / step
    pct = 100 * achieved / bandwidth
    print(
        f"batch {bs:4d}: {step * 1e3:8.3f} ms/step, {bs / step:10.1f} tok/s, "
        f"{achieved / 1e9:8.1f} GB/s, {pct:5.1f}% of roofline"
    )
    return {
        f"bs{bs}_ms_per_step": round(step * 1e3, 3),
        f"bs{bs}_tok_s": round(bs / step, 1),
        f"bs{bs}_achieved_GBps": round(achieved / 1e9, 1),
        f"bs{bs}_roofline_pct": round(pct, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_latency_parser().parse_args(argv)
    record = run_latency(args)
    emit(record, args.output_json)
    return record


def _check_lengths(args: argparse.Namespace) -> tuple[int, int]:
    if len(args.output_lens) != 2 or args.output_lens[0] >= args.output_lens[1]:
        raise ValueError(
            f"--output-lens needs short,long with short < long, got {args.output_lens}"
        )
    if args.input_len < 1:
        raise ValueError(f"--input-len must be >= 1, got {args.input_len}")
    if args.num_iters < 1:
        raise ValueError(f"--num-iters must be >= 1, got {args.num_iters}")
    return args.output_lens[0], args.output_lens[1]


if __name__ == "__main__":
    main()
