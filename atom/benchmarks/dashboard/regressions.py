"""Regressions: the latest run of each (config, max_concurrency) against the one before it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from atom.benchmarks.dashboard.results import Config, Run, group_by

THROUGHPUT_THRESHOLD = 0.05  # a relative drop of output throughput larger than this regresses
LATENCY_THRESHOLD = 0.10  # a relative rise of mean TTFT or TPOT larger than this regresses
EPSILON = 1e-9
# metric -> (name, True when higher is better)
WATCHED = {
    "output_throughput": ("output tok/s", True),
    "mean_ttft_ms": ("mean TTFT ms", False),
    "mean_tpot_ms": ("mean TPOT ms", False),
}


@dataclass(frozen=True, slots=True)
class Thresholds:
    throughput: float = THROUGHPUT_THRESHOLD
    latency: float = LATENCY_THRESHOLD

    def __post_init__(self) -> None:
        for name, value in (("throughput", self.throughput), ("latency", self.latency)):
            if not value >= 0.0:  # also refuses NaN
                raise ValueError(f"{name} threshold must be a fraction >= 0, got {value}")


@dataclass(frozen=True, slots=True)
class Regression:
    metric: str  # a key of WATCHED
    previous: Run
    latest: Run

    @property
    def config(self) -> Config:
        return self.latest.config

    @property
    def max_concurrency(self) -> int | None:
        return self.latest.max_concurrency

    @property
    def change(self) -> float:
        """Relative change, latest against previous (-0.08 = 8% lower)."""
        before = self.previous.metrics[self.metric]
        return (self.latest.metrics[self.metric] - before) / before

    def as_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "config": self.config.label(),
            "config_fields": self.config.as_dict(),
            "max_concurrency": self.max_concurrency,
            "metric": self.metric,
            "previous": self.previous.metrics[self.metric],
            "latest": self.latest.metrics[self.metric],
            "change": round(self.change, 6),
        }
        for when, run in (("previous", self.previous), ("latest", self.latest)):
            record[f"{when}_file"] = run.path
            record[f"{when}_date"] = run.date.isoformat()
            record[f"{when}_commit"] = run.commit
        return record


def compare(previous: Run, latest: Run, thresholds: Thresholds) -> list[Regression]:
    found = []
    for metric, (_, higher_is_better) in WATCHED.items():
        before, after = previous.metrics[metric], latest.metrics[metric]
        if before <= 0:
            continue  # nothing to compare a ratio with
        change = (after - before) / before
        limit = thresholds.throughput if higher_is_better else thresholds.latency
        # "More than" the threshold: a change equal to it up to rounding does not count.
        if (-change if higher_is_better else change) > limit + EPSILON:
            found.append(Regression(metric, previous, latest))
    return found


def find_regressions(runs: Iterable[Run], thresholds: Thresholds) -> list[Regression]:
    """Runs must come oldest first (as load_results returns them)."""
    found: list[Regression] = []
    for group in group_by(runs, lambda run: (run.config, run.max_concurrency)).values():
        if len(group) >= 2:
            found += compare(group[-2], group[-1], thresholds)
    return found


def format_table(regressions: list[Regression]) -> str:
    """A plain-text table for the terminal or a CI log."""
    header = (
        "config",
        "conc",
        "metric",
        "previous",
        "latest",
        "change",
        "previous run",
        "latest run",
    )
    rows = [header]
    for reg in regressions:
        rows.append(
            (
                reg.config.label(),
                reg.latest.concurrency_label,
                WATCHED[reg.metric][0],
                f"{reg.previous.metrics[reg.metric]:.2f}",
                f"{reg.latest.metrics[reg.metric]:.2f}",
                f"{reg.change:+.1%}",
                reg.previous.path,
                reg.latest.path,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )
