"""Per-kernel time of each layer and module, for every step kind of a torch-profiler trace.

    python tools/parse_trace.py TRACE [--layer N] [--output FILE.csv|FILE.xlsx]
                                [--capture-trace FILE] [--top K]

TRACE is a run trace written by `--torch-profiler-dir` (DIR/rank_<r>/*.pt.trace.json.gz). Steps
are grouped by kind (prefill, decode, eager_decode, draft; `step` in a GPU-only trace, whose
kernels are all untagged); in each, every kernel (memcpy, memset) is summed per (layer, module,
kernel name) over the steps of that kind. Modules come from the
`--mark-trace` tags around each launch; the layer is the N of `...layers.N.` in the tag.

CUDA-graph replays launch nothing per module. Their kernels are matched, in order, to those of
the graph's capture trace, a tagged warm-up forward written at capture time
(DIR/capture_traces/bs_<G>_rank<r>.json.gz, found next to the run trace, or --capture-trace).

Compiled code (level >= 1) keeps only attention's tag: its other kernels show as `(compiled)`
and are counted in the layer of the attention before them (approximate: layer N's row then holds
the norm and QKV projection of layer N+1). Kernels outside every tag are `(untagged)`.

Rows: phase, steps, layer (a number; `avg` for the mean over the phase's layers, a layer without
that kernel counting 0; empty outside layers), module, kernel, calls, total_us, avg_us (per call),
per_step_us, exclusive_per_step_us, pct_of_layer, pct_of_step (of all the phase's kernel time).
Exclusive time is the part of a kernel past the end of every kernel before it in its step: what
it adds to the step's GPU span. Kernels launched with programmatic dependent launch start while
the one before them drains and wait inside their own duration, so their durations overlap and
only the exclusive times add up. On a CPU trace (no GPU events) the kernels are the top-level CPU
ops.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from trace_events import CAPTURE_KIND, RUN_KINDS, Step, Trace

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
COMPILED_PREFIXES = ("## Call CompiledFxGraph", "Torch-Compiled Region", "CompiledFunction")
LOOKAHEAD = 64  # how far a replay kernel may skip ahead in its capture's kernel list


@dataclass(slots=True)
class Row:
    phase: str
    steps: int
    layer: str
    module: str
    kernel: str
    calls: float
    total_us: float
    avg_us: float
    per_step_us: float
    exclusive_per_step_us: float
    pct_of_layer: float | None
    pct_of_step: float


HEADER = [f.name for f in fields(Row)]


# ---- CUDA-graph replays ----
def find_capture_trace(run_trace: Path, graph_bs: int, explicit: Path | None) -> Path | None:
    if explicit is not None:
        match = re.search(r"bs_(\d+)", explicit.name)
        return explicit if match is None or int(match[1]) == graph_bs else None
    rank = re.search(r"rank_?(\d+)", run_trace.parent.name)
    folder = run_trace.parent.parent / "capture_traces"
    for suffix in (".json.gz", ".json"):
        path = folder / f"bs_{graph_bs}_rank{rank[1] if rank else 0}{suffix}"
        if path.exists():
            return path
    return None


def capture_kernels(path: Path) -> list[tuple[str, str]]:
    """(kernel, tag) of the warm-up forward in a capture trace, in launch order."""
    steps = Trace.from_file(path, kinds=(CAPTURE_KIND,)).steps
    if not steps:
        raise ValueError(f"{path}: no {CAPTURE_KIND}[...] range")
    return [(w.name, w.tag) for w in steps[0].work]


def match_replay(replayed: Sequence[str], captured: Sequence[tuple[str, str]]) -> list[str]:
    """The tag of each replayed kernel: the next captured kernel of the same name."""
    tags, j = [], 0
    for name in replayed:
        for k in range(j, min(j + LOOKAHEAD, len(captured))):
            if captured[k][0] == name:
                tags.append(captured[k][1])
                j = k + 1
                break
        else:
            tags.append("(unmatched)")
    return tags


class ReplayTags:
    def __init__(self, run_trace: Path, explicit: Path | None) -> None:
        self.run_trace, self.explicit = run_trace, explicit
        self.cache: dict[int, list[tuple[str, str]] | None] = {}
        self.missing: set[int] = set()

    def apply(self, step: Step) -> None:
        replay = [w for w in step.work if w.replay]
        graph_bs = step.label.graph_bs
        if not replay or graph_bs is None:
            return
        if graph_bs not in self.cache:
            path = find_capture_trace(self.run_trace, graph_bs, self.explicit)
            self.cache[graph_bs] = None if path is None else capture_kernels(path)
        captured = self.cache[graph_bs]
        if captured is None:
            self.missing.add(graph_bs)
            tags = ["(graph replay)"] * len(replay)
        else:
            tags = match_replay([w.name for w in replay], captured)
        for work, tag in zip(replay, tags, strict=True):
            work.tag = tag


# ---- rows ----
def layer_and_module(tag: str, previous_layer: int | None) -> tuple[int | None, str]:
    if tag.startswith(COMPILED_PREFIXES):
        return previous_layer, "(compiled)"
    if not tag:
        return None, "(untagged)"
    match = LAYER_RE.search(tag)
    if match is None:
        return None, tag
    return int(match[1]), tag[match.end() :] or "(layer)"


def exclusive_times(step: Step) -> list[float]:
    """Each work item's time past the end of every item that started before it (launch order
    breaks ties), in step.work's order."""
    order = sorted(range(len(step.work)), key=lambda i: step.work[i].ts)
    exclusive = [0.0] * len(step.work)
    covered = float("-inf")
    for i in order:
        work = step.work[i]
        exclusive[i] = max(0.0, work.end - max(work.ts, covered))
        covered = max(covered, work.end)
    return exclusive


