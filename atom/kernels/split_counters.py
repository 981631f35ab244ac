"""Tile counters for kernels whose programs split one output tile between them (gemv's K splits,
attention's KV splits): each program stores its partial, adds one to its tile's counter, and the
last to arrive combines the partials in split order (the same result whatever the arrival order)
and re-arms the counter to 0. No second kernel and no memset: a launch leaves every counter at 0.

One buffer per device serves every such launch: they run in stream order, and a PDL kernel waits
for the one before it to finish before its first read (launch.pdl_start), so two launches never
use the counters at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

MIN_COUNTERS = 4096  # past any split launch: attention splits below 2 x SMs programs
_COUNTERS: dict[torch.device, Tensor] = {}
_OUTGROWN: list[Tensor] = []  # counters a captured CUDA graph may still point at: never freed


def split_counters(device: torch.device, n: int) -> Tensor:
    """At least n zeroed int32 tile counters on device. A buffer that grows stays allocated:
    graphs captured before point at it (graphs warm each size up before capturing it, so the
    buffer grows outside a capture)."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        if counters is not None:
            _OUTGROWN.append(counters)
        counters = torch.zeros(max(n, MIN_COUNTERS), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters
