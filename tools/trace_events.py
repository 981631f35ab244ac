"""Reading torch-profiler (Kineto) chrome traces: runner steps, the work in them, module tags.

Shared by parse_trace.py and analyze_trace_summary.py. Standard library only, so that the tools
run wherever a trace is copied. Times are in microseconds, as in the trace.

* Steps are the runner's labelled CPU ranges (`user_annotation`): `prefill[...]`, `decode[...]`,
  `eager_decode[...]`, `draft[...]` (grammar in atom/executor/trace_labels.py).
* GPU work is every event of category kernel, gpu_memcpy or gpu_memset. Each carries the
  `correlation` id of the host call that launched it (cudaLaunchKernel, cuLaunchKernel,
  cudaMemcpyAsync, cudaGraphLaunch, ...): the step and the innermost module tag around that call,
  on its thread, own it. Without a launch event, the GPU-side projections of the same ranges
  (`gpu_user_annotation`, on the kernel's stream) decide.
* A trace with no GPU event (a CPU run) has CPU work instead: each top-level CPU op (a `cpu_op`
  with no op around it), attributed the same way.
* A GPU-only trace (ATOM_TORCH_PROFILER_GPU_ONLY=1: no host ranges, so the host runs at nearly
  its untraced speed) has no labels: its steps are `step[bs=N]`, each ending with the copy of its
  sampled token ids to the host (int64: N = bytes / 8) and owning the GPU work since the copy
  before. One such copy per step holds for runs without logprobs; a step that samples nothing
  (a chunk of a long prompt, alone) has no copy and joins the step after it.
"""

from __future__ import annotations

import bisect
import gzip
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STEP_KINDS = ("prefill", "decode", "eager_decode", "draft")
GPU_ONLY_KIND = "step"  # a step of a GPU-only trace, found by its sampled-token copy
RUN_KINDS = (*STEP_KINDS, GPU_ONLY_KIND)  # what a run trace's steps may be
SAMPLED_COPY = "DtoH"  # in the name of a device-to-host memcpy
HOST_CATS = frozenset({"cpu_op", "user_annotation", "python_function"})
CAPTURE_KIND = "capture_warmup"
GPU_CATS = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
LAUNCH_CATS = frozenset({"cuda_runtime", "cuda_driver"})
LABEL_RE = re.compile(r"^(?P<kind>[a-z_]+)\[(?P<body>.*)\]$")
NUM_RE = re.compile(r"\d+")

Thread = tuple[Any, Any]  # (pid, tid)


@dataclass(slots=True)
class Span:
    """A complete ('X') trace event."""

    name: str
    cat: str
    ts: float
    dur: float
    pid: Any
    tid: Any
    args: dict[str, Any]

    @property
    def end(self) -> float:
        return self.ts + self.dur

    @property
    def thread(self) -> Thread:
        return (self.pid, self.tid)


@dataclass(slots=True)
class Label:
    """A parsed step label: kind[key=value ...]; draft's leading `i/k` is field `step`."""

    kind: str
    fields: dict[str, str]

    def number(self, key: str, part: int = 0) -> int | None:
        """The part-th integer of a field (`bs=3/4`: part 0 is 3, part 1 is 4)."""
        numbers = NUM_RE.findall(self.fields.get(key, ""))
        return int(numbers[part]) if len(numbers) > part else None

    @property
    def bs(self) -> int | None:
        return self.number("bs")

    @property
    def graph_bs(self) -> int | None:
        """The replayed CUDA graph's batch size (decode[bs=R/G]); R when the label has no G."""
        return self.number("bs", 1) if "/" in self.fields.get("bs", "") else self.bs

    @property
    def tok(self) -> int | None:
        return self.number("tok")


def parse_label(name: str) -> Label | None:
    match = LABEL_RE.match(name)
    if match is None:
        return None
    fields: dict[str, str] = {}
    key = ""
    # ctx=[5, 3] holds spaces: a word without '=' continues the previous field.
    for word in match["body"].split(" "):
        if "=" in word:
            key, value = word.split("=", 1)
            fields[key] = value
        elif key:
            fields[key] += " " + word
        elif word:
            fields["step"] = word  # draft[0/3 bs=4]
    return Label(match["kind"], fields)


