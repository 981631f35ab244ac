"""How all_reduce picks between the custom all-reduce and NCCL (the symmetric-memory kernels
themselves need GPUs: tests/gpu/test_fast_path.py's tp test runs them at tp=2)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from atom import custom_all_reduce, distributed


class TwoRanks:
    """Stands in for CustomAllReduce: two ranks holding the same tensor sum to twice it, in a
    new contiguous tensor as the symmetric-memory kernel's."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.calls = max_bytes, 0
        self.nccl: list[int] = []  # the rows of each all-reduce that went to (fake) NCCL

    def fits(self, x: torch.Tensor) -> bool:
        return x.numel() * x.element_size() <= self.max_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.contiguous() * 2


@pytest.fixture
def two_ranks(monkeypatch: pytest.MonkeyPatch) -> TwoRanks:
    custom = TwoRanks(max_bytes=4 * 8 * 4)  # up to 4 rows of 8 float32

    def fake_nccl(x: torch.Tensor) -> None:
        custom.nccl.append(x.shape[0])
        x.mul_(2)

    monkeypatch.setattr(distributed, "_custom", custom)
    monkeypatch.setattr(distributed, "tp_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", fake_nccl)
    return custom


def test_small_tensors_take_the_custom_all_reduce(two_ranks: TwoRanks) -> None:
    x = torch.randn(3, 8)
    assert torch.equal(distributed.all_reduce(x.clone()), x * 2)
    assert two_ranks.calls == 1 and two_ranks.nccl == []
    big = torch.randn(5, 8)
    out = distributed.all_reduce(big)
    assert out is big and two_ranks.nccl == [5]


def test_compiled_code_picks_at_run_time(two_ranks: TwoRanks) -> None:
    """Under torch.compile the pick is the opaque op's: one graph serves both sides of the size
    limit (no guard on the token count), and x is never mutated by the compiled code."""
    torch._dynamo.reset()
    frames: list[int] = []

    def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
        frames.append(1)
        assert "atom.all_reduce" in str(gm.graph)
        return gm.forward

    @torch.compile(backend=backend, dynamic=True, fullgraph=True)
    def layer(x: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce(x + 1) - 1

    for rows in (2, 3, 7, 9):
        x = torch.randn(rows, 8)
        before = x.clone()
        assert torch.equal(layer(x), (x + 1) * 2 - 1)
        assert torch.equal(x, before)
    assert len(frames) == 1
    assert two_ranks.calls == 2 and two_ranks.nccl == [7, 9]


@pytest.mark.parametrize("rows", [3, 7])
def test_all_reduce_op_passes_opcheck(two_ranks: TwoRanks, rows: int) -> None:
    """The op's schema (no alias of x, x not mutated), its fake against the real outputs, and
    its autograd and AOT registrations, on both sides of the size limit."""
    x = torch.randn(8, rows).t()  # non-contiguous
    torch.library.opcheck(torch.ops.atom.all_reduce.default, (x,))


def test_one_custom_all_reduce_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that has exchanged symmetric-memory handles for an earlier engine keeps NCCL
    (the module doc: a new worker's exchanges would not match this process's numbering)."""
    monkeypatch.setattr(custom_all_reduce, "_rendezvoused", True)
    assert custom_all_reduce.create_custom_all_reduce(torch.device("cpu")) is None


@pytest.mark.parametrize("two_shot", [True, False])
def test_two_shot_from_its_size(monkeypatch: pytest.MonkeyPatch, two_shot: bool) -> None:
    """Below TWO_SHOT_MIN_BYTES (or without the two-shot) the one-shot kernel sums x; from it
    the two-shot sums a copy of x in the symmetric buffer into a new tensor."""
    import torch.distributed._symmetric_memory  # registers the symm_mem ops

    custom = object.__new__(custom_all_reduce.CustomAllReduce)
    custom.group_name, custom.max_bytes, custom.two_shot = "0", 1 << 20, two_shot
    custom.buffer = torch.zeros(custom.max_bytes, dtype=torch.uint8)
    calls: list[str] = []

    def one_shot(buffer: torch.Tensor, x: torch.Tensor, op: str, group: str) -> torch.Tensor:
        calls.append("one")
        return x * 2

    def two(buffer: torch.Tensor, op: str, group: str, out: torch.Tensor) -> torch.Tensor:
        calls.append("two")
        return out.copy_(buffer * 2)

    monkeypatch.setattr(torch.ops.symm_mem, "one_shot_all_reduce_copy", one_shot)
    monkeypatch.setattr(torch.ops.symm_mem, "two_shot_all_reduce_out", two)
    big_rows = custom_all_reduce.TWO_SHOT_MIN_BYTES // (4096 * 2)
    for rows in (1, big_rows - 1, big_rows, 2 * big_rows):
        x = torch.randn(4096, rows).t().bfloat16()  # non-contiguous
        assert torch.equal(custom(x), x * 2)
    assert calls == ["one", "one"] + ["two" if two_shot else "one"] * 2


def test_leaving_by_abort_keeps_the_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Freeing a symmetric buffer synchronizes the device, where a kernel may wait for a dead
    rank forever: a group left by abort keeps its buffer."""
    buffer = object()
    monkeypatch.setattr(distributed, "_custom", buffer)
    monkeypatch.setattr(distributed, "_abandoned", [])
    distributed.leave_tensor_parallel(abort=True)
    assert distributed._custom is None and distributed._abandoned == [buffer]
