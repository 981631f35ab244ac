"""MoE and MLA models on the CUDA fast path (fused MoE kernels in CUDA graphs, compiled pieces):
the tiny checkpoints of tests/models, greedy tokens identical to HF's on the CPU (float32), and
bf16 compiled close to bf16 eager."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

from tests.gpu.conftest import SMALL_ENGINE, unwarmed_sizes_change_no_token
from tests.models import test_deepseek, test_glm4_moe, test_gpt_oss, test_moe_models
from tests.models.oracle import atom_greedy, atom_llm, hf_greedy, load_hf, random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# name: (config, HF loading kwargs)
MODELS: dict[str, tuple[Any, dict[str, Any]]] = {
    "qwen3-moe": (test_moe_models.CONFIGS["qwen3-moe"], {}),
    "mixtral": (test_moe_models.CONFIGS["mixtral"], {}),
    "glm4-moe": (test_glm4_moe.CONFIGS["qkv-bias"], {}),
    "gpt-oss": (test_gpt_oss._config(), {"attn_implementation": "eager"}),  # sinks on the CPU
    "deepseek-v3": (test_deepseek.CONFIGS["v3"], {}),
}


def _prompts() -> list[list[int]]:
    prompts = random_prompts(1, [1, 5, 16, 17, 40, 71, 2, 9])
    return [*prompts, prompts[5][:33] + prompts[0]]  # a shared prefix: a cache hit


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(checkpoint, HF greedy tokens on the CPU in float32)."""
    config, hf_kwargs = MODELS[request.param]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # HF zero-initialises biases, sinks and correction biases
        for name, tensor in [*hf.named_parameters(), *hf.named_buffers()]:
            if name.endswith(("_bias", ".bias", ".sinks", "e_score_correction_bias")):
                tensor.normal_(0.0, 0.1 if "correction" in name else 0.5)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return path, hf_greedy(load_hf(path, **hf_kwargs), _prompts())


@pytest.mark.parametrize(
    "engine",
    # No mixed graphs: every step that is not decode-only runs eagerly, padded to its eager size
    # (executor/eager_steps.py: padding tokens through the routers and experts; MLA's unpadded).
    [{"level": 0}, {"level": 3}, {"level": 3, "mixed_graph_max_tokens": 0}],
    ids=["cuda-graphs", "level3-graphs", "eager-padded"],
)
def test_fast_path_greedy_matches_hf(model: tuple, engine: dict[str, Any]) -> None:
    path, expected = model
    llm = atom_llm(path, device="cuda", dtype="float32", **{**SMALL_ENGINE, **engine})
    assert llm.engine.executor.graphs is not None  # decode replays CUDA graphs
    assert atom_greedy(llm, _prompts()) == expected


def test_graphs_without_their_own_warmup_change_no_token(model: tuple) -> None:
    """The expert kernels' tiles of 24 and 32 rows inside graphs captured without their own
    warm-up forward (MLA models warm every size with one)."""
    unwarmed_sizes_change_no_token(model[0], 256, 0)


def test_bf16_fast_path_close_to_eager(model: tuple) -> None:
    """bf16, default level 3 with graphs, against the eager engine in bf16: Inductor's fusions
    round differently, so the first tokens agree (one near-tie may flip), and nothing fails.
    (A tiny random MoE in bf16 against float32 diverges within a few tokens: routing flips.)"""
    path, _ = model
    fast = atom_greedy(atom_llm(path, device="cuda", dtype="bfloat16", **SMALL_ENGINE), _prompts())
    eager_llm = atom_llm(path, device="cuda", dtype="bfloat16", enforce_eager=True)
    eager = atom_greedy(eager_llm, _prompts())
    same_first = sum(a[0] == b[0] for a, b in zip(fast, eager, strict=True))
    assert same_first >= len(fast) - 1, (fast, eager)
    # decode through the graphs too: a quarter of all tokens before the first difference
    prefix = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        for a, b in zip(fast, eager, strict=True)
    ]
    assert sum(prefix) >= sum(map(len, eager)) // 4, (fast, eager)
