"""Attention over the paged KV cache; the runner binds each layer's cache tensor to `kv_cache`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from atom.executor.forward_context import get_attention_metadata
from atom.kernels.paged_attention import paged_attention_ref, reshape_and_cache_ref, sdpa


def sliding_window_of(config: Any, layer_idx: int) -> int | None:
    """The layer's attention window from an HF config, None for full attention."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if not getattr(config, "use_sliding_window", True):
        return None
    return window


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.sliding_window = sliding_window
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.k_scale = 1.0  # per-layer fp8 KV scales (1.0 until checkpoint/calibrated scales land)
        self.v_scale = 1.0
        self.kv_cache = torch.empty(0)  # [2, num_blocks, block_size, num_kv_heads, head_dim]

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] -> [T, heads, head_dim]."""
        meta = get_attention_metadata()
        if meta is None or self.kv_cache.numel() == 0:
            # Memory-profile forward: one fresh causal sequence, no cache.
            return sdpa(q, k, v, self.scale, self.sliding_window)
        reshape_and_cache_ref(k, v, self.kv_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        return paged_attention_ref(
            q,
            self.kv_cache,
            meta.block_tables,
            meta.seq_lens_cpu,
            meta.query_start_loc_cpu,
            self.scale,
            self.k_scale,
            self.v_scale,
            self.sliding_window,
        )
