"""The start-up precompile's stand-in launches cover every launch configuration a step can pick,
and compile-only launches compile without running (the compiles themselves: tests/gpu)."""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers

from atom.executor import precompile as precompile_module
from atom.executor.forward_context import AttentionMetadata
from atom.executor.precompile import (
    StandIn,
    Weight,
    attend_padding_rows,
    distinct_kinds,
    distinct_weights,
    stand_in_steps,
    start_precompile,
)
from atom.kernels import launch as launch_module
from atom.kernels.attention_config import (
    DEFAULT_NUM_SMS,
    SHORT_CONTEXT,
    LaunchConfig,
    choose_num_splits,
    launch_config,
)
from atom.kernels.grid import next_power_of_2
from atom.kernels.launch import compile_only, launch, pdl
from atom.layers.attention import Attention
from atom.layers.linear import ColumnParallelLinear, RowParallelLinear
from atom.layers.rotary import RotaryEmbedding

CPU = torch.device("cpu")


class _Kernel:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, tuple, dict]] = []

    def __getitem__(self, grid: tuple) -> object:
        return lambda *args, **kwargs: self.calls.append(("run", grid, args, kwargs))

    def warmup(self, *args: object, grid: tuple, **kwargs: object) -> None:
        self.calls.append(("warmup", grid, args, kwargs))


def test_launch_runs_or_only_compiles() -> None:
    kernel = _Kernel()
    launch(kernel, (3, 1), 1, 2, BLOCK=4)
    with compile_only():
        launch(kernel, (5,), 7, BLOCK=8)
    launch(kernel, (2,), 9)  # the mode ends with its block
    assert kernel.calls == [
        ("run", (3, 1), (1, 2), {"BLOCK": 4}),
        ("warmup", (5,), (7,), {"BLOCK": 8}),
        ("run", (2,), (9,), {}),
    ]


def test_pdl_launches_carry_the_launch_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = _Kernel()
    launch(kernel, (1,), PDL=True)
    launch(kernel, (1,), PDL=False)
    with compile_only():  # the same variant as the real launch: launch_pdl is a compile option
        launch(kernel, (1,), PDL=True)
    assert [call[3] for call in kernel.calls] == [
        {"PDL": True, "launch_pdl": True},
        {"PDL": False},
        {"PDL": True, "launch_pdl": True},
    ]
    monkeypatch.setattr(launch_module, "_PDL", True)
    assert not pdl(torch.zeros(1))  # a CPU tensor


