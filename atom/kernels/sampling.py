"""Sampling a token per row in one pass over the logits: the Gumbel-max trick.

argmax(logits / T + G) with G = -ln(-ln U), U uniform, picks token i with probability
softmax(logits / T)_i (the exponential race of atom.executor.sampler, in log space), and T = 0
rows take the plain argmax. Divided by ln 2 (the argmax does not move), the score is
logits / (T ln 2) - log2(-log2 U) up to a constant: a multiply by a per-row scale where the
natural-log form took an IEEE division per token, and on NVIDIA GPUs the outer log2 is the
hardware's `lg2.approx` (one instruction where a log compiles to a ~20-instruction polynomial).
It has a small absolute error, which the outer log tolerates: a score is compared in absolute
terms. The inner log2 stays exact: the winning token's U is near 1 (1 - U ~ 1e-5 at Qwen3's
vocabulary), where an absolute error of 2^-22 in log2 U would be a relative one of percents in
-log2 U, and could turn it to zero or negative. U comes from Philox keyed by the row's seed and
the token's index, so a row's draw depends on its seed alone, not on the batch around it: one
Philox draw gives the four uniforms of tokens 4g..4g+3 (`tl.rand4x(seed, g)`), a quarter of the
work of a draw per token.

The torch sampler reads the logits about ten times per step (float copy, division, softmax, noise,
ratio, two argmaxes: ~0.7 ms of kernels at batch 256 x 151,936 on an H200); this reads them once,
and the noise makes it compute-bound: 123 us a step in the nano-vllm bench with a Philox draw per
token, 85 us with one per four tokens, 62 us in base 2 (H200, eighth, ninth and fifteenth sittings;
benchmarks/bench_sampler.py times it alone). The vocabulary is split across programs so that
small batches still fill the GPU; a tiny torch argmax merges the splits. NaN counts as the largest
value, as in torch.argmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from atom.kernels.grid import cdiv
from atom.kernels.launch import INTERPRET

_BLOCK = 1024  # logits per loop iteration of a program
_TARGET_PROGRAMS = 1024  # enough programs to cover every SM a few times over
_MAX_SPLITS = 64
LN2 = 0.6931471805599453
_LN2: tl.constexpr = tl.constexpr(LN2)  # the kernel's copy (a JIT function reads constexprs only)


def gumbel_scores_ref(logits: Tensor, temperature: Tensor, uniform: Tensor) -> Tensor:
    """The float32 reference's scores [B, V], whose argmax a row draws: logits [B, V],
    temperature [B] (0 = greedy: the logits), uniform [B, V]."""
    x = logits.float()
    t = temperature.float().unsqueeze(1)
    scale = 1.0 / (torch.where(t > 0, t, 1.0) * LN2)
    return torch.where(t > 0, x * scale - torch.log2(-torch.log2(uniform.float())), x)


def gumbel_argmax_ref(logits: Tensor, temperature: Tensor, uniform: Tensor) -> Tensor:
    """The float32 reference's draw: gumbel_scores_ref's argmax per row."""
    return gumbel_scores_ref(logits, temperature, uniform).argmax(dim=-1)


@triton.jit
def _uniform4(seed, first, BLOCK4: tl.constexpr):
    """[BLOCK4, 4] uniforms of columns first + 4 i + j (first a multiple of 4): Philox draw
    first // 4 + i gives its four outputs to the four columns of row i."""
    u0, u1, u2, u3 = tl.rand4x(seed, first // 4 + tl.arange(0, BLOCK4))
    j = tl.arange(0, 4)[None, :]
    u01 = tl.where(j == 0, u0[:, None], u1[:, None])
    u23 = tl.where(j == 2, u2[:, None], u3[:, None])
    return tl.where(j < 2, u01, u23)


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2(x); FAST (NVIDIA): the hardware's approximation, one instruction where tl.log2 is a
    polynomial of ~20, with an absolute error of ~2^-22 (module doc: for the outer log only);
    the interpreter and ROCm have no PTX."""
    if FAST:
        return tl.inline_asm_elementwise(
            "lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.log2(x)


@triton.jit
def _gumbel_argmax_kernel(
    logits_ptr,  # [B, V], last dim contiguous
    temperature_ptr,  # [B] float32
    seed_ptr,  # [B] int64
    best_ptr,  # [B, splits] float32
    index_ptr,  # [B, splits] int32
    vocab,
    chunk,  # logits per split, a multiple of BLOCK
    stride_row,
    num_splits,
    BLOCK: tl.constexpr,
    FAST_LOG: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    t = tl.load(temperature_ptr + row)
    scale = 1.0 / (tl.where(t > 0, t, 1.0) * _LN2)  # Gumbel-max in base 2 (module doc)
    seed = tl.load(seed_ptr + row)
    base = logits_ptr + row.to(tl.int64) * stride_row
    start = split * chunk
    lanes = tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]  # [BLOCK/4, 4]
    best = tl.full([BLOCK // 4, 4], float("-inf"), tl.float32)
    index = tl.minimum(start + lanes, vocab - 1)  # an all -inf split answers its first index
    for offset in range(0, chunk, BLOCK):
        cols = start + offset + lanes
        mask = cols < vocab
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if t > 0:
            u = _uniform4(seed, start + offset, BLOCK // 4)
            x = x * scale - _log2(-tl.log2(u), FAST_LOG)
        x = tl.where(x != x, float("inf"), x)  # NaN wins, as torch.argmax has it
        x = tl.where(mask, x, float("-inf"))
        take = x > best  # strict: the first index of a tie stays
        best = tl.where(take, x, best)
        index = tl.where(take, cols, index)
    top = tl.max(tl.max(best, 1), 0)
    first = tl.min(tl.min(tl.where(best == top, index, vocab), 1), 0)
    tl.store(best_ptr + row * num_splits + split, top)
    tl.store(index_ptr + row * num_splits + split, first)


def _splits(rows: int, vocab: int) -> tuple[int, int]:
    """(number of splits, logits per split): about _TARGET_PROGRAMS programs in all."""
    blocks = cdiv(vocab, _BLOCK)
    splits = max(1, min(_MAX_SPLITS, blocks, cdiv(_TARGET_PROGRAMS, max(rows, 1))))
    chunk = cdiv(blocks, splits) * _BLOCK
    return cdiv(vocab, chunk), chunk


def draw_variant_rows(vocab: int, max_rows: int) -> list[int]:
    """The fewest row counts (1..max_rows) whose draws over vocab logits meet every variant of
    the kernel that any row count does: Triton specialises num_splits on being 1, a multiple of
    16, or neither (the start-up's stand-ins, executor/eager_stand_ins.py)."""
    first: dict[int, int] = {}
    for rows in range(1, max_rows + 1):
        splits = _splits(rows, vocab)[0]
        first.setdefault(1 if splits == 1 else 16 if splits % 16 == 0 else 0, rows)
    return sorted(first.values())


def _fast_log(t: Tensor) -> bool:
    """Whether the draw over t may take the PTX log2: an NVIDIA GPU, not the interpreter."""
    return t.is_cuda and torch.version.hip is None and not INTERPRET


def gumbel_argmax(logits: Tensor, temperature: Tensor, seeds: Tensor) -> Tensor:
    """logits [B, V] (any float dtype), temperature [B] float32 (0 = greedy), seeds [B] int64
    -> [B] int64 sampled ids."""
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    splits, chunk = _splits(rows, vocab)
    best = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    index = torch.empty(rows, splits, dtype=torch.int32, device=logits.device)
    if rows:
        _gumbel_argmax_kernel[(rows, splits)](
            logits,
            temperature.float().contiguous(),
            seeds.to(torch.int64).contiguous(),
            best,
            index,
            vocab,
            chunk,
            logits.stride(0),
            splits,
            BLOCK=_BLOCK,
            FAST_LOG=_fast_log(logits),
            num_warps=4,
        )
    if splits == 1:
        return index[:, 0].long()
    return index.gather(1, best.argmax(dim=1, keepdim=True)).squeeze(1).long()


@triton.jit
def _uniform_kernel(seed_ptr, out_ptr, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    first = tl.program_id(1) * BLOCK
    cols = first + tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]
    u = _uniform4(tl.load(seed_ptr + row), first, BLOCK // 4)
    tl.store(out_ptr + row.to(tl.int64) * vocab + cols, u, mask=cols < vocab)


def philox_uniform(seeds: Tensor, vocab: int) -> Tensor:
    """[B, vocab] float32: the uniforms gumbel_argmax draws for rows with these seeds (for
    checking it against gumbel_argmax_ref)."""
    out = torch.empty(seeds.shape[0], vocab, dtype=torch.float32, device=seeds.device)
    grid = (seeds.shape[0], cdiv(vocab, _BLOCK))
    _uniform_kernel[grid](seeds.to(torch.int64).contiguous(), out, vocab, BLOCK=_BLOCK)
    return out
