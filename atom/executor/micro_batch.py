"""A decode batch run as two micro-batches on two CUDA streams, layer by layer, so that one's
attention (memory bound: it streams the KV cache) runs beside the other's GEMMs and small kernels
(latency bound at decode row counts, the SMs mostly waiting).

The runner's CUDA graphs capture it: the streams become two branches of one graph. With
`chain_attention` every attention launch waits for the one launched before it, on either stream,
so the attentions alternate (A0 B0 A1 B1 ...) and never split the bandwidth between them; the
work between two of one micro-batch's attentions runs beside the other's. Every model in
atom/models has the shape this needs: model.model.{embed_tokens, layers, norm}, each layer
(positions, hidden, residual) -> (hidden, residual), and model.compute_logits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from atom.executor.forward_context import ForwardContext, set_forward_context


@dataclass(slots=True)
class MicroBatch:
    input_ids: Tensor  # [T]
    positions: Tensor  # [T]
    context: ForwardContext  # its own attention metadata (rows of the step's buffers)
    logits: Tensor  # [T, padded vocab]: written by the LM head


class AttentionTurns:
    """Each attention launch waits for the previous one, whatever stream launched it."""

    def __init__(self) -> None:
        self._last: torch.cuda.Event | None = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        stream = torch.cuda.current_stream()
        if self._last is not None:
            stream.wait_event(self._last)
        yield
        self._last = torch.cuda.Event()
        self._last.record(stream)


def split_rows(size: int, parts: int = 2) -> list[tuple[int, int]]:
    """[start, end) of each micro-batch: as even as possible, the first ones the larger."""
    base, extra = divmod(size, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


def forward_micro_batches(
    model: nn.Module, batches: Sequence[MicroBatch], streams: Sequence[torch.cuda.Stream]
) -> None:
    """Runs each micro-batch on its stream (the first: the current one), layer i of every
    micro-batch launched before layer i + 1 of any, and leaves the current stream waiting for
    all of them."""
    inner = model.model
    main = torch.cuda.current_stream()
    for stream in streams[1:]:
        stream.wait_stream(main)
    states: list[tuple[Tensor, Tensor | None]] = []
    for batch, stream in zip(batches, streams, strict=True):
        with torch.cuda.stream(stream):
            states.append((inner.embed_tokens(batch.input_ids), None))
    for layer in inner.layers:
        for i, (batch, stream) in enumerate(zip(batches, streams, strict=True)):
            with torch.cuda.stream(stream), set_forward_context(batch.context):
                states[i] = layer(batch.positions, *states[i])
    for (hidden, residual), batch, stream in zip(states, batches, streams, strict=True):
        with torch.cuda.stream(stream):
            model.compute_logits(inner.norm(hidden, residual)[0], out=batch.logits)
    for stream in streams[1:]:
        main.wait_stream(stream)
