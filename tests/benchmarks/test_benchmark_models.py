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
        head_dim=128,  # hidden_size / num_attention_heads: transformers fills it in
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
    "qwen3-30b-a3b": dict(
        QWEN3_COMMON,
        num_key_value_heads=4,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
    ),
    "deepseek-v2-lite": dict(
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        vocab_size=102400,
        max_position_embeddings=163840,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        first_k_dense_replace=1,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        hidden_act="silu",
    ),
    "gpt-oss-20b": dict(
        hidden_size=2880,
        intermediate_size=2880,
        num_hidden_layers=24,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        num_local_experts=32,
        num_experts_per_tok=4,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * 12,
        vocab_size=201088,
        max_position_embeddings=131072,
        swiglu_limit=7.0,
        attention_bias=True,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=199999,
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
    "qwen3-30b-a3b": {"rope_type": "default", "rope_theta": 1000000},
    "deepseek-v2-lite": {
        "rope_type": "yarn",
        "rope_theta": 10000,
        "factor": 40,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
    },
    "gpt-oss-20b": {
        "rope_type": "yarn",
        "rope_theta": 150000,
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "original_max_position_embeddings": 4096,
    },
}
ARCH = {
    "qwen3-0.6b": "Qwen3ForCausalLM",
    "qwen3-8b": "Qwen3ForCausalLM",
    "llama-3.1-8b": "LlamaForCausalLM",
    "qwen3-30b-a3b": "Qwen3MoeForCausalLM",
    "deepseek-v2-lite": "DeepseekV2ForCausalLM",
    "gpt-oss-20b": "GptOssForCausalLM",
}
EOS = {
    "qwen3-0.6b": (151645, 151643),
    "qwen3-8b": (151645, 151643),
    "llama-3.1-8b": (128001,),
    "qwen3-30b-a3b": (151645, 151643),
    "deepseek-v2-lite": (100001,),
    "gpt-oss-20b": (200002, 199999, 200012),
}


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
    assert {k: v for k, v in hf.rope_parameters.items() if k in ROPE[name]} == ROPE[name]
    assert config.model.architecture == ARCH[name]
    assert getattr(hf, "quantization_config", None) is None  # bf16 experts: MXFP4 not yet
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
