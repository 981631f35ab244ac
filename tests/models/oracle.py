"""The model tests' oracle: HF transformers on the same tiny checkpoint, greedy and in float32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor

from atom import LLM, SamplingParams

NEW_TOKENS = 32
KV_BYTES = 8 << 20  # a small KV cache: the CPU default takes seconds to zero-fill


def load_hf(checkpoint: Path, **kwargs: Any) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, **kwargs
    )
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def random_prompts(seed: int, lens: list[int], vocab: int = 256) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lens]


def hf_greedy(model: Any, prompts: list[list[int]]) -> list[list[int]]:
    outs = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                top_k=None,
                top_p=None,
                temperature=None,
            )
        outs.append(out[0, len(prompt) :].tolist())
    return outs


def atom_llm(checkpoint: Path, **kwargs: Any) -> LLM:
    kwargs.setdefault("kv_cache_memory_bytes", KV_BYTES)
    return LLM(str(checkpoint), skip_tokenizer_init=True, **kwargs)


def atom_greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    pool = llm.engine.scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks  # every block came back
    return [o.outputs[0].token_ids for o in outs]


def atom_logits(checkpoint: Path, prompt: list[int]) -> Tensor:
    """Prefill logits of one prompt straight through the model (no cache, no scheduler)."""
    model = atom_llm(checkpoint, enable_prefix_caching=False).engine.executor.model
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(prompt), torch.arange(len(prompt))))