@dataclass(slots=True)
class Work:
    """One GPU kernel, memcpy or memset (on CPU traces: one top-level CPU op)."""

    name: str
    ts: float
    dur: float
    tag: str  # the innermost module tag around its launch, "" when none
    replay: bool = False  # a kernel of a CUDA-graph replay (its launch is the graph's)

    @property
    def end(self) -> float:
        return self.ts + self.dur


@dataclass(slots=True)
class Step:
    name: str
    label: Label
    cpu: Span  # the host range
    work: list[Work] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.label.kind

    @property
    def work_start(self) -> float | None:
        return min((w.ts for w in self.work), default=None)

    @property
    def work_end(self) -> float | None:
        return max((w.end for w in self.work), default=None)


def load_events(path: str | Path) -> list[dict[str, Any]]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        data = json.load(f)
    return data.get("traceEvents", []) if isinstance(data, dict) else data


def _span(event: dict[str, Any]) -> Span:
    return Span(
        name=str(event.get("name", "")),
        cat=str(event.get("cat", "")),
        ts=float(event.get("ts", 0.0)),
        dur=float(event.get("dur", 0.0)),
        pid=event.get("pid"),
        tid=event.get("tid"),
        args=event.get("args") or {},
    )


def is_tag(name: str) -> bool:
    """A user range that may name a module: not a step or other label, not a profiler step."""
    return LABEL_RE.match(name) is None and not name.startswith("ProfilerStep#")


def innermost(ranges: Sequence[Span], points: Sequence[float]) -> list[Span | None]:
    """For each point, the innermost range containing it. The ranges nest, as record_function
    ranges and ops of one thread do; a sweep over both, sorted, finds them in n log n."""
    order = sorted(range(len(points)), key=points.__getitem__)
    spans = sorted(ranges, key=lambda r: (r.ts, -r.dur))
    found: list[Span | None] = [None] * len(points)
    stack: list[Span] = []
    i = 0
    for k in order:
        point = points[k]
        while i < len(spans) and spans[i].ts <= point:
            while stack and stack[-1].end < spans[i].ts:
                stack.pop()
            stack.append(spans[i])
            i += 1
        while stack and stack[-1].end < point:
            stack.pop()
        found[k] = stack[-1] if stack else None
    return found


def top_level(ops: Iterable[Span]) -> list[Span]:
    """The ops of one thread that no other op contains."""
    result: list[Span] = []
    end = float("-inf")
    for op in sorted(ops, key=lambda r: (r.ts, -r.dur)):
        if op.ts >= end:
            result.append(op)
            end = op.end
    return result


