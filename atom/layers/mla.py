"""Multi-head latent attention (DeepSeek-V2/V3) over a paged cache of compressed latents.

Per token the cache holds one latent row, shared by every head:

    kv_cache [1, num_blocks, block_size, 1, kv_lora_rank + rope_dim]
    row = c_kv (kv_a_layernorm output, kv_lora_rank) | k_pe (roped, rope_dim)

kv_b_proj [H * (nope + v), kv_lora_rank] turns c_kv into per-head keys (W_UK) and values (W_UV).
On CUDA every row runs absorbed (W_UK into the query, W_UV after), so attention reads only the
latents (the point of MLA: a short cache row and no per-token up-projection), in a Triton kernel
(atom/kernels/mla_attention.py). On the CPU the torch references run: decode absorbed, prefill
with the context up-projected (atom/kernels/mla_reference.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from atom.executor.forward_context import context_layer, get_attention_metadata
from atom.kernels import mla_attention, ops
from atom.kernels.attention_config import DecodeKind
from atom.kernels.mla_reference import mla_expanded_ref
from atom.layers.attention import Attention


class MLAAttention(Attention):
    """An `Attention` for the runner (cache allocation, forward context) with a latent cache."""

    # CUDA runs the Triton kernel on device lengths only: no host sync, CUDA graphs can capture
    # it (tests/gpu/test_mla_gpu.py replays one).

    def __init__(
        self,
        num_heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        scale: float,
    ) -> None:
        # One shared "KV head" whose row is the latent: the runner sizes blocks from these.
        super().__init__(num_heads, kv_lora_rank + qk_rope_head_dim, scale, num_kv_heads=1)
        self.kv_lora_rank = kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (1, num_blocks, block_size, 1, self.head_dim)

    def decode_kind(self) -> DecodeKind:
        """One KV head (splits no less than its head groups), its own split rule, and tiles of
        its own kernel (mla_attention.mla_launch_config) that no context changes."""
        return DecodeKind(1, self.num_heads, self.head_dim, mla_attention.SPLITS_FILL_TWICE, False)

    def forward(self, q: Tensor, latent: Tensor, w_kv_b: Tensor) -> Tensor:  # type: ignore[override]
        """q [T, H, nope + rope], latent [T, rank + rope] (c_kv | roped k_pe), w_kv_b the local
        kv_b_proj weight [H * (nope + v), rank] -> [T, H, v]."""
        out = q.new_empty(q.shape[0], q.shape[1], self.v_dim)
        if torch.compiler.is_compiling():
            torch.ops.atom.mla_attention(q, latent, w_kv_b, out, self.layer_index)
        else:
            self.forward_into(q, latent, w_kv_b, out)
        return out

    def forward_into(self, q: Tensor, latent: Tensor, w_kv_b: Tensor, out: Tensor) -> None:  # type: ignore[override]
        meta = get_attention_metadata()
        if meta is None or self.kv_cache.numel() == 0:
            if self.kv_amax is not None:  # fp8 calibration: one scale for the whole row
                amax = max(self.kv_amax[0], latent.abs().max().item())
                self.kv_amax = (amax, amax)
            out.copy_(mla_expanded_ref(q, latent, w_kv_b, self.nope_dim, self.v_dim, self.scale))
            return
        ops.write_latent_cache(latent, self.kv_cache, meta.slot_mapping, self.k_scale)
        ops.mla_attention(
            q, self.kv_cache, meta, w_kv_b, self.nope_dim, self.v_dim, self.scale, self.k_scale, out
        )


@torch.library.custom_op("atom::mla_attention", mutates_args=("out",))
def _mla_attention_op(
    q: Tensor, latent: Tensor, w_kv_b: Tensor, out: Tensor, layer_index: Tensor
) -> None:
    layer = context_layer(layer_index, "atom.mla_attention")
    with layer.trace_scope():
        layer.forward_into(q, latent, w_kv_b, out)


@_mla_attention_op.register_fake
def _(q: Tensor, latent: Tensor, w_kv_b: Tensor, out: Tensor, layer_index: Tensor) -> None:
    return None
