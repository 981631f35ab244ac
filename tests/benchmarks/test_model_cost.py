"""model_cost on tiny MoE and MLA configs, counted by hand, and on the benchmark MoE configs against
the published parameter counts."""

from __future__ import annotations

import pytest
import torch
import transformers

from atom.benchmarks.model_cost import AttentionGroup, ExpertLayer, model_cost
from atom.benchmarks.model_dirs import CONFIGS_DIR
from atom.benchmarks.roofline import (
    kv_bytes_per_step,
    parameter_count,
    weight_bytes_streamed,
    workload_seconds,
)

# hidden 64, 2 layers, 4 heads of 16, vocab 128 (untied: 8192 embedding + 8192 LM head), 8 experts
# of intermediate 32 (3 * 64 * 32 = 6144 parameters each), top 2.
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    intermediate_size=96,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def _qwen3_moe() -> transformers.PretrainedConfig:
    return transformers.Qwen3MoeConfig(
        **TINY,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        mlp_only_layers=[0],  # layer 0 keeps a dense MLP of intermediate_size
        architectures=["Qwen3MoeForCausalLM"],
    )


def _deepseek_v2() -> transformers.PretrainedConfig:
    tiny = {k: v for k, v in TINY.items() if k not in ("head_dim", "num_key_value_heads")}
    return transformers.DeepseekV2Config(
        **tiny,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        architectures=["DeepseekV2ForCausalLM"],
    )


def _gpt_oss() -> transformers.PretrainedConfig:
    tiny = {k: v for k, v in TINY.items() if k != "intermediate_size"}
    return transformers.GptOssConfig(
        **tiny,
        intermediate_size=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        architectures=["GptOssForCausalLM"],
    )


def _hf_params(config: transformers.PretrainedConfig) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return sum(p.numel() for p in model.parameters())


def test_qwen3_moe_by_hand() -> None:
    config = _qwen3_moe()
    cost = model_cost(config)
    attn = 64 * (64 + 2 * 32) + 64 * 64 + 2 * 16  # qkv_proj, o_proj, q_norm + k_norm
    layers = 2 * (attn + 2 * 64) + 3 * 64 * 96 + 64 * 8  # + norms; dense MLP; router
    assert cost.total_params == layers + 8 * 6144 + 2 * 8192 + 64 == _hf_params(config)
    assert cost.dense_params == layers + 8192 + 64  # the LM head and final norm; no embedding
    assert cost.experts == (ExpertLayer(8, 2, 6144, 2 * 6144),)
    assert cost.active_params == cost.dense_params + 2 * 6144
    dense_bytes = 2 * cost.dense_params
    assert cost.weight_bytes(1) == dense_bytes + 2 * 6144 * 2  # k experts
    assert weight_bytes_streamed(config, batch=2) == dense_bytes + round(3.5 * 6144 * 2)
    assert cost.weight_bytes(1000) == cost.max_weight_bytes == dense_bytes + 8 * 6144 * 2
    # K and V of 2 kv heads of 16 per layer; q.k and p.v of 4 heads of 16 per pair and layer.
    assert cost.attention == (AttentionGroup(None, 2, 2 * (2 * 2 * 16), 2 * (4 * 4 * 16)),)
    assert kv_bytes_per_step(config, 3, 10, 2) == 3 * 10 * 128 * 2


def test_deepseek_v2_mla_by_hand() -> None:
    """MLA caches one latent row (kv_lora_rank + rope dims) per token and layer; a pair costs the
    cheaper of absorbed (q.k over the row, p.v over the latent: 40 + 32) and expanded (nope + rope,
    then v: 16 + 8 + 16). The router is float32."""
    config = _deepseek_v2()
    cost = model_cost(config)
    # q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj
    attn = 64 * 4 * 24 + 64 * (32 + 8) + 32 + 32 * 4 * (16 + 16) + 4 * 16 * 64
    router, shared = 8 * 64, 3 * 64 * 32
    layers = 2 * (attn + 2 * 64) + 3 * 64 * 96 + router + shared
    assert cost.total_params == layers + 8 * 6144 + 2 * 8192 + 64 == _hf_params(config)
    assert cost.dense_params == layers + 8192 + 64
    assert cost.dense_bytes == 2 * cost.dense_params + 2 * router  # float32 router weights
    assert cost.experts == (ExpertLayer(8, 2, 6144, 2 * 6144),)
    assert cost.attention == (AttentionGroup(None, 2, 2 * 40, 2 * (2 * 4 * (16 + 8 + 16))),)
    assert kv_bytes_per_step(config, 2, 10, 1) == 2 * 10 * 80  # fp8 latents
    # float32 weights: the bf16 parameters double, the pinned router does not
    assert weight_bytes_streamed(config, dtype_bytes=4, batch=1) == (
        4 * cost.dense_params + 2 * 6144 * 4
    )


