"""Tiny random DeepSeek-V2 / V3 checkpoints made with transformers: ATOM must match HF."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from atom.kernels.mla_reference import mla_absorbed_ref, mla_expanded_ref
from atom.layers.mla import MLAAttention
from atom.model_source import load_hf_config, resolve_model
from atom.models.registry import get_model_class
from tests.models.oracle import (
    atom_greedy,
    atom_llm,
    atom_logits,
    hf_greedy,
    load_hf,
    random_prompts,
)

PROMPT_LENS = [1, 16, 17, 40]  # around the block size (16), and long
KV_LORA_RANK, ROPE_DIM = 32, 8


def _configs() -> dict[str, Any]:
    common: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        max_position_embeddings=512,
        initializer_range=0.2,  # well-separated logits and router scores: no near-ties
        tie_word_embeddings=False,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,  # layer 0 dense, layers 1-2 MoE
        kv_lora_rank=KV_LORA_RANK,
        qk_nope_head_dim=16,
        qk_rope_head_dim=ROPE_DIM,
        v_head_dim=16,
    )
    yarn = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,  # equal: the rope cache is unscaled, the softmax scale is not
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    }
    return {
        # V2-Lite: full-rank q_proj, greedy softmax routing.
        "v2-lite": transformers.DeepseekV2Config(**common, q_lora_rank=None),
        # V2: low-rank q, group-limited softmax routing, scaled routed output.
        "v2": transformers.DeepseekV2Config(
            **common,
            q_lora_rank=24,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
        ),
        # V3: sigmoid + bias grouped routing, yarn rope with mscale.
        "v3": transformers.DeepseekV3Config(
            **common,
            q_lora_rank=24,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            rope_parameters=yarn,
        ),
    }


CONFIGS = _configs()


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param])
    with torch.no_grad():  # HF initialises the bias to zero: make it steer the choice
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path


def _prompts(seed: int) -> list[list[int]]:
    prompts = random_prompts(seed, PROMPT_LENS)
    return [*prompts, prompts[-1][:33] + prompts[0]]  # a shared prefix: cache hits


@pytest.fixture(scope="module")
def hf_model(checkpoint: Path) -> Any:
    return load_hf(checkpoint)


@pytest.fixture(scope="module")
def expected(hf_model: Any) -> list[list[int]]:
    return hf_greedy(hf_model, _prompts(1))


def test_greedy_matches_hf_and_cache_is_latent(checkpoint: Path, expected: list[list[int]]) -> None:
    llm = atom_llm(checkpoint)
    attn = [m for m in llm.engine.executor.model.modules() if isinstance(m, MLAAttention)]
    assert len(attn) == 3
    for layer in attn:  # one c_kv | k_pe row per token, not per-head K and V
        _, num_blocks, block_size, _, _ = layer.kv_cache.shape
        assert layer.kv_cache.shape == (1, num_blocks, block_size, 1, KV_LORA_RANK + ROPE_DIM)
    assert atom_greedy(llm, _prompts(1)) == expected


# The engine settings change only which tokens share a step and which blocks are reused; one
# V2 and one V3 checkpoint keep the run inside the CI budget.
@pytest.mark.parametrize("checkpoint", ["v2-lite", "v3"], indirect=True)
@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {"enable_prefix_caching": False},
        {"max_num_batched_tokens": 16, "long_prefill_token_threshold": 7},  # tiny chunks
    ],
    ids=["no-prefix-cache", "chunked"],
)
def test_engine_settings_change_no_token(
    checkpoint: Path, expected: list[list[int]], engine_kwargs: dict[str, Any]
) -> None:
    assert atom_greedy(atom_llm(checkpoint, **engine_kwargs), _prompts(1)) == expected


def test_prefill_logits_match_hf(checkpoint: Path, hf_model: Any) -> None:
    prompt = _prompts(2)[3]
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(atom_logits(checkpoint, prompt), hf_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("checkpoint", ["v3"], indirect=True)
def test_mtp_layer_in_checkpoint_loads(checkpoint: Path, hf_model: Any, tmp_path: Path) -> None:
    """A V3 checkpoint's MTP layer (model.layers.{num_hidden_layers}.*) is skipped, not an error."""
    state = load_file(str(checkpoint / "model.safetensors"))
    num_layers = hf_model.config.num_hidden_layers
    hidden = hf_model.config.hidden_size
    mtp = {
        k.replace("model.layers.2.", f"model.layers.{num_layers}."): v.clone()
        for k, v in state.items()
        if k.startswith("model.layers.2.")
    }
    mtp[f"model.layers.{num_layers}.enorm.weight"] = torch.ones(hidden)
    mtp[f"model.layers.{num_layers}.hnorm.weight"] = torch.ones(hidden)
    mtp[f"model.layers.{num_layers}.eh_proj.weight"] = torch.zeros(hidden, 2 * hidden)
    mtp[f"model.layers.{num_layers}.shared_head.head.weight"] = state["lm_head.weight"].clone()
    shutil.copy(checkpoint / "config.json", tmp_path)
    save_file({**state, **mtp}, str(tmp_path / "model.safetensors"))
    prompt = _prompts(2)[4]
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(atom_logits(tmp_path, prompt), hf_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kv_len", [1, 7, 33])
def test_absorbed_decode_equals_expanded(kv_len: int) -> None:
    """Decode in the latent space (W_UK into q, W_UV after) equals up-projecting K/V."""
    gen = torch.Generator().manual_seed(kv_len)
    heads, nope, v_dim = 4, 16, 16
    q = torch.randn(heads, nope + ROPE_DIM, generator=gen)
    latents = torch.randn(kv_len, KV_LORA_RANK + ROPE_DIM, generator=gen)
    w_kv_b = torch.randn(heads * (nope + v_dim), KV_LORA_RANK, generator=gen) * 0.2
    expanded = mla_expanded_ref(q.unsqueeze(0), latents, w_kv_b, nope, v_dim, 0.1)[0]
    absorbed = mla_absorbed_ref(q, latents, w_kv_b, nope, v_dim, 0.1)
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("checkpoint", ["v3"], indirect=True)
def test_kimi_k2_config_needs_no_remote_code(checkpoint: Path, tmp_path: Path) -> None:
    """Kimi-K2 names a model_type of its own and an auto_map; it is DeepSeek-V3 in shape."""
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(
        model_type="kimi_k2",
        auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    )
    for f in checkpoint.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf_config = load_hf_config(resolve_model(str(tmp_path), "auto"))
    assert hf_config.architectures == ["DeepseekV3ForCausalLM"]
    assert get_model_class(hf_config.architectures[0]).__name__ == "DeepseekV3ForCausalLM"
