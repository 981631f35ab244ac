"""Step timing of a torch-profiler trace as Markdown: prefill, decode, draft, iterations.

    python tools/analyze_trace_summary.py TRACE [--output performance_summary.md]

Per step, from the runner's labels (atom/executor/trace_labels.py):
  host      the labelled host range: queuing the step's work (forward, LM head, sampling)
  GPU span  its first GPU kernel/memcpy/memset start to its last one's end
  period    its start to the next step's start, the share of the timeline the step owns
            (the last step: to its own end); GPU traces start a step at its first GPU work
  GPU busy  the part of the period with any GPU work running (the union of all kernel,
            memcpy and memset intervals); idle = 100% - busy
  host busy (decode) the host's own time per step: its range's start to the next step's, less
            the time it waited on the GPU (cudaEventSynchronize and other syncs). A host busier
            than the period is what leaves the GPU idle; one well below it is ahead.
  idle steps  each step idle more than IDLE_LIMIT percent (most idle first, up to IDLE_ROWS):
            its longest GPU gap and the GPU work on either side (the next step's first work
            closes the last gap), which tells a host that fell behind within the step's
            submission from one that started it late
  blocked host  the CUDA runtime and driver calls of over BLOCK_LIMIT us, by call name (count,
            total, longest), then the longest (up to BLOCK_ROWS, at most BLOCK_PER_CALL of a
            name): where the host stood still, with its step and the op around it. One
            wait a step for its sampled ids is expected; a launch that waits is a full launch
            queue (~1,000 launches deep on an H200: benchmarks/RESULTS.md, nineteenth sitting),
            and a copy or allocation that waits is an implicit sync
A CPU trace has no GPU columns ("no GPU events"): its step time is the host range. A GPU-only
trace (ATOM_TORCH_PROFILER_GPU_ONLY=1) has no host columns: its steps, `step[bs=N]`, are found
by their sampled-token copies (trace_events.py) and reported with the decode steps.
"""

from __future__ import annotations

import argparse
import bisect
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from trace_events import GPU_ONLY_KIND, Span, StepTiming, Trace, step_timings

FIRST_ITERATIONS = 10
IDLE_LIMIT = 10.0  # percent: decode steps idler than this are counted
IDLE_ROWS = 40  # idle steps listed
BLOCK_LIMIT = 1000.0  # us: host calls into CUDA at least this long are listed
BLOCK_ROWS = 30
BLOCK_PER_CALL = 5  # rows of one call name in that list


def fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us / 1000:.3f} ms" if us >= 1000 else f"{us:.1f} us"


def fmt_pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def step_time(t: StepTiming) -> float:
    """A step's duration for the statistics: its period on GPU traces, else its host range."""
    return t.period if t.gpu_busy is not None else t.step.cpu.dur


def stats_row(
    name: str, values: Sequence[float], fmt: Callable[[float], str] = fmt_us, total: bool = True
) -> str:
    if not values:
        return f"| {name} | 0 | - | - | - | - |"
    return (
        f"| {name} | {len(values)} | {fmt(statistics.fmean(values))} | {fmt(min(values))} | "
        f"{fmt(max(values))} | {fmt(sum(values)) if total else '-'} |"
    )


def prefill_section(timings: list[StepTiming], gpu: bool) -> list[str]:
    lines = ["## Prefill", ""]
    if not timings:
        return [*lines, "No prefill steps.", ""]
    lines += ["| # | label | host | GPU span | period | GPU busy |", "|---|---|---|---|---|---|"]
    for i, t in enumerate(timings):
        lines.append(
            f"| {i} | `{t.step.name}` | {fmt_us(t.step.cpu.dur)} | {fmt_us(t.gpu_span)} | "
            f"{fmt_us(t.period)} | {fmt_pct(t.gpu_busy) if gpu else 'no GPU events'} |"
        )
    host = sum(t.step.cpu.dur for t in timings)
    span = sum(t.gpu_span or 0.0 for t in timings) if gpu else None
    total = f"| | **total** | {fmt_us(host)} | {fmt_us(span)} | "
    lines.append(total + f"{fmt_us(sum(t.period for t in timings))} | |")
    return [*lines, ""]