def test_gpt_oss_by_hand() -> None:
    """Biased experts count their biases; a sliding layer reads at most its window of keys."""
    config = _gpt_oss()
    cost = model_cost(config)
    expert = 64 * 2 * 32 + 2 * 32 + 32 * 64 + 64  # gate_up + bias, down + bias
    attn = 64 * 128 + 128 + 64 * 64 + 64  # biased qkv_proj, o_proj
    layers = 2 * (attn + 4 + 64 * 4 + 4 + 2 * 64)  # + sinks (float32), router + bias, norms
    assert cost.total_params == layers + 2 * 4 * expert + 2 * 8192 + 64 == _hf_params(config)
    assert cost.dense_bytes == 2 * cost.dense_params + 2 * 2 * 4  # the sinks are float32
    assert cost.experts == (ExpertLayer(4, 2, expert, 2 * expert),) * 2
    assert cost.weight_bytes(1) == cost.dense_bytes + 2 * 2 * expert * 2
    assert cost.weight_bytes(3) == cost.dense_bytes + round(2 * 4 * (1 - 0.5**3) * expert * 2)
    per_layer = 2 * 2 * 16
    assert cost.attention == (
        AttentionGroup(8, 1, per_layer, 4 * 4 * 16),
        AttentionGroup(None, 1, per_layer, 4 * 4 * 16),
    )
    # contexts 5 and 20: the full layer reads 25 tokens, the sliding one 5 + 8
    assert cost.kv_bytes([5, 20], 2) == per_layer * (25 + 13) * 2
    assert cost.attention_flops([5, 20]) == 256 * (25 + 13)
    # a prefill of 20: 210 causal pairs, 36 + 12 * 8 = 132 within the window
    assert cost.prefill_flops(20) == 2 * cost.active_params * 20 + 256 * (210 + 132)


def test_workload_reads_the_live_batchs_experts() -> None:
    """Two sequences decode together, then one alone: the first step reads the experts of a
    batch of 2, the second those of 1."""
    cost = model_cost(_qwen3_moe())
    kv = 128 * 2  # bytes per token of context
    _, decode = workload_seconds(cost, [4, 6], [3, 2], bandwidth=1e9, flops=1e30)
    step1 = cost.weight_bytes(2) + kv * (5 + 7)
    step2 = cost.weight_bytes(1) + kv * 6
    assert decode == pytest.approx((step1 + step2) / 1e9)
    prefill, _ = workload_seconds(cost, [4, 6], [3, 2], bandwidth=1e30, flops=1e9)
    pairs = 10 + 21
    assert prefill == pytest.approx((2 * cost.active_params * 10 + 512 * pairs) / 1e9)


def test_experts_read() -> None:
    layer = ExpertLayer(num_experts=128, top_k=8, expert_params=1, expert_bytes=2)
    assert layer.experts_read(1) == pytest.approx(8)
    assert layer.experts_read(2) == pytest.approx(128 * (1 - (120 / 128) ** 2))  # 15.5
    assert layer.experts_read(1024) == pytest.approx(128)
    with pytest.raises(ValueError, match="batch"):
        model_cost(_qwen3_moe()).weight_bytes(0)


# Published totals and actives (model cards). Qwen counts the input embedding among the active
# parameters (3.3B); OpenAI does not (3.61B), nor, within rounding, DeepSeek (2.4B).
PUBLISHED = {
    "qwen3-30b-a3b": (30.5e9, 3.3e9, True),
    "deepseek-v2-lite": (15.7e9, 2.4e9, False),
    "gpt-oss-20b": (20.91e9, 3.61e9, False),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_benchmark_moe_configs_build_on_meta(name: str) -> None:
    config = transformers.AutoConfig.from_pretrained(CONFIGS_DIR / name)
    cost = model_cost(config)
    total, active, with_embedding = PUBLISHED[name]
    assert cost.total_params == parameter_count(config)
    assert cost.total_params == pytest.approx(total, rel=0.01)
    embedding = config.vocab_size * config.hidden_size
    assert cost.active_params + with_embedding * embedding == pytest.approx(active, rel=0.03)
    assert cost.weight_bytes(1) < cost.weight_bytes(8) < cost.weight_bytes(128)
    assert cost.weight_bytes(128) <= cost.max_weight_bytes
