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
