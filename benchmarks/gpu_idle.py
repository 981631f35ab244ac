"""GPU idle per engine step from CUDA events, without a profiler (whose own host overhead makes
the idle it is asked to show): `GpuIdle().install()` before a generate, `report()` after it.

For step N, event F(N) is recorded just before its forward (a graph replay, or the eager
forward's first launch: after the step's uploads) and B(N) after its last launch. The GPU reaches
F(N) once all earlier work is done and the host has queued it, so F(N) - B(N-1) is the GPU's wait
before step N's forward: about zero when the host is ahead, the idle when it is behind (it also
holds the step's uploads and pending-token copies, tens of us). The step's period is B(N) -
B(N-1) on the GPU's clock. A step is idle above 10% when that wait is over a tenth of its period.
It misses idle inside an eager forward (prefill), which a host slower than the GPU leaves between
its launches; a decode step's forward is one graph replay. Its step numbers count the steps with a
forward (throughput_logged.py's count every engine step: the two can differ by a few).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import atom.executor.model_runner as model_runner

WORST = 8


@dataclass
class _Step:
    batch: int
    decode: bool
    forward: torch.cuda.Event
    end: torch.cuda.Event | None = None


class GpuIdle:
    def __init__(self) -> None:
        self.steps: list[_Step] = []
        self._originals: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        runner = model_runner.ModelRunner
        plain_forward, plain_submit = runner._forward, runner.submit_model
        steps = self.steps

        def forward(self: Any, inputs: Any, graph: bool, sample: bool) -> Any:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            steps.append(_Step(len(inputs.req_ids), inputs.is_decode_only, event))
            return plain_forward(self, inputs, graph, sample)

        def submit(self: Any, sched: Any) -> Any:
            wait = plain_submit(self, sched)
            if steps and steps[-1].end is None:
                steps[-1].end = torch.cuda.Event(enable_timing=True)
                steps[-1].end.record()
            return wait

        self._originals = [
            (runner, "_forward", plain_forward),
            (runner, "submit_model", plain_submit),
        ]
        runner._forward, runner.submit_model = forward, submit  # type: ignore[method-assign]

    def uninstall(self) -> None:
        for owner, name, fn in self._originals:
            setattr(owner, name, fn)

    def report(self) -> None:
        """Decode steps' GPU idle: mean, count above 10%, by batch, the worst; then clears."""
        torch.cuda.synchronize()
        rows = []  # (idle ms, period ms, step, batch, decode)
        for i, (prev, step) in enumerate(zip(self.steps, self.steps[1:], strict=False), 1):
            if prev.end is None or step.end is None:
                continue
            idle = max(prev.end.elapsed_time(step.forward), 0.0)
            period = prev.end.elapsed_time(step.end)
            rows.append((idle, period, i, step.batch, step.decode))
        self.steps.clear()
        decode = [r for r in rows if r[4]]
        if not decode:
            return
        total_idle, total = sum(r[0] for r in decode), sum(r[1] for r in decode)
        over = [r for r in decode if r[0] > 0.1 * r[1]]
        by: dict[int, list[tuple[float, float]]] = {}
        for idle, period, _, batch, _ in decode:
            by.setdefault(batch if batch <= 16 else 32 * -(-batch // 32), []).append((idle, period))
        shares = {
            b: round(100 * sum(i for i, _ in v) / sum(p for _, p in v), 1)
            for b, v in sorted(by.items())
        }
        mean = 100 * total_idle / total
        print(
            f"gpu idle (events): decode steps {len(decode)}, mean {mean:.1f}%, "
            f"{len(over)} above 10%",
            flush=True,
        )
        print("gpu idle % by batch (up to):", shares, flush=True)
        worst = sorted(decode, key=lambda r: r[0] / r[1])[-WORST:]
        print("gpu idle, worst decode steps (idle ms, period ms, step, batch):", _rounded(worst))
        prefill = [r for r in rows if not r[4]]
        if prefill:
            print("gpu wait before eager steps (idle ms, period ms, step, batch):",
                  _rounded(prefill[:12]), flush=True)  # fmt: skip


Row = tuple[float, float, int, int, bool]  # idle ms, period ms, step, batch, decode-only


def _rounded(rows: list[Row]) -> list[tuple[float, float, int, int]]:
    return [(round(i, 3), round(p, 3), s, b) for i, p, s, b, _ in rows]
