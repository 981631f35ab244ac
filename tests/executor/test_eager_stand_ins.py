"""The precompile's eager stand-ins (executor/eager_stand_ins.py): one task per distinct kernel
use, launching what a real step launches on stand-ins of a row or two; the precompile's executor
builds each compiled variant's launcher (the compiles and launches themselves: tests/gpu)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from atom.executor import eager_stand_ins as stand_ins
from atom.executor.precompile import LaunchersToo
from atom.kernels.sampling import _splits, draw_variant_rows
from atom.layers.attention import Attention
from atom.layers.rotary import RotaryEmbedding
from atom.models.qwen3 import Qwen3ForCausalLM
from tests.conftest import tiny_qwen3_config


def _variant(rows: int, vocab: int) -> str:
    splits = _splits(rows, vocab)[0]
    return "one" if splits == 1 else "sixteen" if splits % 16 == 0 else "other"


@pytest.mark.parametrize("vocab", [100, 32000, 49152, 128256, 151936])
@pytest.mark.parametrize("max_rows", [1, 24, 512])
def test_draw_rows_meet_every_variant_once(vocab: int, max_rows: int) -> None:
    rows = draw_variant_rows(vocab, max_rows)
    assert rows == sorted(rows) and all(1 <= r <= max_rows for r in rows)
    met = [_variant(r, vocab) for r in rows]
    assert len(set(met)) == len(met)  # one row count a variant
    assert set(met) == {_variant(r, vocab) for r in range(1, max_rows + 1)}


def test_one_task_per_distinct_use_with_a_real_steps_shapes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Qwen3 of three layers: one norm width (the q/k norms run inside the rotary kernel), one
    gate/up width, one rope shape, the draw; each task's launches shaped as the model's."""
    model = Qwen3ForCausalLM(tiny_qwen3_config(), 64)
    layers = [m for m in model.modules() if type(m) is Attention]
    calls: list[tuple] = []

    def record(name: str) -> Callable[..., None]:
        return lambda *args: calls.append((name, *[_shape(a) for a in args]))

    for name in ("rms_norm", "fused_add_rms_norm", "deferred_rms_norm", "silu_and_mul",
                 "gumbel_argmax"):  # fmt: skip
        monkeypatch.setattr(stand_ins, name, record(name))
    monkeypatch.setattr(stand_ins, "defers_norm", lambda x: True)  # as on a GPU with gemv on
    monkeypatch.setattr(RotaryEmbedding, "forward", lambda self, *args: record("rotary")(*args))
    tasks = stand_ins.eager_stand_ins(model, layers, torch.float32, max_seqs=64)
    rows = draw_variant_rows(100, 64)
    assert len(tasks) == 3 + 2 * len(rows)  # the draw: a task per variant, head's and float32
    for task in tasks:
        task()
    weight = ((64,), (1,), torch.float32)
    row = ((1, 64), (64, 1), torch.float32)
    assert calls[:3] == [
        ("rms_norm", row, weight, None),
        ("fused_add_rms_norm", row, row, weight, None),
        ("deferred_rms_norm", row, None, weight),
    ]
    assert calls[3] == ("silu_and_mul", ((1, 192), (192, 1), torch.float32))
    # q and k: views of fused projection rows of (4 + 2 * 2) heads of 16, with the q/k norms.
    q, k = ((2, 4, 16), (128, 16, 1), torch.float32), ((2, 2, 16), (128, 16, 1), torch.float32)
    assert calls[4] == ("rotary", ((2,), (1,), torch.int64), q, k, *layers[0].rope[1:])
    # Each draw variant's rows, overlapping at a stride of the real one's class (100 is no
    # multiple of 16: 17); temperature and seeds a row each.
    assert [c[1] for c in calls[5:]] == [((r, 100), (17, 1), torch.float32) for r in rows
                                         for _ in range(2)]  # fmt: skip
    assert all(c[2][0] == c[3][0] == (c[1][0][0],) for c in calls[5:])
    calls.clear()
    monkeypatch.setattr(stand_ins, "tp_world_size", lambda: 2)  # and the residual's, after the
    tasks[0]()  # all-reduce
    assert calls[3] == ("deferred_rms_norm", row, row, weight)
    calls.clear()
    monkeypatch.setattr(stand_ins, "defers_norm", lambda x: False)  # fp16, ATOM_GEMV=0, ...
    tasks[0]()
    assert [c[0] for c in calls] == ["rms_norm", "fused_add_rms_norm"]


def test_draw_stand_in_holds_a_row_of_logits_in_the_real_stride_class(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = []
    monkeypatch.setattr(stand_ins, "gumbel_argmax", lambda logits, t, s: seen.append(logits))
    for row_stride, stride in ((151936, 16), (32001, 17)):
        stand_ins._draw(torch.device("cpu"), torch.bfloat16, 1024, 1000, row_stride)
        logits = seen.pop()
        assert logits.shape == (1024, 1000) and logits.stride() == (stride, 1)
        assert logits.untyped_storage().nbytes() == ((1023 * stride) + 1000) * 2


def _shape(a: object) -> object:
    if isinstance(a, torch.Tensor):
        return (tuple(a.shape), a.stride(), a.dtype)
    if isinstance(a, float):
        return None
    return a


def test_side_stream_task_runs_on_the_cpu_free_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_on_side_stream sets the device, runs the task on a stream of its own and waits."""
    seen = []
    stream = SimpleNamespace(synchronize=lambda: seen.append("synchronized"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.append(("device", device)))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: _Scope(seen, s is stream))
    stand_ins.run_on_side_stream(lambda: seen.append("task"), torch.device("cuda", 1))
    assert seen == [("device", torch.device("cuda", 1)), ("enter", True), "task", "exit",
                    "synchronized"]  # fmt: skip


class _Scope:
    def __init__(self, seen: list, ours: bool) -> None:
        self.seen, self.ours = seen, ours

    def __enter__(self) -> None:
        self.seen.append(("enter", self.ours))

    def __exit__(self, *exc: object) -> None:
        self.seen.append("exit")


def test_compiles_build_their_launcher_and_a_failed_build_costs_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import triton.runtime

    built = []
    kernel = SimpleNamespace(src="src", metadata="meta", name="k")
    fake = SimpleNamespace(active=SimpleNamespace(launcher_cls=lambda s, m: built.append((s, m))))
    monkeypatch.setattr(triton.runtime, "driver", fake)
    with ThreadPoolExecutor(2) as pool:
        assert LaunchersToo(pool).submit(lambda: kernel).result() is kernel
        assert built == [("src", "meta")]

        def fails(src: str, meta: str) -> None:
            raise RuntimeError("gcc failed")

        fake.active.launcher_cls = fails
        assert LaunchersToo(pool).submit(lambda: kernel).result() is kernel
