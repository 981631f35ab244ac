"""Zeroed int32 counters, one per output tile, for kernels whose programs share a tile (split-K in
gemv.py, stream-K in streamk.py): the last program of a tile to arrive adds the parts and sets its
counter back to 0, so every launch leaves them zeroed and launches on one device share a buffer
(stream order keeps two launches apart)."""

from __future__ import annotations

import torch
from torch import Tensor

_COUNTERS: dict[torch.device, Tensor] = {}
_OUTGROWN: list[Tensor] = []  # counters a captured CUDA graph may still point at: never freed


def tile_counters(device: torch.device, n: int) -> Tensor:
    """At least n zeroed counters on device. A buffer that grows stays allocated: graphs captured
    before point at it (the first buffer, 4096 counters, has served every launch so far)."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        if counters is not None:
            _OUTGROWN.append(counters)
        counters = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters
