"""Rotary position embedding with a precomputed [max_position, rotary_dim] cos|sin cache.

Frequencies come from transformers' own rope initialisers (llama3, yarn, linear, longrope, ...), so
every scaling scheme matches the reference implementation by construction. Layers with the same
frequencies share one cache tensor (Llama-3.1's 131,072 positions x 128 floats are 64 MiB: one
per layer was 2 GiB of an 8B model's memory and a second of its start-up).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from atom.kernels import ops
from atom.layers.norm import RMSNorm


def rope_parameters(config: Any) -> dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _inv_freq(config: Any, head_dim: int) -> tuple[Tensor, float]:
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        dim = int(head_dim * factor)
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    def __init__(
        self, config: Any, head_dim: int, max_position: int, is_neox_style: bool = True
    ) -> None:
        super().__init__()
        self.is_neox_style = is_neox_style
        cache = _shared_cos_sin_cache(config, head_dim, max_position)
        self.rotary_dim = cache.shape[-1]
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(
        self,
        positions: Tensor,
        q: Tensor,
        k: Tensor,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
    ) -> tuple[Tensor, Tensor]:
        """q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim] (views
        are fine) -> new (q, k); fp32 math, features past rotary_dim pass through. With q_norm
        and k_norm (Qwen3, GLM-4.5's per-head RMSNorm), q and k are normed first, in the same
        kernel."""
        norm, q, k = self._norms(q, k, q_norm, k_norm)
        args = (self.cos_sin_cache, self.rotary_dim, self.is_neox_style, norm)
        return ops.rotary_embedding(positions, q, k, *args)

    def forward_into_cache(
        self,
        positions: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        kv_cache: Tensor,
        slot_mapping: Tensor,
        k_scale: float,
        v_scale: float,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
    ) -> Tensor:
        """forward, with the rotated k and v written into the paged kv_cache at slot_mapping
        (the attention layer's cache write) instead of returned: the rotated q only."""
        norm, q, k = self._norms(q, k, q_norm, k_norm)
        args = (self.cos_sin_cache, self.rotary_dim, self.is_neox_style, k_scale, v_scale, norm)
        return ops.rotary_and_cache(positions, q, k, v, kv_cache, slot_mapping, *args)

    @staticmethod
    def _norms(
        q: Tensor, k: Tensor, q_norm: RMSNorm | None, k_norm: RMSNorm | None
    ) -> tuple[tuple[Tensor, Tensor, float] | None, Tensor, Tensor]:
        """(weights and eps for the kernel to norm q and k itself, q, k); norms it cannot fuse
        (unequal eps or dtypes: no model has them) are applied here instead."""
        if q_norm is None or k_norm is None:
            return None, q, k
        if q_norm.eps == k_norm.eps and q_norm.weight.dtype == k_norm.weight.dtype == q.dtype:
            return (q_norm.weight, k_norm.weight, q_norm.eps), q, k
        return None, q_norm.norm(q), k_norm.norm(k)


# (frequencies, scaling, positions, device) -> the cache tensor, while some module holds it.
_CACHES: weakref.WeakValueDictionary[tuple[bytes, float, int, str], Tensor] = (
    weakref.WeakValueDictionary()
)


def _shared_cos_sin_cache(config: Any, head_dim: int, max_position: int) -> Tensor:
    """The cache on the device the model is being built on, one tensor for equal frequencies.
    float32 whatever the model dtype; built on the CPU (transformers' initialisers return CPU
    tensors), then moved."""
    with torch.device("cpu"):
        inv_freq, scaling = _inv_freq(config, head_dim)
    device = torch.get_default_device()
    key = (inv_freq.numpy().tobytes(), scaling, max_position, str(device))
    cache = _CACHES.get(key)
    if cache is None:
        cache = _cos_sin_cache(inv_freq, scaling, max_position).to(device)
        _CACHES[key] = cache
    return cache


def _cos_sin_cache(inv_freq: Tensor, scaling: float, max_position: int) -> Tensor:
    """[max_position, rotary_dim] float32 on the CPU: cos | sin, times the attention scaling."""
    with torch.device("cpu"):
        t = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)
        return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1).float()
