"""The small-batch linear path (CUDA, unless ATOM_GEMV=0): gemv where gemv.linear_config gives
a tile (up to gemv.MAX_M rows without a tuned table), else F.linear; bias added, any leading
shape; an opaque op under torch.compile whose row test is no guard (the kernel in the
interpreter without a GPU; the engine on a GPU: tests/gpu). The same for the gate/up GEMM with
its SiLU-and-mul fused (gemv's gated launch)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from atom.kernels import linear_ops
from atom.kernels.gemv import MAX_M, GemvConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randn(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEVICE)


@pytest.mark.parametrize("shape", [(1, 48), (MAX_M, 48), (MAX_M + 1, 48), (2, 3, 48), (0, 48)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_f_linear(shape: tuple[int, ...], with_bias: bool) -> None:
    x, w = _randn(*shape, seed=1), _randn(40, 48, seed=2) * 0.1
    bias = _randn(40, seed=3) if with_bias else None
    out = linear_ops.small_batch_linear(x, w, bias)
    assert out.shape == (*shape[:-1], 40)
    torch.testing.assert_close(out, F.linear(x, w, bias), atol=1e-4, rtol=1e-4)


def test_on_by_default_and_plain_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert linear_ops._GEMV or os.environ.get(linear_ops.GEMV_ENV) == "0"
    calls = []
    monkeypatch.setattr(linear_ops, "small_batch_linear", lambda *a: calls.append(a))
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    monkeypatch.setattr(linear_ops, "_GEMV", True)
    torch.testing.assert_close(linear_ops.linear(x, w, None), F.linear(x, w))  # a CPU tensor
    assert not calls


def test_op_compiles_once_for_every_token_count() -> None:
    """Under Dynamo with a dynamic token count: one graph for counts on both sides of MAX_M (the
    op decides inside, at run time)."""
    w, bias = _randn(24, 32, seed=4) * 0.1, _randn(24, seed=5)
    frames = []

    def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(lambda x: torch.ops.atom.linear(x, w, bias), backend=backend,
                             fullgraph=True)  # fmt: skip
    for rows in (3, MAX_M, MAX_M + 5, 2):
        x = _randn(rows, 32, seed=rows)
        torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(compiled(x), F.linear(x, w, bias), atol=1e-4, rtol=1e-4)
    assert len(frames) == 1


def _silu_and_mul(y: torch.Tensor) -> torch.Tensor:
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("shape", [(1, 48), (MAX_M, 48), (MAX_M + 1, 48), (2, 3, 48), (0, 48)])
def test_gated_matches_silu_of_f_linear(shape: tuple[int, ...]) -> None:
    """gemv's gated launch up to MAX_M rows (the interpreter without a GPU), F.linear and the
    SiLU-and-mul kernel past them."""
    x, w = _randn(*shape, seed=1), _randn(2 * 20, 48, seed=2) * 0.1
    out = linear_ops.small_batch_linear_silu_and_mul(x, w)
    assert out.shape == (*shape[:-1], 20)
    torch.testing.assert_close(out, _silu_and_mul(F.linear(x, w)), atol=1e-4, rtol=1e-4)


def test_gated_pair_where_the_table_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where linear_config gives no gated tile but a plain one (the table's gated entry null:
    the pair won), gemv's plain launch and the SiLU-and-mul kernel run."""
    plain = GemvConfig(16, 32, 4, 2)
    monkeypatch.setattr(linear_ops._gemv, "linear_config",
                        lambda rows, w, gated=False: None if gated else plain)  # fmt: skip
    launches = []
    gemv = linear_ops._gemv.gemv

    def recorded(*args: object, gated: bool = False, **kwargs: object) -> torch.Tensor:
        launches.append((args[2], gated))
        return gemv(*args, gated=gated, **kwargs)

    monkeypatch.setattr(linear_ops._gemv, "gemv", recorded)
    x, w = _randn(3, 48, seed=1), _randn(2 * 20, 48, seed=2) * 0.1
    out = linear_ops.small_batch_linear_silu_and_mul(x, w)
    torch.testing.assert_close(out, _silu_and_mul(F.linear(x, w)), atol=1e-4, rtol=1e-4)
    assert launches == [(plain, False)]


def test_linear_silu_and_mul_off_by_default_and_plain_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Off by default (ATOM_GEMV_SILU=1 turns it on); on the CPU the two ops, a bias added."""
    assert not linear_ops._GEMV_SILU or os.environ.get(linear_ops.GEMV_SILU_ENV) == "1"
    calls = []
    monkeypatch.setattr(linear_ops, "small_batch_linear_silu_and_mul", lambda *a: calls.append(a))
    monkeypatch.setattr(linear_ops, "_GEMV_SILU", True)
    x, w, bias = torch.randn(2, 8), torch.randn(6, 8), torch.randn(6)
    torch.testing.assert_close(linear_ops.linear_silu_and_mul(x, w, bias),
                               _silu_and_mul(F.linear(x, w, bias)))  # fmt: skip
    assert not calls


def test_gated_op_compiles_once_for_every_token_count() -> None:
    w = _randn(2 * 12, 32, seed=4) * 0.1
    frames = []

    def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(lambda x: torch.ops.atom.linear_silu_and_mul(x, w), backend=backend,
                             fullgraph=True)  # fmt: skip
    for rows in (3, MAX_M, MAX_M + 5, 2):
        x = _randn(rows, 32, seed=rows)
        torch._dynamo.mark_dynamic(x, 0)
        out = compiled(x)
        torch.testing.assert_close(out, _silu_and_mul(F.linear(x, w)), atol=1e-4, rtol=1e-4)
    assert len(frames) == 1
