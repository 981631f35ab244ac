"""MoE models on CUDA (eager: the torch expert loop syncs with the host): identical to HF."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from atom import LLM, SamplingParams
from tests.gpu.conftest import SMALL_ENGINE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

COMMON = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=512,
    max_position_embeddings=1024,
    initializer_range=0.2,
    tie_word_embeddings=False,
    num_experts_per_tok=2,
)
CONFIGS = {
    "qwen3-moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, intermediate_size=256, moe_intermediate_size=64, num_experts=8
    ),
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON, intermediate_size=64, num_local_experts=8
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_moe_float32_greedy_matches_hf(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]())
    hf.save_pretrained(tmp_path)
    hf = hf.cuda().eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (1, 17, 90)]
    llm = LLM(
        str(tmp_path), skip_tokenizer_init=True, device="cuda", dtype="float32", **SMALL_ENGINE
    )
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt], device="cuda"),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert out.outputs[0].token_ids == ref[0, len(prompt) :].tolist()
