"""Attention over the paged KV cache: the torch reference (the CPU path and the kernel oracle).

KV cache of one layer: [2, num_blocks, block_size, num_kv_heads, head_dim]; token t of a sequence
lives in block block_table[t // block_size] at offset t % block_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _bytes(t: Tensor) -> Tensor:
    """fp8 tensors as uint8: CPU indexing kernels are not built for float8."""
    return t.view(torch.uint8) if t.dtype in FP8_DTYPES else t


SCORE_ELEMENTS = 1 << 26  # float32 scores per query chunk of sdpa's by-hand path: 256 MiB


def causal_mask(
    q_len: int, kv_len: int, device: torch.device, sliding_window: int | None = None
) -> Tensor:
    """Query i sits at context position p = kv_len - q_len + i and sees keys j <= p
    (and, with a sliding window W, only the last W of them: j > p - W)."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def paged_attention_ref(
    query: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    seq_lens: list[int],
    query_start_loc: list[int],
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """query [T, num_heads, head_dim] -> [T, num_heads, head_dim], one sequence at a time.

    softcap: scores become softcap * tanh(scores / softcap) before masking (Gemma 2).
    sinks: [num_heads] float32 logits that join each softmax denominator with no value (GPT-OSS).
    """
    block_size = kv_cache.shape[2]
    out = torch.empty_like(query)
    for i, kv_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        blocks = block_tables[i, : -(-kv_len // block_size)].long()
        k, v = _gather(kv_cache, blocks, query.dtype, k_scale, v_scale)
        k, v = k[:kv_len], v[:kv_len]
        if end - start == 1:
            window = slice(-sliding_window, None) if sliding_window else slice(None)
            out[start] = _decode(query[start], k[window], v[window], scale, softcap, sinks)
        else:
            out[start:end] = sdpa(query[start:end], k, v, scale, sliding_window, softcap, sinks)
    return out


def _gather(
    kv_cache: Tensor, blocks: Tensor, dtype: torch.dtype, k_scale: float, v_scale: float
) -> tuple[Tensor, Tensor]:
    """K and V of the given blocks ([n]) as [n * block_size, num_kv_heads, head_dim]."""
    kv = _bytes(kv_cache)[:, blocks].view(kv_cache.dtype).flatten(1, 2)
    k, v = kv[0], kv[1]
    if kv_cache.dtype != dtype:
        return k.to(dtype) * k_scale, v.to(dtype) * v_scale
    return k, v


def _softmax(scores: Tensor, sinks: Tensor | None) -> Tensor:
    """float32 softmax over the last dim; a sink [..., 1] column joins the denominator and is
    dropped after, so each head may put weight on "nothing" (attention sinks, GPT-OSS)."""
    if sinks is None:
        return scores.softmax(dim=-1)
    sink = sinks.float().view(*sinks.shape, *([1] * (scores.dim() - sinks.dim())))
    combined = torch.cat([scores, sink.expand(*scores.shape[:-1], 1)], dim=-1)
    return combined.softmax(dim=-1)[..., :-1]


def _decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """One query token q [H, D] over k, v [L, H_kv, D]; query heads grouped per KV head.

    Plain einsum: on the CPU it beats SDPA's generic path by ~4x for a single query row.
    """
    num_kv_heads = k.shape[1]
    qg = q.float().view(num_kv_heads, -1, q.shape[-1])  # [H_kv, groups, D]
    scores = torch.einsum("hgd,lhd->hgl", qg, k.float()) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    group_sinks = None if sinks is None else sinks.view(num_kv_heads, -1)  # [H_kv, groups]
    out = torch.einsum("hgl,lhd->hgd", _softmax(scores, group_sinks), v.float())
    return out.reshape(q.shape).to(q.dtype)


def sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Causal attention of q [q_len, H, D] over k, v [kv_len, H_kv, D] (queries are the tail);
    sinks [H] float32 logits join each softmax denominator."""
    q_len, kv_len = q.shape[0], k.shape[0]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # equal head counts let SDPA pick a fused kernel instead of the O(n^2) math one
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if softcap is not None or sinks is not None:  # SDPA has no score hook: float32 by hand
        # In query chunks of bounded scores: the memory profile runs a whole token budget
        # (16k tokens x 64 heads would be 64 GiB of scores at once).
        rows = max(1, SCORE_ELEMENTS // (q.shape[1] * kv_len))
        out = q.new_empty(q_len, q.shape[1], v.shape[-1])
        k, v = k.float(), v.float()
        for start in range(0, q_len, rows):
            end = min(start + rows, q_len)
            seen = kv_len - q_len + end  # these queries are the tail of keys [0, seen)
            scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k[:seen])
            scores = scores * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            mask = causal_mask(end - start, seen, q.device, sliding_window)
            probs = _softmax(scores.masked_fill(~mask, float("-inf")), sinks)
            out[start:end] = torch.einsum("hqk,khd->qhd", probs, v[:seen])
        return out
    is_causal = q_len == kv_len and (sliding_window is None or sliding_window >= kv_len)
    mask = None if is_causal else causal_mask(q_len, kv_len, q.device, sliding_window)
    o = F.scaled_dot_product_attention(  # 4-D [1, H, L, D]: the fused CUDA kernels want a batch
        q.transpose(0, 1).unsqueeze(0).to(k.dtype),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
    )
    return o[0].transpose(0, 1).to(q.dtype)
