"""The dashboard's charts from runs: interactivity against throughput per model, and throughput,
TTFT and TPOT over time per config (a line per max concurrency)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from atom.benchmarks.dashboard.regressions import Regression
from atom.benchmarks.dashboard.results import Config, Run, group_by
from atom.benchmarks.dashboard.svg import PALETTE, Chart, Point, Series, timestamp

# kind -> (metric, title, y label)
TRENDS = {
    "throughput": ("output_throughput", "Output throughput over time", "output tok/s"),
    "ttft": ("mean_ttft_ms", "Mean TTFT over time", "mean TTFT (ms)"),
    "tpot": ("mean_tpot_ms", "Mean TPOT over time", "mean TPOT (ms)"),
}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def sitting_name(runs: Sequence[Run]) -> str:
    """A sitting's name with the day of its last run, unless the name is that day."""
    day = runs[-1].date.strftime("%Y-%m-%d")
    return runs[-1].sitting if runs[-1].sitting == day else f"{runs[-1].sitting}, {day}"


def _point(run: Run, x: float, y: float, label: str, regressed: str | None = None) -> Point:
    tooltip = (
        f"{run.config.label()}\nconcurrency {run.concurrency_label}, {run.date:%Y-%m-%d %H:%M}"
        f"{f', {run.commit}' if run.commit else ''}\noutput {run.output_throughput:,.1f} tok/s, "
        f"{run.tok_s_gpu:,.1f} tok/s/GPU\nTTFT {run.metrics['mean_ttft_ms']:,.1f} ms, "
        f"TPOT {run.metrics['mean_tpot_ms']:,.2f} ms\n{run.path}"
    )
    attrs = {
        "config": run.config.label(),
        "concurrency": run.concurrency_label,
        "sitting": run.sitting,
        "date": run.date.isoformat(),
        "file": run.path,
        "x": f"{x:.6g}",
        "y": f"{y:.6g}",
    }
    if regressed:
        attrs["regressed"] = regressed
    return Point(x, y, label, tooltip, attrs)


def _pareto_points(sitting: Sequence[Run]) -> tuple[Point, ...]:
    newest = {run.max_concurrency: run for run in sitting}  # a repeat replaces the earlier run
    ordered = sorted(newest.items(), key=lambda item: (item[0] is None, item[0] or 0))
    return tuple(
        _point(run, run.tok_s_user, run.tok_s_gpu, run.concurrency_label)
        for _, run in ordered
        if run.tok_s_user is not None
    )


def pareto_chart(model: str, runs: Sequence[Run], chart_id: str) -> Chart:
    """tok/s/GPU against tok/s/user, a line per (config, sitting) through its concurrencies;
    the newest sitting of a config solid, older ones dashed in the same colour."""
    series = []
    for index, config_runs in enumerate(group_by(runs, lambda run: run.config).values()):
        sittings = group_by(config_runs, lambda run: run.sitting).values()
        ordered = sorted(sittings, key=lambda group: group[-1].date)
        for age, sitting in enumerate(reversed(ordered)):
            series.append(
                Series(
                    name=f"{sitting[0].config.label(with_model=False)} · {sitting_name(sitting)}",
                    color=PALETTE[index % len(PALETTE)],
                    points=_pareto_points(sitting),
                    dashed=age > 0,
                )
            )
    return Chart(
        kind="pareto",
        chart_id=chart_id,
        title=f"{model}: interactivity vs throughput (points: max concurrency)",
        x_label="interactivity: tok/s/user (1000 / mean TPOT ms)",
        y_label="throughput: output tok/s/GPU",
        series=tuple(series),
        attrs={"model": model},
    )


def trend_chart(
    kind: str, config: Config, runs: Sequence[Run], chart_id: str, regressed: set[tuple[int, str]]
) -> Chart:
    """One metric over time, a line per max concurrency; `regressed` holds (id(run), metric)."""
    metric, title, y_label = TRENDS[kind]
    series = []
    by_concurrency = group_by(runs, lambda run: run.max_concurrency)
    for index, group in enumerate(by_concurrency.values()):
        points = tuple(
            _point(
                run,
                timestamp(run.date),
                run.metrics[metric],
                "",
                metric if (id(run), metric) in regressed else None,
            )
            for run in group
        )
        name = f"concurrency {group[0].concurrency_label}"
        series.append(Series(name, PALETTE[index % len(PALETTE)], points))
    return Chart(
        kind=kind,
        chart_id=chart_id,
        title=title,  # the config is the heading above
        x_label="run date",
        y_label=y_label,
        series=tuple(series),
        time_x=True,
        attrs={"config": config.label()},
    )


@dataclass(frozen=True, slots=True)
class ModelCharts:
    model: str
    pareto: Chart
    trends: tuple[tuple[Config, tuple[Chart, ...]], ...]  # per config: throughput, ttft, tpot


def build_charts(runs: Sequence[Run], regressions: Sequence[Regression]) -> list[ModelCharts]:
    regressed = {(id(reg.latest), reg.metric) for reg in regressions}
    used: set[str] = set()

    def unique(chart_id: str) -> str:
        base, n = chart_id, 1
        while chart_id in used:
            n += 1
            chart_id = f"{base}-{n}"
        used.add(chart_id)
        return chart_id

    models = []
    for model, model_runs in group_by(runs, lambda run: run.config.model).items():
        trends = tuple(
            (
                config,
                tuple(
                    trend_chart(
                        kind, config, group, unique(f"{kind}-{slug(config.label())}"), regressed
                    )
                    for kind in TRENDS
                ),
            )
            for config, group in group_by(model_runs, lambda run: run.config).items()
        )
        pareto = pareto_chart(model, model_runs, unique(f"pareto-{slug(model)}"))
        models.append(ModelCharts(model, pareto, trends))
    return models
