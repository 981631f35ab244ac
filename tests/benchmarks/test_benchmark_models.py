"""The benchmark model folders: exact checkpoint values through the engine's config layer, and a
stand-in tokenizer that decodes every id of the vocabulary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from atom.args import EngineArgs
from atom.benchmarks import model_dirs
from atom.benchmarks.model_dirs import (
    STAMP_FILE,
    benchmark_model_dir,
    benchmark_model_names,
    resolve_benchmark_model,
)
from atom.config import EngineConfig

QWEN3_COMMON: dict[str, Any] = dict(
    head_dim=128,
    num_key_value_heads=8,
    vocab_size=151936,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    attention_bias=False,
)
EXPECTED: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(
        QWEN3_COMMON,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        tie_word_embeddings=True,
    ),
    "qwen3-8b": dict(
        QWEN3_COMMON,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        tie_word_embeddings=False,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        hidden_act="silu",
    ),
}
ROPE = {
    "qwen3-0.6b": {"rope_type": "default", "rope_theta": 1000000},
    "qwen3-8b": {"rope_type": "default", "rope_theta": 1000000},
    "llama-3.1-8b": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
ARCH = {"qwen3-0.6b": "Qwen3ForCausalLM", "qwen3-8b": "Qwen3ForCausalLM"}
EOS = {"qwen3-0.6b": (151645, 151643), "qwen3-8b": (151645, 151643), "llama-3.1-8b": (128001,)}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("benchmark_models")


def _engine_config(model_dir: Path) -> EngineConfig:
    args = EngineArgs(model=str(model_dir), load_format="dummy", max_model_len=4096, device="cpu")
    return args.create_engine_config()


def test_names() -> None:
    assert benchmark_model_names() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_values_reach_the_engine(name: str, cache_dir: Path) -> None:
    config = _engine_config(benchmark_model_dir(name, cache_dir))
    hf = config.model.hf_config
    for key, value in EXPECTED[name].items():
        assert getattr(hf, key) == value, key
    assert getattr(hf, "head_dim", 128) == 128
    assert {k: v for k, v in hf.rope_parameters.items() if k in ROPE[name]} == ROPE[name]
    assert config.model.architecture == ARCH.get(name, "LlamaForCausalLM")
    assert config.model.eos_token_ids == EOS[name]
    assert config.model.load_format == "dummy"
    assert str(hf.dtype).removeprefix("torch.") == "bfloat16"  # the GPU dtype under --dtype auto


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_stand_in_tokenizer_covers_the_vocabulary(name: str, cache_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(benchmark_model_dir(name, cache_dir))
    vocab_size = EXPECTED[name]["vocab_size"]
    assert len(tokenizer) == vocab_size
    assert tokenizer.eos_token_id == EOS[name][0]
    assert tokenizer.decode([5, vocab_size - 1, 7], skip_special_tokens=True) == "t5 t7"
    assert tokenizer.encode("t5 t6", add_special_tokens=False) == [5, 6]


def test_cache_is_reused_and_refreshed(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = benchmark_model_dir("qwen3-0.6b", cache_dir)
    mtime = (first / "tokenizer.json").stat().st_mtime_ns
    assert benchmark_model_dir("qwen3-0.6b", cache_dir) == first
    assert (first / "tokenizer.json").stat().st_mtime_ns == mtime  # not rewritten
    stamp = (first / STAMP_FILE).read_text()
    monkeypatch.setattr(model_dirs, "RECIPE_VERSION", "test")
    assert benchmark_model_dir("qwen3-0.6b", cache_dir) == first
    assert (first / STAMP_FILE).read_text() != stamp  # rebuilt under the new recipe
    assert sorted(p.name for p in cache_dir.iterdir() if p.name.startswith(".")) == []


def test_resolve(cache_dir: Path, tmp_path: Path) -> None:
    assert resolve_benchmark_model("llama-3.1-8b", cache_dir) == str(cache_dir / "llama-3.1-8b")
    assert resolve_benchmark_model(str(tmp_path), cache_dir) == str(tmp_path)  # a path wins
    assert resolve_benchmark_model("org/some-hub-id", cache_dir) == "org/some-hub-id"
    assert resolve_benchmark_model(None, cache_dir) is None
    with pytest.raises(ValueError, match="unknown benchmark model"):
        benchmark_model_dir("qwen3-0.5b", cache_dir)
