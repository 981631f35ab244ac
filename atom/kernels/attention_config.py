"""Launch configuration of the Triton paged attention (unified_attention.py): tile sizes per batch
shape and the split-KV heuristic. Everything here is computed from Python ints and the device's SM
count, never from device data: a captured CUDA graph replays the same launches.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from atom.kernels.grid import next_power_of_2

DEFAULT_NUM_SMS = 132  # an H100/H200; used where no CUDA device can be asked (the interpreter)
# The attention kernels' integer arguments that change from step to step. Triton compiles one
# variant per class of an int argument's value (1, a multiple of 16, other), so a class first met
# mid-run costs a compile there: a block table whose width (its row stride since the tables go up
# compact) was a multiple of 16 spent 2.3 s in its step's first attention call (H200 trace).
DO_NOT_SPECIALIZE = ("num_seqs", "num_splits", "stride_bt")
MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost (Q load, partials) dominates
SHORT_SPLIT_TOKENS = 128  # ... except in a short-context decode of few programs (choose_num_splits)
FEWEST_SPLIT_TOKENS = 64  # ... and of fewer still (an eighth of the SMs: short_split_tokens)
MAX_SPLITS = 64
SHORT_CONTEXT = 2 * MIN_TOKENS_PER_SPLIT - 1  # decode contexts up to this take short_decode_tiles
DESC_PROGRAMS_PER_SM = 8  # long-context decodes of this many programs an SM copy K/V by TMA


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    block_m: int  # rows of one program: block_q query tokens x group heads (padded)
    block_q: int
    tile: int  # KV tokens per loop iteration
    one_block_per_seq: bool
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # registers a thread at most (Triton's maxnreg); None: no cap
    kv_desc: bool = False  # K/V blocks through tensor descriptors (a tile of one or two blocks)


def launch_config(
    max_query_len: int,
    group: int,
    head_dim_p: int,
    programs: int = 0,
    max_seq_len: int | None = None,
    num_sms: int = DEFAULT_NUM_SMS,
) -> LaunchConfig:
    """Tile sizes from the Python ints only (so a captured CUDA graph sees the same launch).

    Measured on an H200 (bf16, H=32, H_kv=8, D=128): decode reads 3.9-4.4 TB/s of KV at
    B >= 32 with 128-token tiles (64: 3.3-3.7); prefill reaches 260-305 TFLOP/s with 64 x 64 tiles
    and 4 warps (128 x 128 with 8 warps: 240-307, 128 x 64: 233-276). A decode (one query a
    sequence) over contexts of at most SHORT_CONTEXT tokens takes short_decode_tiles, by its
    programs: num_seqs x KV heads (a CUDA graph's padding rows included).
    """
    rows = max(max_query_len, 1) * group
    if rows <= 64:
        # Decode and short speculative steps: one q-block per sequence, as few padded rows as
        # tl.dot allows (M >= 16). Memory bound: long tiles, K and V double-buffered (three
        # stages read 1-2.5% more in tune_attention_decode.py, but the bench's attention time
        # per step did not move: 3,604 -> 3,615 us, H200, 2026-11-29).
        block_m = max(16, next_power_of_2(rows))
        block_q = block_m // group
        short = max_seq_len is not None and max_seq_len <= SHORT_CONTEXT
        if max_query_len == 1 and short and head_dim_p <= 128:
            tile, stages = short_decode_tiles(programs, num_sms)
            return LaunchConfig(block_m, block_q, tile, True, 4, stages)
        if max_query_len == 1 and head_dim_p <= 128 and programs >= DESC_PROGRAMS_PER_SM * num_sms:
            return descriptor_decode(block_m, block_q)
        return pointer_decode(block_m, block_q, head_dim_p)
    # D = 256 halves the tile and doubles the warps to keep the fp32 accumulator in registers.
    tile, num_warps = (64, 4) if head_dim_p <= 128 else (32, 8)
    block_m = max(64, next_power_of_2(group))
    return LaunchConfig(block_m, max(block_m // group, 1), tile, False, num_warps, 2)


def pointer_decode(block_m: int, block_q: int, head_dim_p: int) -> LaunchConfig:
    """A long-context decode's tiles through pointer loads: 128 keys (64 at D = 256), K and V
    double-buffered, 4 warps (196 registers a thread: two programs an SM)."""
    return LaunchConfig(block_m, block_q, 128 if head_dim_p <= 128 else 64, True, 4, 2)


def descriptor_decode(block_m: int, block_q: int) -> LaunchConfig:
    """A long-context decode of at least DESC_PROGRAMS_PER_SM programs an SM: 32-key tiles of
    two 16-token blocks, each block's K and V copied by the tensor memory accelerator, one warp,
    six stages (attention_tiles.kv_descriptors; with other block sizes pointer_decode's). H200,
    the nano-vllm bench's heads over contexts of 100-2,048 tokens, GB/s of KV against
    pointer_decode's (tune_attention_decode.py, RESULTS forty-first sitting): batch 256 4,119
    vs 3,930, 128 3,761 vs 3,734, 64 3,105 vs 3,384: fewer programs leave each one's chain of
    small tiles exposed."""
    return LaunchConfig(block_m, block_q, 32, True, 1, 6, kv_desc=True)


class DecodeKind(NamedTuple):
    """What picks an attention layer's decode launches besides the batch and its longest context
    (decode_variant): one per distinct layer of a model."""

    num_kv_heads: int
    group: int  # query heads per KV head
    head_dim_p: int  # padded_head_dim
    fill_twice: bool = True  # choose_num_splits's
    unified: bool = True  # launch_config picks the tiles (MLA's latent kernel has its own)


def decode_variant(
    kind: DecodeKind, num_seqs: int, max_seq_len: int, num_sms: int
) -> tuple[int, LaunchConfig | None]:
    """The KV splits and (unified kernel) the tiles of a decode of num_seqs sequences whose
    longest context is max_seq_len: what a CUDA graph captured for that context cap fixes."""
    splits = choose_num_splits(
        num_seqs,
        kind.num_kv_heads,
        1,
        max_seq_len,
        num_sms,
        fill_twice=kind.fill_twice,
        short_splits=kind.unified,
    )
    if not kind.unified:
        return splits, None
    programs = num_seqs * kind.num_kv_heads
    return splits, launch_config(1, kind.group, kind.head_dim_p, programs, max_seq_len, num_sms)


def padded_head_dim(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def short_split_tokens(programs: int, num_sms: int) -> int | None:
    """Keys a split (and its one tile) of a short-context decode of `programs` programs: 128
    where they fill at most a quarter of the SMs, 64 where at most an eighth (Llama-3.1-8B's
    batches 1-2: at batch 1 its 8 programs split 8 ways, one 64-key tile each, over contexts of
    128-400 tokens at the graphs' 511-token cap: 4.040 ms a step against 4.064 with 128-key
    splits and 4.056 with 32-key ones; batch 2 4.109 vs 4.124; H200, RESULTS thirty-sixth
    sitting); None where they fill more (unsplit: choose_num_splits)."""
    if 8 * programs <= num_sms:
        return FEWEST_SPLIT_TOKENS
    return SHORT_SPLIT_TOKENS if 4 * programs <= num_sms else None


def short_decode_tiles(programs: int, num_sms: int) -> tuple[int, int]:
    """(tile, stages) of a decode over contexts of at most SHORT_CONTEXT tokens: a program runs a
    few tiles, so its fixed costs (the query, the output) weigh, and one stage of K/V in shared
    memory lets more programs share an SM. Where the programs cover every SM twice, 64-token
    tiles put four on one (126 registers a thread, where their 36 KB of shared memory would allow
    six: benchmarks/attention_resources.py). H200, Llama-3.1-8B's heads over contexts of 144-400
    tokens, tune_attention_decode.py: batch 128 2,847 GB/s against 2,420 with 128-token tiles and
    two stages; batch 1 / 8 88 / 650 GB/s with one stage of 128-token tiles against 81 / 595 with
    two (RESULTS, seventeenth sitting). Where they fill at most a quarter of the SMs, the tile is
    a split's keys (short_split_tokens: 64 where they fill at most an eighth)."""
    if programs >= 2 * num_sms:
        return 64, 1
    return short_split_tokens(programs, num_sms) or 128, 1


@functools.lru_cache(maxsize=16)
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(
    num_seqs: int,
    num_kv_heads: int,
    max_query_len: int,
    max_seq_len: int,
    num_sms: int,
    *,
    fill_twice: bool = True,
    short_splits: bool = True,
) -> int:
    """KV splits per (sequence, KV head) for flash-decoding.

    Only decode splits: a prefill has q-blocks enough to fill the GPU. A decode batch of
    num_seqs * num_kv_heads programs that covers every SM twice runs in one pass; one that
    covers them once takes two splits (H200, the bench's contexts of 100-2,048 tokens: batch 32
    x 8 KV heads reads 2.45-2.48 TB/s with two, 2.25 with one; RESULTS, fourteenth sitting);
    fewer programs aim at four per SM, each over at least MIN_TOKENS_PER_SPLIT keys (B=1 x 32k:
    33 splits 2.3 TB/s, 64 splits 2.4; B=8 x 32k: 5 splits 3.7, 8 splits 4.0). fill_twice=False
    (MLA's latent attention, mla_attention.SPLITS_FILL_TWICE) leaves a batch that covers every SM
    once unsplit.

    With short_splits (the unified kernel's), decodes over contexts of at most SHORT_CONTEXT
    tokens whose programs fill at most a quarter of the SMs split every SHORT_SPLIT_TOKENS keys
    instead (FEWEST_SPLIT_TOKENS where they fill an eighth: short_split_tokens), one tile a
    split: a program there walks its few tiles one after another, each waiting out its loads.
    H200, contexts of 128-400 tokens, a split per tile (4 at the graphs' cap) against none, ms a
    step (RESULTS, thirty-fifth sitting): Llama-3.1-8B batch 1 4.193 vs 4.287, batch 4 4.326 vs
    4.361, batch 8 (64 programs) 4.482 vs 4.469; Qwen3-0.6B batch 1 0.964 vs 1.037, batch 4
    1.029 vs 1.076, batch 8 1.151 vs 1.104. So batches of more than 32 programs stay unsplit.
    """
    programs = num_seqs * num_kv_heads
    if max_query_len != 1 or programs == 0 or programs >= (2 if fill_twice else 1) * num_sms:
        return 1
    wanted = 2 if programs >= num_sms else math.ceil(4 * num_sms / programs)
    split_tokens = None
    if short_splits and max_seq_len <= SHORT_CONTEXT:
        split_tokens = short_split_tokens(programs, num_sms)
    if split_tokens:  # one split a short tile: the kernel deals whole tiles out to the splits
        by_length = math.ceil(max_seq_len / split_tokens)
    else:
        by_length = max(max_seq_len // MIN_TOKENS_PER_SPLIT, 1)
    return max(1, min(wanted, by_length, MAX_SPLITS))
