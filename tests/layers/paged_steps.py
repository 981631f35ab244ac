"""Mixed steps through a paged KV cache for the attention layers' tests: prompts (one in two
chunks), then decode rows; the last sequence is a padding row (seq_len 0, slot -1) as in a
CUDA-graph batch. Block ids are shuffled across sequences.

    sequence:  0              1                    2     3 (padding)
    step 0:    17 tokens      23 tokens            1     0
    step 1:    1 (decode)     17 (second chunk)    1     0
    step 2:    1              1                    -     1
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from atom.executor.forward_context import AttentionMetadata

BLOCK = 16
STEPS = [[17, 23, 1, 0], [1, 17, 1, 0], [1, 1, 0, 1]]
LENGTHS = [19, 41, 2, 0]  # each sequence's context after the last step
TABLES = torch.tensor([[7, 2, 0], [1, 9, 4], [11, 0, 0], [0, 0, 0]], dtype=torch.int32)
NUM_BLOCKS = 12


@dataclass
class Step:
    meta: AttentionMetadata
    positions: Tensor  # [T] (padding rows: 0)
    rows: list[slice | None]  # each sequence's rows of its whole sequence this step; None: padding
    counts: list[int]  # query tokens of each sequence

    def gather(self, whole: list[Tensor]) -> Tensor:
        """This step's query rows of per-sequence tensors (random rows for the padding)."""
        parts = [
            w[r] if r is not None else torch.randn(n, *w.shape[1:])
            for w, r, n in zip(whole, self.rows, self.counts, strict=True)
        ]
        return torch.cat(parts)


def paged_steps() -> Iterator[Step]:
    done = [0] * len(LENGTHS)
    for counts in STEPS:
        qsl, seq_lens, slots, positions, rows = [0], [], [], [], []
        for i, n in enumerate(counts):
            padding = LENGTHS[i] == 0
            qsl.append(qsl[-1] + n)
            seq_lens.append(0 if padding else done[i] + n)
            pos = torch.arange(done[i], done[i] + n)
            positions.append(torch.zeros_like(pos) if padding else pos)
            slot = TABLES[i, pos // BLOCK].long() * BLOCK + pos % BLOCK
            slots.append(torch.full_like(slot, -1) if padding else slot)
            rows.append(None if padding else slice(done[i], done[i] + n))
            done[i] += 0 if padding else n
        meta = AttentionMetadata(
            torch.cat(slots), TABLES, torch.tensor(seq_lens, dtype=torch.int32),
            torch.tensor(qsl, dtype=torch.int32), seq_lens, qsl, max(counts), max(seq_lens),
        )  # fmt: skip
        yield Step(meta, torch.cat(positions), rows, counts)
    assert done == LENGTHS
