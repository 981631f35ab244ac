"""The Triton MLA kernels on CUDA at DeepSeek's shapes (kv_lora_rank 512, rope 64; 16 heads as
V2-Lite or V3 at TP 8, 128 as V3 at TP 1): bf16, fp16 and fp8 latents against the float32 torch
references, no host sync, CUDA-graph capture of a decode step, and a tiny DeepSeek end to end
(skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from atom.executor.forward_context import AttentionMetadata, ForwardContext, set_forward_context
from atom.kernels.attention_config import choose_num_splits
from atom.kernels.latent_cache import write_latent_cache, write_latent_cache_ref
from atom.kernels.mla_attention import (
    mla_latent_attention,
    mla_launch_config,
    mla_paged_attention,
)
from atom.kernels.mla_reference import (
    mla_latent_attention_ref,
    mla_paged_attention_ref,
)
from atom.layers.mla import MLAAttention
from tests.kernels.block_tables import query_start_loc, shuffled_block_tables

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"
RANK, ROPE, NOPE, V_DIM = 512, 64, 128, 128
SCALE = (NOPE + ROPE) ** -0.5
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
# (seq_len, q_len): decode rows, chunked prefill over a cached prefix, whole prompts, padding
MIXED = [(1, 1), (255, 1), (2049, 1), (700, 300), (1000, 129), (513, 513), (0, 0), (64, 1), (0, 1)]
LONG_DECODE = [(5000, 1), (1, 1), (0, 0), (3333, 1), (0, 1)]


def _i32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _inputs(seqs: list[tuple[int, int]], heads: int, block_size: int = 16, seed: int = 0) -> dict:
    """Random queries and latents (c_kv ~ a layernorm output), shuffled block ids, NaN in every
    slot no sequence owns."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    tables, num_blocks = shuffled_block_tables([s for s, _ in seqs], block_size, cpu_gen)
    tables = tables.to(DEVICE)
    cache = torch.full((1, num_blocks, block_size, 1, RANK + ROPE), float("nan"), device=DEVICE)
    for i, (seq_len, _) in enumerate(seqs):
        j = torch.arange(seq_len, device=DEVICE)
        slots = tables[i, j // block_size].long() * block_size + j % block_size
        rows = torch.randn(seq_len, RANK + ROPE, generator=gen, device=DEVICE)
        cache.view(-1, RANK + ROPE)[slots] = rows
    qsl = query_start_loc([q for _, q in seqs])
    return {
        "q_lat": torch.randn(qsl[-1], heads, RANK, generator=gen, device=DEVICE) * 0.5,
        "q_pe": torch.randn(qsl[-1], heads, ROPE, generator=gen, device=DEVICE),
        "cache": cache,
        "tables": tables,
        "seqs": seqs,
        "qsl": qsl,
    }


def _lens(inp: dict) -> list[int]:
    return [s for s, _ in inp["seqs"]]


def _kernel(inp: dict, dtype: torch.dtype, cache: torch.Tensor, **kw: object) -> torch.Tensor:
    return mla_latent_attention(
        inp["q_lat"].to(dtype), inp["q_pe"].to(dtype), cache, inp["tables"], _i32(_lens(inp)),
        _i32(inp["qsl"]), max(q for _, q in inp["seqs"]), max(_lens(inp)), SCALE, **kw,
    )  # fmt: skip


def _reference(inp: dict, dtype: torch.dtype, cache: torch.Tensor, **kw: object) -> torch.Tensor:
    """float32 on the kernel's inputs (queries rounded to dtype, the cache as stored)."""
    q_lat, q_pe = inp["q_lat"].to(dtype).float(), inp["q_pe"].to(dtype).float()
    return mla_latent_attention_ref(
        q_lat, q_pe, cache, inp["tables"], _lens(inp), inp["qsl"], SCALE, **kw
    ).float()


def _check(inp: dict, dtype: torch.dtype, **kw: object) -> None:
    cache = inp["cache"].to(dtype)
    out = _kernel(inp, dtype, cache, **kw)
    kw.pop("num_splits", None)
    expected = _reference(inp, dtype, cache.float(), **kw)
    torch.testing.assert_close(out.float(), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [16, 128, 5])  # V2-Lite / V3 at TP 8, V3 at TP 1, odd
def test_mixed_batch(dtype: torch.dtype, heads: int) -> None:
    _check(_inputs(MIXED, heads), dtype)


@pytest.mark.parametrize("num_splits", [None, 1, 7])
@pytest.mark.parametrize("heads", [16, 128])
def test_decode_split_kv(num_splits: int | None, heads: int) -> None:
    groups = mla_launch_config(1, heads).num_head_groups
    assert choose_num_splits(len(LONG_DECODE), groups, 1, 5000, 132) > 1  # None splits here
    _check(_inputs(LONG_DECODE, heads, seed=1), torch.bfloat16, num_splits=num_splits)


@pytest.mark.parametrize("block_size", [1, 32, 64])
def test_block_sizes(block_size: int) -> None:
    _check(_inputs(MIXED, 16, block_size=block_size, seed=2), torch.bfloat16)


@pytest.mark.parametrize("seqs", [MIXED, LONG_DECODE], ids=["mixed", "decode"])
def test_fp8_cache(seqs: list[tuple[int, int]]) -> None:
    inp = _inputs(seqs, 16, seed=3)
    cache8 = (inp["cache"] / 0.05).to(torch.float8_e4m3fn)
    out = _kernel(inp, torch.bfloat16, cache8, kv_scale=0.05)
    # The reference reads the same fp8 values back as stored * scale.
    expected = _reference(inp, torch.bfloat16, cache8, kv_scale=0.05)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_write_latent_cache(dtype: torch.dtype) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    # The layer's latent: a concatenation; here a strided view, 30 sigma / 0.05 clamps some fp8
    latent = (torch.randn(300, RANK + ROPE + 8, generator=gen, device=DEVICE) * 30)[:, 8:]
    latent = latent.to(torch.bfloat16 if dtype.itemsize == 1 else dtype)
    slots = torch.randperm(40 * 16, generator=gen, device=DEVICE)[:300]
    slots[::7] = -1
    expected = torch.full((1, 40, 16, 1, RANK + ROPE), 7.0, device=DEVICE).to(dtype)
    cache = expected.clone()
    write_latent_cache_ref(latent, expected, slots, 0.05)
    write_latent_cache(latent, cache, slots, 0.05)
    as_bits = torch.uint8 if dtype.itemsize == 1 else dtype
    assert torch.equal(cache.view(as_bits), expected.view(as_bits))


def _layer_inputs(
    heads: int, tokens: int, seed: int, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, nope + rope] and kv_b_proj's weight [H * (nope + v), rank], O(1) scores."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(tokens, heads, NOPE + ROPE, generator=gen, device=DEVICE)
    w_kv_b = torch.randn(heads * (NOPE + V_DIM), RANK, generator=gen, device=DEVICE) * RANK**-0.5
    return q.to(dtype), w_kv_b.to(dtype)


@pytest.mark.parametrize("seqs", [MIXED, LONG_DECODE], ids=["mixed", "decode"])
def test_absorbed_matches_layer_reference(seqs: list[tuple[int, int]]) -> None:
    """W_UK, the kernel, W_UV in bf16 against the CPU path in float32 (expanded prefills)."""
    inp = _inputs(seqs, 16, seed=5)
    q, w_kv_b = _layer_inputs(16, inp["qsl"][-1], seed=6)
    cache = inp["cache"].bfloat16()
    lens = _lens(inp)
    out = mla_paged_attention(
        q, cache, inp["tables"], _i32(lens), _i32(inp["qsl"]), max(q for _, q in seqs),
        max(lens), w_kv_b, NOPE, V_DIM, SCALE,
    )  # fmt: skip
    expected = mla_paged_attention_ref(
        q.float(), cache.float(), inp["tables"], lens, inp["qsl"], w_kv_b.float(), NOPE, V_DIM,
        SCALE,
    )  # fmt: skip
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def _decode_layer(batch: int, max_seq_len: int, seed: int) -> tuple[MLAAttention, dict]:
    """A 16-head layer, its cache, and one decode step's static inputs (lengths up to
    max_seq_len, row 2 a padding row) for the layer's forward."""
    num_blocks = batch * max_seq_len // 16 + 8
    layer = MLAAttention(16, RANK, NOPE, ROPE, V_DIM, SCALE)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    layer.kv_cache = torch.randn(
        layer.kv_cache_shape(num_blocks, 16), generator=gen, device=DEVICE
    ).bfloat16()
    q, w_kv_b = _layer_inputs(16, batch, seed)
    static = {
        "q": q,
        "latent": torch.randn(batch, RANK + ROPE, device=DEVICE).bfloat16(),
        "w_kv_b": w_kv_b,
        "tables": torch.zeros(batch, max_seq_len // 16, dtype=torch.int32, device=DEVICE),
        "lens": torch.zeros(batch, dtype=torch.int32, device=DEVICE),
        "slots": torch.zeros(batch, dtype=torch.int64, device=DEVICE),
    }
    _refill(static, num_blocks, max_seq_len, gen)
    return layer, static


def _refill(static: dict, num_blocks: int, max_seq_len: int, gen: torch.Generator) -> None:
    """New values in every input buffer, in place."""
    batch = static["lens"].shape[0]
    static["q"].copy_(torch.randn(static["q"].shape, generator=gen, device=DEVICE))
    static["latent"].copy_(torch.randn(static["latent"].shape, generator=gen, device=DEVICE))
    lens = torch.randint(1, max_seq_len + 1, (batch,), generator=gen, device=DEVICE)
    lens[2] = 0
    perm = torch.randperm(num_blocks, generator=gen, device=DEVICE)
    tables = perm[: static["tables"].numel()].view(static["tables"].shape).to(torch.int32)
    pos = (lens - 1).clamp(min=0)
    slots = tables.gather(1, (pos // 16).unsqueeze(1)).squeeze(1).long() * 16 + pos % 16
    slots[2] = -1
    static["tables"].copy_(tables)
    static["lens"].copy_(lens.to(torch.int32))
    static["slots"].copy_(slots)


def _step(layer: MLAAttention, s: dict, max_seq_len: int) -> torch.Tensor:
    batch = s["lens"].shape[0]
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE)
    meta = AttentionMetadata(s["slots"], s["tables"], s["lens"], qsl, [], [], 1, max_seq_len)
    with set_forward_context(ForwardContext([], meta)):
        return layer(s["q"], s["latent"], s["w_kv_b"])


def test_layer_decode_does_not_sync() -> None:
    layer, static = _decode_layer(4, 8192, seed=7)
    _step(layer, static, 8192)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(layer, static, 8192)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("max_seq_len", [64, 8192])  # single pass, then split-KV
def test_cuda_graph_replay_matches_eager(max_seq_len: int) -> None:
    """The layer's decode step (cache write, W_UK, kernel, W_UV) captured once and replayed over
    new inputs in the same buffers gives the eager result bit for bit."""
    batch = 4
    layer, static = _decode_layer(batch, max_seq_len, seed=8)
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    num_blocks = layer.kv_cache.shape[1]
    _step(layer, static, max_seq_len)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _step(layer, static, max_seq_len)
    for _ in range(3):
        _refill(static, num_blocks, max_seq_len, gen)
        graph.replay()
        replayed = out.clone()
        eager = _step(layer, static, max_seq_len)  # rewrites the same slots with the same rows
        torch.testing.assert_close(replayed, eager, atol=0, rtol=0)
        assert torch.equal(replayed[2], torch.zeros_like(replayed[2]))


@pytest.mark.parametrize("name", ["v2-lite", "v3"])
def test_deepseek_float32_greedy_matches_hf(name: str, tmp_path: Path) -> None:
    """The tiny DeepSeek checkpoints of tests/models on CUDA (the kernel for every attention
    row, chunked prefills and prefix hits included) against HF on the CPU."""
    from tests.models.oracle import atom_greedy, atom_llm, hf_greedy, load_hf
    from tests.models.test_deepseek import CONFIGS, _prompts

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(CONFIGS[name]).save_pretrained(tmp_path)
    expected = hf_greedy(load_hf(tmp_path), _prompts(1))
    for kwargs in ({}, {"max_num_batched_tokens": 16, "long_prefill_token_threshold": 7}):
        llm = atom_llm(tmp_path, device="cuda", dtype="float32", **kwargs)
        assert atom_greedy(llm, _prompts(1)) == expected
