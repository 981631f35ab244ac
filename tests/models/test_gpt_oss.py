"""A tiny random GPT-OSS checkpoint made with transformers: ATOM must match HF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from atom import LLM, SamplingParams
from atom.executor.loader import iter_safetensors, load_weights
from atom.kernels.silu_and_mul import clamped_swiglu
from atom.models.registry import get_model_class
from tests.models.oracle import (
    KV_BYTES,
    NEW_TOKENS,
    atom_greedy,
    atom_llm,
    atom_logits,
    hf_greedy,
    load_hf,
    random_prompts,
)

PROMPT_LENS = [1, 5, 16, 17, 40, 71]


def _config() -> transformers.GptOssConfig:
    return transformers.GptOssConfig(
        hidden_size=64,
        num_hidden_layers=4,  # sliding, full, sliding, full
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        intermediate_size=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=8,  # prompts and generations run well past it
        max_position_embeddings=512,
        initializer_range=0.2,  # well-separated logits and router scores: no near-ties
        tie_word_embeddings=False,
        # The released config's YaRN, scaled down: 4096 * 32 -> 64 * 8 positions.
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 8.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 64,
        },
        attn_implementation="eager",  # the one HF path with sinks on the CPU
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config())
    with torch.no_grad():  # HF zero-initialises expert biases: make every bias and sink count
        for name, param in model.named_parameters():
            if name.endswith(("_bias", ".bias", ".sinks")):
                param.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("gpt-oss")
    model.save_pretrained(path, max_shard_size="100KB")  # sharded: experts split over files
    return path


def _prompts(seed: int) -> list[list[int]]:
    prompts = random_prompts(seed, PROMPT_LENS)
    return prompts + [prompts[-1][:33] + p for p in prompts[:3]]  # shared prefixes: cache hits


@pytest.fixture(scope="module")
def hf_model(checkpoint: Path) -> Any:
    return load_hf(checkpoint, attn_implementation="eager")  # HF's only CPU path with sinks


@pytest.fixture(scope="module")
def expected(hf_model: Any) -> list[list[int]]:
    return hf_greedy(hf_model, _prompts(1))


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {},
        {"enable_prefix_caching": False},
        {"max_num_batched_tokens": 16, "long_prefill_token_threshold": 7},  # tiny chunks
    ],
    ids=["default", "no-prefix-cache", "chunked"],
)
def test_greedy_matches_hf(
    checkpoint: Path, expected: list[list[int]], engine_kwargs: dict[str, Any]
) -> None:
    assert atom_greedy(atom_llm(checkpoint, **engine_kwargs), _prompts(1)) == expected


def test_tensor_parallel_matches_hf(checkpoint: Path, expected: list[list[int]]) -> None:
    # tp=2 on gloo: sinks split by head, experts by intermediate column (gate/up de-interleaved
    # per rank), the down bias added once before the all-reduce.
    llm = LLM(
        str(checkpoint),
        skip_tokenizer_init=True,
        kv_cache_memory_bytes=KV_BYTES,
        tensor_parallel_size=2,
    )
    try:
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        prompt = {"prompt_token_ids": _prompts(1)[4]}  # one prompt: worker startup dominates
        outs = llm.generate([prompt], params, use_tqdm=False)
    finally:
        llm.shutdown()
    assert outs[0].outputs[0].token_ids == expected[4]


def test_prefill_logits_match_hf(checkpoint: Path, hf_model: Any) -> None:
    prompt = _prompts(2)[5]
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(atom_logits(checkpoint, prompt), hf_logits, atol=1e-4, rtol=1e-4)


def test_clamped_swiglu_matches_hf(hf_model: Any) -> None:
    experts = hf_model.model.layers[0].mlp.experts
    gate_up = torch.randn(5, 64) * 6  # past the clamp limit on both sides
    expected = experts._apply_gate(gate_up)
    got = clamped_swiglu(gate_up[:, 0::2], gate_up[:, 1::2], experts.alpha, experts.limit)
    torch.testing.assert_close(got, expected)


def test_missing_sinks_and_mxfp4_are_errors(checkpoint: Path) -> None:
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    model = get_model_class(config.architectures[0])(config, 64)
    weights = ((k, t) for k, t in iter_safetensors(str(checkpoint)) if not k.endswith(".sinks"))
    with pytest.raises(ValueError, match=r"attn\.sinks"):
        load_weights(model, weights)
    mxfp4 = [("model.layers.0.mlp.experts.gate_up_proj_blocks", torch.zeros(1))]
    with pytest.raises(ValueError, match="MXFP4"):
        load_weights(model, mxfp4)
