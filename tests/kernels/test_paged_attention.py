"""Paged attention (torch reference) against dense float32 attention on contiguous K/V."""

from __future__ import annotations

import pytest
import torch

from atom.kernels import paged_attention
from atom.kernels.paged_attention import paged_attention_ref
from atom.kernels.reshape_and_cache import reshape_and_cache_ref

BLOCK = 16


def _dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None
) -> torch.Tensor:
    """q [n, H, D] = the last n positions of k, v [L, Hkv, D]; causal; float32."""
    n, length = q.shape[0], k.shape[0]
    groups = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(groups, 1)
    v = v.float().repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    pos = torch.arange(length - n, length).unsqueeze(1)
    keys = torch.arange(length).unsqueeze(0)
    hidden = (keys > pos) | ((keys <= pos - window) if window else False)
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 64), (8, 2, 32), (6, 1, 128)])
def test_paged_attention_matches_dense(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, window: int | None
) -> None:
    gen = torch.Generator().manual_seed(heads * head_dim)
    # (context length after the step, new query tokens): decode, chunks, whole prompts
    seqs = [(1, 1), (15, 1), (16, 1), (17, 1), (33, 5), (16, 16), (17, 17), (100, 37), (250, 1)]
    num_blocks = sum(-(-length // BLOCK) for length, _ in seqs) + 7
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # shuffled, non-contiguous
    cache = torch.zeros(2, num_blocks, BLOCK, kv_heads, head_dim, dtype=dtype)
    tables = torch.zeros(len(seqs), 20, dtype=torch.int32)
    queries, expected, keys = [], [], []
    for i, (length, n) in enumerate(seqs):
        blocks = [perm.pop() for _ in range(-(-length // BLOCK))]
        tables[i, : len(blocks)] = torch.tensor(blocks)
        k = torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype)
        slots = torch.tensor([blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(length)])
        reshape_and_cache_ref(k, v, cache, slots)
        q = torch.randn(n, heads, head_dim, generator=gen).to(dtype)
        queries.append(q)
        expected.append(_dense(q, k, v, head_dim**-0.5, window))
        keys.append(k)
    qsl = [0]
    for _, n in seqs:
        qsl.append(qsl[-1] + n)
    out = paged_attention_ref(
        torch.cat(queries),
        cache,
        tables,
        [s[0] for s in seqs],
        qsl,
        head_dim**-0.5,
        sliding_window=window,
    )
    tol = {torch.float32: 1e-4, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.float(), torch.cat(expected), atol=tol, rtol=tol)


def _dense_with_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None,
    sinks: torch.Tensor,
) -> torch.Tensor:
    """As _dense, with exp(sink[h]) added to each row's denominator: float32, spelled out."""
    n, length = q.shape[0], k.shape[0]
    groups = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(groups, 1)
    v = v.float().repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    pos = torch.arange(length - n, length).unsqueeze(1)
    keys = torch.arange(length).unsqueeze(0)
    hidden = (keys > pos) | ((keys <= pos - window) if window else False)
    exp = scores.masked_fill(hidden, float("-inf")).exp()  # small random scores: no overflow
    denom = exp.sum(-1, keepdim=True) + sinks.float().exp().view(-1, 1, 1)
    return torch.einsum("hqk,khd->qhd", exp / denom, v)


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 64), (8, 2, 32)])
def test_paged_attention_sinks_match_dense(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, window: int | None
) -> None:
    gen = torch.Generator().manual_seed(7 * heads + head_dim)
    # decode (one query) and prefill (several) both take a sinks path of their own
    seqs = [(1, 1), (15, 1), (17, 1), (33, 5), (17, 17), (100, 37), (250, 1)]
    num_blocks = sum(-(-length // BLOCK) for length, _ in seqs) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # shuffled, non-contiguous
    cache = torch.zeros(2, num_blocks, BLOCK, kv_heads, head_dim, dtype=dtype)
    tables = torch.zeros(len(seqs), 20, dtype=torch.int32)
    sinks = torch.randn(heads, generator=gen) * 3  # large enough to take much of the mass
    queries, expected, qsl = [], [], [0]
    for i, (length, n) in enumerate(seqs):
        blocks = [perm.pop() for _ in range(-(-length // BLOCK))]
        tables[i, : len(blocks)] = torch.tensor(blocks)
        k = torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype)
        slots = torch.tensor([blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(length)])
        reshape_and_cache_ref(k, v, cache, slots)
        q = torch.randn(n, heads, head_dim, generator=gen).to(dtype)
        queries.append(q)
        expected.append(_dense_with_sinks(q, k, v, head_dim**-0.5, window, sinks))
        qsl.append(qsl[-1] + n)
    args = (torch.cat(queries), cache, tables, [s[0] for s in seqs], qsl, head_dim**-0.5)
    out = paged_attention_ref(*args, sliding_window=window, sinks=sinks)
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float(), torch.cat(expected), atol=tol, rtol=tol)
    # The sinks only shrink each output row: without them the result is different.
    plain = paged_attention_ref(*args, sliding_window=window)
    assert not torch.allclose(plain.float(), out.float(), atol=10 * tol)


@pytest.mark.parametrize("window", [None, 5])
def test_sdpa_by_hand_in_query_chunks(window: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sinks and softcap take the float32 path in bounded query chunks: any chunking, same rows
    (prefix queries included: 9 queries over 20 keys)."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(n, h, 16, generator=gen) for n, h in ((9, 4), (20, 2), (20, 2)))
    sinks = torch.randn(4, generator=gen)
    whole = paged_attention.sdpa(q, k, v, 0.25, window, 30.0, sinks)
    monkeypatch.setattr(paged_attention, "SCORE_ELEMENTS", 4 * 20 * 2)  # 2 rows per chunk
    chunked = paged_attention.sdpa(q, k, v, 0.25, window, 30.0, sinks)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
