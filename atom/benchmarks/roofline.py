"""The decode roofline: what a step must read from memory, and how fast this device reads.

A decode step streams the weights once (the input embedding excepted: its rows are gathered, one
per token) plus the KV cache of every sequence; at small batch that is the whole cost, so step
time >= (weight bytes + KV bytes) / copy bandwidth. A dense model reads all its weights at every
batch; a MoE reads the experts its batch routes to, more as the batch grows (model_cost.py counts
both from ATOM's own model class). For dense models the formulas are those of `peer_latency.py`
(the vLLM side of the comparison), so that both report the same percentage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from atom.benchmarks.model_cost import ModelCost, model_cost, module_cost


def measure_copy_bandwidth(
    device: torch.device | str, num_bytes: int | None = None, iters: int = 20
) -> float:
    """Bytes/s of a device-to-device copy, read plus write counted (as peer_latency.py: a 1 GiB
    uint8 copy on CUDA, the median of 20 timed with CUDA events); 64 MiB on the CPU."""
    dev = torch.device(device)
    n = num_bytes or (1 << 30 if dev.type == "cuda" else 64 << 20)
    seconds = _time_copy(n, dev, iters)
    _release_cached_memory(dev)  # the buffers died with _time_copy's frame
    return 2 * n / seconds


def measure_matmul_flops(
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    size: int | None = None,
    iters: int = 20,
) -> float:
    """FLOP/s of a square matmul: 8192^3 in bfloat16 on CUDA, 512^3 in float32 on the CPU."""
    dev = torch.device(device)
    on_cuda = dev.type == "cuda"
    dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
    n = size or (8192 if on_cuda else 512)
    seconds = _time_matmul(n, dtype, dev, iters if on_cuda else min(iters, 5))
    _release_cached_memory(dev)
    return 2 * n**3 / seconds


def engine_itemsizes(engine_config: Any) -> tuple[int, int]:
    """Bytes per weight and per KV-cache element of an engine's configuration."""
    from atom.executor.model_runner import kv_cache_torch_dtype  # the engine, only when asked

    return getattr(torch, engine_config.model.dtype).itemsize, kv_cache_torch_dtype(
        engine_config
    ).itemsize


def engine_model_cost(engine_config: Any) -> ModelCost:
    """The cost of an engine's model at its dtype, unsharded: call it before the engine starts
    (tensor parallelism shards the model built in this process afterwards)."""
    return model_cost(engine_config.model.hf_config, getattr(torch, engine_config.model.dtype))


def measure_device(device: str) -> tuple[float, float]:
    """Copy bandwidth (bytes/s) and matmul FLOP/s (1 GiB twice and three 8192^2 bf16 matrices
    on CUDA, ~2.4 GiB: they fit in the tenth of the memory an engine leaves at
    --gpu-memory-utilization 0.9, not beside one at 0.99)."""
    bandwidth = measure_copy_bandwidth(device)
    flops = measure_matmul_flops(device)
    print(f"copy bandwidth {bandwidth / 1e9:,.0f} GB/s, matmul {flops / 1e12:,.1f} TFLOP/s")
    return bandwidth, flops


def parameter_count(config: Any) -> int:
    """Parameters of ATOM's model for an HF config (any family it runs), tied embeddings once."""
    return model_cost(config).total_params


def weight_bytes_streamed(
    model_or_config: nn.Module | Any, dtype_bytes: int = 2, batch: int = 1
) -> int:
    """Weight bytes a decode step of `batch` sequences reads: every dense parameter except the
    input embedding (its rows are gathered, not streamed; tied embeddings are streamed once, as
    the LM head), and in each MoE layer the experts its tokens route to (model_cost's uniform
    routing: k experts at batch 1, nearly all at large batch). A dense model reads the same
    bytes at every batch.

    A module counts its own parameters at their own dtypes (a tensor-parallel rank's shards);
    a config counts ATOM's model for it at `dtype_bytes` (2 or 4) per unpinned parameter.
    """
    return _cost(model_or_config, dtype_bytes).weight_bytes(batch)


def kv_bytes_per_step(
    config: Any | ModelCost, batch: int, context_len: float, kv_dtype_bytes: int = 2
) -> int:
    """KV cache bytes one decode step reads: `context_len` tokens (the average over the timed
    steps) for each of `batch` sequences in every layer, at most its window in a sliding layer;
    K and V per token and head, or MLA's one latent row per token."""
    return round(batch * _cost(config).kv_bytes([context_len], kv_dtype_bytes))


def workload_seconds(
    config: Any | ModelCost,
    prompt_lens: list[int],
    output_lens: list[int],
    bandwidth: float,
    flops: float,
    dtype_bytes: int = 2,
    kv_dtype_bytes: int = 2,
) -> tuple[float, float]:
    """(prefill, decode) seconds under which no engine can run an offline workload: every prompt
    prefilled at the matmul rate (2 FLOPs per active parameter per token + causal attention),
    then every sequence decoding together, each step the slower of its bytes (the weights its
    live batch reads + the live sequences' KV) over the copy bandwidth and its FLOPs over the
    matmul rate. Every sequence runs at once (the throughput bench's 256 fit the default
    max_num_seqs); the first output token comes from the prefill. A ModelCost carries its own
    weight dtype; a config is counted at `dtype_bytes`."""
    cost = _cost(config, dtype_bytes)
    prefill_flops = sum(cost.prefill_flops(n) for n in prompt_lens)
    linear_per_token = 2 * cost.active_params
    decode = 0.0
    for step in range(1, max(output_lens, default=1)):  # decode step `step` makes token step + 1
        contexts = [p + step for p, o in zip(prompt_lens, output_lens, strict=True) if o > step]
        step_bytes = cost.weight_bytes(len(contexts)) + cost.kv_bytes(contexts, kv_dtype_bytes)
        step_flops = linear_per_token * len(contexts) + cost.attention_flops(contexts)
        decode += max(step_bytes / bandwidth, step_flops / flops)
    return prefill_flops / flops, decode


def _cost(model_or_config: nn.Module | ModelCost | Any, dtype_bytes: int = 2) -> ModelCost:
    if isinstance(model_or_config, ModelCost):
        return model_or_config
    if isinstance(model_or_config, nn.Module):
        return module_cost(model_or_config)
    return model_cost(model_or_config, dtype_bytes)


def _time_copy(num_bytes: int, device: torch.device, iters: int) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return _median_seconds(lambda: dst.copy_(src), device, iters)


def _time_matmul(n: int, dtype: torch.dtype, device: torch.device, iters: int) -> float:
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    return _median_seconds(lambda: torch.matmul(a, b, out=out), device, iters)


def _median_seconds(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """The upper median of `iters` timings after 3 warm-ups (peer_latency.py's sorted(ts)[10])."""
    for _ in range(3):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            for _ in range(iters):
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _release_cached_memory(device: torch.device) -> None:
    # Measured beside a running engine (benchmark_latency, benchmark_throughput): give the
    # buffers back at once rather than leaving them in the allocator's cache.
    if device.type == "cuda":
        torch.cuda.empty_cache()