def phase_rows(phase: str, steps: list[Step]) -> list[Row]:
    totals: dict[tuple[int | None, str, str], list[float]] = {}  # calls, time, exclusive time
    for step in steps:
        layer = None
        for work, exclusive in zip(step.work, exclusive_times(step), strict=True):
            layer, module = layer_and_module(work.tag, layer)
            entry = totals.setdefault((layer, module, work.name), [0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += work.dur
            entry[2] += exclusive
    phase_total = sum(t for _, t, _ in totals.values()) or 1.0
    layer_total: dict[int, float] = defaultdict(float)
    for (layer, _, _), (_, t, _) in totals.items():
        if layer is not None:
            layer_total[layer] += t
    n = len(steps)
    rows = []
    for (layer, module, kernel), (calls, t, ex) in totals.items():  # first-seen order
        pct_layer = None if layer is None else 100 * t / (layer_total[layer] or 1.0)
        layer_name = "" if layer is None else str(layer)
        pct = 100 * t / phase_total
        per_step = (t / n, ex / n)
        rows.append(Row(phase, n, layer_name, module, kernel, calls, t, t / calls, *per_step,
                        pct_layer, pct))  # fmt: skip
    return rows + average_rows(phase, n, totals, layer_total, phase_total)


def average_rows(
    phase: str,
    n: int,
    totals: dict[tuple[int | None, str, str], list[float]],
    layer_total: dict[int, float],
    phase_total: float,
) -> list[Row]:
    """Each (module, kernel) of the layers, averaged over all the phase's layers (a layer that
    does not run it counts 0), so that the average rows add up to the average layer."""
    if not layer_total:
        return []
    num_layers = len(layer_total)
    mean_layer = sum(layer_total.values()) / num_layers
    groups: dict[tuple[str, str], list[float]] = {}
    for (layer, module, kernel), (calls, t, ex) in totals.items():
        if layer is not None:
            group = groups.setdefault((module, kernel), [0, 0.0, 0.0])
            group[0] += calls
            group[1] += t
            group[2] += ex
    rows = []
    for (module, kernel), (calls, t, ex) in groups.items():
        c, avg, avg_ex = calls / num_layers, t / num_layers, ex / num_layers
        pct_layer = 100 * avg / (mean_layer or 1.0)
        pct = 100 * avg / phase_total
        per_step = (avg / n, avg_ex / n)
        rows.append(Row(phase, n, "avg", module, kernel, c, avg, avg / c, *per_step, pct_layer,
                        pct))  # fmt: skip
    return rows


def breakdown(trace: Trace, replay_tags: ReplayTags) -> list[Row]:
    rows: list[Row] = []
    for kind in RUN_KINDS:
        steps = [s for s in trace.steps if s.kind == kind]
        if steps:
            for step in steps:
                replay_tags.apply(step)
            rows += phase_rows(kind, steps)
    return rows


# ---- output ----
def _cell(value: object) -> object:
    if value is None:
        return ""
    return round(value, 3) if isinstance(value, float) else value


def write_csv(path: Path, rows: list[Row]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows([_cell(v) for v in astuple(row)] for row in rows)


def write_xlsx(path: Path, rows: list[Row]) -> None:
    try:
        import openpyxl
        from openpyxl.styles import Font
    except ImportError as e:
        raise SystemExit("xlsx output needs openpyxl: pip install openpyxl") from e
    book = openpyxl.Workbook()
    book.remove(book.active)
    for phase in dict.fromkeys(r.phase for r in rows):
        sheet = book.create_sheet(phase)
        sheet.append(HEADER)
        for cell in sheet[1]:
            cell.font = Font(bold=True)
        for row in rows:
            if row.phase == phase:
                sheet.append([_cell(v) for v in astuple(row)])
        sheet.freeze_panes = "A2"
        for letter, width in zip(
            "ABCDEFGHIJK", (12, 6, 6, 28, 60, 8, 12, 10, 12, 12, 11), strict=True
        ):
            sheet.column_dimensions[letter].width = width
    book.save(path)


def print_phase(rows_: list[Row], top: int, layer: int | None) -> None:
    """The rows of one phase: the layer asked for, or the layer averages and the rest."""
    first = rows_[0]
    total = sum(r.per_step_us for r in rows_ if r.layer != "avg")
    exclusive = sum(r.exclusive_per_step_us for r in rows_ if r.layer != "avg")
    print(f"\n## {first.phase}: {first.steps} steps, {total:.1f} us of kernels per step "
          f"({exclusive:.1f} us exclusive)")  # fmt: skip
    blocks = (
        [(f"layer {layer}", [r for r in rows_ if r.layer == str(layer)])]
        if layer is not None
        else [
            ("per layer (average over the layers)", [r for r in rows_ if r.layer == "avg"]),
            ("outside layers", [r for r in rows_ if r.layer == ""]),
        ]
    )
    for title, rows in blocks:
        if not rows:
            continue
        keep = {id(r) for r in sorted(rows, key=lambda r: -r.total_us)[:top]}
        print(f"\n{title}:")
        print(
            f"{'module':<28} {'kernel':<48} {'calls':>7} {'us/step':>10} {'excl/step':>10} "
            f"{'%layer':>7} {'%step':>6}"
        )
        for r in rows:
            if id(r) in keep:
                pct_layer = "" if r.pct_of_layer is None else f"{r.pct_of_layer:.1f}"
                print(
                    f"{r.module[:28]:<28} {r.kernel[:48]:<48} {r.calls:>7.4g} "
                    f"{r.per_step_us:>10.1f} {r.exclusive_per_step_us:>10.1f} {pct_layer:>7} "
                    f"{r.pct_of_step:>6.1f}"
                )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trace", type=Path, help="run trace (.json or .json.gz)")
    parser.add_argument("--layer", type=int, default=None, help="only this layer's rows")
    parser.add_argument("--output", type=Path, default=None, help="FILE.csv or FILE.xlsx")
    parser.add_argument(
        "--capture-trace", type=Path, default=None, help="capture trace of the replayed graph"
    )
    parser.add_argument("--top", type=int, default=25, help="rows printed per table")
    args = parser.parse_args(argv)
    if args.output is not None and args.output.suffix not in (".csv", ".xlsx"):
        parser.error(f"--output must end in .csv or .xlsx, got {args.output}")
    trace = Trace.from_file(args.trace)
    if not trace.steps:
        parser.error(f"{args.trace}: no prefill/decode step labels")
    replay_tags = ReplayTags(args.trace, args.capture_trace)
    rows = breakdown(trace, replay_tags)
    if args.layer is not None and not any(r.layer == str(args.layer) for r in rows):
        parser.error(f"no layer {args.layer} in {args.trace}")
    work = "GPU kernels" if trace.has_gpu else "CPU trace: top-level CPU ops"
    print(f"{args.trace.name}: {work}")
    for size in sorted(replay_tags.missing):
        print(f"no capture trace for the graph of bs={size}: its replayed kernels are unattributed")
    for phase in dict.fromkeys(r.phase for r in rows):
        phase_rows_ = [r for r in rows if r.phase == phase]
        if args.layer is None or any(r.layer == str(args.layer) for r in phase_rows_):
            print_phase(phase_rows_, args.top, args.layer)
    if args.layer is not None:
        rows = [r for r in rows if r.layer == str(args.layer)]
    if args.output is not None:
        (write_xlsx if args.output.suffix == ".xlsx" else write_csv)(args.output, rows)
        print(f"\nwrote {len(rows)} rows to {args.output}")


if __name__ == "__main__":
    sys.exit(main())
