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
