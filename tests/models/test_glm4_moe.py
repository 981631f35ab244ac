"""Tiny random GLM-4-MoE checkpoints made with transformers: ATOM must match HF."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.models.oracle import (
    atom_greedy,
    atom_llm,
    atom_logits,
    hf_greedy,
    load_hf,
    random_prompts,
)

PROMPT_LENS = [1, 16, 17, 40]  # around the block size (16), and long


def _configs() -> dict[str, Any]:
    common: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        max_position_embeddings=512,
        initializer_range=0.2,  # well-separated logits and router scores: no near-ties
        tie_word_embeddings=False,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        n_shared_experts=1,
        first_k_dense_replace=1,  # layer 0 dense, layers 1-2 MoE
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        num_nextn_predict_layers=1,
        # rope on the first half of each head; the other half passes through
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
        },
    )
    return {
        "qk-norm": transformers.Glm4MoeConfig(**common, use_qk_norm=True, attention_bias=False),
        "qkv-bias": transformers.Glm4MoeConfig(**common, use_qk_norm=False, attention_bias=True),
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
        for name, param in model.named_parameters():
            if name.endswith("_proj.bias"):  # zero-initialised too: make the bias matter
                param.copy_(torch.randn_like(param) * 0.2)
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


def test_greedy_matches_hf(checkpoint: Path, expected: list[list[int]]) -> None:
    assert atom_greedy(atom_llm(checkpoint), _prompts(1)) == expected


# The engine settings change only which tokens share a step and which blocks are reused; one
# checkpoint keeps the run inside the CI budget.
@pytest.mark.parametrize("checkpoint", ["qk-norm"], indirect=True)
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


@pytest.mark.parametrize("checkpoint", ["qk-norm"], indirect=True)
def test_mtp_layer_in_checkpoint_loads(checkpoint: Path, hf_model: Any, tmp_path: Path) -> None:
    """The MTP layer (model.layers.{num_hidden_layers}.*) is skipped, not an error."""
    state = load_file(str(checkpoint / "model.safetensors"))
    num_layers = hf_model.config.num_hidden_layers
    hidden = hf_model.config.hidden_size
    mtp = {
        k.replace("model.layers.2.", f"model.layers.{num_layers}."): v.clone()
        for k, v in state.items()
        if k.startswith("model.layers.2.")
    }
    prefix = f"model.layers.{num_layers}"
    mtp[f"{prefix}.enorm.weight"] = torch.ones(hidden)
    mtp[f"{prefix}.hnorm.weight"] = torch.ones(hidden)
    mtp[f"{prefix}.eh_proj.weight"] = torch.zeros(hidden, 2 * hidden)
    mtp[f"{prefix}.embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    mtp[f"{prefix}.shared_head.norm.weight"] = torch.ones(hidden)
    mtp[f"{prefix}.shared_head.head.weight"] = state["lm_head.weight"].clone()
    shutil.copy(checkpoint / "config.json", tmp_path)
    save_file({**state, **mtp}, str(tmp_path / "model.safetensors"))
    prompt = _prompts(2)[4]
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(atom_logits(tmp_path, prompt), hf_logits, atol=1e-4, rtol=1e-4)
