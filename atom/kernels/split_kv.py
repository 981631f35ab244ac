"""Split-KV (flash-decoding) partials, shared by the paged-attention kernels (unified_attention.py,
mla_attention.py): each program over a split of a sequence's keys stores its rows unnormalised,
(acc, m, l) in the log2 domain, and a reduce kernel of its own file combines the splits as
sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s; an unsplit program stores its rows normalised.
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
