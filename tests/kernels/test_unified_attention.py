"""Triton unified paged attention against the torch reference (paged_attention_ref, float32).

On a machine without CUDA the kernel runs in the Triton interpreter on CPU tensors (conftest.py),
so sizes stay small. Sequences are (seq_len, q_len): seq_len counts the cached context plus this
step's q_len tokens; (0, 0) is a padding row of the batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

import atom.kernels.unified_attention as ua
from atom.kernels.attention_config import (
    DEFAULT_NUM_SMS,
    DESC_PROGRAMS_PER_SM,
    SHORT_CONTEXT,
    LaunchConfig,
    choose_num_splits,
    descriptor_decode,
    launch_config,
)
from atom.kernels.paged_attention import paged_attention_ref
from atom.kernels.unified_attention import unified_attention
from tests.kernels.block_tables import query_start_loc, shuffled_block_tables
from tests.kernels.compiled import run_compiled
from tests.kernels.descriptors import record_descriptors

BLOCK = 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

DECODE = [(1, 1), (15, 1), (16, 1), (17, 1), (50, 1)]
# decode rows, chunks over a cached prefix, whole prompts, a padding row
MIXED = [(17, 1), (1, 1), (40, 7), (33, 17), (16, 16), (0, 0), (37, 37), (16, 1)]


@dataclass
class Batch:
    query: torch.Tensor  # [T, H, D] float32
    cache: torch.Tensor  # [2, num_blocks, BLOCK, H_kv, D] float32
    tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    seqs: list[tuple[int, int]]
    qsl: list[int]

    def run(
        self,
        dtype: torch.dtype,
        out: torch.Tensor | None = None,
        cache: torch.Tensor | None = None,
        **kw: object,
    ) -> torch.Tensor:
        """The kernel on inputs cast to dtype (or on the given cache as is)."""
        cache = self.cache.to(dtype) if cache is None else cache
        return unified_attention(
            self.query.to(dtype).to(DEVICE),
            cache.to(DEVICE),
            self.tables.to(DEVICE),
            torch.tensor([s for s, _ in self.seqs], dtype=torch.int32, device=DEVICE),
            torch.tensor(self.qsl, dtype=torch.int32, device=DEVICE),
            max(q for _, q in self.seqs),
            max(s for s, _ in self.seqs),
            kw.pop("scale", self.query.shape[-1] ** -0.5),
            out=out,
            **kw,
        )

    def expected(
        self, dtype: torch.dtype, cache: torch.Tensor | None = None, **kw: object
    ) -> torch.Tensor:
        """The reference per non-padding sequence, float32 on inputs rounded to dtype."""
        query = self.query.to(dtype).float()
        cache = self.cache.to(dtype).float() if cache is None else cache
        scale = kw.pop("scale", self.query.shape[-1] ** -0.5)
        out = torch.zeros_like(query)
        for i, (seq_len, q_len) in enumerate(self.seqs):
            if seq_len == 0:
                continue
            rows = slice(self.qsl[i], self.qsl[i] + q_len)
            out[rows] = paged_attention_ref(
                query[rows], cache, self.tables[i : i + 1], [seq_len], [0, q_len], scale, **kw
            )
        return out

    @property
    def rows(self) -> int:
        return self.qsl[-1]


def make_batch(
    seqs: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, extra_tokens: int = 0
) -> Batch:
    """Random K/V in every block (unused ones too), shuffled non-contiguous block ids."""
    gen = torch.Generator().manual_seed(hash((tuple(seqs), heads, kv_heads, head_dim)) % 2**31)
    tables, num_blocks = shuffled_block_tables([s for s, _ in seqs], BLOCK, gen)
    qsl = query_start_loc([q for _, q in seqs])
    return Batch(
        query=torch.randn(qsl[-1] + extra_tokens, heads, head_dim, generator=gen),
        cache=torch.randn(2, num_blocks, BLOCK, kv_heads, head_dim, generator=gen),
        tables=tables,
        seqs=seqs,
        qsl=qsl,
    )


def check(batch: Batch, dtype: torch.dtype, **kw: object) -> None:
    out = batch.run(dtype, **dict(kw)).float().cpu()
    kw.pop("num_splits", None)
    n = batch.rows
    torch.testing.assert_close(
        out[:n], batch.expected(dtype, **kw)[:n], atol=TOL[dtype], rtol=TOL[dtype]
    )


@pytest.mark.parametrize("seqs", [DECODE, MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 64), (8, 4, 128), (8, 2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(
    seqs: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    check(make_batch(seqs, heads, kv_heads, head_dim), dtype)


@pytest.mark.parametrize(("heads", "kv_heads"), [(2, 2), (8, 2)])
def test_long_prefill_spans_q_blocks(heads: int, kv_heads: int) -> None:
    # Several q-blocks per sequence, starting off block boundaries: the binary search path.
    check(make_batch([(150, 150), (5, 1), (200, 131)], heads, kv_heads, 64), torch.float16)


@pytest.mark.parametrize(("head_dim", "dtype"), [(256, torch.float16), (80, torch.float32)])
def test_other_head_dims(head_dim: int, dtype: torch.dtype) -> None:
    check(make_batch(MIXED, 4, 2, head_dim), dtype)


@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("window", [5, 16, 40])
def test_sliding_window(window: int, num_splits: int | None) -> None:
    seqs = [(1, 1), (17, 1), (100, 1), (70, 30), (45, 45), (0, 0)]
    check(make_batch(seqs, 4, 2, 64), torch.float16, sliding_window=window, num_splits=num_splits)


@pytest.mark.parametrize("window", [None, 24])
def test_softcap(window: int | None) -> None:
    # scale 0.5 makes raw scores large enough (std ~4) for a cap of 3 to bite
    batch = make_batch(MIXED, 4, 2, 64)
    check(batch, torch.float32, scale=0.5, softcap=3.0, sliding_window=window)


@pytest.mark.parametrize("num_splits", [2, 7])  # 7: more splits than tiles, empty splits
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2)])
def test_split_kv_decode(num_splits: int, heads: int, kv_heads: int) -> None:
    seqs = [(1, 1), (16, 1), (0, 0), (300, 1), (129, 1)]
    check(make_batch(seqs, heads, kv_heads, 64), torch.float32, num_splits=num_splits)


def test_split_kv_mixed_batch() -> None:
    # Splits are general (any q-block); the heuristic only picks them for decode.
    check(make_batch([(17, 1), (40, 7), (33, 17), (0, 0)], 4, 2, 64), torch.float16, num_splits=3)


def _on_device(kw: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def _sinks(heads: int) -> torch.Tensor:
    """Logits around the scores' own size (std ~1), some far above: the sink takes most of the
    mass in some heads and little in others; -inf weighs nothing."""
    gen = torch.Generator().manual_seed(heads)
    sinks = torch.randn(heads, generator=gen) * 2
    sinks[0] = 6.0
    sinks[-1] = float("-inf") if heads > 2 else sinks[-1]
    return sinks


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("seqs", [DECODE, MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sinks(
    seqs: list[tuple[int, int]], window: int | None, num_splits: int, dtype: torch.dtype
) -> None:
    batch = make_batch(seqs, 8, 2, 32)
    sinks = _sinks(8)
    out = batch.run(dtype, sinks=sinks.to(DEVICE), sliding_window=window, num_splits=num_splits)
    expected = batch.expected(dtype, sinks=sinks, sliding_window=window)
    n = batch.rows
    torch.testing.assert_close(
        out.float().cpu()[:n], expected[:n], atol=TOL[dtype], rtol=TOL[dtype]
    )
    # The sinks only shrink rows: without them the result must differ.
    assert not torch.allclose(
        out.float().cpu()[:n], batch.expected(dtype, sliding_window=window)[:n]
    )


@pytest.mark.parametrize("num_splits", [1, 3])
def test_sinks_padding_rows_write_zeros(num_splits: int) -> None:
    seqs = [(20, 1), (0, 0), (0, 1), (33, 1)]
    batch = make_batch(seqs, 4, 2, 32)
    sinks = _sinks(4)
    out = torch.full_like(batch.query, 7.0).to(DEVICE)
    batch.run(torch.float32, out=out, sinks=sinks.to(DEVICE), num_splits=num_splits)
    assert torch.equal(out[1].cpu(), torch.zeros(4, 32))
    expected = batch.expected(torch.float32, sinks=sinks)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("num_splits", "sinks"), [(None, False), (2, False), (None, True), (2, True)]
)
def test_fp8_cache(num_splits: int | None, sinks: bool) -> None:
    batch = make_batch([(17, 1), (40, 7), (0, 0), (16, 16)], 8, 2, 64)
    scales: dict = {"k_scale": 0.5, "v_scale": 2.0}
    if sinks:  # the sink is not scaled by k_scale: the fp8 path folds that into the query
        scales["sinks"] = _sinks(8)
    stored = batch.cache / torch.tensor([0.5, 2.0]).view(2, 1, 1, 1, 1)
    cache8 = stored.to(torch.float8_e4m3fn)
    out = batch.run(torch.float16, cache=cache8, num_splits=num_splits, **_on_device(scales))
    # The reference reads the same fp8 values back as stored * scale, in float32.
    expected = batch.expected(torch.float16, cache=cache8, **scales)
    n = batch.rows
    torch.testing.assert_close(out.float().cpu()[:n], expected[:n], atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("num_splits", [None, 3])
def test_padding_rows_and_out_in_place(num_splits: int | None) -> None:
    # (0, 1): a padded decode slot of a CUDA graph batch; 3 tokens after the last sequence.
    seqs = [(20, 1), (0, 0), (0, 1), (33, 1), (0, 0)]
    batch = make_batch(seqs, 4, 2, 64, extra_tokens=3)
    # A query sliced out of a fused QKV projection: rows are strided.
    qkv = torch.randn(batch.query.shape[0], 8, 64).to(DEVICE)
    qkv[:, :4] = batch.query.to(DEVICE)
    out = torch.full_like(batch.query, 7.0).to(DEVICE)
    result = unified_attention(
        qkv[:, :4], batch.cache.to(DEVICE), batch.tables.to(DEVICE),
        torch.tensor([s for s, _ in seqs], dtype=torch.int32, device=DEVICE),
        torch.tensor(batch.qsl, dtype=torch.int32, device=DEVICE),
        1, 33, 0.125, out=out, num_splits=num_splits,
    )  # fmt: skip
    assert result.data_ptr() == out.data_ptr()
    expected = batch.expected(torch.float32, scale=0.125)
    torch.testing.assert_close(out[:3].cpu(), expected[:3], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[1].cpu(), torch.zeros(4, 64))  # seq_len 0: zeros, no memory touched
    assert torch.equal(out[3:].cpu(), torch.full((3, 4, 64), 7.0))  # not owned: untouched


@pytest.mark.parametrize(
    ("seqs", "tokens"),
    [
        ([(17, 1), (40, 7), (9, 9)], 32),  # 32 x 2 query rows: one q-block per sequence
        ([(17, 1), (40, 7), (9, 9)], 17),  # no padding token, padding sequences only
        (MIXED, 96),  # q-blocks found by search
    ],
)
@pytest.mark.parametrize(("window", "sinks"), [(None, False), (12, True)])
def test_mixed_graph_padding(
    seqs: list[tuple[int, int]], tokens: int, window: int | None, sinks: bool
) -> None:
    """A step as a mixed step's CUDA graph launches it (executor/mixed_graphs.py): tokens padded
    to `tokens`, sequences to twice as many plus one (seq_len 0, the first owning the padding
    tokens), the longest query taken as `tokens` and the context as 4,096: the real rows are the
    step's own attention, the padding rows zeros."""
    batch = make_batch(
        seqs, 8, 4, 64, extra_tokens=tokens - query_start_loc([q for _, q in seqs])[-1]
    )
    real = batch.rows
    pad_seqs = len(seqs) + 1
    seq_lens = [s for s, _ in seqs] + [0] * pad_seqs
    qsl = batch.qsl + [tokens] * pad_seqs
    tables = torch.cat(
        [batch.tables, torch.zeros(pad_seqs, batch.tables.shape[1], dtype=torch.int32)]
    )
    out = torch.full_like(batch.query, 7.0).to(DEVICE)
    unified_attention(
        batch.query.to(DEVICE), batch.cache.to(DEVICE), tables.to(DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        tokens, 4096, 0.125, out=out, sliding_window=window,
        sinks=_sinks(8).to(DEVICE) if sinks else None,
    )  # fmt: skip
    extra = {"sinks": _sinks(8)} if sinks else {}
    expected = batch.expected(torch.float32, scale=0.125, sliding_window=window, **extra)
    torch.testing.assert_close(out[:real].cpu(), expected[:real], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[real:].cpu(), torch.zeros(tokens - real, 8, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_many_short_decodes(dtype: torch.dtype) -> None:
    """Programs enough to cover every SM twice over short contexts: 64-token tiles, one stage
    (attention_config.short_decode_tiles); contexts of one to three such tiles."""
    seqs = [(1 + 53 * i % 190, 1) for i in range(2 * DEFAULT_NUM_SMS // 8 + 1)]
    cfg = launch_config(1, 1, 64, len(seqs) * 8, max(s for s, _ in seqs), DEFAULT_NUM_SMS)
    assert (cfg.tile, cfg.num_stages) == (64, 1)
    check(make_batch(seqs, 8, 8, 64), dtype)


def test_decode_tiles_by_context() -> None:
    """Decode tiles: short contexts take one stage, 64-token tiles once the programs cover every
    SM twice or fill at most an eighth of the SMs (one a split); longer contexts, head dims past
    128 and prefill keep theirs."""
    sms = DEFAULT_NUM_SMS

    def tiles(q: int, head_dim: int, programs: int, context: int | None) -> tuple[int, int]:
        cfg = launch_config(q, 4, head_dim, programs, context, sms)
        return cfg.tile, cfg.num_stages

    assert tiles(1, 128, 8, SHORT_CONTEXT) == (64, 1)  # an eighth of the SMs: 64-key splits
    assert tiles(1, 128, 24, SHORT_CONTEXT) == (128, 1)
    assert tiles(1, 128, 2 * sms - 1, 100) == (128, 1)
    assert tiles(1, 128, 2 * sms, 100) == (64, 1)
    assert tiles(1, 128, 2 * sms, SHORT_CONTEXT + 1) == (128, 2)
    assert tiles(1, 128, 8, None) == (128, 2)  # no context given
    assert tiles(1, 256, 2 * sms, 100) == (64, 2)
    assert tiles(512, 128, 2 * sms, 100) == (64, 2)  # prefill
    assert tiles(2, 128, 2 * sms, 100) == (128, 2)  # short queries keep theirs


def test_large_long_context_decodes_take_descriptors() -> None:
    """Long-context decodes of at least DESC_PROGRAMS_PER_SM programs an SM copy K/V blocks
    through descriptors (32-key tiles, one warp); fewer programs, short contexts, head dims past
    128, prefill and multi-token decodes keep pointer loads."""
    sms = DEFAULT_NUM_SMS
    many = DESC_PROGRAMS_PER_SM * sms
    cfg = launch_config(1, 2, 128, many, 2048, sms)
    assert (cfg.kv_desc, cfg.tile, cfg.num_warps) == (True, 32, 1)
    assert not launch_config(1, 2, 128, many - 1, 2048, sms).kv_desc
    assert not launch_config(1, 2, 128, many, SHORT_CONTEXT, sms).kv_desc
    assert not launch_config(1, 2, 256, many, 2048, sms).kv_desc
    assert not launch_config(512, 2, 128, many, 2048, sms).kv_desc
    assert not launch_config(4, 2, 128, many, 2048, sms).kv_desc  # speculative steps


# Forced descriptor launches run in the interpreter only: on an H200 (triton 3.6) a forced
# 4-warp descriptor variant over a mixed batch hung (RESULTS, forty-first sitting; the kernel now
# takes descriptors for decodes only), and the engine's own descriptor launch is checked there in
# bf16, fp16 and fp8 by tests/gpu/test_attention_gpu.py::test_large_decode_through_descriptors.
interpreter_only = pytest.mark.skipif(DEVICE != "cpu", reason="the GPU runs the engine's launch")


@pytest.fixture
def descriptor_tiles(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> list:
    """Every launch forced onto descriptor tiles of request.param keys; records whether each
    launch got its descriptors (kv_descriptors not None)."""
    tile = request.param
    plain_config = ua.launch_config

    def config(*args: object) -> LaunchConfig:
        plain = plain_config(*args)
        return dataclasses.replace(descriptor_decode(plain.block_m, plain.block_q), tile=tile)

    monkeypatch.setattr(ua, "launch_config", config)
    return record_descriptors(monkeypatch)


@interpreter_only
@pytest.mark.parametrize("descriptor_tiles", [16, 32], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_descriptor_tiles_match_reference(descriptor_tiles: list, dtype: torch.dtype) -> None:
    """K/V blocks through descriptors, one or two blocks a tile (descriptor_decode's launch) over
    decodes: splits (a tile's blocks past the context masked), a sliding window, softcap, blocks
    whose tail past the context holds NaN (its values must weigh exactly 0), and a table no
    wider than the longest sequence's 15 blocks (a two-block tile's second block past it)."""
    seqs = [(100, 1), (37, 1), (225, 1), (20, 1), (16, 1), (0, 0), (33, 1)]
    batch = make_batch(seqs, 8, 4, 128)
    batch.tables = batch.tables[:, :15].contiguous()
    for i, (seq_len, _) in enumerate(seqs):
        if not seq_len:
            continue
        last = int(batch.tables[i, (seq_len - 1) // BLOCK])
        batch.cache[:, last, (seq_len - 1) % BLOCK + 1 :] = float("nan")
    check(batch, dtype)
    check(batch, dtype, num_splits=3)
    check(batch, dtype, sliding_window=20)
    check(batch, dtype, softcap=10.0)
    assert descriptor_tiles and all(descriptor_tiles)


@interpreter_only
@pytest.mark.parametrize("descriptor_tiles", [32], indirect=True)
def test_descriptor_tiles_read_fp8(descriptor_tiles: list) -> None:
    batch = make_batch([(100, 1), (37, 1), (0, 0), (250, 1)], 8, 2, 64)
    stored = batch.cache / torch.tensor([0.5, 2.0]).view(2, 1, 1, 1, 1)
    cache8 = stored.to(torch.float8_e4m3fn)
    scales = {"k_scale": 0.5, "v_scale": 2.0}
    out = batch.run(torch.float16, cache=cache8, **scales)
    expected = batch.expected(torch.float16, cache=cache8, **scales)
    n = batch.rows
    torch.testing.assert_close(out.float().cpu()[:n], expected[:n], atol=5e-3, rtol=5e-3)
    assert descriptor_tiles == [True]


@pytest.mark.parametrize("descriptor_tiles", [32], indirect=True)
def test_descriptor_tiles_fall_back_to_pointers(descriptor_tiles: list) -> None:
    """A cache whose layout descriptors cannot box (head-major blocks: a KV head's rows
    contiguous) or whose tile is not one or two blocks takes the pointer tiles, same result."""
    batch = make_batch([(100, 1), (37, 1), (250, 1)], 8, 4, 64)
    head_major = batch.cache.transpose(2, 3).contiguous().transpose(2, 3)
    out = batch.run(torch.float32, cache=head_major)
    torch.testing.assert_close(out.cpu(), batch.expected(torch.float32), atol=1e-5, rtol=1e-5)
    assert descriptor_tiles == [False]
    assert ua.kv_descriptors(batch.cache, 64) is None  # four blocks a tile


def test_choose_num_splits() -> None:
    sms = DEFAULT_NUM_SMS
    assert choose_num_splits(8, 8, 1, 32768, sms) == 9  # 64 programs -> ~4 per SM
    assert choose_num_splits(1, 8, 1, 32768, sms) == 64  # capped
    assert choose_num_splits(1, 8, 1, 1024, sms) == 4  # at least 256 keys per split
    assert choose_num_splits(4, 8, 1, 100, sms) == 1  # too short to split
    assert choose_num_splits(32, 8, 1, 32768, sms) == 2  # 256 programs: each SM's two
    assert choose_num_splits(32, 8, 1, 400, sms) == 1  # ... but too short to split
    # short contexts of programs filling at most a quarter of the SMs: a split a 128-key tile,
    # at most an eighth: a split a 64-key tile
    assert choose_num_splits(1, 8, 1, SHORT_CONTEXT, sms) == 8
    assert choose_num_splits(2, 8, 1, 272, sms) == 5
    assert choose_num_splits(1, 8, 1, 60, sms) == 1
    assert choose_num_splits(3, 8, 1, 272, sms) == 3  # 24 programs
    assert choose_num_splits(4, 8, 1, SHORT_CONTEXT, sms) == 4  # 32 programs
    assert choose_num_splits(8, 8, 1, SHORT_CONTEXT, sms) == 1  # 64 programs: not
    assert choose_num_splits(1, 8, 1, SHORT_CONTEXT + 1, sms) == 2  # longer: 256 keys a split
    assert choose_num_splits(1, 8, 1, SHORT_CONTEXT, sms, short_splits=False) == 1  # MLA's
    assert choose_num_splits(33, 8, 1, 32768, sms) == 1  # 264 programs fill the GPU twice
    assert choose_num_splits(32, 8, 1, 32768, sms, fill_twice=False) == 1  # MLA: once is enough
    assert choose_num_splits(1, 8, 512, 32768, sms) == 1  # prefill: q-blocks fill the GPU


def test_rejects_bad_inputs() -> None:
    batch = make_batch(DECODE, 4, 2, 64)
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        unified_attention(
            batch.query, batch.cache, batch.tables, torch.ones(5, dtype=torch.int64),
            torch.arange(6, dtype=torch.int32), 1, 1, 1.0,
        )  # fmt: skip
    with pytest.raises(ValueError, match="sinks must be"):
        unified_attention(
            batch.query, batch.cache, batch.tables, torch.ones(5, dtype=torch.int32),
            torch.arange(6, dtype=torch.int32), 1, 1, 1.0, sinks=torch.zeros(2),
        )  # fmt: skip
    with pytest.raises(ValueError, match="do not fit"):
        unified_attention(
            batch.query[:, :3], batch.cache, batch.tables, torch.ones(5, dtype=torch.int32),
            torch.arange(6, dtype=torch.int32), 1, 1, 1.0,
        )  # fmt: skip


def _dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cap: float, window: int | None
) -> torch.Tensor:
    """q [n, H, D] = the last n positions of k, v [L, Hkv, D]; causal, softcapped; float32."""
    n, length = q.shape[0], k.shape[0]
    groups = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(groups, 1)
    v = v.float().repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    scores = cap * torch.tanh(scores / cap)
    pos = torch.arange(length - n, length).unsqueeze(1)
    keys = torch.arange(length).unsqueeze(0)
    hidden = (keys > pos) | ((keys <= pos - window) if window else False)
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(hidden, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("window", [None, 10])
def test_reference_softcap_matches_dense(window: int | None) -> None:
    seqs = [(1, 1), (17, 1), (40, 7), (33, 33)]  # decode (einsum path) and prefill (sdpa path)
    batch = make_batch(seqs, 4, 2, 32)
    for i, (seq_len, q_len) in enumerate(seqs):
        rows = slice(batch.qsl[i], batch.qsl[i] + q_len)
        blocks = batch.tables[i, : -(-seq_len // BLOCK)].long()
        k, v = (batch.cache[j, blocks].flatten(0, 1)[:seq_len] for j in (0, 1))
        got = paged_attention_ref(
            batch.query[rows], batch.cache, batch.tables[i : i + 1], [seq_len], [0, q_len], 0.5,
            sliding_window=window, softcap=2.0,
        )  # fmt: skip
        want = _dense(batch.query[rows], k, v, 0.5, 2.0, window)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# Both kernels compiled for sm90 (not interpreted), in their own process (this one's kernels were
# defined for the interpreter): the PTX's global loads before the PDL wait, decode and mixed.
_PRE_WAIT_LOADS = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from atom.kernels.unified_attention import _reduce_splits_kernel
sys.path.insert(0, "benchmarks")
from attention_resources import compile_attention, decode_const

def loads_before_wait(ptx):
    return ptx.split("griddepcontrol.wait")[0].count("ld.global")

for decode in (True, False):
    const = decode_const(4, 64)
    if decode:
        const["SPLIT"] = True
    else:
        const.update(BLOCK_M=64, BLOCK_Q=16, ONE_BLOCK_PER_SEQ=False)
    kernel = compile_attention(const, num_warps=4, num_stages=2)
    print("attention", decode, loads_before_wait(kernel.asm["ptx"]))
sig = {"out_ptr": "*bf16", "ws_acc_ptr": "*fp32", "ws_m_ptr": "*fp32", "ws_l_ptr": "*fp32",
       "sinks_ptr": "*fp32", "qsl_ptr": "*i32", "num_seqs": "i32", "num_splits": "i32",
       "stride_ot": "i32", "stride_oh": "i32"}
const = {"NUM_HEADS": 32, "HEAD_DIM": 128, "HEAD_DIM_P": 128, "SPLITS_P": 8, "USE_SINKS": False,
         "PDL": True}
sig.update(dict.fromkeys(const, "constexpr"))
ptx = triton.compile(ASTSource(fn=_reduce_splits_kernel, signature=sig, constexprs=const),
                     target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
print("reduce", loads_before_wait(ptx))
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="compiles for sm90 on the CPU machine")
def test_step_inputs_load_before_the_pdl_wait() -> None:
    """query_start_loc and seq_lens (the mixed path's binary search over query_start_loc too) are
    read before the PDL wait, and nothing else: q and this step's K/V come from the kernel before.
    H200, 8B decode: batch 1 / 4 / 32 0.6 / 1.0 / 0.4% faster a step (RESULTS, thirty-seventh
    sitting)."""
    counts = dict(line.rsplit(" ", 1) for line in run_compiled(_PRE_WAIT_LOADS).splitlines())
    assert counts == {"attention True": "3", "attention False": "4", "reduce": "1"}, counts


_RESOURCES = """
import sys
sys.path.insert(0, "benchmarks")
from attention_resources import resources
r = resources(2, 128, 4, 2, None)  # the nano-vllm bench's long-context decode
print(r["registers"], r["spill_bytes"], r["programs_per_sm"])
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="compiles for sm90 on the CPU machine")
def test_decode_variant_vectorises_its_kv_loads() -> None:
    """Compiled for sm90 as a launch specialises it (aligned pointers, strides multiples of 16),
    the bench's decode variant fits in 196 registers without spilling: two programs an SM
    (benchmarks/attention_resources.py). Strides left unspecialised (DO_NOT_SPECIALIZE) would
    turn its K/V loads into scalar 2-byte loads at 255 registers."""
    registers, spilled, programs = map(int, run_compiled(_RESOURCES).split())
    assert registers < 224 and spilled == 0 and programs >= 2, (registers, spilled, programs)


_DESC_RESOURCES = """
import sys
sys.path.insert(0, "benchmarks")
from atom.kernels.attention_config import descriptor_decode
cfg = descriptor_decode(16, 8)
from attention_resources import resources
r = resources(2, cfg.tile, cfg.num_warps, cfg.num_stages, None, True)
print(r["spill_bytes"], r["programs_per_sm"], r["tma_copies"])
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="compiles for sm90 on the CPU machine")
def test_descriptor_decode_copies_by_tma() -> None:
    """The engine's descriptor launch (descriptor_decode) compiled for sm90: its K/V come by the
    tensor memory accelerator, nothing spills, and more programs share an SM than the pointer
    tiles' two (H200: five, by its 41 KB of shared memory)."""
    spilled, programs, copies = map(int, run_compiled(_DESC_RESOURCES).split())
    assert spilled == 0 and programs > 2 and copies > 0, (spilled, programs, copies)
