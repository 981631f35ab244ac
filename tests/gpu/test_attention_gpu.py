"""The Triton unified attention kernel on CUDA: bf16, fp16 and fp8 KV against the float32 torch
reference at realistic sizes, and CUDA-graph capture of the decode call (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from atom.kernels.attention_config import DESC_PROGRAMS_PER_SM, choose_num_splits, launch_config
from atom.kernels.paged_attention import paged_attention_ref
from atom.kernels.unified_attention import _unified_attention_kernel, unified_attention
from tests.kernels.descriptors import record_descriptors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BLOCK = 16
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
# (seq_len, q_len): decode rows, chunked prefill over a cached prefix, whole prompts, padding
MIXED = [(1, 1), (255, 1), (2049, 1), (700, 300), (1000, 129), (513, 513), (0, 0), (64, 1)]


def _inputs(
    seqs: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, seed: int = 0
) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = [-(-s // BLOCK) for s, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 9
    perm = torch.randperm(num_blocks, generator=gen, device="cuda").to(torch.int32)
    tables = torch.zeros(len(seqs), max(blocks_per_seq) + 3, dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = perm[used : used + n]
        used += n
    qsl = [0]
    for _, q_len in seqs:
        qsl.append(qsl[-1] + q_len)
    return {
        "query": torch.randn(qsl[-1], heads, head_dim, generator=gen, device="cuda"),
        "cache": torch.randn(
            2, num_blocks, BLOCK, kv_heads, head_dim, generator=gen, device="cuda"
        ),
        "tables": tables,
        "seqs": seqs,
        "qsl": qsl,
    }


def _reference(inp: dict, query: torch.Tensor, cache: torch.Tensor, **kw: object) -> torch.Tensor:
    """float32 reference per non-padding sequence; padding rows stay zero."""
    out = torch.zeros_like(query, dtype=torch.float32)
    for i, (seq_len, q_len) in enumerate(inp["seqs"]):
        if seq_len:
            rows = slice(inp["qsl"][i], inp["qsl"][i] + q_len)
            out[rows] = paged_attention_ref(
                query[rows].float(), cache, inp["tables"][i : i + 1], [seq_len], [0, q_len], **kw
            )
    return out


def _kernel(inp: dict, query: torch.Tensor, cache: torch.Tensor, **kw: object) -> torch.Tensor:
    seqs = inp["seqs"]
    return unified_attention(
        query,
        cache,
        inp["tables"],
        torch.tensor([s for s, _ in seqs], dtype=torch.int32, device="cuda"),
        torch.tensor(inp["qsl"], dtype=torch.int32, device="cuda"),
        max(q for _, q in seqs),
        max(s for s, _ in seqs),
        **kw,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(32, 8, 128), (16, 16, 64), (8, 1, 256), (12, 4, 80)]
)
@pytest.mark.parametrize(
    "features", [{}, {"sliding_window": 200}, {"softcap": 30.0, "scale": 0.3}], ids=str
)
def test_mixed_batch(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, features: dict
) -> None:
    inp = _inputs(MIXED, heads, kv_heads, head_dim)
    kw = {"scale": head_dim**-0.5, **features}
    query, cache = inp["query"].to(dtype), inp["cache"].to(dtype)
    out = _kernel(inp, query, cache, **kw)
    expected = _reference(inp, query, cache.float(), **kw)
    torch.testing.assert_close(out.float(), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("num_splits", [None, 1, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_split_kv(dtype: torch.dtype, num_splits: int | None) -> None:
    seqs = [(5000, 1), (1, 1), (0, 0), (3333, 1)]
    assert choose_num_splits(len(seqs), 8, 1, 5000, 132) > 1  # None takes the split path here
    inp = _inputs(seqs, 32, 8, 128, seed=1)
    query, cache = inp["query"].to(dtype), inp["cache"].to(dtype)
    out = _kernel(inp, query, cache, scale=128**-0.5, num_splits=num_splits)
    expected = _reference(inp, query, cache.float(), scale=128**-0.5)
    torch.testing.assert_close(out.float(), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("window", [None, 128])  # GPT-OSS: sinks, every other layer windowed
@pytest.mark.parametrize(
    ("seqs", "num_splits"),
    [(MIXED, None), ([(5000, 1), (1, 1), (0, 0), (3333, 1)], None), (MIXED, 3)],
    ids=["mixed", "decode-split", "mixed-split"],
)
def test_sinks(seqs: list[tuple[int, int]], num_splits: int | None, window: int | None) -> None:
    inp = _inputs(seqs, 64, 8, 64, seed=3)
    gen = torch.Generator(device="cuda").manual_seed(4)
    sinks = torch.randn(64, generator=gen, device="cuda") * 2
    kw = {"scale": 64**-0.5, "sliding_window": window, "sinks": sinks}
    query, cache = inp["query"].to(torch.bfloat16), inp["cache"].to(torch.bfloat16)
    out = _kernel(inp, query, cache, num_splits=num_splits, **kw)
    expected = _reference(inp, query, cache.float(), **kw)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("seqs", [MIXED, [(4000, 1), (17, 1), (900, 1)]], ids=["mixed", "decode"])
def test_fp8_cache(seqs: list[tuple[int, int]]) -> None:
    inp = _inputs(seqs, 32, 8, 128, seed=2)
    scales = {"k_scale": 0.25, "v_scale": 2.0}
    stored = inp["cache"] / torch.tensor([0.25, 2.0], device="cuda").view(2, 1, 1, 1, 1)
    cache8 = stored.to(torch.float8_e4m3fn)
    query = inp["query"].to(torch.bfloat16)
    out = _kernel(inp, query, cache8, scale=128**-0.5, **scales)
    # The reference reads the same fp8 values back as stored * scale.
    expected = _reference(inp, query, cache8, scale=128**-0.5, **scales)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def _large_decode(kv_heads: int) -> list[tuple[int, int]]:
    """A decode of enough sequences to take descriptor tiles (attention_config.descriptor_decode),
    contexts of 513-2,100 tokens and some padding rows (a CUDA graph's)."""
    n = -(-DESC_PROGRAMS_PER_SM * torch.cuda.get_device_properties(0).multi_processor_count
          // kv_heads)  # fmt: skip
    seqs = [(513 + (997 * i) % 1588, 1) for i in range(n)]
    return seqs + [(0, 1)] * 5


@pytest.mark.parametrize("kv", ["bf16", "fp16", "fp8"])
def test_large_decode_through_descriptors(kv: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The descriptor tiles at the batch that takes them (bf16, fp16 and fp8 caches) against the
    reference, and a CUDA graph's replay of the launch identical to it."""
    seqs = _large_decode(8)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert launch_config(1, 2, 128, len(seqs) * 8, 2100, sms).kv_desc
    built = record_descriptors(monkeypatch)
    inp = _inputs(seqs, 16, 8, 128, seed=5)
    dtype = torch.float16 if kv == "fp16" else torch.bfloat16
    query, kw = inp["query"].to(dtype), {"scale": 128**-0.5}
    cache = inp["cache"].to(dtype)
    if kv == "fp8":
        kw.update(k_scale=0.25, v_scale=2.0)
        stored = inp["cache"] / torch.tensor([0.25, 2.0], device="cuda").view(2, 1, 1, 1, 1)
        cache = stored.to(torch.float8_e4m3fn)
    out = _kernel(inp, query, cache, **kw)
    expected = _reference(inp, query, cache if kv == "fp8" else cache.float(), **kw)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    lens = torch.tensor([s for s, _ in seqs], dtype=torch.int32, device="cuda")
    qsl = torch.tensor(inp["qsl"], dtype=torch.int32, device="cuda")
    graph = torch.cuda.CUDAGraph()
    replayed = torch.empty_like(out)
    with torch.cuda.graph(graph):
        unified_attention(
            query, cache, inp["tables"], lens, qsl, 1, max(s for s, _ in seqs), out=replayed, **kw
        )
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, out)
    assert built == [True, True]  # the eager launch and the captured one


@pytest.mark.parametrize("max_seq_len", [64, 8192])  # single pass, then split-KV
def test_cuda_graph_replay_matches_eager(max_seq_len: int) -> None:
    batch, heads, kv_heads, head_dim = 4, 32, 8, 128
    num_blocks = batch * max_seq_len // BLOCK + 8
    gen = torch.Generator(device="cuda").manual_seed(3)

    def fresh_inputs() -> tuple[torch.Tensor, ...]:
        """New values for every device input; lengths 0 (padding) to max_seq_len."""
        query = torch.randn(batch, heads, head_dim, generator=gen, device="cuda")
        lens = torch.randint(1, max_seq_len + 1, (batch,), generator=gen, device="cuda")
        lens[2] = 0
        perm = torch.randperm(num_blocks, generator=gen, device="cuda")
        tables = perm[: batch * (max_seq_len // BLOCK)].view(batch, -1)
        return query.bfloat16(), tables.to(torch.int32), lens.to(torch.int32)

    cache = torch.randn(2, num_blocks, BLOCK, kv_heads, head_dim, device="cuda").bfloat16()
    query, tables, lens = fresh_inputs()
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    out = torch.empty_like(query)

    def step() -> None:
        unified_attention(query, cache, tables, lens, qsl, 1, max_seq_len, head_dim**-0.5, out=out)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        new = fresh_inputs()
        for static, value in zip((query, tables, lens), new, strict=True):
            static.copy_(value)
        graph.replay()
        replayed = out.clone()
        step()
        torch.testing.assert_close(replayed, out, atol=0, rtol=0)
        assert torch.equal(replayed[2], torch.zeros_like(replayed[2]))


def _variants(kernel: object) -> int:
    """Compiled variants of a Triton kernel (its per-device caches' first member)."""
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


def test_block_table_width_compiles_no_new_variant() -> None:
    """Compact block tables change width (their row stride) every step: widths of 1, a multiple
    of 16 and others must reuse one compiled variant, not compile mid-run."""
    seqs = [(16, 3), (12, 9), (5, 1)]  # one block each: a table may be 1 wide
    inp = _inputs(seqs, 16, 8, 128)
    query, cache = inp["query"].bfloat16(), inp["cache"].bfloat16()
    expected = _reference(inp, query, cache.float(), scale=0.1)
    counts = []
    for width in (inp["tables"].shape[1], 1, 16, 7, 32):
        tables = torch.zeros(len(seqs), width, dtype=torch.int32, device="cuda")
        tables[:, :1] = inp["tables"][:, :1]
        out = _kernel({**inp, "tables": tables}, query, cache, scale=0.1)
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
        counts.append(_variants(_unified_attention_kernel))
    assert counts == [counts[0]] * len(counts), counts
