"""Roofline byte formulas, checked on the Llama-3.1-8B numbers of peer_latency.py and against the
parameters transformers builds for each benchmark config."""

from __future__ import annotations

import pytest
import torch
import transformers

from atom.benchmarks.model_dirs import CONFIGS_DIR, benchmark_model_names
from atom.benchmarks.roofline import (
    kv_bytes_per_step,
    measure_copy_bandwidth,
    measure_matmul_flops,
    parameter_count,
    weight_bytes_streamed,
    workload_seconds,
)

LLAMA31_8B_PARAMS = 8_030_261_248  # peer_latency.py's n_params


def _config(name: str) -> transformers.PretrainedConfig:
    return transformers.AutoConfig.from_pretrained(CONFIGS_DIR / name)


def test_llama31_8b_matches_the_peer_script() -> None:
    config = _config("llama-3.1-8b")
    assert parameter_count(config) == LLAMA31_8B_PARAMS
    emb = 128256 * 4096 * 2
    assert weight_bytes_streamed(config) == LLAMA31_8B_PARAMS * 2 - emb == 15_009_849_344
    assert weight_bytes_streamed(config, dtype_bytes=4) == 2 * 15_009_849_344
    for bs in (1, 8, 32, 128):
        peer = bs * (128 + 144) * 32 * 2 * 8 * 128 * 2
        assert kv_bytes_per_step(config, bs, 128 + (16 + 272) / 2, 2) == peer
    assert kv_bytes_per_step(config, 1, 272, 1) == 272 * 32 * 2 * 8 * 128


def test_tied_embedding_is_streamed_once_as_the_lm_head() -> None:
    config = _config("qwen3-0.6b")
    assert parameter_count(config) == 596_049_920
    assert weight_bytes_streamed(config) == 596_049_920 * 2  # nothing subtracted
    untied = _config("qwen3-8b")
    assert weight_bytes_streamed(untied) == (parameter_count(untied) - 151936 * 4096) * 2


@pytest.mark.parametrize("name", benchmark_model_names())
def test_formula_matches_transformers_and_module_count(name: str) -> None:
    config = _config(name)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == parameter_count(config)
    assert weight_bytes_streamed(model) == weight_bytes_streamed(config, dtype_bytes=2)


def test_unknown_family_is_refused() -> None:
    config = transformers.GPT2Config()
    with pytest.raises(ValueError, match="gpt2"):
        weight_bytes_streamed(config)


def test_measurements_on_the_cpu() -> None:
    assert measure_copy_bandwidth("cpu", num_bytes=1 << 20, iters=3) > 0
    assert measure_matmul_flops("cpu", size=64, iters=3) > 0


def test_workload_seconds_by_hand() -> None:
    """One sequence, prompt 4, 3 output tokens: a prefill of 4 tokens, decode steps at contexts 5
    and 6; bytes bound the decode (a huge matmul rate), FLOPs the prefill."""
    config = _config("qwen3-0.6b")
    linear = parameter_count(config)  # tied: the embedding is the LM head's matmul
    pair = 4 * 16 * 128 * 28  # QK^T + PV FLOPs per (query, key) pair over the 28 layers
    kv = 28 * 2 * 8 * 128 * 2  # K and V bytes per token of context
    prefill, decode = workload_seconds(config, [4], [3], bandwidth=1e12, flops=1e20)
    assert prefill == pytest.approx((2 * linear * 4 + pair * 10) / 1e20)
    weights = weight_bytes_streamed(config)
    assert decode == pytest.approx((2 * weights + kv * (5 + 6)) / 1e12)
    _, compute_bound = workload_seconds(config, [4], [3], bandwidth=1e30, flops=1e12)
    assert compute_bound == pytest.approx((2 * 2 * linear + pair * (5 + 6)) / 1e12)


def test_workload_seconds_of_the_throughput_bench() -> None:
    """The nano-vllm bench on Qwen3-0.6B at an H200's measured rates: 3.9 s, ~34k tok/s (KV reads
    dominate: 256 sequences of ~1,000 tokens of context each step)."""
    from atom.benchmarks.benchmark_throughput import workload

    prompts, outputs = workload(256, 100, 1024, 100, 1024, 0)
    prefill, decode = workload_seconds(
        _config("qwen3-0.6b"), list(map(len, prompts)), outputs, 4.11e12, 760e12
    )
    assert prefill == pytest.approx(0.239, abs=1e-3)
    assert decode == pytest.approx(3.667, abs=1e-3)
