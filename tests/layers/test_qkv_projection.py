"""Attention.project_and_attend, Llama's and Qwen3's qkv projection inside the attention op: with
the fused projection (rotary and the cache write in gemv's epilogue) taken on the CPU, through
its chain of references and through the Triton kernel in the interpreter, greedy tokens equal
those of the projection, then rotary_and_cache; projections the kernel cannot take fall back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from atom import LLM, SamplingParams
from atom.kernels import gemv_rope, linear_ops
from atom.layers.attention import Attention
from atom.layers.linear import QKVParallelLinear
from atom.layers.norm import RMSNorm
from atom.layers.rotary import RotaryEmbedding
from tests.conftest import tiny_llama_config

SIZES: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=256,
)


def _checkpoint(family: str, path: Path) -> Path:
    torch.manual_seed(0)
    if family == "llama":
        config = tiny_llama_config(head_dim=16)
    else:
        config = transformers.Qwen3Config(**SIZES, initializer_range=0.2, eos_token_id=1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _tokens(path: Path) -> list[list[int]]:
    llm = LLM(str(path), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        prompts = [{"prompt_token_ids": [3 + (7 * j + i) % 100 for j in range(4 + 9 * i)]}
                   for i in range(3)]  # fmt: skip
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("kernel", ["references", "triton"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fused_projection_changes_no_token(
    family: str, kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _checkpoint(family, tmp_path)
    baseline = _tokens(path)
    rows: list[int] = []
    ref = gemv_rope.gemv_rope_and_cache_ref
    fused = ref if kernel == "references" else gemv_rope.gemv_rope_and_cache

    def counted(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows.append(x.shape[0])
        return fused(x, *args, **kwargs)

    # What ops decides on CUDA, here: steps of 1-16 tokens (decodes, short prompts) fuse.
    monkeypatch.setattr(
        linear_ops,
        "fuses_qkv_rope",
        lambda x, w, d, r, neox: gemv_rope.fuses(x.shape[0], w, d, r, neox),
    )
    monkeypatch.setattr(gemv_rope, "gemv_rope_and_cache_ref", counted)
    assert _tokens(path) == baseline
    assert rows and max(rows) <= 16 and 3 in rows, rows  # the batch of three decodes


def _layer(bias: bool = False, norms: tuple[float, float] | None = None) -> Attention:
    qkv = QKVParallelLinear(32, 16, 4, 2, bias=bias)
    config = tiny_llama_config(head_dim=16)
    qk_norm = None if norms is None else (RMSNorm(16, norms[0]), RMSNorm(16, norms[1]))
    rope = RotaryEmbedding(config, 16, 64)
    return Attention(4, 16, 0.25, 2, rope=rope, qk_norm=qk_norm, qkv=qkv)


def test_what_fuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_ops, "fuses_qkv_rope", lambda *args: True)  # as on CUDA
    x = torch.zeros(2, 32)
    assert _layer().fuses_projection(x)
    assert _layer(norms=(1e-6, 1e-6)).fuses_projection(x)
    assert not _layer(bias=True).fuses_projection(x)  # a bias: the projection, then rotary
    assert not _layer(norms=(1e-6, 1e-5)).fuses_projection(x)  # norms of two eps
    assert not Attention(
        4, 16, 0.25, 2, qkv=QKVParallelLinear(32, 16, 4, 2, False)
    ).fuses_projection(x)
    with pytest.raises(ValueError, match="qkv projection"):
        Attention(4, 16, 0.25, 2).project_and_attend(x)
