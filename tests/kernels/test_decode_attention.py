"""Decode attention with the rotary embedding and cache write fused in, against the chain of
references (rotary_and_cache_ref, then paged_attention_ref) in float32.

Without CUDA the kernel runs in the Triton interpreter on CPU tensors (conftest.py): small sizes,
float32 and float16 (the interpreter mishandles bfloat16; fp8 caches run on a GPU only).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from atom.kernels.attention_config import fuse_decode_rope
from atom.kernels.decode_attention import decode_attention, decode_attention_ref
from tests.kernels.block_tables import shuffled_block_tables

BLOCK = 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAX_POSITION = 128
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
# seq_len counts this step's token; 0 is a CUDA graph's padding row (slot -1, position 0).
SEQ_LENS = [50, 1, 17, 16, 0, 33, 2]


@dataclass
class Decode:
    qkv: torch.Tensor  # [B, (H + 2 H_kv) D]: q, k, v are views of it, as models pass them
    heads: int
    kv_heads: int
    cache: torch.Tensor  # [2, blocks, BLOCK, H_kv, D]: the cached context
    tables: torch.Tensor
    seq_lens: list[int]
    cos_sin: torch.Tensor
    rotary_dim: int
    norm: tuple[torch.Tensor, torch.Tensor, float] | None

    def qkv_views(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        b, d = len(self.seq_lens), self.cache.shape[-1]
        qkv = self.qkv.to(DEVICE, dtype)
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], -1)
        return q.view(b, -1, d), k.view(b, -1, d), v.view(b, -1, d)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, slots): each row's token sits at seq_len - 1."""
        pos = [max(s - 1, 0) for s in self.seq_lens]
        slots = [
            int(self.tables[i, p // BLOCK]) * BLOCK + p % BLOCK if s else -1
            for i, (s, p) in enumerate(zip(self.seq_lens, pos, strict=True))
        ]
        return torch.tensor(pos, device=DEVICE), torch.tensor(slots, device=DEVICE)

    def run(self, dtype: torch.dtype, is_neox: bool, cache_dtype=None, **kw: object):
        """(out, cache after the step) of the kernel."""
        q, k, v = self.qkv_views(dtype)
        positions, slots = self.rows()
        cache = self.cache.to(DEVICE, cache_dtype or dtype)
        seq_lens = torch.tensor(self.seq_lens, dtype=torch.int32, device=DEVICE)
        qsl = torch.arange(len(self.seq_lens) + 1, dtype=torch.int32, device=DEVICE)
        norm = self._norm(dtype)
        out = decode_attention(
            q, k, v, positions, cache, slots, self.tables.to(DEVICE), seq_lens, qsl,
            max(self.seq_lens), self.cos_sin.to(DEVICE), self.rotary_dim, is_neox, norm,
            kw.pop("scale", 0.3), **kw,
        )  # fmt: skip
        return out, cache

    def expected(self, dtype: torch.dtype, is_neox: bool, cache_dtype=None, **kw: object):
        """(out, cache) of the references, on the device, inputs rounded to dtype."""
        q, k, v = self.qkv_views(dtype)
        positions, slots = self.rows()
        cache = self.cache.to(DEVICE, cache_dtype or dtype)
        kw.pop("num_splits", None)
        out = decode_attention_ref(
            q, k, v, positions, cache, slots, self.tables.to(DEVICE), self.seq_lens,
            self.cos_sin.to(DEVICE), self.rotary_dim, is_neox, self._norm(dtype),
            kw.pop("scale", 0.3), **kw,
        )  # fmt: skip
        return out, cache

    def _norm(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if self.norm is None:
            return None
        q_w, k_w, eps = self.norm
        return q_w.to(DEVICE, dtype), k_w.to(DEVICE, dtype), eps


def make_decode(
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    rotary_dim: int | None = None,
    norm: bool = False,
    seq_lens: list[int] = SEQ_LENS,
    seed: int = 0,
) -> Decode:
    gen = torch.Generator().manual_seed(seed)
    tables, num_blocks = shuffled_block_tables([max(s, 1) for s in seq_lens], BLOCK, gen)
    qkv = torch.randn(len(seq_lens), (heads + 2 * kv_heads) * head_dim, generator=gen)
    cache = torch.randn(2, num_blocks, BLOCK, kv_heads, head_dim, generator=gen)
    rotary_dim = rotary_dim or head_dim
    angles = torch.rand(MAX_POSITION, rotary_dim // 2, generator=gen) * 100
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
    weights = None
    if norm:
        w = [torch.rand(head_dim, generator=gen).add(0.5) for _ in range(2)]
        weights = (w[0], w[1], 1e-6)
    return Decode(qkv, heads, kv_heads, cache, tables, seq_lens, cos_sin, rotary_dim, weights)


def _check(batch: Decode, dtype: torch.dtype, is_neox: bool = True, **kw: object) -> None:
    out, cache = batch.run(dtype, is_neox, **dict(kw))
    expected, expected_cache = batch.expected(dtype, is_neox, **dict(kw))
    torch.testing.assert_close(out.float(), expected.float(), **TOL[dtype])
    # The cache holds what rotary_and_cache writes: the rotated k rounds where it does.
    torch.testing.assert_close(cache.float(), expected_cache.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("is_neox", "norm"), [(True, False), (True, True), (False, True)])
def test_matches_reference(dtype: torch.dtype, is_neox: bool, norm: bool) -> None:
    _check(make_decode(norm=norm), dtype, is_neox)


@pytest.mark.parametrize("num_splits", [2, 3, 5])
def test_split_kv(num_splits: int) -> None:
    """The new key joins the last split, whatever the others hold (some are empty)."""
    _check(make_decode(heads=8, kv_heads=2, norm=True), torch.float32, num_splits=num_splits)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "rotary_dim", "is_neox"),
    [(3, 1, 48, 16, True), (4, 4, 64, 32, False), (2, 1, 80, 80, True)],
)
def test_shapes_and_partial_rotary(
    heads: int, kv_heads: int, head_dim: int, rotary_dim: int, is_neox: bool
) -> None:
    """Odd group sizes, head dims below a power of two, features past rotary_dim."""
    batch = make_decode(heads, kv_heads, head_dim, rotary_dim, norm=True, seed=head_dim)
    _check(batch, torch.float32, is_neox)


@pytest.mark.parametrize("num_splits", [None, 2])
def test_sliding_window_softcap_and_sinks(num_splits: int | None) -> None:
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    kw = dict(sliding_window=20, softcap=5.0, sinks=sinks, num_splits=num_splits)
    _check(make_decode(seed=2), torch.float32, **kw)


def test_padding_rows_write_nothing_and_give_zeros() -> None:
    batch = make_decode(seq_lens=[0, 19, 0])
    out, cache = batch.run(torch.float32, True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], out[0])
    _, slots = batch.rows()
    written = torch.zeros(cache.shape[1] * BLOCK, dtype=torch.bool, device=DEVICE)
    written[slots[1]] = True
    before = batch.cache.to(DEVICE).flatten(1, 2)
    assert torch.equal(cache.flatten(1, 2)[:, ~written], before[:, ~written])


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter's float8 stores are unreliable")
@pytest.mark.parametrize("num_splits", [None, 2])
def test_fp8_cache(num_splits: int | None) -> None:
    """fp8 KV with per-layer scales: the new k and v stored scaled, read back as stored."""
    batch = make_decode(norm=True)
    kw = dict(cache_dtype=torch.float8_e4m3fn, k_scale=0.5, v_scale=2.0, num_splits=num_splits)
    out, cache = batch.run(torch.float16, True, **dict(kw))
    expected, expected_cache = batch.expected(torch.float16, True, **dict(kw))
    torch.testing.assert_close(out.float(), expected.float(), atol=5e-3, rtol=5e-3)
    # One fp8 step (1/8 relative) apart where the rotated k rounded one ulp apart.
    torch.testing.assert_close(cache.float(), expected_cache.float(), atol=2e-2, rtol=0.13)


@pytest.mark.skipif(DEVICE != "cuda", reason="bfloat16: the interpreter mishandles it")
def test_bfloat16() -> None:
    _check(make_decode(heads=16, kv_heads=8, head_dim=128, norm=True), torch.bfloat16)


def test_rejects_bad_inputs() -> None:
    batch = make_decode()
    q, k, v = batch.qkv_views(torch.float32)
    positions, slots = batch.rows()
    cache = batch.cache.to(DEVICE)
    seq_lens = torch.tensor(batch.seq_lens, dtype=torch.int32, device=DEVICE)
    qsl = torch.arange(len(batch.seq_lens) + 1, dtype=torch.int32, device=DEVICE)
    args = (batch.tables.to(DEVICE), seq_lens, qsl, 50, batch.cos_sin.to(DEVICE), 32, True, None)
    with pytest.raises(ValueError, match="do not fit the cache"):
        decode_attention(q, k[:, :1], v, positions, cache, slots, *args, 0.3)
    with pytest.raises(ValueError, match="one entry per row"):
        decode_attention(q, k, v, positions[:-1], cache, slots, *args, 0.3)
    with pytest.raises(ValueError, match="int32"):
        bad = (args[0], seq_lens.long(), *args[2:])
        decode_attention(q, k, v, positions, cache, slots, *bad, 0.3)


def test_fused_only_where_programs_fill_the_sms_at_most_twice() -> None:
    """Larger decode batches keep the rotary kernel: the fused one's per-program start costs
    more there than the launch it saves (attention_config.fuse_decode_rope)."""
    assert fuse_decode_rope(32, 8, 132) and fuse_decode_rope(1, 1, 132)
    assert not fuse_decode_rope(33, 8, 132) and not fuse_decode_rope(264, 1, 132)
