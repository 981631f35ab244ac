"""The decode fast paths change no greedy token: small-batch linear layers through gemv.py's
kernel (against cuBLAS, ATOM_GEMV=0) and programmatic dependent launch (against plain launches,
ATOM_PDL=0); a float32 Llama with CUDA graphs at level 3, decode batches of 1-8 rows (run by
benchmarks/gpu_run.sh on the GPU machine; skipped elsewhere)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from atom import LLM, SamplingParams
from atom.kernels import launch, ops
from tests.gpu.conftest import SMALL_ENGINE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def checkpoint(save_random_model: Callable[[Any], Path]) -> Path:
    return save_random_model(
        transformers.LlamaConfig(
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=1000,
            max_position_embeddings=512,
        )
    )


def _tokens(checkpoint: Path) -> list[list[int]]:
    llm = LLM(
        str(checkpoint),
        skip_tokenizer_init=True,
        dtype="float32",
        **SMALL_ENGINE,
    )
    try:
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        prompts = [{"prompt_token_ids": [1 + (5 * j + i) % 900 for j in range(3 + 7 * i)]}
                   for i in range(6)]  # fmt: skip
        outs = llm.generate(prompts, params, use_tqdm=False)
        outs += llm.generate(prompts[:1], params, use_tqdm=False)  # batch 1: the eager layers
        return [o.outputs[0].token_ids for o in outs]
    finally:
        llm.shutdown()


def test_gemv_changes_no_token(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    kernel = ops.small_batch_linear

    def counted(*args: object) -> torch.Tensor:
        if not launch._COMPILE_ONLY.get():  # not the start-up precompile's stand-in launches
            calls.append(1)
        return kernel(*args)

    monkeypatch.setattr(ops, "_GEMV", False)
    baseline = _tokens(checkpoint)
    monkeypatch.setattr(ops, "_GEMV", True)
    monkeypatch.setattr(ops, "small_batch_linear", counted)
    assert _tokens(checkpoint) == baseline
    assert calls, "the small-batch path never ran"


def test_pdl_changes_no_token(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm90")
    launches: list[bool] = []
    plain = launch.launch

    def counted(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
        # Real launches only: not the precompile's, not Dynamo's trace of a launcher.
        if not torch.compiler.is_dynamo_compiling() and not launch._COMPILE_ONLY.get():
            launches.append(bool(kwargs.get("PDL")))
        plain(kernel, grid, *args, **kwargs)

    for module in (ops._attention, ops._gemv, ops._norm, ops._rotary, ops._silu):
        monkeypatch.setattr(module, "launch", counted)
    monkeypatch.setattr(launch, "_PDL", False)
    baseline = _tokens(checkpoint)
    assert launches and not any(launches), "a launch used PDL with ATOM_PDL off"
    launches.clear()
    monkeypatch.setattr(launch, "_PDL", True)
    assert _tokens(checkpoint) == baseline
    assert any(launches), "no kernel was launched with PDL"
