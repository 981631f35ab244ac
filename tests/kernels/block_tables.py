"""Paged-attention test batches: shuffled, non-contiguous block tables and query offsets."""

from __future__ import annotations

import itertools

import torch

SPARE_BLOCKS = 5  # blocks owned by no sequence
SPARE_COLUMNS = 2  # table columns past the longest sequence's blocks


def shuffled_block_tables(
    seq_lens: list[int], block_size: int, gen: torch.Generator
) -> tuple[torch.Tensor, int]:
    """(int32 tables [len(seq_lens), max blocks + SPARE_COLUMNS], number of blocks): every
    sequence gets its blocks from one random permutation, so no table is contiguous."""
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + SPARE_BLOCKS
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq) + SPARE_COLUMNS, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = perm[used : used + n]
        used += n
    return tables, num_blocks


def query_start_loc(q_lens: list[int]) -> list[int]:
    """[0, q0, q0 + q1, ...]: each sequence's first query row."""
    return [0, *itertools.accumulate(q_lens)]
