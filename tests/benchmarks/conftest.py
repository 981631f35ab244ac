"""Tiny config folders with stand-in tokenizers: the benchmarks run end to end in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from atom.benchmarks.model_dirs import write_stand_in_tokenizer

# Prompt ids of the throughput workload go up to 10000: the vocabulary must hold them.
TINY_VOCAB = 10240


def make_tiny_model(path: Path, config: transformers.PretrainedConfig) -> Path:
    config.save_pretrained(path)
    eos = int(config.eos_token_id)
    spec = {
        "special_tokens_start": eos,
        "special_tokens": {str(eos): "<eos>"},
        "eos_token": "<eos>",
    }
    write_stand_in_tokenizer(path, spec, config.vocab_size)
    return path


def _common() -> dict[str, object]:
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=4096,
        eos_token_id=TINY_VOCAB - 8,
    )


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = transformers.Qwen3Config(**_common(), tie_word_embeddings=True)
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), config)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    config = transformers.LlamaConfig(**_common(), rope_parameters=rope)
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), config)


def _moe_common() -> dict[str, object]:
    # 8 experts of intermediate 32, top 2; the dense MLPs keep intermediate_size
    return dict(_common(), moe_intermediate_size=32, num_experts_per_tok=2)


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = transformers.Qwen3MoeConfig(**_moe_common(), num_experts=8)
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen3-moe"), config)


@pytest.fixture(scope="session")
def tiny_deepseek_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MLA (latent cache) and routed + shared experts after one dense layer."""
    common = {k: v for k, v in _moe_common().items() if k != "head_dim"}
    config = transformers.DeepseekV2Config(
        **common,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        first_k_dense_replace=1,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
    )
    return make_tiny_model(tmp_path_factory.mktemp("tiny-deepseek-v2"), config)


@pytest.fixture(scope="session")
def tiny_gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Biased experts, attention sinks, a sliding layer (window 8) and a full one."""
    common = {k: v for k, v in _moe_common().items() if k != "moe_intermediate_size"}
    config = transformers.GptOssConfig(
        **dict(common, intermediate_size=32),
        num_local_experts=8,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )
    return make_tiny_model(tmp_path_factory.mktemp("tiny-gpt-oss"), config)
