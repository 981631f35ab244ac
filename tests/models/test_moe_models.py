"""Tiny random Qwen3-MoE and Mixtral checkpoints made with transformers: ATOM must match HF."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch import Tensor

from atom import LLM, SamplingParams
from atom.executor.loader import iter_safetensors, load_weights
from atom.models.registry import get_model_class

NEW_TOKENS = 32
PROMPT_LENS = [1, 5, 16, 17, 40, 71]
# A small KV cache: the CPU default takes seconds to zero-fill, for each LLM() of the test.
KV_BYTES = 8 << 20


def _configs() -> dict[str, Any]:
    common: dict[str, Any] = dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        max_position_embeddings=512,
        initializer_range=0.2,  # well-separated logits and router scores: no near-ties
        tie_word_embeddings=False,
        num_experts_per_tok=2,
    )
    return {
        # Layer 1 dense (mlp_only_layers), layers 0 and 2 sparse; top-k weights renormalised.
        "qwen3-moe": transformers.Qwen3MoeConfig(
            **common,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=8,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        ),
        # Every second layer sparse (decoder_sparse_step), raw softmax weights.
        "qwen3-moe-step2": transformers.Qwen3MoeConfig(
            **common,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=8,
            norm_topk_prob=False,
            decoder_sparse_step=2,
        ),
        "mixtral": transformers.MixtralConfig(**common, intermediate_size=32, num_local_experts=8),
    }


CONFIGS = _configs()


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, max_shard_size="100KB")  # sharded: experts split over files
    return path


@pytest.fixture(scope="module")
def hf_model(checkpoint: Path) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def _prompts(seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    return prompts + [prompts[-1][:33] + p for p in prompts[:3]]  # shared prefixes: cache hits


@pytest.fixture(scope="module")
def expected(hf_model: Any) -> list[list[int]]:
    """HF greedy continuations of _prompts(1), computed once for every engine setting."""
    outs = []
    for prompt in _prompts(1):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                top_k=None,
                top_p=None,
                temperature=None,
            )
        outs.append(out[0, len(prompt) :].tolist())
    return outs


def _atom_greedy(checkpoint: Path, prompts: list[list[int]], **kwargs: Any) -> list[list[int]]:
    llm = LLM(str(checkpoint), skip_tokenizer_init=True, kv_cache_memory_bytes=KV_BYTES, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    pool = llm.engine.scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks  # every block came back
    return [o.outputs[0].token_ids for o in outs]


# qwen3-moe-step2 differs from qwen3-moe only in which layers are sparse and in norm_topk_prob;
# its prefill logits cover that, and the generation runs stay within the CI time budget.
@pytest.mark.parametrize("checkpoint", ["qwen3-moe", "mixtral"], indirect=True)
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
    assert _atom_greedy(checkpoint, _prompts(1), **engine_kwargs) == expected


def _atom_logits(checkpoint: Path, prompt: list[int]) -> Tensor:
    llm = LLM(
        str(checkpoint),
        skip_tokenizer_init=True,
        enable_prefix_caching=False,
        kv_cache_memory_bytes=KV_BYTES,
    )
    model = llm.engine.executor.model
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(prompt), torch.arange(len(prompt))))


def _is_hub_gate_key(name: str, model_type: str) -> bool:
    if model_type == "mixtral":
        return ".block_sparse_moe.experts." in name and name.endswith(".w1.weight")
    return ".mlp.experts." in name and name.endswith(".gate_proj.weight")


def _per_expert_state_dict(state: dict[str, Tensor], model_type: str) -> dict[str, Tensor]:
    """transformers' stacked experts split into the hub's one-tensor-per-expert keys."""
    gate, up, down, block = ("w1", "w3", "w2", "block_sparse_moe")
    if model_type != "mixtral":
        gate, up, down, block = ("gate_proj", "up_proj", "down_proj", "mlp")
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        prefix = name.rsplit(".experts.", 1)[0].replace(".mlp", f".{block}")  # "...layers.N.mlp"
        if name.endswith(".experts.gate_up_proj"):
            for e, (g, u) in enumerate(zip(*tensor.chunk(2, dim=1), strict=True)):
                out[f"{prefix}.experts.{e}.{gate}.weight"] = g.clone()
                out[f"{prefix}.experts.{e}.{up}.weight"] = u.clone()
        elif name.endswith(".experts.down_proj"):
            for e, d in enumerate(tensor):
                out[f"{prefix}.experts.{e}.{down}.weight"] = d.clone()
        else:
            out[name.replace(".mlp.gate.", f".{block}.gate.")] = tensor
    return out


def test_prefill_logits_and_both_expert_layouts(
    checkpoint: Path, hf_model: Any, tmp_path: Path
) -> None:
    prompt = _prompts(2)[5]
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(_atom_logits(checkpoint, prompt), hf_logits, atol=1e-4, rtol=1e-4)
    # transformers 5 holds experts stacked (experts.gate_up_proj [E, 2I, H]); hub checkpoints
    # have one tensor per expert. Write both by hand: each must load to the same logits.
    model_type = hf_model.config.model_type
    stacked = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    num_sparse = sum(k.endswith(".experts.gate_up_proj") for k in stacked)
    assert num_sparse > 0
    per_expert = _per_expert_state_dict(stacked, model_type)
    assert sum(_is_hub_gate_key(k, model_type) for k in per_expert) == 8 * num_sparse
    for layout, state in [("stacked", stacked), ("per-expert", per_expert)]:
        path = tmp_path / layout
        path.mkdir()
        shutil.copy(checkpoint / "config.json", path)
        save_file(state, str(path / "model.safetensors"))
        logits = _atom_logits(path, prompt)
        torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=1e-4, msg=layout)


def test_missing_expert_is_an_error(checkpoint: Path) -> None:
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    model = get_model_class(config.architectures[0])(config, 64)
    dropped = next(k for k, _ in iter_safetensors(str(checkpoint)) if ".experts.3." in k)
    weights = ((k, t) for k, t in iter_safetensors(str(checkpoint)) if k != dropped)
    with pytest.raises(ValueError, match=r"experts\.w"):
        load_weights(model, weights)
