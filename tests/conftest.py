"""Without a GPU, Triton kernels run in the Triton interpreter on CPU tensors.

Set before anything imports triton: `triton.jit` reads TRITON_INTERPRET when a kernel is defined.
Also the tiny random Llama the engine-level tests share (`tiny`, `tiny_llama_config`), and a
tiny Qwen3 shape (q/k norms, GQA) for tests that build the model in process (`tiny_qwen3_config`).
"""

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_llama_config(**overrides: Any) -> transformers.LlamaConfig:
    values: dict[str, Any] = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        initializer_range=0.2,
        eos_token_id=1,
        bos_token_id=0,
    )
    values.update(overrides)
    return transformers.LlamaConfig(**values)


def tiny_qwen3_config() -> transformers.Qwen3Config:
    return transformers.Qwen3Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=100,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of tiny_llama_config() with seed-0 weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    return path
