"""The decode fast paths change no greedy token: small-batch linear layers through gemv.py's
kernel (against cuBLAS, ATOM_GEMV=0), the MLP's gate/up and SiLU in one launch
(ATOM_GEMV_SILU=1), rotary and the KV-cache write in the qkv projection's epilogue (against
ATOM_GEMV_ROPE=0), RMSNorm deferred into the GEMMs around it (ATOM_GEMV_NORM=0), x's tiles
through a descriptor at 1-16 rows (ATOM_GEMV_X_DESC_ROWS=16), its row-tiled regime past 16 rows
(a tile forced for every weight: the tuned table holds 16-bit tiles only) and programmatic
dependent launch (against plain launches, ATOM_PDL=0); a float32 Llama with CUDA graphs at level
3, decode batches of 1-8 rows and of 40 (run by benchmarks/gpu_run.sh on the GPU machine;
skipped elsewhere)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from atom import LLM, SamplingParams
from atom.kernels import launch, linear_ops, ops
from atom.kernels.gemv import MAX_M, MAX_TUNED_M, GemvConfig
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


def _tokens(checkpoint: Path, num_prompts: int = 6) -> list[list[int]]:
    engine = dict(SMALL_ENGINE)
    if num_prompts > engine["max_num_seqs"]:
        engine.update(max_num_seqs=48, cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32, 48])
    llm = LLM(str(checkpoint), skip_tokenizer_init=True, dtype="float32", **engine)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        prompts = [{"prompt_token_ids": [1 + (5 * j + i) % 900 for j in range(3 + 7 * (i % 6))]}
                   for i in range(num_prompts)]  # fmt: skip
        outs = llm.generate(prompts, params, use_tqdm=False)
        outs += llm.generate(prompts[:1], params, use_tqdm=False)  # batch 1: the eager layers
        return [o.outputs[0].token_ids for o in outs]
    finally:
        llm.shutdown()


def test_gemv_changes_no_token(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    kernel = linear_ops.small_batch_linear

    def counted(*args: object) -> torch.Tensor:
        if not launch._COMPILE_ONLY.get():  # not the start-up precompile's stand-in launches
            calls.append(1)
        return kernel(*args)

    monkeypatch.setattr(linear_ops, "_GEMV", False)
    baseline = _tokens(checkpoint)
    monkeypatch.setattr(linear_ops, "_GEMV", True)
    monkeypatch.setattr(linear_ops, "small_batch_linear", counted)
    assert _tokens(checkpoint) == baseline
    assert calls, "the small-batch path never ran"


def _gemv_launches_where(
    monkeypatch: pytest.MonkeyPatch,
    wanted: Callable[[dict[str, Any]], bool],
    module: Any = linear_ops._gemv,
) -> list[int]:
    """From now on, one entry per real launch of the module's kernels (gemv.py's by default; not
    the precompile's compile-only stand-ins) whose keyword arguments `wanted` accepts."""
    seen: list[int] = []
    plain = module.launch

    def recorded(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
        if wanted(kwargs) and not launch._COMPILE_ONLY.get():
            seen.append(1)
        plain(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(module, "launch", recorded)
    return seen


def test_gated_gemv_changes_no_token(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The MLP's gate/up GEMM and SiLU-and-mul in one gemv launch (ATOM_GEMV_SILU=1)."""
    monkeypatch.setattr(linear_ops, "_GEMV", False)
    baseline = _tokens(checkpoint)
    monkeypatch.setattr(linear_ops, "_GEMV", True)
    monkeypatch.setattr(linear_ops, "_GEMV_SILU", True)
    gated = _gemv_launches_where(monkeypatch, lambda kwargs: bool(kwargs.get("GATED")))
    assert _tokens(checkpoint) == baseline
    assert gated, "no gated gemv launch"


def test_x_through_a_descriptor_changes_no_token(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ATOM_GEMV_X_DESC_ROWS=16: x's tiles through a descriptor at 1-16 rows as well."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm90")
    monkeypatch.setattr(linear_ops, "_GEMV", False)
    baseline = _tokens(checkpoint)
    monkeypatch.setattr(linear_ops, "_GEMV", True)
    monkeypatch.setattr(linear_ops._gemv, "X_DESC_ROWS", MAX_M)
    x_desc = _gemv_launches_where(
        monkeypatch, lambda kwargs: bool(kwargs.get("X_DESC")) and kwargs.get("BLOCK_M") == MAX_M
    )
    assert _tokens(checkpoint) == baseline
    assert x_desc, "no launch of 1-16 rows took x through a descriptor"


def test_rope_epilogue_changes_no_token(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The qkv projection of 1-16 rows with rotary and the cache write in its epilogue
    (kernels/gemv_rope.py) against gemv, then rotary_and_cache."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm90")
    fused = _gemv_launches_where(monkeypatch, lambda kwargs: True, linear_ops._gemv_rope)
    monkeypatch.setattr(linear_ops._gemv_rope, "ROPE", "0")
    baseline = _tokens(checkpoint)
    assert not fused
    monkeypatch.setattr(linear_ops._gemv_rope, "ROPE", "1")
    assert _tokens(checkpoint) == baseline
    assert fused, "no qkv projection took the fused epilogue"


@pytest.mark.parametrize("gated", [False, True])
def test_deferred_norm_changes_no_token(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, gated: bool
) -> None:
    """RMSNorm at 1-16 rows in the GEMMs around it (kernels/gemv_norm.py): the residual add and
    the sums in o_proj's and down_proj's epilogue, the 1/rms in gate/up's (gated or not) and the
    qkv projection's, against the norm kernels apart (ATOM_GEMV_NORM=0)."""
    monkeypatch.setattr(linear_ops, "_GEMV_SILU", gated)
    fused = _gemv_launches_where(monkeypatch, lambda kwargs: True, linear_ops._gemv_norm)
    scaled = _gemv_launches_where(monkeypatch, lambda kwargs: bool(kwargs.get("ROW_SCALE")))
    monkeypatch.setattr(linear_ops, "_NORM", False)
    baseline = _tokens(checkpoint)
    assert not fused and not scaled
    monkeypatch.setattr(linear_ops, "_NORM", True)
    assert _tokens(checkpoint) == baseline
    assert fused and scaled, "no launch took the deferred norm"


def test_row_tiles_change_no_token(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode steps of 40 rows (the graph of 48) and any step of 17-256 tokens through the
    row-tiled kernel."""
    rows_tiled = []
    tile = GemvConfig(block_n=64, block_k=64, num_warps=4, num_stages=3, block_m=32)

    chosen = linear_ops._gemv.linear_config

    def forced(rows: int, weight: torch.Tensor, gated: bool = False) -> GemvConfig | None:
        if launch._COMPILE_ONLY.get():
            return None  # the precompile's stand-ins: the real launches compile it
        if MAX_M < rows <= MAX_TUNED_M:
            rows_tiled.append(rows)
            return tile
        return chosen(rows, weight, gated)

    monkeypatch.setattr(linear_ops, "_GEMV", False)
    baseline = _tokens(checkpoint, num_prompts=40)
    monkeypatch.setattr(linear_ops, "_GEMV", True)
    monkeypatch.setattr(linear_ops._gemv, "linear_config", forced)
    assert _tokens(checkpoint, num_prompts=40) == baseline
    assert 48 in rows_tiled, sorted(set(rows_tiled))


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

    for module in (
        ops._attention,
        linear_ops._gemv,
        linear_ops._gemv_rope,
        ops._norm,
        ops._rotary,
        ops._silu,
    ):
        monkeypatch.setattr(module, "launch", counted)
    monkeypatch.setattr(launch, "_PDL", False)
    baseline = _tokens(checkpoint)
    assert launches and not any(launches), "a launch used PDL with ATOM_PDL off"
    launches.clear()
    monkeypatch.setattr(launch, "_PDL", True)
    assert _tokens(checkpoint) == baseline
    assert any(launches), "no kernel was launched with PDL"
