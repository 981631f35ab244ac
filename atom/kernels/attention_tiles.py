"""How a paged-attention program (unified_attention.py) walks its keys: a K/V tile of TILE tokens
at a time, either gathered through pointers token by token (`_attend_tiles`: any layout, block
size and head dim) or, for large decodes (attention_config.descriptor_decode), one or two whole
blocks copied by the tensor memory accelerator through descriptors of the cache (`_attend_blocks`,
`kv_descriptors`); `attend` picks. Both run the same online softmax in the log2 domain over
(acc, m, l) and the same score step (`_scores`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from atom.kernels.attention_config import padded_head_dim


@triton.jit
def _softcap(x, cap):
    """cap * tanh(x / cap); tanh from exp2 (the interpreter and every Triton version have it).
    For large |x| exp2 saturates to inf or 0 and the formula to +-cap, never NaN."""
    e = tl.exp2((2.0 * 1.4426950408889634 / cap) * x)
    return cap - (2.0 * cap) / (e + 1.0)


@triton.jit
def _scores(
    s,  # [BLOCK_M, TILE] q . k in fp32
    j,  # [TILE] key positions
    j_ok,  # [TILE] keys before kv_hi
    pos,
    qk_scale,
    softcap,
    SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr,
):
    """A tile's log2-domain scores: scaled (softcapped), and where MASKED, -inf for the keys a row
    may not see (past kv_hi, after its own position, before its window)."""
    if USE_SOFTCAP:
        s = _softcap(s * qk_scale, softcap) * 1.4426950408889634
    else:
        s = s * (qk_scale * 1.4426950408889634)
    if MASKED:
        seen = (j[None, :] <= pos[:, None]) & j_ok[None, :]
        if SLIDING_WINDOW > 0:
            seen &= j[None, :] > pos[:, None] - SLIDING_WINDOW
        s = tl.where(seen, s, float("-inf"))
    return s


@triton.jit
def _attend_tiles(
    acc,  # [BLOCK_M, HEAD_DIM_P] fp32, unnormalised output
    m_i,  # [BLOCK_M] running max of the log2-domain scores
    l_i,  # [BLOCK_M] running sum of exp2(score - m_i)
    q,  # [BLOCK_M, HEAD_DIM_P]
    tile_lo,
    tile_hi,
    k_base,
    v_base,
    bt_row,
    pos,  # [BLOCK_M] context position of each row's query token
    kv_hi,  # keys >= kv_hi are never read
    qk_scale,
    softcap,
    stride_kb,
    stride_ks,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr,  # False: every row sees every key of these tiles
    DOT_PRECISION: tl.constexpr,
):
    offs_t = tl.arange(0, TILE)
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_ok = offs_d < HEAD_DIM
    for t in range(tile_lo, tile_hi):
        j = t * TILE + offs_t  # [TILE] key positions
        if MASKED:
            j_ok = j < kv_hi
            blk = tl.load(bt_row + j // BLOCK_SIZE, mask=j_ok, other=0)
        else:
            j_ok = offs_t < TILE
            blk = tl.load(bt_row + j // BLOCK_SIZE)
        off = blk.to(tl.int64) * stride_kb + (j % BLOCK_SIZE) * stride_ks  # [TILE]
        if MASKED or HEAD_DIM_P != HEAD_DIM:
            # Masked-out keys must load as 0, not as whatever a padded block holds: NaN * 0 = NaN.
            k = tl.load(
                k_base + off[None, :] + offs_d[:, None],
                mask=j_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            v = tl.load(
                v_base + off[:, None] + offs_d[None, :],
                mask=j_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
        else:
            k = tl.load(k_base + off[None, :] + offs_d[:, None])  # [HEAD_DIM_P, TILE]
            v = tl.load(v_base + off[:, None] + offs_d[None, :])  # [TILE, HEAD_DIM_P]
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION)  # [BLOCK_M, TILE] fp32
        s = _scores(s, j, j_ok, pos, qk_scale, softcap, SLIDING_WINDOW, USE_SOFTCAP, MASKED)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no key yet keeps m = -inf; exponents then use 0 to avoid inf - inf.
        m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_exp[:, None])
        alpha = tl.exp2(m_i - m_exp)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(
            p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION
        )
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _block_scores(
    q,
    k_desc,
    bt_row,
    b,  # the sequence's block index
    kv_col,
    pos,
    kv_hi,
    qk_scale,
    softcap,
    BLOCK_SIZE: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Block b's log2-domain scores [BLOCK_M, BLOCK_SIZE], its K copied through the descriptor,
    and its first row in the descriptor's view. A block past kv_hi (a two-block tile's tail,
    maybe past the table's width) is not looked up: it reads cache block 0, its scores masked."""
    j = b * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    if MASKED:
        row = tl.load(bt_row + b, mask=b * BLOCK_SIZE < kv_hi, other=0) * BLOCK_SIZE
    else:
        row = tl.load(bt_row + b) * BLOCK_SIZE
    k = k_desc.load([row, kv_col])  # [BLOCK_SIZE, HEAD_DIM]
    s = tl.dot(q, tl.trans(k).to(q.dtype), input_precision=DOT_PRECISION)
    s = _scores(s, j, j < kv_hi, pos, qk_scale, softcap, SLIDING_WINDOW, USE_SOFTCAP, MASKED)
    return s, row


