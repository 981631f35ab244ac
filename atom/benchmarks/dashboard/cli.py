"""`python -m atom.benchmarks.dashboard RESULTS_DIR -o dashboard.html`: the page, a regression
table on stdout, and exit code 1 when a config regressed (for CI and nightly jobs)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from atom.benchmarks.dashboard.page import render_page
from atom.benchmarks.dashboard.regressions import (
    LATENCY_THRESHOLD,
    THROUGHPUT_THRESHOLD,
    Regression,
    Thresholds,
    find_regressions,
    format_table,
)
from atom.benchmarks.dashboard.results import Run, latest_per_concurrency, load_results

EXIT_OK, EXIT_REGRESSED, EXIT_NO_RESULTS = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m atom.benchmarks.dashboard",
        description="A self-contained HTML dashboard from saved serving-benchmark JSONs "
        "(benchmark_serving --save-result, vLLM's fields), with regression detection. Exit "
        "codes: 0 no regression, 1 regressions (unless --no-fail), 2 no results or bad usage.",
    )
    parser.add_argument("results_dir", type=Path, help="folder searched recursively for *.json")
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("dashboard.html"), help="the page to write"
    )
    parser.add_argument(
        "--throughput-threshold",
        type=float,
        default=THROUGHPUT_THRESHOLD,
        help="relative output-throughput drop that counts as a regression (default: %(default)s)",
    )
    parser.add_argument(
        "--latency-threshold",
        type=float,
        default=LATENCY_THRESHOLD,
        help="relative mean TTFT or TPOT rise that counts as a regression (default: %(default)s)",
    )
    parser.add_argument(
        "--no-fail", action="store_true", help="exit 0 even when there are regressions"
    )
    parser.add_argument(
        "--json-summary", type=Path, default=None, help="also write runs and regressions as JSON"
    )
    return parser


def summary(
    runs: Sequence[Run], skipped: Sequence[str], regressions: Sequence[Regression], t: Thresholds
) -> dict[str, Any]:
    latest = [
        {
            "config": run.config.label(),
            "config_fields": run.config.as_dict(),
            "max_concurrency": run.max_concurrency,
            "file": run.path,
            "date": run.date.isoformat(),
            "commit": run.commit,
            "output_throughput": run.output_throughput,
            "tok_s_gpu": run.tok_s_gpu,
            "tok_s_user": run.tok_s_user,
            "mean_ttft_ms": run.metrics["mean_ttft_ms"],
            "mean_tpot_ms": run.metrics["mean_tpot_ms"],
        }
        for run in latest_per_concurrency(runs)
    ]
    return {
        "num_runs": len(runs),
        "num_configs": len({run.config for run in runs}),
        "skipped": list(skipped),
        "thresholds": {"throughput": t.throughput, "latency": t.latency},
        "regressions": [reg.as_dict() for reg in regressions],
        "latest": latest,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if not args.results_dir.is_dir():
        parser.error(f"results_dir {str(args.results_dir)!r} is not a folder")
    try:
        thresholds = Thresholds(args.throughput_threshold, args.latency_threshold)
    except ValueError as exc:
        parser.error(str(exc))
    runs, skipped = load_results(args.results_dir)
    if not runs:
        print(f"error: no serving-benchmark results under {args.results_dir}", file=sys.stderr)
        return EXIT_NO_RESULTS
    regressions = find_regressions(runs, thresholds)
    source = args.results_dir.resolve().name  # a name, not the machine's absolute path
    page = render_page(runs, skipped, regressions, thresholds, source)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(page, encoding="utf-8")
    num_configs = len({run.config for run in runs})
    print(f"wrote {args.output}: {len(runs)} runs, {num_configs} configs, {len(skipped)} skipped")
    if args.json_summary is not None:
        record = summary(runs, skipped, regressions, thresholds)
        args.json_summary.parent.mkdir(parents=True, exist_ok=True)
        args.json_summary.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if not regressions:
        print("no regressions")
        return EXIT_OK
    print(f"{len(regressions)} regression(s) against the previous run of the same config:")
    print(format_table(list(regressions)))
    return EXIT_OK if args.no_fail else EXIT_REGRESSED
