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

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import triton

import atom.executor.model_runner as model_runner
from atom.engine.core import step_done

WORST = 8


@dataclass
class _Step:
    batch: int
    decode: bool
    forward: torch.cuda.Event
    end: torch.cuda.Event | None = None
    # Host clock (ms): submit's start, the forward's call, submit's return; the output wait
    # that ran before this submit (the engine's, between the two submits)
    began: float = 0.0
    called: float = 0.0
    returned: float = 0.0
    waited: float = 0.0
    compiles: list[str] = field(default_factory=list)  # Triton compiles inside the step


class GpuIdle:
    def __init__(self) -> None:
        self.steps: list[_Step] = []
        self._originals: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        runner = model_runner.ModelRunner
        plain_forward, plain_submit = runner._forward, runner.submit_model
        plain_hook = getattr(triton.knobs.runtime, "jit_cache_hook", None)
        steps = self.steps
        began = [0.0]
        waited = [0.0]

        def forward(self: Any, inputs: Any, graph: bool, sample: bool) -> Any:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            steps.append(
                _Step(len(inputs.req_ids), inputs.is_decode_only, event,
                      began=began[0], called=_ms(), waited=waited[0])
            )  # fmt: skip
            return plain_forward(self, inputs, graph, sample)

        def submit(self: Any, sched: Any) -> Any:
            began[0] = _ms()
            wait = plain_submit(self, sched)
            if steps and steps[-1].end is None:
                steps[-1].end = torch.cuda.Event(enable_timing=True)
                steps[-1].end.record()
                steps[-1].returned = _ms()

            return _TimedWait(wait, waited)

        def compiling(*args: Any, **kwargs: Any) -> Any:
            """Triton's hook before a launch compiles a variant (or loads it from disk)."""
            if steps:
                steps[-1].compiles.append(str(kwargs.get("repr", "?"))[:80])
            return plain_hook(*args, **kwargs) if plain_hook else None

        self._originals = [
            (runner, "_forward", plain_forward),
            (runner, "submit_model", plain_submit),
            (triton.knobs.runtime, "jit_cache_hook", plain_hook),
        ]
        runner._forward, runner.submit_model = forward, submit  # type: ignore[method-assign]
        triton.knobs.runtime.jit_cache_hook = compiling

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
        pairs = zip(self.steps, self.steps[1:], strict=False)
        host = {i: pair for i, pair in enumerate(pairs, 1)}
        compiled = [(i, s.compiles) for i, s in enumerate(self.steps) if s.compiles]
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
        print("  their host ms (since the last submit returned: the engine's part, of it the wait "
              "for a step's output; submit to forward; forward to submit's return):",
              [(s, *_host(*host[s])) for _, _, s, _, _ in worst], flush=True)  # fmt: skip
        if compiled:
            print("Triton compiles inside steps (step, kernels):", compiled[:20], flush=True)
        prefill = [r for r in rows if not r[4]][:12]
        if prefill:
            print("gpu wait before eager steps (idle ms, period ms, step, batch):",
                  _rounded(prefill), flush=True)  # fmt: skip
            rows_ms = [(s, *_host(*host[s]), _gpu_ms(host[s][1])) for _, _, s, _, _ in prefill]
            print("  their host ms (as above), then the GPU's ms from the forward's event to the "
                  "step's end:", rows_ms, flush=True)  # fmt: skip


class _TimedWait:
    """A queued step's wait that records its length; done() as the step's own (the engine's
    busy() asks it)."""

    def __init__(self, wait: Any, waited: list[float]) -> None:
        self.wait, self.waited = wait, waited

    def __call__(self) -> Any:
        start = _ms()
        try:
            return self.wait()
        finally:
            self.waited[0] = _ms() - start

    def done(self) -> bool:
        return step_done(self.wait)


def _ms() -> float:
    return 1e3 * time.perf_counter()


def _gpu_ms(step: _Step) -> float:
    """The GPU's ms from the step's forward event to its end event."""
    assert step.end is not None
    return round(step.forward.elapsed_time(step.end), 3)


def _host(prev: _Step, step: _Step) -> tuple[float, ...]:
    """(the engine's part, of it the output wait, submit to forward, forward to return) ms."""
    parts = (step.began - prev.returned, step.waited, step.called - step.began,
             step.returned - step.called)  # fmt: skip
    return tuple(round(t, 3) for t in parts)


Row = tuple[float, float, int, int, bool]  # idle ms, period ms, step, batch, decode-only


def _rounded(rows: list[Row]) -> list[tuple[float, float, int, int]]:
    return [(round(i, 3), round(p, 3), s, b) for i, p, s, b, _ in rows]
