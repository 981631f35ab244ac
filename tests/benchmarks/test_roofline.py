"""Roofline byte formulas, checked on the Llama-3.1-8B numbers of peer_latency.py, against the
parameters transformers builds for each benchmark config, and, for the dense families, against the
closed forms the roofline used before it counted ATOM's own modules (the peer's formulas)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

from atom.benchmarks.model_cost import model_cost
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
DENSE_MODELS = ("llama-3.1-8b", "qwen3-0.6b", "qwen3-8b")
DENSE_MODEL_TYPES = ("llama", "mistral", "qwen3")  # the closed form's families


def dense_parameter_count(config: Any) -> int:
    """The closed form for a dense Llama/Mistral/Qwen3 config (peer_latency.py's count), tied
    embeddings once: the check of model_cost on the dense families."""
    model_type = getattr(config, "model_type", "")
    if model_type not in DENSE_MODEL_TYPES:
        raise ValueError(f"dense_parameter_count knows {', '.join(DENSE_MODEL_TYPES)}")
    h, v, inter = config.hidden_size, config.vocab_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    attn = h * (q + 2 * kv) + q * h  # qkv_proj + o_proj
    if getattr(config, "attention_bias", False):
        attn += q + 2 * kv + h
    mlp = 3 * h * inter  # gate, up, down
    if getattr(config, "mlp_bias", False):
        mlp += 2 * inter + h
    norms = 2 * h + (2 * head_dim if model_type == "qwen3" else 0)  # Qwen3 adds q_norm, k_norm
    embeddings = v * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return config.num_hidden_layers * (attn + mlp + norms) + embeddings + h  # + final norm


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
    if name in DENSE_MODELS:  # transformers' experts are not ATOM's: all dense to module_cost
        assert parameter_count(config) == dense_parameter_count(config)
        assert weight_bytes_streamed(model) == weight_bytes_streamed(config, dtype_bytes=2)


def _closed_form_workload(
    config: transformers.PretrainedConfig,
    prompt_lens: list[int],
    output_lens: list[int],
    bandwidth: float,
    flops: float,
) -> tuple[float, float]:
    """workload_seconds as it was for dense configs (bf16 weights and KV), before model_cost."""
    head_dim = config.head_dim
    layers, q_dim = config.num_hidden_layers, config.num_attention_heads * head_dim
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    linear_params = dense_parameter_count(config) - embedding
    attention_per_pair = 4 * q_dim * layers
    prefill_flops = sum(
        2 * linear_params * n + attention_per_pair * n * (n + 1) / 2 for n in prompt_lens
    )
    weights = linear_params * 2
    per_token_kv = layers * 2 * config.num_key_value_heads * head_dim * 2
    decode = 0.0
    for step in range(1, max(output_lens)):
        live = [(p, o) for p, o in zip(prompt_lens, output_lens, strict=True) if o > step]
        context = sum(p + step for p, _ in live)
        step_flops = 2 * linear_params * len(live) + attention_per_pair * context
        decode += max((weights + per_token_kv * context) / bandwidth, step_flops / flops)
    return prefill_flops / flops, decode


@pytest.mark.parametrize("name", DENSE_MODELS)
def test_dense_models_keep_the_closed_forms(name: str) -> None:
    """One code path for every family: on a dense config it gives exactly the peer's numbers, the
    same weight bytes at every batch."""
    config = _config(name)
    cost = model_cost(config)
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    linear = dense_parameter_count(config) - embedding
    assert (cost.total_params, cost.active_params, cost.experts) == (linear + embedding, linear, ())
    for bs in (1, 8, 256):
        assert weight_bytes_streamed(config, batch=bs) == cost.weight_bytes(bs) == 2 * linear
        per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim
        assert kv_bytes_per_step(config, bs, 200.5, 2) == round(bs * 200.5 * per_token * 2)
    prompts, outputs = [5, 300, 17, 1024], [9, 1, 40, 33]
    for bandwidth, flops in ((4.11e12, 760e12), (1e12, 1e12), (1e15, 1e9)):
        expected = _closed_form_workload(config, prompts, outputs, bandwidth, flops)
        assert workload_seconds(config, prompts, outputs, bandwidth, flops) == expected
        assert workload_seconds(cost, prompts, outputs, bandwidth, flops) == expected


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