def decode_section(timings: list[StepTiming], gpu: bool, host_columns: bool = True) -> list[str]:
    lines = ["## Decode", ""]
    if not timings:
        return [*lines, "No decode steps.", ""]
    kinds = ", ".join(sorted({t.step.kind for t in timings}))
    lines += [f"{len(timings)} iterations ({kinds}).", ""]
    lines += ["| time | steps | mean | min | max | total |", "|---|---|---|---|---|---|"]
    if host_columns:
        lines.append(stats_row("host", [t.step.cpu.dur for t in timings]))
    lines.append(stats_row("period", [t.period for t in timings]))
    if gpu:
        lines.append(stats_row("GPU span", [t.gpu_span for t in timings if t.gpu_span is not None]))
        if host_columns:
            host_busy = [t.host_busy for t in timings if t.host_busy is not None]
            lines.append(stats_row("host busy", host_busy))
        idle = [100 * (1 - t.gpu_busy) for t in timings if t.gpu_busy is not None]
        period = "decode" if host_columns else "step"  # a GPU-only trace's steps hold prefills
        lines.append(stats_row("GPU idle %", idle, lambda v: f"{v:.1f}%", total=False))
        over = sum(v > IDLE_LIMIT for v in idle)
        lines += [
            "",
            f"**Mean GPU idle: {statistics.fmean(idle):.1f}%** of the {period} period; "
            f"max {max(idle):.1f}%; {over} of {len(idle)} steps idle more than {IDLE_LIMIT:.0f}%.",
        ]
    else:
        lines += ["", "GPU busy: no GPU events (a CPU trace)."]
    lines += ["", "Per batch size:", ""]
    lines += [
        "| kind | bs | graph | steps | mean time | min | max | mean GPU idle | mean host busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, int, int], list[StepTiming]] = defaultdict(list)
    for t in timings:
        label = t.step.label
        groups[(t.step.kind, label.bs or 0, label.graph_bs or 0)].append(t)
    for (kind, bs, graph), group in sorted(groups.items()):
        times = [step_time(t) for t in group]
        busy = [t.gpu_busy for t in group if t.gpu_busy is not None]
        idle = fmt_pct(1 - statistics.fmean(busy)) if busy else "no GPU events"
        host = [t.host_busy for t in group if t.host_busy is not None]
        graph_text = str(graph) if kind == "decode" else "-"
        lines.append(
            f"| {kind} | {bs} | {graph_text} | {len(group)} | {fmt_us(statistics.fmean(times))} | "
            f"{fmt_us(min(times))} | {fmt_us(max(times))} | {idle} | "
            f"{fmt_us(statistics.fmean(host)) if host else '-'} |"
        )
    return [*lines, ""]


def longest_gap(
    gpu: Sequence[Span], starts: Sequence[float], t: StepTiming
) -> tuple[float, str, str]:
    """The step's longest stretch without GPU work inside its period, with the names of the work
    that ends it on the left and starts it on the right. gpu is sorted by start; starts its ts."""
    end = t.start + t.period
    lo, hi = bisect.bisect_left(starts, t.start), bisect.bisect_left(starts, end)
    best, before, after = 0.0, "(step start)", "(step end)"
    busy_end, prev = t.start, "(step start)"
    for w in gpu[lo : hi + 1]:  # the next step's first work closes the last gap
        gap = min(w.ts, end) - busy_end
        if gap > best:
            best, before, after = gap, prev, w.name
        busy_end, prev = max(busy_end, w.end), w.name
    return best, before, after


def idle_section(trace: Trace, timings: list[StepTiming]) -> list[str]:
    idle = [(1 - t.gpu_busy, i, t) for i, t in enumerate(timings) if t.gpu_busy is not None]
    over = sorted((x for x in idle if 100 * x[0] > IDLE_LIMIT), key=lambda x: -x[0])
    if not over:
        return []
    starts = [g.ts for g in trace.gpu]
    lines = [
        f"## Steps idle more than {IDLE_LIMIT:.0f}%",
        "",
        f"{len(over)} steps, most idle first (up to {IDLE_ROWS}); step numbers count every "
        "labelled step from 0.",
        "",
        "| step | kind | bs | period | GPU idle | longest gap | after | before |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fraction, i, t in over[:IDLE_ROWS]:
        gap, before, after = longest_gap(trace.gpu, starts, t)
        lines.append(
            f"| {i} | {t.step.kind} | {t.step.label.bs or '-'} | {fmt_us(t.period)} | "
            f"{fmt_pct(fraction)} | {fmt_us(gap)} | `{before[:60]}` | `{after[:60]}` |"
        )
    return [*lines, ""]


def blocked_section(trace: Trace, timings: list[StepTiming]) -> list[str]:
    calls = trace.long_host_calls(BLOCK_LIMIT)
    if not calls:
        return []
    number = {id(t.step): i for i, t in enumerate(timings)}
    total = sum(c.dur for c, _, _ in calls)
    by_name: dict[str, list[float]] = defaultdict(list)
    for call, _, _ in calls:
        by_name[call.name].append(call.dur)
    lines = [
        f"## Host calls into CUDA over {fmt_us(BLOCK_LIMIT)}",
        "",
        f"{len(calls)} calls, {fmt_us(total)} in all.",
        "",
        "| call | calls | total | longest |",
        "|---|---|---|---|",
    ]
    for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"| `{name}` | {len(durs)} | {fmt_us(sum(durs))} | {fmt_us(max(durs))} |")
    lines += [
        "",
        f"Longest first (up to {BLOCK_ROWS}, at most {BLOCK_PER_CALL} of one call: the waits for "
        "each step's sampled ids would crowd out the rest); step numbers as above.",
        "",
        "| step | kind | call | duration | inside |",
        "|---|---|---|---|---|",
    ]
    shown: dict[str, int] = defaultdict(int)
    for call, step, op in sorted(calls, key=lambda c: -c[0].dur):
        if shown[call.name] == BLOCK_PER_CALL:
            continue
        shown[call.name] += 1
        where = ("-", "-") if step is None else (str(number[id(step)]), step.kind)
        lines.append(
            f"| {where[0]} | {where[1]} | `{call.name}` | {fmt_us(call.dur)} | `{op[:60]}` |"
        )
        if sum(shown.values()) == BLOCK_ROWS:
            break
    return [*lines, ""]


def iterations(timings: list[StepTiming]) -> list[tuple[StepTiming, list[StepTiming]]]:
    """Each decode step with the draft steps that follow it."""
    result: list[tuple[StepTiming, list[StepTiming]]] = []
    for t in timings:
        if t.step.kind in ("decode", "eager_decode", GPU_ONLY_KIND):
            result.append((t, []))
        elif t.step.kind == "draft" and result:
            result[-1][1].append(t)
    return result


def draft_section(drafts: list[StepTiming]) -> list[str]:
    by_step: dict[str, list[float]] = defaultdict(list)
    for t in drafts:
        by_step[t.step.label.fields.get("step", "?")].append(step_time(t))

    def order(key: str) -> tuple[int, str]:
        numbers = re.findall(r"\d+", key)
        return (int(numbers[0]) if numbers else 1 << 30, key)

    keys = sorted(by_step, key=order)
    base = statistics.fmean(by_step[keys[0]])
    lines = ["## Draft Step Breakdown", ""]
    lines += ["| step | calls | mean | min | max | Δ vs first |", "|---|---|---|---|---|---|"]
    for key in keys:
        v = by_step[key]
        mean = statistics.fmean(v)
        lines.append(
            f"| draft[{key}] | {len(v)} | {fmt_us(mean)} | {fmt_us(min(v))} | {fmt_us(max(v))} | "
            f"{(mean - base) / base * 100 if base else 0.0:+.1f}% |"
        )
    return [*lines, ""]


def iteration_section(iters: list[tuple[StepTiming, list[StepTiming]]], gpu: bool) -> list[str]:
    shown = iters[:FIRST_ITERATIONS]
    lines = [f"## Iteration Timing (first {len(shown)} of {len(iters)})", ""]
    if not shown:
        return [*lines, "No decode iterations.", ""]
    lines += [
        "| # | label | decode | draft | total | draft/decode | GPU busy |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (t, drafts) in enumerate(shown):
        decode, draft = step_time(t), sum(step_time(d) for d in drafts)
        ratio = f"{draft / decode:.2f}" if drafts and decode else "-"
        lines.append(
            f"| {i} | `{t.step.name}` | {fmt_us(decode)} | {fmt_us(draft if drafts else None)} | "
            f"{fmt_us(decode + draft)} | {ratio} | "
            f"{fmt_pct(t.gpu_busy) if gpu else 'no GPU events'} |"
        )
    mean = statistics.fmean(step_time(t) + sum(step_time(d) for d in ds) for t, ds in shown)
    return [*lines, "", f"Mean iteration (shown): {fmt_us(mean)}.", ""]


def report(trace: Trace, name: str) -> str:
    timings = step_timings(trace)
    gpu = trace.has_gpu
    lines = ["# Trace Performance Summary", "", f"**File:** `{name}`", ""]
    counts = defaultdict(int)
    for t in timings:
        counts[t.step.kind] += 1
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no labelled steps"
    source = f"{len(trace.gpu)} GPU events" if gpu else "no GPU events (a CPU trace)"
    step_times = "period (GPU timeline)" if gpu else "host range"
    lines += [f"Steps: {summary}; {source}. Step time below: {step_times}.", ""]
    if trace.gpu_only:
        lines += [
            "A GPU-only trace: no host ranges, so steps are split at their sampled-token copies "
            "(prefill and decode alike, as `step`; one copy per step holds without logprobs) "
            "and there are no host columns.",
            "",
        ]
    lines += prefill_section([t for t in timings if t.step.kind == "prefill"], gpu)
    decodes = [t for t in timings if t.step.kind in ("decode", "eager_decode", GPU_ONLY_KIND)]
    lines += decode_section(decodes, gpu, host_columns=not trace.gpu_only)
    if gpu:
        lines += idle_section(trace, timings)
        lines += blocked_section(trace, timings)
    drafts = [t for t in timings if t.step.kind == "draft"]
    if drafts:
        lines += draft_section(drafts)
    lines += iteration_section(iterations(timings), gpu)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trace", type=Path, help="run trace (.json or .json.gz)")
    parser.add_argument("--output", type=Path, default=None, help="write the Markdown here")
    args = parser.parse_args(argv)
    text = report(Trace.from_file(args.trace), args.trace.name)
    if args.output is None:
        print(text)
    else:
        args.output.write_text(text + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