@triton.jit
def _block_values(
    acc, p, v_desc, row, b, kv_col, kv_hi, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """acc + p @ V of block b (V copied through the descriptor). Keys past kv_hi weigh 0 in p,
    but their values must read as 0 too (whatever a block's tail holds: NaN * 0 = NaN)."""
    v = v_desc.load([row, kv_col]).to(p.dtype)  # [BLOCK_SIZE, HEAD_DIM]
    if MASKED:
        j = b * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        v = tl.where((j < kv_hi)[:, None], v, 0.0)
    return tl.dot(p, v, acc, input_precision=DOT_PRECISION)


@triton.jit
def _attend_blocks(
    acc,
    m_i,
    l_i,
    q,
    tile_lo,
    tile_hi,
    k_desc,  # descriptors of the caches' [BLOCK_SIZE, HEAD_DIM] tiles
    v_desc,
    kv_col,  # this KV head's first column in a descriptor's [tokens, H_kv * D] view
    bt_row,
    pos,
    kv_hi,
    qk_scale,
    softcap,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,  # one or two blocks
    SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """_attend_tiles with each block copied whole by the tensor memory accelerator (no address
    registers, deeper pipelines): a tile's blocks each get their own dots, one softmax update a
    tile."""
    NB: tl.constexpr = TILE // BLOCK_SIZE
    for t in range(tile_lo, tile_hi):
        b = t * NB
        s0, r0 = _block_scores(
            q, k_desc, bt_row, b, kv_col, pos, kv_hi, qk_scale, softcap, BLOCK_SIZE,
            SLIDING_WINDOW, USE_SOFTCAP, MASKED, DOT_PRECISION,
        )  # fmt: skip
        m_tile = tl.max(s0, axis=1)
        if NB >= 2:
            s1, r1 = _block_scores(
                q, k_desc, bt_row, b + 1, kv_col, pos, kv_hi, qk_scale, softcap, BLOCK_SIZE,
                SLIDING_WINDOW, USE_SOFTCAP, MASKED, DOT_PRECISION,
            )  # fmt: skip
            m_tile = tl.maximum(m_tile, tl.max(s1, axis=1))
        m_new = tl.maximum(m_i, m_tile)
        m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)  # as in _attend_tiles
        alpha = tl.exp2(m_i - m_exp)
        acc = acc * alpha[:, None]
        p = tl.exp2(s0 - m_exp[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = _block_values(
            acc, p.to(q.dtype), v_desc, r0, b, kv_col, kv_hi, BLOCK_SIZE, MASKED, DOT_PRECISION
        )
        if NB >= 2:
            p = tl.exp2(s1 - m_exp[:, None])
            l_i += tl.sum(p, axis=1)
            acc = _block_values(
                acc, p.to(q.dtype), v_desc, r1, b + 1, kv_col, kv_hi, BLOCK_SIZE, MASKED,
                DOT_PRECISION,
            )  # fmt: skip
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attend(
    acc, m_i, l_i, q, tile_lo, tile_hi, k_base, v_base, k_desc, v_desc, kv_col, bt_row, pos,
    kv_hi, qk_scale, softcap, stride_kb, stride_ks, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_DESC: tl.constexpr,
):  # fmt: skip
    """The tiles [tile_lo, tile_hi) through descriptors (KV_DESC) or pointers."""
    if KV_DESC:
        return _attend_blocks(
            acc, m_i, l_i, q, tile_lo, tile_hi, k_desc, v_desc, kv_col, bt_row, pos, kv_hi,
            qk_scale, softcap, BLOCK_SIZE, TILE, SLIDING_WINDOW, USE_SOFTCAP, MASKED,
            DOT_PRECISION,
        )  # fmt: skip
    return _attend_tiles(
        acc, m_i, l_i, q, tile_lo, tile_hi, k_base, v_base, bt_row, pos, kv_hi, qk_scale,
        softcap, stride_kb, stride_ks, BLOCK_SIZE, TILE, HEAD_DIM, HEAD_DIM_P, SLIDING_WINDOW,
        USE_SOFTCAP, MASKED, DOT_PRECISION,
    )  # fmt: skip


def kv_descriptors(kv_cache: Tensor, tile: int) -> tuple[TensorDescriptor, TensorDescriptor] | None:
    """Descriptors of the K and V caches' blocks ([block_size, D] of one KV head, in a
    [blocks * block_size, H_kv * D] view) where a tile is one or two blocks and the layout allows
    it (token-major, contiguous, D a power of two the copy engine can box, rows numbered in
    int32), on a device that has the copy engine (Hopper on; the interpreter runs the path on
    the CPU); None otherwise."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    width = num_kv_heads * head_dim
    token_major = kv_cache.stride(3) == head_dim and kv_cache.stride(2) == width
    if (
        not _copies_by_tma(kv_cache.device)
        or tile not in (block_size, 2 * block_size)
        or num_blocks * block_size >= 2**31
        or head_dim != padded_head_dim(head_dim)
        or head_dim > 256
        or block_size > 256
        or not token_major
        or kv_cache.stride(1) != block_size * width
        or (width * kv_cache.element_size()) % 16
        or kv_cache.data_ptr() % 16
        or (kv_cache.stride(0) * kv_cache.element_size()) % 16
    ):
        return None
    return tuple(
        TensorDescriptor(
            kv_cache[i], [num_blocks * block_size, width], [width, 1], [block_size, head_dim]
        )
        for i in (0, 1)
    )  # type: ignore[return-value]


@functools.lru_cache(maxsize=16)
def _copies_by_tma(device: torch.device) -> bool:
    """Whether descriptor loads are bulk copies here: Hopper or later (before it, Triton lowers
    them to plain loads, with a launch tuned for the copies)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9
