"""Per-step attention metadata, visible to attention layers only while the runner's forward runs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass(slots=True)
class AttentionMetadata:
    """A flat batch of B sequences, T tokens in all, over the paged KV cache.

    Sequence i owns query tokens [query_start_loc[i], query_start_loc[i+1]); after this step it
    holds seq_lens[i] tokens of context, the last of which are its query tokens. Padding rows of a
    CUDA-graph batch have seq_lens 0 and slot -1. The *_cpu lists serve the CPU reference path.
    """

    slot_mapping: Tensor  # [T] int64: block_id * block_size + offset for each new token
    block_tables: Tensor  # [B, max_blocks] int32 (may be a column slice of a wider buffer)
    seq_lens: Tensor  # [B] int32
    query_start_loc: Tensor  # [B + 1] int32
    seq_lens_cpu: list[int]
    query_start_loc_cpu: list[int]
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


@dataclass(slots=True)
class ForwardContext:
    # Attention layers in model order: compiled graphs call attention as an opaque custom op that
    # knows its layer only by its index here (Attention.layer_index).
    layers: Sequence[Any]
    attn: AttentionMetadata | None  # None: a forward with no KV cache (memory profile, calibration)


_CONTEXT: ContextVar[ForwardContext | None] = ContextVar("atom_forward_context", default=None)


@contextmanager
def set_forward_context(context: ForwardContext) -> Iterator[None]:
    token = _CONTEXT.set(context)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def get_forward_context() -> ForwardContext | None:
    """None outside a runner step (e.g. a model called directly in a test)."""
    return _CONTEXT.get()


def get_attention_metadata() -> AttentionMetadata | None:
    context = _CONTEXT.get()
    return None if context is None else context.attn


def context_layer(layer_index: Tensor, op: str) -> Any:
    """The attention layer a custom op names by its index (the op runs inside a runner step)."""
    context = _CONTEXT.get()
    assert context is not None, f"{op} runs inside the runner's forward context"
    return context.layers[int(layer_index)]