def test_compile_only_holds_while_dynamo_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compiler.is_compiling() is one process-wide flag in newer torch, True while Dynamo
    compiles on any thread (the main thread, during the precompile): it must not turn the
    precompile thread's launches into real ones."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    kernel = _Kernel()
    with compile_only():
        launch(kernel, (1,), 2)
    assert [call[0] for call in kernel.calls] == ["warmup"]


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [
        (32, 8, 128),
        (16, 16, 64),
        (64, 1, 256),
        (8, 1, 128),
        (12, 2, 128),
        (64, 4, 64),
        (128, 64, 128),
    ],
)
def test_stand_in_steps_cover_every_launch(heads: int, kv_heads: int, head_dim: int) -> None:
    """Every (tile configuration, split or not) pair of batches 1-600 at query lengths 1-300
    and contexts up to 128k, short and long, and every reduce variant (splits padded to a power
    of two) of their decodes, is among the stand-ins'."""
    group, sms = heads // kv_heads, DEFAULT_NUM_SMS
    steps = list(stand_in_steps(16, CPU))

    def variant(q: int, seqs: int, context: int) -> tuple[LaunchConfig, bool]:
        splits = choose_num_splits(seqs, kv_heads, q, context, sms)
        return launch_config(q, group, head_dim, seqs * kv_heads, context, sms), splits > 1

    variants = {variant(m.max_query_len, len(m.seq_lens_cpu), m.max_seq_len) for m in steps}
    splits = {
        next_power_of_2(choose_num_splits(1, kv_heads, m.max_query_len, m.max_seq_len, sms))
        for m in steps
    }
    contexts = (1, 17, 255, 256, 511, 512, 700, 4096, 32768, 131072)
    for batch in range(1, 601):
        for context in contexts:
            assert variant(1, batch, context) in variants, (batch, context)
            s = choose_num_splits(batch, kv_heads, 1, context, sms)
            assert next_power_of_2(s) in splits, (batch, context, s)
    for q in range(2, 301):
        for batch, context in itertools.product((1, 7, 300), contexts):
            if context >= q:
                assert variant(q, batch, context) in variants, (q, batch, context)
    for m in steps:  # metadata consistent with itself
        seqs, q = len(m.seq_lens_cpu), m.max_query_len
        assert m.query_start_loc_cpu == list(range(0, seqs * q + 1, q))
        assert m.slot_mapping.shape == (seqs * q,) and (m.slot_mapping == -1).all()
        assert m.block_tables.shape == (seqs, -(-m.max_seq_len // 16))
        assert m.seq_lens.tolist() == [m.max_seq_len] * seqs and q <= m.max_seq_len
        assert m.query_start_loc.tolist() == m.query_start_loc_cpu


def test_one_layer_per_kind_and_no_thread_on_the_cpu() -> None:
    rope = RotaryEmbedding(
        transformers.LlamaConfig(hidden_size=512, num_attention_heads=8), 64, 512
    )
    a = Attention(8, 64, 0.125, 2, rope=rope)
    b = Attention(8, 64, 0.125, 2, rope=rope)
    windowed = Attention(8, 64, 0.125, 2, sliding_window=128, rope=rope)
    assert list(distinct_kinds([a, b, windowed, a])) == [a, windowed]
    shapes = StandIn(CPU, torch.float32, torch.float32, 16)
    assert start_precompile(torch.nn.ModuleList([a, windowed]), shapes) is None


def test_one_gemv_launch_per_weight_shape() -> None:
    """One per shape, dtype and launch kind (a gated MLP's gate/up weight launches the SiLU-fused
    variant where that is on)."""
    linears = [ColumnParallelLinear(64, 96, False), ColumnParallelLinear(64, 96, False),
               RowParallelLinear(96, 64, False), ColumnParallelLinear(64, 96, True)]  # fmt: skip
    weights = [Weight(m.weight, False) for m in linears]
    assert list(distinct_weights(weights)) == [weights[0], weights[2]]
    half = Weight(linears[1].weight.data.half(), False)
    assert list(distinct_weights([weights[0], half])) == [weights[0], half]
    gated = Weight(linears[1].weight, True)
    assert list(distinct_weights([weights[0], gated, weights[1]])) == [weights[0], gated]


def test_attend_padding_rows_launches_padding_rows_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph's shorter cap's warm-up: one attention launch per layer kind, shaped as the
    graph's (its rows, its cap), over padding rows of its own: the live step buffers are not
    read."""
    seen: list[tuple[Attention, AttentionMetadata]] = []
    real = precompile_module.attend_stand_in

    def attend_stand_in(layer: Attention, meta: AttentionMetadata, shapes: StandIn) -> None:
        seen.append((layer, meta))
        real(layer, meta, shapes)

    monkeypatch.setattr(precompile_module, "attend_stand_in", attend_stand_in)
    slots, seq_lens = torch.arange(8), torch.full((8,), 50, dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=slots[:4],
        block_tables=torch.zeros((8, 4), dtype=torch.int32)[:4],
        seq_lens=seq_lens[:4],
        query_start_loc=torch.arange(5, dtype=torch.int32),
        seq_lens_cpu=[],
        query_start_loc_cpu=[],
        max_query_len=1,
        max_seq_len=SHORT_CONTEXT,
    )
    layers = [Attention(4, 64, 0.125, 2), Attention(4, 64, 0.125, 2)]
    attend_padding_rows(layers, meta, StandIn(CPU, torch.float32, torch.float32, 16))
    assert len(seen) == 1 and seen[0][0] is layers[0]  # one layer kind
    warm = seen[0][1]
    assert warm.max_seq_len == SHORT_CONTEXT and warm.max_query_len == 1
    assert (warm.slot_mapping == -1).all() and warm.slot_mapping.shape == (4,)
    assert (warm.seq_lens == 0).all() and warm.seq_lens.shape == (4,)
    assert seq_lens.eq(50).all() and slots.tolist() == list(range(8))
