"""Fused MoE experts on CUDA without a host sync: align slots by expert, two grouped GEMMs.

Biases (GPT-OSS: one per expert and projection) are added in the GEMMs' epilogues; the activation
between the GEMMs is SiLU-and-mul or a caller's function of the [slots, 2I] gate/up rows.

The T*K (token, expert) slots are sorted by expert on the device and each expert's segment is
padded to a multiple of BLOCK_M, so that every row block of a GEMM belongs to one expert:

    sorted_slot_ids  | e0 e0 e0 pad | e2 e2 e2 e2 | e2 pad pad pad | e5 pad pad pad | pad ... |
    block_expert_ids |      0       |      2      |       2        |       5        |  -1 ... |
                     ^ block of BLOCK_M rows        num_tokens_post_padded ^ (device tensor)

Nothing here reads a count on the host: buffers have the worst-case size T*K + E*(BLOCK_M-1)
and the kernels skip blocks past num_tokens_post_padded, so the whole path can be captured in a
CUDA graph. The torch reference is atom.layers.moe.fused_experts (its expert loop syncs).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import Tensor

from atom.kernels.grid import cdiv, next_power_of_2
from atom.kernels.silu_and_mul import silu_and_mul


@triton.jit
def _moe_align_kernel(
    ids_ptr,  # [S] expert of each slot
    sorted_slot_ids_ptr,  # [P] int32 out
    block_expert_ids_ptr,  # [P // BLOCK_M] int32 out
    num_post_padded_ptr,  # [1] int32 out
    cursor_ptr,  # [E] int32 scratch: the next free row of each expert
    num_slots,
    num_experts,
    max_padded,
    BLOCK_M: tl.constexpr,
    BINS: tl.constexpr,  # a power of two > num_experts: bin num_experts.. counts masked lanes
    CHUNK: tl.constexpr,
    BLOCK_CHUNK: tl.constexpr,
):
    # One program does it all: the counts, their padded prefix sums, the block owners, then
    # every slot's row by an atomic bump of its expert's cursor (the order within an expert is
    # free: every row of a GEMM tile is computed independently).
    experts = tl.arange(0, BINS)
    real = experts < num_experts
    counts = tl.zeros([BINS], dtype=tl.int32)
    for s0 in range(0, num_slots, CHUNK):
        offs = s0 + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_slots, other=num_experts).to(tl.int32)
        counts += tl.histogram(ids, BINS)
    padded = tl.where(real, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    padded_end = tl.cumsum(padded, 0)
    tl.store(cursor_ptr + experts, padded_end - padded, mask=real)
    tl.store(num_post_padded_ptr, tl.sum(padded, 0))
    # Block b starts at row b * BLOCK_M; its expert is the first whose padded end lies beyond
    # (empty experts end where they start: <= steps over them); past the total: -1.
    for b0 in range(0, max_padded // BLOCK_M, BLOCK_CHUNK):
        blocks = b0 + tl.arange(0, BLOCK_CHUNK)
        before = (padded_end[None, :] <= (blocks * BLOCK_M)[:, None]) & real[None, :]
        owner = tl.sum(before.to(tl.int32), 1)
        owner = tl.where(owner < num_experts, owner, -1)
        tl.store(block_expert_ids_ptr + blocks, owner, mask=blocks < max_padded // BLOCK_M)
    for p0 in range(0, max_padded, CHUNK):
        offs = p0 + tl.arange(0, CHUNK)
        tl.store(sorted_slot_ids_ptr + offs, num_slots + tl.zeros([CHUNK], tl.int32),
                 mask=offs < max_padded)  # fmt: skip
    tl.debug_barrier()  # the padding and the cursors are written before the slots land
    for s0 in range(0, num_slots, CHUNK):
        offs = s0 + tl.arange(0, CHUNK)
        valid = offs < num_slots
        ids = tl.load(ids_ptr + offs, mask=valid, other=0).to(tl.int32)
        row = tl.atomic_add(cursor_ptr + ids, 1, mask=valid)
        tl.store(sorted_slot_ids_ptr + row, offs, mask=valid)


def moe_align(topk_ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Slots grouped by expert, each expert's segment padded to a multiple of block_m.

    topk_ids [T, K] -> (sorted_slot_ids [P] int32 with padding = T*K, block_expert_ids
    [P // block_m] int32 with -1 past the end, num_tokens_post_padded [1] int32), where
    P = T*K + E*(block_m-1) rounded up to whole blocks is the worst case. One kernel launch
    (25 small torch ops before: ~60 us a layer in a decode graph), no host sync.
    """
    device = topk_ids.device
    ids = topk_ids.reshape(-1).contiguous()  # a column slice's view would be read strided
    num_slots = ids.numel()
    max_padded = -(-(num_slots + num_experts * (block_m - 1)) // block_m) * block_m  # whole blocks
    sorted_slot_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_expert_ids = torch.empty(max_padded // block_m, dtype=torch.int32, device=device)
    num_post_padded = torch.empty(1, dtype=torch.int32, device=device)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=device)
    bins = next_power_of_2(num_experts + 1)
    _moe_align_kernel[(1,)](
        ids,
        sorted_slot_ids,
        block_expert_ids,
        num_post_padded,
        cursor,
        num_slots,
        num_experts,
        max_padded,
        BLOCK_M=block_m,
        BINS=bins,
        CHUNK=1024,
        BLOCK_CHUNK=max(1, 8192 // bins),
        num_warps=4,
    )
    return sorted_slot_ids, block_expert_ids, num_post_padded


@triton.jit
def _fused_moe_kernel(
    a_ptr,  # [rows, K_DIM]; row of slot s is s // A_ROW_DIV
    b_ptr,  # [E, N, K_DIM]: each expert's weight, read transposed
    bias_ptr,  # [E, N] when HAS_BIAS
    c_ptr,  # [S, N], row per slot
    topk_weights_ptr,  # [S] float32
    sorted_slot_ids_ptr,  # [P] int32, padding = num_slots
    block_expert_ids_ptr,  # [P // BLOCK_M] int32
    num_post_padded_ptr,  # [1] int32
    N,
    K_DIM,
    num_slots,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_bias_e,
    stride_cm,
    stride_cn,
    A_ROW_DIV: tl.constexpr,  # top_k for the first GEMM (rows are tokens), 1 for the second
    HAS_BIAS: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # The grid covers the worst case; blocks past the real padded total exit at once.
    if pid_m * BLOCK_M >= tl.load(num_post_padded_ptr):
        return
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slot_ids_ptr + offs_m)
    row_mask = slots < num_slots
    a_rows = (slots // A_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BM, BK]
    b_ptrs = (  # [BK, BN]
        b_ptr
        + expert * stride_be
        + offs_n[None, :].to(tl.int64) * stride_bn
        + offs_k[:, None] * stride_bk
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_DIM, BLOCK_K):
        k_mask = offs_k < K_DIM - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_bias_e + offs_n, mask=col_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if MUL_ROUTED_WEIGHT:  # after the bias: w * (x @ W^T + b), as the reference
        w = tl.load(topk_weights_ptr + slots, mask=row_mask, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + slots[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# Tile sizes per expert shape and token count, from `benchmarks/bench_fused_moe.py --tune` on an
# H200 in bfloat16 (see that file); other shapes and dtypes take the heuristic below.
TUNED_CONFIGS = Path(__file__).with_name("fused_moe_configs.json")
TUNED_CAPABILITY = (9, 0)  # the compute capability the table was tuned on


@functools.cache
def _tuned_table() -> dict[str, dict[int, dict[str, int]]]:
    if not TUNED_CONFIGS.is_file():
        return {}
    shapes = json.loads(TUNED_CONFIGS.read_text())["shapes"]
    return {key: {int(t): cfg for t, cfg in by_t.items()} for key, by_t in shapes.items()}


def shape_key(num_experts: int, inter: int, hidden: int, top_k: int) -> str:
    return f"E={num_experts},I={inter},H={hidden},K={top_k}"


def heuristic_config(num_tokens: int) -> dict[str, int]:
    """Decode has few rows per expert, so short M tiles waste less."""
    if num_tokens <= 32:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


def _tuned_for(
    num_experts: int,
    inter: int,
    hidden: int,
    top_k: int,
    dtype: torch.dtype,
    capability: tuple[int, int],
) -> dict[int, dict[str, int]] | None:
    """This shape's tuned tiles by token count, if they apply: tuned for 16-bit inputs on Hopper
    (H100/H200: 228 KB of shared memory per SM); float32 or a smaller card's shared memory would
    not hold every tuned tile."""
    table = _tuned_table().get(shape_key(num_experts, inter, hidden, top_k))
    if not table or dtype.itemsize != 2 or capability != TUNED_CAPABILITY:
        return None
    return table


def select_config(
    num_tokens: int,
    num_experts: int,
    inter: int,
    hidden: int,
    top_k: int,
    dtype: torch.dtype,
    capability: tuple[int, int] = TUNED_CAPABILITY,
) -> dict[str, int]:
    """The tuned tiles of the nearest token count (in log scale) for this shape, else the
    heuristic."""
    table = _tuned_for(num_experts, inter, hidden, top_k, dtype, capability)
    if table is None:
        return heuristic_config(num_tokens)
    nearest = min(table, key=lambda t: (abs(math.log2(t) - math.log2(max(num_tokens, 1))), t))
    return dict(table[nearest])


def tile_token_counts(
    num_experts: int,
    inter: int,
    hidden: int,
    top_k: int,
    dtype: torch.dtype,
    capability: tuple[int, int] = TUNED_CAPABILITY,
) -> list[int]:
    """A token count for each distinct tile configuration select_config can give this shape:
    running the experts once at each compiles every kernel variant a request could need."""
    table = _tuned_for(num_experts, inter, hidden, top_k, dtype, capability)
    if table is None:
        table = {1: heuristic_config(1), 64: heuristic_config(64)}
    counts: list[int] = []
    configs: list[dict[str, int]] = []
    for num_tokens in sorted(table):
        if table[num_tokens] not in configs:
            configs.append(table[num_tokens])
            counts.append(num_tokens)
    return counts


def _grouped_gemm(
    a: Tensor,
    b: Tensor,
    bias: Tensor | None,
    c: Tensor,
    topk_weights: Tensor,
    align: tuple[Tensor, Tensor, Tensor],
    a_row_div: int,
    mul_routed_weight: bool,
    cfg: dict[str, int],
) -> None:
    """c[s] = (a[s // a_row_div] @ b[e]^T + bias[e]) (* topk_weights[s]), e = expert(s)."""
    sorted_slot_ids, block_expert_ids, num_post_padded = align
    n, k_dim = b.shape[1], b.shape[2]
    # Every block holds a slot, so at most min(blocks, slots) blocks are not padding: decode
    # launches T*K row blocks, not E * (BLOCK_M - 1) / BLOCK_M mostly idle ones.
    grid = (min(block_expert_ids.numel(), topk_weights.numel()), cdiv(n, cfg["BLOCK_N"]))
    _fused_moe_kernel[grid](
        a,
        b,
        b if bias is None else bias.contiguous(),  # not read without a bias
        c,
        topk_weights,
        sorted_slot_ids,
        block_expert_ids,
        num_post_padded,
        n,
        k_dim,
        c.shape[0],
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        0 if bias is None else bias.shape[-1],  # rows of the contiguous bias
        c.stride(0),
        c.stride(1),
        A_ROW_DIV=a_row_div,
        HAS_BIAS=bias is not None,
        MUL_ROUTED_WEIGHT=mul_routed_weight,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",  # fp32: exact, not tf32
        **cfg,
    )


def fused_experts(
    hidden_states: Tensor,
    w13: Tensor,
    w2: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w13_bias: Tensor | None = None,
    w2_bias: Tensor | None = None,
    activation: Callable[[Tensor], Tensor] = silu_and_mul,
    config: dict[str, int] | None = None,
) -> Tensor:
    """hidden_states [T, H], w13 [E, 2I, H] (gate rows, then up), w2 [E, H, I], topk_weights
    [T, K] float32, topk_ids [T, K], biases [E, 2I] / [E, H] -> [T, H]; `activation` maps the
    [S, 2I] gate/up rows to [S, I]. The contract of atom.layers.moe.fused_experts; `config`
    overrides the tile sizes (the tuner)."""
    num_tokens, hidden = hidden_states.shape
    num_experts, top_k, inter = w13.shape[0], topk_ids.shape[1], w2.shape[2]
    if w13.shape[2] != hidden or w2.shape[1] != hidden or w13.shape[1] != 2 * inter:
        raise ValueError(f"expert shapes w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} mismatch")
    num_slots = num_tokens * top_k
    if num_slots == 0:
        return torch.zeros_like(hidden_states)
    capability = (
        torch.cuda.get_device_capability(hidden_states.device)  # cached: no sync
        if hidden_states.is_cuda
        else TUNED_CAPABILITY  # the interpreter stands in for the tuned card
    )
    cfg = config or select_config(
        num_tokens, num_experts, inter, hidden, top_k, hidden_states.dtype, capability
    )
    align = moe_align(topk_ids, num_experts, cfg["BLOCK_M"])
    weights = topk_weights.reshape(-1).float().contiguous()  # [S]
    gate_up = hidden_states.new_empty(num_slots, 2 * inter)  # [S, 2I]
    _grouped_gemm(hidden_states, w13, w13_bias, gate_up, weights, align, top_k, False, cfg)
    act = activation(gate_up)  # [S, I]
    down = hidden_states.new_empty(num_slots, hidden)  # [S, H], already weighted
    _grouped_gemm(act, w2, w2_bias, down, weights, align, 1, True, cfg)
    return down.view(num_tokens, top_k, hidden).sum(1)  # accumulates in float32, one rounding
