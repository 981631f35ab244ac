"""Triton MLA attention over the paged latent cache against the float32 torch references.

Without CUDA the kernels run in the Triton interpreter (conftest.py), so the latent is narrow
(rank 32-128, rope 8-32 instead of 512 and 64); tests/gpu/test_mla_gpu.py runs the real shapes.
Sequences are (seq_len, q_len): seq_len counts the cached context plus this step's q_len tokens;
(0, 0) is a padding row of the batch, (0, 1) a padded decode slot of a CUDA-graph batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from atom.kernels.attention_config import DEFAULT_NUM_SMS, choose_num_splits
from atom.kernels.latent_cache import write_latent_cache, write_latent_cache_ref
from atom.kernels.mla_attention import (
    mla_latent_attention,
    mla_launch_config,
    mla_paged_attention,
)
from atom.kernels.mla_reference import (
    mla_latent_attention_ref,
    mla_paged_attention_ref,
)
from tests.kernels.block_tables import query_start_loc, shuffled_block_tables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

DECODE = [(1, 1), (15, 1), (16, 1), (17, 1), (50, 1), (0, 1)]
# decode rows, chunks over a cached prefix, whole prompts, padding rows
MIXED = [(17, 1), (1, 1), (40, 7), (33, 17), (16, 16), (0, 0), (37, 37), (16, 1)]


def _i32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


@dataclass
class Batch:
    q_lat: torch.Tensor  # [T, H, R] float32
    q_pe: torch.Tensor  # [T, H, P] float32
    cache: torch.Tensor  # [1, num_blocks, block_size, 1, R + P] float32
    tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    seqs: list[tuple[int, int]]
    qsl: list[int]
    scale: float

    @property
    def rows(self) -> int:
        return self.qsl[-1]

    @property
    def seq_lens(self) -> list[int]:
        return [s for s, _ in self.seqs]

    def run(self, dtype: torch.dtype, cache: torch.Tensor | None = None, **kw: object):
        cache = self.cache.to(dtype) if cache is None else cache
        return mla_latent_attention(
            self.q_lat.to(dtype).to(DEVICE),
            self.q_pe.to(dtype).to(DEVICE),
            cache.to(DEVICE),
            self.tables.to(DEVICE),
            _i32(self.seq_lens),
            _i32(self.qsl),
            max(q for _, q in self.seqs),
            max(self.seq_lens),
            self.scale,
            **kw,
        )

    def expected(self, dtype: torch.dtype, cache: torch.Tensor | None = None, **kw: object):
        """float32 reference on the inputs rounded to dtype."""
        cache = self.cache.to(dtype).float() if cache is None else cache
        q_lat, q_pe = self.q_lat.to(dtype).float(), self.q_pe.to(dtype).float()
        args = (self.tables, self.seq_lens, self.qsl, self.scale)
        return mla_latent_attention_ref(q_lat, q_pe, cache, *args, **kw)


def make_batch(
    seqs: list[tuple[int, int]],
    heads: int,
    rank: int,
    rope: int,
    block_size: int = 16,
    extra_tokens: int = 0,
) -> Batch:
    """Random latents, shuffled non-contiguous block ids; NaN in every slot past a sequence's
    end and in unused blocks, so that a key read outside the context poisons the output."""
    gen = torch.Generator().manual_seed(hash((tuple(seqs), heads, rank, rope, block_size)) % 2**31)
    tables, num_blocks = shuffled_block_tables([s for s, _ in seqs], block_size, gen)
    qsl = query_start_loc([q for _, q in seqs])
    tokens = qsl[-1] + extra_tokens
    cache = torch.full((1, num_blocks, block_size, 1, rank + rope), float("nan"))
    for i, (seq_len, _) in enumerate(seqs):
        slots = _slots(tables[i], seq_len, block_size)
        cache.view(-1, rank + rope)[slots] = torch.randn(seq_len, rank + rope, generator=gen)
    return Batch(
        q_lat=torch.randn(tokens, heads, rank, generator=gen),
        q_pe=torch.randn(tokens, heads, rope, generator=gen),
        cache=cache,
        tables=tables,
        seqs=seqs,
        qsl=qsl,
        scale=(rank + rope) ** -0.5,
    )


def _slots(table: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Cache slots of a sequence's first seq_len tokens."""
    j = torch.arange(seq_len)
    return table[j // block_size].long() * block_size + j % block_size


def check(batch: Batch, dtype: torch.dtype, **kw: object) -> None:
    out = batch.run(dtype, **dict(kw)).float().cpu()
    kw.pop("num_splits", None)
    n = batch.rows
    expected = batch.expected(dtype, **kw).float()
    torch.testing.assert_close(out[:n], expected[:n], atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("seqs", [DECODE, MIXED], ids=["decode", "mixed"])
# 3 heads: 5 tokens a program; 20: two groups of 10; rank 48 and rope 8 pad to 64 and 16
@pytest.mark.parametrize(("heads", "rank", "rope"), [(3, 64, 16), (16, 128, 32), (20, 48, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(
    seqs: list[tuple[int, int]], heads: int, rank: int, rope: int, dtype: torch.dtype
) -> None:
    check(make_batch(seqs, heads, rank, rope), dtype)


@pytest.mark.parametrize("block_size", [1, 48, 64])  # one token a block, non-power of 2, > TILE
def test_block_sizes(block_size: int) -> None:
    seqs = [(17, 1), (1, 1), (64, 1), (65, 1), (40, 7), (0, 0), (49, 49)]
    check(make_batch(seqs, 4, 32, 16, block_size=block_size), torch.float32, num_splits=2)


def test_long_prefill_spans_q_blocks() -> None:
    # Several q-blocks per sequence starting off block boundaries: the binary-search path.
    check(make_batch([(90, 90), (5, 1), (120, 71)], 4, 32, 16), torch.float16)


@pytest.mark.parametrize("num_splits", [2, 7])  # 7: more splits than tiles, empty splits
@pytest.mark.parametrize("heads", [4, 18])
def test_split_kv_decode(num_splits: int, heads: int) -> None:
    seqs = [(1, 1), (16, 1), (0, 0), (300, 1), (129, 1), (0, 1)]
    check(make_batch(seqs, heads, 64, 16), torch.float32, num_splits=num_splits)


def test_split_kv_mixed_batch() -> None:
    # Splits are general (any q-block); the heuristic only picks them for decode.
    check(make_batch([(17, 1), (40, 7), (33, 17), (0, 0)], 4, 64, 16), torch.float16, num_splits=3)


@pytest.mark.parametrize("num_splits", [None, 3])
def test_padding_rows_and_strided_io(num_splits: int | None) -> None:
    # (0, 1): a padded decode slot of a CUDA-graph batch; 3 tokens after the last sequence.
    seqs = [(20, 1), (0, 0), (0, 1), (33, 1), (0, 0)]
    batch = make_batch(seqs, 4, 64, 16, extra_tokens=3)
    # q_lat and the output as mla_paged_attention lays them out ([H, T, R] memory), q_pe sliced
    # out of the full query [T, H, nope + rope]
    q_lat = batch.q_lat.transpose(0, 1).contiguous().transpose(0, 1).to(DEVICE)
    q_full = torch.randn(q_lat.shape[0], 4, 24 + 16)
    q_full[..., 24:] = batch.q_pe
    out = torch.full((4, q_lat.shape[0], 64), 7.0).transpose(0, 1).to(DEVICE)
    result = mla_latent_attention(
        q_lat, q_full[..., 24:].to(DEVICE), batch.cache.to(DEVICE), batch.tables.to(DEVICE),
        _i32(batch.seq_lens), _i32(batch.qsl), 1, 33, batch.scale, out=out,
        num_splits=num_splits,
    )  # fmt: skip
    assert result.data_ptr() == out.data_ptr()
    expected = batch.expected(torch.float32)
    torch.testing.assert_close(out[:3].cpu(), expected[:3], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[1].cpu(), torch.zeros(4, 64))  # seq_len 0: zeros, no memory touched
    assert torch.equal(out[3:].cpu(), torch.full((3, 4, 64), 7.0))  # not owned: untouched


@pytest.mark.parametrize("num_splits", [None, 2])
def test_fp8_cache(num_splits: int | None) -> None:
    batch = make_batch([(17, 1), (40, 7), (0, 0), (16, 16)], 4, 64, 16)
    cache8 = (batch.cache / 0.5).to(torch.float8_e4m3fn)
    out = batch.run(torch.float16, cache=cache8, kv_scale=0.5, num_splits=num_splits)
    # The reference reads the same fp8 values back as stored * scale, in float32.
    expected = batch.expected(torch.float16, cache=cache8, kv_scale=0.5)
    n = batch.rows
    torch.testing.assert_close(out.float().cpu()[:n], expected.float()[:n], atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("num_splits", [None, 3])
def test_absorbed_kernel_matches_layer_reference(num_splits: int | None) -> None:
    """The CUDA path of the layer (W_UK, kernel, W_UV) against the CPU path, which expands the
    context for prefills: equal up to rounding, q_len > 1 rows included."""
    heads, nope, rope, v_dim, rank = 3, 16, 16, 24, 64
    batch = make_batch(MIXED, heads, rank, rope)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(batch.rows, heads, nope + rope, generator=gen)
    w_kv_b = torch.randn(heads * (nope + v_dim), rank, generator=gen) * rank**-0.5
    args = (nope, v_dim, batch.scale)
    out = mla_paged_attention(
        q.to(DEVICE), batch.cache.to(DEVICE), batch.tables.to(DEVICE), _i32(batch.seq_lens),
        _i32(batch.qsl), 37, 40, w_kv_b.to(DEVICE), *args, num_splits=num_splits,
    )  # fmt: skip
    expected = mla_paged_attention_ref(
        q, batch.cache, batch.tables, batch.seq_lens, batch.qsl, w_kv_b, *args
    )
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


# fp8 writes run on a GPU only (tests/gpu/test_mla_gpu.py): the interpreter's float8_e4m3fn
# conversion is wrong (see test_reshape_and_cache.py).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_latent_cache(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(6, 80, generator=gen)[:, :72]  # strided rows: c_kv 64 | k_pe 8
    slots = torch.tensor([5, -1, 0, 33, -1, 17])
    cache = torch.zeros(1, 3, 16, 1, 72, dtype=dtype, device=DEVICE)
    write_latent_cache(latent.to(DEVICE), cache, slots.to(DEVICE), 0.5)
    expected = torch.zeros(1, 3, 16, 1, 72, dtype=dtype)
    write_latent_cache_ref(latent, expected, slots, 0.5)
    assert torch.equal(cache.cpu(), expected)
    assert int((expected != 0).flatten(0, 3).any(-1).sum()) == 4  # padding slots wrote nothing


def test_launch_config() -> None:
    v2_lite = mla_launch_config(1, 16)  # decode: one token x all 16 heads, one program a sequence
    assert (v2_lite.head_group, v2_lite.num_head_groups, v2_lite.block_m) == (16, 1, 16)
    assert v2_lite.one_block_per_seq
    v3_tp1 = mla_launch_config(1, 128)
    assert (v3_tp1.head_group, v3_tp1.num_head_groups) == (16, 8)
    assert mla_launch_config(1, 20).head_group == 10  # balanced groups, not 16 + 4
    spec = mla_launch_config(3, 4)  # 12 rows: still one decode program a sequence
    assert (spec.block_m, spec.block_q, spec.one_block_per_seq) == (16, 4, True)
    prefill = mla_launch_config(512, 16)
    assert (prefill.block_m, prefill.block_q, prefill.one_block_per_seq) == (32, 2, False)
    # V2-Lite decode at batch 1: one program a sequence, so split up to the cap
    assert choose_num_splits(1, v2_lite.num_head_groups, 1, 32768, DEFAULT_NUM_SMS) == 64


def test_rejects_bad_inputs() -> None:
    batch = make_batch(DECODE, 4, 64, 16)
    lens, qsl = torch.ones(6, dtype=torch.int32), torch.arange(7, dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_cache"):
        mla_latent_attention(
            batch.q_lat, batch.q_pe[..., :8], batch.cache, batch.tables, lens, qsl, 1, 1, 1.0
        )
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        mla_latent_attention(
            batch.q_lat, batch.q_pe, batch.cache, batch.tables, lens.long(), qsl, 1, 1, 1.0
        )
    with pytest.raises(ValueError, match="one dtype"):
        mla_latent_attention(
            batch.q_lat, batch.q_pe.half(), batch.cache, batch.tables, lens, qsl, 1, 1, 1.0
        )
