"""Multi-head latent attention (DeepSeek-V2/V3) over a paged cache of compressed latents.

Per token the cache holds one latent row, shared by every head:

    kv_cache [1, num_blocks, block_size, 1, kv_lora_rank + rope_dim]
    row = c_kv (kv_a_layernorm output, kv_lora_rank) | k_pe (roped, rope_dim)

kv_b_proj [H * (nope + v), kv_lora_rank] turns c_kv into per-head keys (W_UK) and values (W_UV).
Prefill up-projects the sequence's latents and runs causal attention; decode absorbs W_UK into the
query and W_UV into the output, so it reads only the latents (the point of MLA: a short cache row
and no per-token up-projection). Both are torch references: the CPU path and a kernel's oracle.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from atom.executor.forward_context import get_forward_context
from atom.kernels.paged_attention import FP8_DTYPES, sdpa
from atom.layers.attention import Attention


def mla_expanded_ref(
    q: Tensor, latents: Tensor, w_kv_b: Tensor, nope_dim: int, v_dim: int, scale: float
) -> Tensor:
    """Causal attention with up-projected K/V; the queries are the tail of the context.

    q [T, H, nope + rope], latents [L, rank + rope] (L >= T), w_kv_b [H * (nope + v), rank]
    -> [T, H, v].
    """
    rank = w_kv_b.shape[1]
    c_kv, k_pe = latents.split([rank, latents.shape[1] - rank], dim=-1)
    kv = (c_kv @ w_kv_b.t()).view(latents.shape[0], -1, nope_dim + v_dim)  # [L, H, nope + v]
    k_nope, v = kv.split([nope_dim, v_dim], dim=-1)
    k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, k_nope.shape[1], -1)], dim=-1)
    return sdpa(q, k, v.contiguous(), scale)


def mla_absorbed_ref(
    q: Tensor, latents: Tensor, w_kv_b: Tensor, nope_dim: int, v_dim: int, scale: float
) -> Tensor:
    """One query token over all of latents [L, rank + rope], in the latent space.

    q [H, nope + rope] -> [H, v]; equal to mla_expanded_ref up to rounding:
    q_nope . (W_UK c) = (q_nope W_UK) . c, and sum_l p_l W_UV c_l = W_UV (sum_l p_l c_l).
    """
    rank = w_kv_b.shape[1]
    w = w_kv_b.float().view(-1, nope_dim + v_dim, rank)  # [H, nope + v, rank]
    w_uk, w_uv = w.split([nope_dim, v_dim], dim=1)
    c_kv, k_pe = latents.float().split([rank, latents.shape[1] - rank], dim=-1)
    q_nope, q_pe = q.float().split([nope_dim, q.shape[-1] - nope_dim], dim=-1)
    q_lat = torch.einsum("hn,hnr->hr", q_nope, w_uk)  # [H, rank]
    scores = (q_lat @ c_kv.t() + q_pe @ k_pe.t()) * scale  # [H, L]
    out_lat = scores.softmax(dim=-1) @ c_kv  # [H, rank]
    return torch.einsum("hr,hvr->hv", out_lat, w_uv).to(q.dtype)


class MLAAttention(Attention):
    """An `Attention` for the runner (cache allocation, forward context) with a latent cache."""

    # The reference loops over sequences with host-side lengths: no CUDA graphs until a kernel.
    syncs_host: ClassVar[bool] = True

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

    def forward(self, q: Tensor, latent: Tensor, w_kv_b: Tensor) -> Tensor:  # type: ignore[override]
        """q [T, H, nope + rope], latent [T, rank + rope] (c_kv | roped k_pe), w_kv_b the local
        kv_b_proj weight [H * (nope + v), rank] -> [T, H, v]."""
        out = q.new_empty(q.shape[0], q.shape[1], self.v_dim)
        if torch.compiler.is_compiling():
            torch.ops.atom.mla_attention(q, latent, w_kv_b, out, self.layer_name)
        else:
            self.forward_into(q, latent, w_kv_b, out)
        return out

    def forward_into(self, q: Tensor, latent: Tensor, w_kv_b: Tensor, out: Tensor) -> None:  # type: ignore[override]
        context = get_forward_context()
        meta = None if context is None else context.attn
        args = (w_kv_b, self.nope_dim, self.v_dim, self.scale)
        if meta is None or self.kv_cache.numel() == 0:
            if self.kv_amax is not None:  # fp8 calibration: one scale for the whole row
                amax = max(self.kv_amax[0], latent.abs().max().item())
                self.kv_amax = (amax, amax)
            out.copy_(mla_expanded_ref(q, latent, *args))
            return
        self._write(latent, meta.slot_mapping)
        block_size = self.kv_cache.shape[2]
        rows = self.kv_cache[0, :, :, 0]  # [num_blocks, block_size, rank + rope]
        for i, kv_len in enumerate(meta.seq_lens_cpu):
            start, end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
            blocks = meta.block_tables[i, : -(-kv_len // block_size)].long()
            ctx = self._read(rows, blocks, q.dtype)[:kv_len]
            if end - start == 1:
                out[start] = mla_absorbed_ref(q[start], ctx, *args)
            else:
                out[start:end] = mla_expanded_ref(q[start:end], ctx, *args)

    def _write(self, latent: Tensor, slot_mapping: Tensor) -> None:
        keep = slot_mapping >= 0  # negative slots: CUDA-graph padding rows
        latent, slots = latent[keep], slot_mapping[keep]
        cache = self.kv_cache[0].view(-1, self.head_dim)  # [num_blocks * block_size, row]
        if cache.dtype in FP8_DTYPES:
            fp8_max = torch.finfo(cache.dtype).max
            latent = (latent.float() / self.k_scale).clamp(-fp8_max, fp8_max).to(cache.dtype)
            cache.view(torch.uint8).index_copy_(0, slots, latent.view(torch.uint8))
        else:
            cache.index_copy_(0, slots, latent.to(cache.dtype))

    def _read(self, rows: Tensor, blocks: Tensor, dtype: torch.dtype) -> Tensor:
        """The latents of the given blocks ([n]) as [n * block_size, rank + rope]."""
        if rows.dtype in FP8_DTYPES:  # CPU indexing is not built for float8
            ctx = rows.view(torch.uint8)[blocks].view(rows.dtype).flatten(0, 1)
            return ctx.to(dtype) * self.k_scale
        return rows[blocks].flatten(0, 1).to(dtype)


@torch.library.custom_op("atom::mla_attention", mutates_args=("out",))
def _mla_attention_op(
    q: Tensor, latent: Tensor, w_kv_b: Tensor, out: Tensor, layer_name: str
) -> None:
    context = get_forward_context()
    assert context is not None, "atom.mla_attention runs inside the runner's forward context"
    layer = context.layers[layer_name]
    with layer.trace_scope():
        layer.forward_into(q, latent, w_kv_b, out)


@_mla_attention_op.register_fake
def _(q: Tensor, latent: Tensor, w_kv_b: Tensor, out: Tensor, layer_name: str) -> None:
    return None
