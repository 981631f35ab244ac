"""The start-up precompile compiles every attention and gemv variant a run meets, and its eager
stand-ins the norm, SiLU and draw variants: after it, neither the CUDA-graph warm-up, the warm-up
requests nor a run with prefix hits compiles another (run by benchmarks/gpu_run.sh on the GPU
machine; skipped elsewhere)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from atom import LLM, SamplingParams
from atom.executor.model_runner import ModelRunner
from atom.kernels.gemv import _gemv_kernel
from atom.kernels.gemv_norm import _gemv_add_norm_kernel
from atom.kernels.gemv_rope import _gemv_rope_kernel
from atom.kernels.reshape_and_cache import _reshape_and_cache_kernel
from atom.kernels.rms_norm import _rms_norm_kernel
from atom.kernels.rotary import _rotary_embedding_kernel
from atom.kernels.sampling import _gumbel_argmax_kernel
from atom.kernels.silu_and_mul import _silu_and_mul_kernel
from atom.kernels.unified_attention import _reduce_splits_kernel, _unified_attention_kernel
from tests.gpu.conftest import SMALL_ENGINE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KERNELS = {
    "attention": _unified_attention_kernel,
    "reduce": _reduce_splits_kernel,
    "rotary": _rotary_embedding_kernel,
    "cache": _reshape_and_cache_kernel,
    "gemv": _gemv_kernel,
    "gemv_rope": _gemv_rope_kernel,
    "gemv_norm": _gemv_add_norm_kernel,
    "norm": _rms_norm_kernel,
    "silu": _silu_and_mul_kernel,
    "draw": _gumbel_argmax_kernel,
}


def _variants() -> dict[str, int]:
    return {
        name: sum(len(caches[0]) for caches in kernel.device_caches.values())
        for name, kernel in KERNELS.items()
    }


@pytest.fixture(scope="module", params=[96, 128], ids=["head96", "head128"])
def checkpoint(save_random_model: Callable[[Any], Path], request: pytest.FixtureRequest) -> Path:
    """Qwen3 (q/k norms in the rotary kernel) with a GQA group no other GPU test uses (3) and a
    head size none uses (96: its variants are compiled here first, not by an earlier test), or
    128, whose qkv projection takes the fused rotary-and-cache epilogue (kernels/gemv_rope.py)."""
    return save_random_model(
        transformers.Qwen3Config(
            hidden_size=288,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=request.param,
            vocab_size=1000,
            max_position_embeddings=1024,
        )
    )


def test_precompile_leaves_no_attention_variant_to_compile(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    joined: list[dict[str, int]] = []
    join = ModelRunner._join_precompile

    def counted(self: ModelRunner) -> None:
        started = self._precompile is not None
        join(self)
        if started:
            joined.append(_variants())

    monkeypatch.setattr(ModelRunner, "_join_precompile", counted)
    llm = LLM(
        str(checkpoint),
        skip_tokenizer_init=True,
        max_model_len=1024,
        **SMALL_ENGINE,
    )
    try:
        assert joined, "no precompile started"
        ready = _variants()
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        prompts = [[1 + (3 * j + i) % 900 for j in range(n)] for i, n in enumerate((5, 40, 300))]
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        # Prefix hits: queries of a few tokens after cached blocks, batched and alone.
        again = [{"prompt_token_ids": [*p, 7, 8, 9]} for p in prompts]
        llm.generate(again, params, use_tqdm=False)
        llm.generate(again[2:], params, use_tqdm=False)
        assert _variants() == ready == joined[0], (joined[0], ready, _variants())
    finally:
        llm.shutdown()
