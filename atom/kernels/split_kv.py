"""Split-KV (flash-decoding) partials, shared by the paged-attention kernels (unified_attention.py,
mla_attention.py): each program over a split of a sequence's keys stores its rows unnormalised,
(acc, m, l) in the log2 domain, and a reduce kernel of its own file combines the splits as
sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s; an unsplit program stores its rows normalised.
`combine_rows` is the same sum inside the attention kernel, by the last of a q-block's split
programs to store its partials (split_counters.py), in place of the reduce kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def split_workspace(
    num_tokens: int, num_heads: int, num_splits: int, width_p: int, like: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(acc [T, H, splits, width_p], m [T, H, splits], l [T, H, splits]) in float32 on like's
    device; one-element stand-ins when unsplit (the kernel reads none)."""
    f32 = {"dtype": torch.float32, "device": like.device}
    if num_splits == 1:
        return torch.empty(1, **f32), torch.empty(1, **f32), torch.empty(1, **f32)
    shape = (num_tokens, num_heads, num_splits)
    return (
        torch.empty((*shape, width_p), **f32),
        torch.empty(shape, **f32),
        torch.empty(shape, **f32),
    )


@triton.jit
def store_rows(
    out_ptr,
    ws_acc_ptr,
    ws_m_ptr,
    ws_l_ptr,
    acc,  # [BLOCK_M, WIDTH_P] fp32, unnormalised
    m_i,
    l_i,
    tok,  # [BLOCK_M] int64 query row of each program row
    head,  # [BLOCK_M] its query head
    offs_d,  # [WIDTH_P]
    row_ok,
    d_ok,
    split,
    num_splits,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    WIDTH_P: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """A paged-attention program's rows (unified_attention.py, mla_attention.py): a split's
    partials, unnormalised (an empty split, l = 0 and m = -inf, then weighs nothing in the
    reduce), or the output normalised (a row with no keys writes zeros)."""
    if SPLIT:
        ws_row = (tok * NUM_HEADS + head) * num_splits + split
        tl.store(ws_m_ptr + ws_row, m_i, mask=row_ok)
        tl.store(ws_l_ptr + ws_row, l_i, mask=row_ok)
        tl.store(
            ws_acc_ptr + ws_row[:, None] * WIDTH_P + offs_d[None, :], acc, mask=row_ok[:, None]
        )
    else:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


@triton.jit
def combine_rows(
    out_ptr,
    ws_acc_ptr,
    ws_m_ptr,
    ws_l_ptr,
    sinks_ptr,  # [H] fp32 sink logits (USE_SINKS only)
    tok,  # [BLOCK_M] int64 query row of each program row
    head,  # [BLOCK_M] its query head
    offs_d,  # [WIDTH_P]
    row_ok,
    d_ok,
    num_splits,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    WIDTH_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    USE_SINKS: tl.constexpr,
):
    """Every split's partials of these rows (store_rows's, by other programs of the same launch:
    read past the caches) combined in split order and the rows written normalised: the reduce
    kernels' sum, as a loop over the splits (not bit for bit their tree sum); a sink joins the
    denominator once, after the splits."""
    base = (tok * NUM_HEADS + head) * num_splits
    m_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(num_splits):
        m_s = tl.load(ws_m_ptr + base + s, mask=row_ok, other=float("-inf"), volatile=True)
        m_max = tl.maximum(m_max, m_s)
    if USE_SINKS:  # a raw logit, not times the softmax scale: log2 domain by * log2(e)
        sink = tl.load(sinks_ptr + head, mask=row_ok, other=float("-inf")).to(tl.float32)
        sink = sink * 1.4426950408889634
        m_max = tl.maximum(m_max, sink)
    m_exp = tl.where(m_max == float("-inf"), 0.0, m_max)  # a row with no keys: no inf - inf
    denom = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, WIDTH_P], dtype=tl.float32)
    for s in range(num_splits):
        m_s = tl.load(ws_m_ptr + base + s, mask=row_ok, other=float("-inf"), volatile=True)
        w = tl.exp2(m_s - m_exp)
        denom += w * tl.load(ws_l_ptr + base + s, mask=row_ok, other=0.0, volatile=True)
        part = tl.load(
            ws_acc_ptr + (base + s)[:, None] * WIDTH_P + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
            volatile=True,
        )
        acc += w[:, None] * part
    if USE_SINKS:
        denom += tl.exp2(sink - m_exp)
    store_rows(
        out_ptr, ws_acc_ptr, ws_m_ptr, ws_l_ptr, acc, m_max, denom, tok, head, offs_d, row_ok,
        d_ok, 0, 1, stride_ot, stride_oh, NUM_HEADS, WIDTH_P, False,
    )  # fmt: skip
