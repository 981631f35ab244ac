"""Multi-head latent attention (DeepSeek-V2/V3) in torch: the CPU path of atom.layers.mla and the
oracles of the Triton kernels in mla_attention.py.

One cache row per token, shared by every head:

    kv_cache [1, num_blocks, block_size, 1, R + P]    row = c_kv (R = kv_lora_rank) | k_pe (P)

kv_b_proj [H * (nope + v), R] turns c_kv into per-head keys (W_UK, [H, nope, R]) and values
(W_UV, [H, v, R]). Two equal forms (up to rounding):

    expanded  k = [W_UK c | k_pe], v = W_UV c, then ordinary attention
    absorbed  q_lat = q_nope W_UK, s = q_lat . c + q_pe . k_pe, o = W_UV (softmax(s) . c)

The absorbed one reads only the latents (MLA's point); the expanded one has 3.4x fewer attention
FLOPs at V3's shape, so the CPU path uses it for prefill. An fp8 cache stores row / kv_scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from atom.kernels.paged_attention import FP8_DTYPES, causal_mask, sdpa


def mla_expanded_ref(
    q: Tensor, latents: Tensor, w_kv_b: Tensor, nope_dim: int, v_dim: int, scale: float
) -> Tensor:
    """Causal attention with up-projected K/V; the queries are the tail of the context.

    q [T, H, nope + rope], latents [L, rank + rope] (L >= T), w_kv_b [H * (nope + v), rank]
    -> [T, H, v].
    """
    rank = w_kv_b.shape[1]
    c_kv, k_pe = latents.split([rank, latents.shape[1] - rank], dim=-1)
    kv = (c_kv @ w_kv_b.t()).view(latents.shape[0], -1, nope_dim + v_dim)  # [L, H, nope + v]
    k_nope, v = kv.split([nope_dim, v_dim], dim=-1)
    k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, k_nope.shape[1], -1)], dim=-1)
    return sdpa(q, k, v.contiguous(), scale)


def mla_absorbed_ref(
    q: Tensor, latents: Tensor, w_kv_b: Tensor, nope_dim: int, v_dim: int, scale: float
) -> Tensor:
    """One query token over all of latents [L, rank + rope], in the latent space.

    q [H, nope + rope] -> [H, v]; equal to mla_expanded_ref up to rounding:
    q_nope . (W_UK c) = (q_nope W_UK) . c, and sum_l p_l W_UV c_l = W_UV (sum_l p_l c_l).
    """
    rank = w_kv_b.shape[1]
    w = w_kv_b.float().view(-1, nope_dim + v_dim, rank)  # [H, nope + v, rank]
    w_uk, w_uv = w.split([nope_dim, v_dim], dim=1)
    c_kv, k_pe = latents.float().split([rank, latents.shape[1] - rank], dim=-1)
    q_nope, q_pe = q.float().split([nope_dim, q.shape[-1] - nope_dim], dim=-1)
    q_lat = torch.einsum("hn,hnr->hr", q_nope, w_uk)  # [H, rank]
    scores = (q_lat @ c_kv.t() + q_pe @ k_pe.t()) * scale  # [H, L]
    out_lat = scores.softmax(dim=-1) @ c_kv  # [H, rank]
    return torch.einsum("hr,hvr->hv", out_lat, w_uv).to(q.dtype)


def read_latents(
    kv_cache: Tensor, blocks: Tensor, dtype: torch.dtype, kv_scale: float = 1.0
) -> Tensor:
    """The rows of the given blocks ([n]) as [n * block_size, rank + rope] in dtype."""
    rows = kv_cache[0, :, :, 0]  # [num_blocks, block_size, rank + rope]
    if rows.dtype in FP8_DTYPES:  # CPU indexing is not built for float8
        ctx = rows.view(torch.uint8)[blocks].view(rows.dtype).flatten(0, 1)
        return ctx.to(dtype) * kv_scale
    return rows[blocks].flatten(0, 1).to(dtype)


def mla_paged_attention_ref(
    q: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    seq_lens: list[int],
    query_start_loc: list[int],
    w_kv_b: Tensor,
    nope_dim: int,
    v_dim: int,
    scale: float,
    kv_scale: float = 1.0,
) -> Tensor:
    """q [T, H, nope + rope] over the paged latents -> [T, H, v], one sequence at a time:
    absorbed for a single query row, expanded for several. Rows of seq_len 0 are zeros."""
    block_size = kv_cache.shape[2]
    args = (w_kv_b, nope_dim, v_dim, scale)
    out = q.new_zeros(q.shape[0], q.shape[1], v_dim)
    for i, kv_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        if kv_len == 0 or end == start:
            continue
        blocks = block_tables[i, : -(-kv_len // block_size)].long()
        ctx = read_latents(kv_cache, blocks, q.dtype, kv_scale)[:kv_len]
        if end - start == 1:
            out[start] = mla_absorbed_ref(q[start], ctx, *args)
        else:
            out[start:end] = mla_expanded_ref(q[start:end], ctx, *args)
    return out


def mla_latent_attention_ref(
    q_lat: Tensor,
    q_pe: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    seq_lens: list[int],
    query_start_loc: list[int],
    scale: float,
    kv_scale: float = 1.0,
) -> Tensor:
    """The kernel's oracle, in float32: absorbed causal attention of q_lat [T, H, R] and
    q_pe [T, H, P] over the paged latents -> softmax . c_kv [T, H, R] (in q_lat's dtype).

    Query row r of sequence i sits at position seq_lens[i] - q_len + (r - qsl[i]); rows of a
    sequence with seq_len 0, and rows after qsl[B], are zeros.
    """
    rank = q_lat.shape[-1]
    block_size = kv_cache.shape[2]
    out = torch.zeros(q_lat.shape, dtype=torch.float32, device=q_lat.device)
    for i, kv_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        if kv_len == 0 or end == start:
            continue
        blocks = block_tables[i, : -(-kv_len // block_size)].long()
        ctx = read_latents(kv_cache, blocks, torch.float32, kv_scale)[:kv_len]
        c_kv, k_pe = ctx.split([rank, ctx.shape[1] - rank], dim=-1)
        scores = torch.einsum("qhr,lr->hql", q_lat[start:end].float(), c_kv)
        scores += torch.einsum("qhp,lp->hql", q_pe[start:end].float(), k_pe)
        mask = causal_mask(end - start, kv_len, q_lat.device)
        probs = (scores * scale).masked_fill(~mask, float("-inf")).softmax(dim=-1)
        out[start:end] = torch.einsum("hql,lr->qhr", probs, c_kv)
    return out.to(q_lat.dtype)
