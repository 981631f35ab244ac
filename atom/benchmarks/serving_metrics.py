"""Metrics of a serving benchmark run, with vLLM's definitions, table and JSON field names.

Over the successful requests: TTFT, TPOT = (E2EL - TTFT) / (output tokens - 1) for requests of more
than one output token, ITL (every gap of every request), E2EL; each as mean, median, std and the
chosen percentiles (NumPy's linear interpolation) in ms. Throughputs are over the wall time of the
timed run; concurrency = sum(E2EL) / duration (the mean number of requests in flight). Goodput
counts the requests within every given SLO (TPOT counts as 0 for a one-token output).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from atom.benchmarks.serving_client import RequestResult
from atom.benchmarks.serving_datasets import BenchmarkRequest

PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
# (name in the table, section header) as vLLM prints them.
METRIC_TITLES = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}
# Distinct errors printed under the table (all of them go to the JSON).
MAX_PRINTED_ERRORS = 10


@dataclass(frozen=True, slots=True)
class Stats:
    """One latency metric in ms."""

    mean: float
    median: float
    std: float
    percentiles: list[tuple[float, float]]  # (percentile, value)

    @classmethod
    def of(cls, seconds: Sequence[float], percentiles: Sequence[float]) -> Stats:
        ms = np.asarray(seconds if len(seconds) else [0.0], dtype=np.float64) * 1000.0
        values = [(p, float(np.percentile(ms, p))) for p in percentiles]
        return cls(float(np.mean(ms)), float(np.median(ms)), float(np.std(ms)), values)


@dataclass(frozen=True, slots=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    total_input: int
    total_output: int
    request_throughput: float
    request_goodput: float
    output_throughput: float
    total_token_throughput: float
    concurrency: float
    stats: dict[str, Stats]  # "ttft", "tpot", "itl", "e2el"
    output_lens: list[int]  # per request, 0 for a failed one
    errors: dict[str, int]  # distinct error -> count, most frequent first


def parse_slo(item: str) -> tuple[str, float]:
    """A --goodput item, `ttft:300` (milliseconds)."""
    name, sep, value = item.partition(":")
    try:
        ms = float(value)
    except ValueError:
        ms = float("nan")
    if not sep or name not in GOODPUT_METRICS or not ms >= 0:
        raise argparse.ArgumentTypeError(
            f"invalid --goodput item {item!r}: expected NAME:MS with NAME one of "
            f"{', '.join(GOODPUT_METRICS)} and MS >= 0"
        )
    return name, ms


def tpot(result: RequestResult, output_len: int) -> float:
    """Seconds per output token after the first; 0 for a single-token output."""
    return (result.latency - result.ttft) / (output_len - 1) if output_len > 1 else 0.0


def calculate_metrics(
    requests: Sequence[BenchmarkRequest],
    results: Sequence[RequestResult],
    duration: float,
    count_tokens: Callable[[str], int],
    percentiles: Sequence[float],
    goodput: dict[str, float] | None = None,
) -> BenchmarkMetrics:
    """`count_tokens` counts a text's tokens for results without usage.completion_tokens."""
    output_lens: list[int] = []
    total_input = 0
    ttfts: list[float] = []
    tpots: list[float] = []  # requests of more than one token
    all_tpots: list[float] = []  # with 0 for one-token outputs, for goodput
    itls: list[float] = []
    e2els: list[float] = []
    for request, result in zip(requests, results, strict=True):
        if not result.success:
            output_lens.append(0)
            continue
        out = result.output_tokens
        if out is None:
            out = count_tokens(result.generated_text)
        output_lens.append(out)
        total_input += request.prompt_len
        all_tpots.append(tpot(result, out))
        if out > 1:
            tpots.append(all_tpots[-1])
        ttfts.append(result.ttft)
        itls.extend(result.itl)
        e2els.append(result.latency)
    good = 0
    if goodput:
        per_metric = {"ttft": ttfts, "tpot": all_tpots, "e2el": e2els}
        slos = [(per_metric[name], ms / 1000.0) for name, ms in goodput.items()]
        good = sum(all(values[i] <= limit for values, limit in slos) for i in range(len(ttfts)))
    completed = len(ttfts)
    total_output = sum(output_lens)
    errors = Counter(r.error or "unknown error" for r in results if not r.success)
    return BenchmarkMetrics(
        completed=completed,
        failed=len(results) - completed,
        total_input=total_input,
        total_output=total_output,
        request_throughput=completed / duration,
        request_goodput=good / duration,
        output_throughput=total_output / duration,
        total_token_throughput=(total_input + total_output) / duration,
        concurrency=sum(e2els) / duration,
        stats={
            "ttft": Stats.of(ttfts, percentiles),
            "tpot": Stats.of(tpots, percentiles),
            "itl": Stats.of(itls, percentiles),
            "e2el": Stats.of(e2els, percentiles),
        },
        output_lens=output_lens,
        errors=dict(errors.most_common()),
    )


def percentile_word(p: float) -> str:
    """99 -> "99", 99.9 -> "99.9" (vLLM's key and label spelling)."""
    return str(int(p)) if int(p) == p else str(p)


def result_fields(
    m: BenchmarkMetrics, duration: float, selected: Sequence[str], with_goodput: bool
) -> dict[str, Any]:
    """The measured part of the saved JSON, with vLLM's field names."""
    fields: dict[str, Any] = {
        "duration": duration,
        "completed": m.completed,
        "failed": m.failed,
        "total_input_tokens": m.total_input,
        "total_output_tokens": m.total_output,
        "request_throughput": m.request_throughput,
        "request_goodput": m.request_goodput if with_goodput else None,
        "output_throughput": m.output_throughput,
        "total_token_throughput": m.total_token_throughput,
        "concurrency": m.concurrency,
    }
    for name in PERCENTILE_METRICS:
        if name not in selected:
            continue
        s = m.stats[name]
        fields[f"mean_{name}_ms"] = s.mean
        fields[f"median_{name}_ms"] = s.median
        fields[f"std_{name}_ms"] = s.std
        for p, value in s.percentiles:
            fields[f"p{percentile_word(p)}_{name}_ms"] = value
    fields["errors_summary"] = m.errors
    return fields


def format_table(
    m: BenchmarkMetrics,
    duration: float,
    selected: Sequence[str],
    max_concurrency: int | None,
    request_rate: float,
    with_goodput: bool,
) -> str:
    """vLLM's result table, plus ATOM's concurrency row and the failed requests' errors."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: float | int, fmt: str = "<10.2f") -> None:
        lines.append(f"{label:<40} {value:{fmt}}")

    row("Successful requests:", m.completed, "<10")
    row("Failed requests:", m.failed, "<10")
    if max_concurrency is not None:
        row("Maximum request concurrency:", max_concurrency, "<10")
    if request_rate != float("inf"):
        row("Request rate configured (RPS):", request_rate)
    row("Benchmark duration (s):", duration)
    row("Total input tokens:", m.total_input, "<10")
    row("Total generated tokens:", m.total_output, "<10")
    row("Request throughput (req/s):", m.request_throughput)
    if with_goodput:
        row("Request goodput (req/s):", m.request_goodput)
    row("Output token throughput (tok/s):", m.output_throughput)
    row("Total Token throughput (tok/s):", m.total_token_throughput)
    row("Concurrency:", m.concurrency)
    for name in PERCENTILE_METRICS:
        if name not in selected:
            continue
        label, header = METRIC_TITLES[name]
        s = m.stats[name]
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        row(f"Mean {label} (ms):", s.mean)
        row(f"Median {label} (ms):", s.median)
        for p, value in s.percentiles:
            row(f"P{percentile_word(p)} {label} (ms):", value)
    if m.errors:
        lines.append("{s:{c}^{n}}".format(s="Errors (count: error)", n=50, c="-"))
        for error, count in list(m.errors.items())[:MAX_PRINTED_ERRORS]:
            lines.append(f"{count}: {error}")
        if len(m.errors) > MAX_PRINTED_ERRORS:
            lines.append(f"... {len(m.errors) - MAX_PRINTED_ERRORS} more (see errors_summary)")
    lines.append("=" * 50)
    return "\n".join(lines)