class Trace:
    """The steps of one trace (ranges labelled with one of `kinds`) and the work in each."""

    def __init__(self, events: Iterable[dict[str, Any]], kinds: Sequence[str] = RUN_KINDS):
        spans = [_span(e) for e in events if e.get("ph") == "X"]
        self.gpu = sorted((s for s in spans if s.cat in GPU_CATS), key=lambda s: s.ts)
        self.has_gpu = bool(self.gpu)
        # The host blocked on the GPU (cudaEventSynchronize and the like), as sorted intervals.
        self.host_waits = merge_intervals(
            (s.ts, s.end) for s in spans if s.cat in LAUNCH_CATS and "Synchronize" in s.name
        )
        self._calls = [s for s in spans if s.cat in LAUNCH_CATS]  # the host's calls into CUDA
        # Host ops and module tags per thread: what a call into CUDA was made inside
        self._ops: dict[Thread, list[Span]] = defaultdict(list)
        for s in spans:
            if s.cat == "cpu_op" or (s.cat == "user_annotation" and is_tag(s.name)):
                self._ops[s.thread].append(s)
        host: dict[Thread, list[Span]] = defaultdict(list)
        device_ranges: dict[Thread, list[Span]] = defaultdict(list)
        for s in spans:
            if s.cat == "user_annotation" or (s.cat == "cpu_op" and not self.has_gpu):
                host[s.thread].append(s)
            elif s.cat == "gpu_user_annotation":
                device_ranges[s.thread].append(s)
        self.steps: list[Step] = []
        self._step_of: dict[int, Step] = {}
        for thread_spans in host.values():
            for s in thread_spans:
                label = parse_label(s.name) if s.cat == "user_annotation" else None
                if label is not None and label.kind in kinds:
                    step = Step(s.name, label, s)
                    self.steps.append(step)
                    self._step_of[id(s)] = step
        self.steps.sort(key=lambda st: st.cpu.ts)
        # No host event at all (not merely no labels): a trace of the GPU activity alone.
        self.gpu_only = self.has_gpu and not any(s.cat in HOST_CATS for s in spans)
        if self.gpu_only and GPU_ONLY_KIND in kinds:
            self._steps_from_copies()
        elif self.has_gpu:
            self._attribute_gpu(spans, host, device_ranges)
        else:
            self._attribute_cpu(host)
        for step in self.steps:
            step.work.sort(key=lambda w: w.ts)

    @classmethod
    def from_file(cls, path: str | Path, kinds: Sequence[str] = RUN_KINDS) -> Trace:
        return cls(load_events(path), kinds)

    def long_host_calls(self, min_us: float) -> list[tuple[Span, Step | None, str]]:
        """CUDA runtime and driver calls of at least min_us, in time order, where the host stood
        still: a sync, a launch into a full queue, an allocation that waits for the device. Each
        with its step (None outside any) and the innermost host op or module tag around it ("")."""
        by_thread: dict[Thread, list[Span]] = defaultdict(list)
        for call in self._calls:
            if call.dur >= min_us:
                by_thread[call.thread].append(call)
        found: list[tuple[Span, Step | None, str]] = []
        for thread, calls in by_thread.items():
            points = [c.ts for c in calls]
            step_ranges = [st.cpu for st in self.steps if st.cpu.thread == thread]
            steps = innermost(step_ranges, points)
            ops = innermost(self._ops.get(thread, []), points)
            for call, st, op in zip(calls, steps, ops, strict=True):
                step = None if st is None else self._step_of.get(id(st))
                found.append((call, step, "" if op is None else op.name))
        return sorted(found, key=lambda f: f[0].ts)

    def _place(
        self, ranges: dict[Thread, list[Span]], queries: dict[Thread, list[tuple[float, Any]]]
    ) -> list[tuple[Any, Step | None, str]]:
        """(payload, step, tag) for each query point, from the ranges of the query's thread."""
        placed = []
        for thread, items in queries.items():
            spans = ranges.get(thread, [])
            steps = [s for s in spans if id(s) in self._step_of]
            tags = [s for s in spans if s.cat.endswith("user_annotation") and is_tag(s.name)]
            points = [ts for ts, _ in items]
            for (_, payload), st, tag in zip(
                items, innermost(steps, points), innermost(tags, points), strict=True
            ):
                step = None if st is None else self._step_of[id(st)]
                placed.append((payload, step, "" if tag is None else tag.name))
        return placed

    def _attribute_gpu(
        self,
        spans: list[Span],
        host: dict[Thread, list[Span]],
        device_ranges: dict[Thread, list[Span]],
    ) -> None:
        launches: dict[Any, Span] = {}
        for s in spans:
            if s.cat in LAUNCH_CATS and "correlation" in s.args:
                launches.setdefault(s.args["correlation"], s)
        by_launch: dict[Thread, list[tuple[float, Any]]] = defaultdict(list)
        by_stream: dict[Thread, list[tuple[float, Any]]] = defaultdict(list)
        for g in self.gpu:
            launch = launches.get(g.args.get("correlation"))
            if launch is not None:
                # Every kernel of a replay carries the graph launch's correlation id; newer
                # Kineto also writes the graph's id.
                replay = "graphlaunch" in launch.name.lower() or bool(g.args.get("graph id"))
                by_launch[launch.thread].append((launch.ts, (g, replay)))
            else:
                by_stream[g.thread].append((g.ts, (g, False)))
        # Device-side ranges name their step by the host range's External id.
        ext_steps = {s.cpu.args.get("External id"): s for s in self.steps}
        for ranges in device_ranges.values():
            for r in ranges:
                step = ext_steps.get(r.args.get("External id"))
                if step is not None and r.name == step.name:
                    self._step_of[id(r)] = step
        placed = self._place(host, by_launch) + self._place(device_ranges, by_stream)
        for (g, replay), step, tag in placed:
            if step is not None:
                step.work.append(Work(g.name, g.ts, g.dur, tag, replay))

    def _steps_from_copies(self) -> None:
        """Steps of a GPU-only trace: each ends with a device-to-host copy (its sampled ids)."""
        work: list[Work] = []
        for g in self.gpu:
            work.append(Work(g.name, g.ts, g.dur, ""))
            if g.cat != "gpu_memcpy" or SAMPLED_COPY not in g.name:
                continue
            rows = int(g.args.get("bytes", 0)) // 8
            first = work[0].ts
            span = Span(
                f"{GPU_ONLY_KIND}[bs={rows}]", "gpu_step", first, g.end - first, None, None, {}
            )
            label = Label(GPU_ONLY_KIND, {"bs": str(rows)})
            self.steps.append(Step(span.name, label, span, work))
            work = []

    def _attribute_cpu(self, host: dict[Thread, list[Span]]) -> None:
        queries: dict[Thread, list[tuple[float, Any]]] = {}
        for thread, spans in host.items():
            ops = top_level(s for s in spans if s.cat == "cpu_op")
            queries[thread] = [(op.ts, op) for op in ops]
        for op, step, tag in self._place(host, queries):
            if step is not None:
                step.work.append(Work(op.name, op.ts, op.dur, tag))


