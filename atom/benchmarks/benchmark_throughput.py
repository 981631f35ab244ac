"""Offline throughput, the nano-vllm benchmark: `python -m atom.benchmarks.benchmark_throughput`.

The workload is the one `peer_bench.py` gives vLLM and SGLang: 256 token-id prompts of random ids
in [0, 10000] and U[100, 1024] tokens, max_tokens U[100, 1024], temperature 0.6, ignore_eos, drawn
from Python's `random` seeded with --seed (0) in the same order; one short warm-up generate
(3 tokens in, 8 out) before the timed one. Throughput is the planned output tokens over the
wall time of the timed generate (the peer's tok_per_s); start-up is reported separately. The
roofline of the workload (roofline.workload_seconds: prefill FLOPs at the matmul rate, each decode
step's weight + KV bytes at the copy bandwidth, both measured once the engine is ready) gives the
share of it reached; a MoE step reads the experts its live batch routes to (taken as uniform).
Takes every engine flag; the default model is the Qwen3-0.6B shape with random weights. With
--torch-profiler-dir the workload runs a second time under the profiler (not timed), its prompts'
prefix cache reset first so that it meets the timed run's steps; add
--mark-trace for module tags and per-graph capture traces (tools/parse_trace.py).
"""

from __future__ import annotations

import argparse
import logging
import random
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
from atom.benchmarks.model_cost import ModelCost
from atom.benchmarks.roofline import (
    engine_itemsizes,
    engine_model_cost,
    measure_device,
    workload_seconds,
)
from atom.process_age import seconds_since_process_start
from atom.sampling_params import SamplingParams

MAX_PROMPT_TOKEN_ID = 10000  # nano-vllm's randint(0, 10000)
PEER_MAX_MODEL_LEN = 4096  # what peer_bench.py gives vLLM (and nano-vllm's bench.py its engine)


def workload(
    num_seqs: int, min_in: int, max_in: int, min_out: int, max_out: int, seed: int
) -> tuple[list[list[int]], list[int]]:
    """Prompts and max_tokens, drawn exactly as nano-vllm's bench.py and peer_bench.py draw them:
    all prompts first (each its length, then its ids), then all output lengths."""
    for name, lo, hi in (("input", min_in, max_in), ("output", min_out, max_out)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name} lengths need 1 <= min <= max, got min={lo} max={hi}")
    rng = random.Random(seed)  # the same stream as random.seed(seed) + random.randint
    prompts = [
        [rng.randint(0, MAX_PROMPT_TOKEN_ID) for _ in range(rng.randint(min_in, max_in))]
        for _ in range(num_seqs)
    ]
    max_tokens = [rng.randint(min_out, max_out) for _ in range(num_seqs)]
    return prompts, max_tokens


def build_throughput_parser() -> argparse.ArgumentParser:
    parser = build_parser(
        __doc__, model="qwen3-0.6b", load_format="dummy", max_model_len=PEER_MAX_MODEL_LEN
    )
    group = parser.add_argument_group("workload (--seed seeds it and the engine)")
    group.add_argument("--num-seqs", type=int, default=256)
    group.add_argument("--min-input-len", type=int, default=100)
    group.add_argument("--max-input-len", type=int, default=1024)
    group.add_argument("--min-output-len", type=int, default=100)
    group.add_argument("--max-output-len", type=int, default=1024)
    group.add_argument("--temperature", type=float, default=0.6)
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    prompts, max_tokens = workload(
        args.num_seqs,
        args.min_input_len,
        args.max_input_len,
        args.min_output_len,
        args.max_output_len,
        args.seed,
    )
    engine_args = engine_args_from(args)
    device = engine_args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine_config = engine_args.create_engine_config()
    cost = engine_model_cost(engine_config)  # unsharded: before the engine starts TP here
    _, kv_itemsize = engine_itemsizes(engine_config)
    tp = engine_config.parallel.tensor_parallel_size  # tp devices of the measured rates each
    begin = time.perf_counter()
    llm, startup = start_engine(engine_args)
    since_start = seconds_since_process_start()
    print(f"engine ready in {startup:.1f} s ({since_start or 0:.1f} s since process start)")
    try:
        start = time.perf_counter()
        llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=8), use_tqdm=False)
        warmup = time.perf_counter() - start
        params = [
            SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=n)
            for n in max_tokens
        ]
        inputs = [{"prompt_token_ids": p} for p in prompts]
        start = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        wall = time.perf_counter() - begin
        # After start-up and the timed run, which it is no part of.
        bandwidth, flops = measure_device(device)
        if engine_args.torch_profiler_dir:  # the same workload again, traced (not timed)
            if not llm.reset_prefix_cache():  # as the timed run met it: no prompt cached yet
                raise RuntimeError("the prefix cache could not be reset: a request holds blocks")
            llm.start_profile()
            llm.generate(inputs, params, use_tqdm=False)
            llm.stop_profile()
            print(f"profiled a second run into {engine_args.torch_profiler_dir}")
        record = engine_record(llm, engine_args, args.model, args.tag)
    finally:
        llm.shutdown()
    roofline = _roofline(cost, kv_itemsize, prompts, max_tokens, bandwidth * tp, flops * tp)
    prompt_tokens = sum(map(len, prompts))
    planned = sum(max_tokens)
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    print(f"Total: {planned}tok, Time: {elapsed:.2f}s, Throughput: {planned / elapsed:.2f}tok/s")
    pct = 100 * roofline["roofline_s"] / elapsed
    print(f"roofline {roofline['roofline_s']:.2f} s: {pct:.1f}% of it reached")
    roofline["roofline_pct"] = round(pct, 1)
    return {
        "benchmark": "throughput",
        **record,
        "seqs": args.num_seqs,
        "prompt_tokens": prompt_tokens,
        "planned_out": planned,
        "generated": generated,
        "seconds": round(elapsed, 3),
        "tok_per_s": round(planned / elapsed, 1),  # the peer's figure
        "output_tok_per_s": round(generated / elapsed, 1),
        "total_tok_per_s": round((prompt_tokens + generated) / elapsed, 1),
        "startup_s": round(startup, 1),
        "process_start_to_ready_s": since_start and round(since_start, 1),
        "warmup_s": round(warmup, 2),
        "total_wall_incl_startup": round(wall, 1),
        "copy_GBps": round(bandwidth / 1e9, 1),
        "matmul_TFLOPs": round(flops / 1e12, 3),
        **roofline,
        **environment_info(record["device"]),
    }


def _roofline(
    cost: ModelCost,
    kv_itemsize: int,
    prompts: list[list[int]],
    max_tokens: list[int],
    bandwidth: float,
    flops: float,
) -> dict[str, Any]:
    lens = list(map(len, prompts))
    prefill, decode = workload_seconds(
        cost, lens, max_tokens, bandwidth, flops, kv_dtype_bytes=kv_itemsize
    )
    return {
        "roofline_prefill_s": round(prefill, 6),
        "roofline_decode_s": round(decode, 6),
        "roofline_s": round(prefill + decode, 6),
        "roofline_tok_per_s": round(sum(max_tokens) / (prefill + decode), 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_throughput_parser().parse_args(argv)
    record = run(args)
    emit(record, args.output_json)
    return record


if __name__ == "__main__":
    main()