def merge_intervals(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def covered(merged: Sequence[tuple[float, float]], lo: float, hi: float) -> float:
    """How much of [lo, hi) the disjoint sorted intervals cover."""
    total = 0.0
    i = max(bisect.bisect_right(merged, (lo, float("inf"))) - 1, 0)
    while i < len(merged) and merged[i][0] < hi:
        start, end = merged[i]
        total += max(0.0, min(end, hi) - max(start, lo))
        i += 1
    return total


@dataclass(slots=True)
class StepTiming:
    step: Step
    start: float  # GPU traces: its first GPU work (host start without any); CPU: host start
    period: float  # to the next step's start (the last step: to its own end)
    gpu_span: float | None  # first to last GPU work of the step
    gpu_busy: float | None  # fraction of the period with any GPU work running; None: CPU trace
    # The host's own time for the step: its range's start to the next step's, less the time it
    # waited on the GPU in between. None: the last step, or a CPU trace.
    host_busy: float | None = None


def step_timings(trace: Trace) -> list[StepTiming]:
    gpu = merge_intervals((g.ts, g.end) for g in trace.gpu)
    starts, ends, spans = [], [], []
    for step in trace.steps:
        first, last = step.work_start, step.work_end
        if trace.has_gpu and first is not None and last is not None:
            starts.append(first)
            ends.append(last)
            spans.append(last - first)
        else:
            starts.append(step.cpu.ts)
            ends.append(step.cpu.end)
            spans.append(None)
    timings = []
    for i, step in enumerate(trace.steps):
        end = starts[i + 1] if i + 1 < len(starts) else ends[i]
        period = max(end - starts[i], 0.0)
        busy = host_busy = None
        if trace.has_gpu:
            busy = covered(gpu, starts[i], end) / period if period > 0 else 1.0
            if i + 1 < len(trace.steps) and not trace.gpu_only:
                lo, hi = step.cpu.ts, trace.steps[i + 1].cpu.ts
                host_busy = hi - lo - covered(trace.host_waits, lo, hi)
        timings.append(StepTiming(step, starts[i], period, spans[i], busy, host_busy))
    return timings
