"""The dashboard page: one self-contained HTML file (inline CSS, SVG and a few lines of script;
nothing fetched at view time)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from atom.benchmarks.dashboard.charts import ModelCharts, build_charts, slug
from atom.benchmarks.dashboard.regressions import WATCHED, Regression, Thresholds
from atom.benchmarks.dashboard.results import Run, group_by
from atom.benchmarks.dashboard.svg import render

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h2 { margin-top: 32px; border-bottom: 1px solid #ccc; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
svg.chart { background: #fff; border: 1px solid #ddd; font-size: 11px; }
svg.chart .chart-title { font-size: 14px; font-weight: 600; }
svg.chart .x-tick, svg.chart .x-label, svg.chart .no-data { text-anchor: middle; }
svg.chart .y-tick { text-anchor: end; }
svg.chart .y-label { text-anchor: middle; }
svg.chart .grid { stroke: #eee; }
svg.chart .axis { stroke: #444; }
svg.chart polyline { fill: none; stroke-width: 2; }
svg.chart .legend line { stroke-width: 2; }
svg.chart .legend-item { cursor: pointer; }
svg.chart .legend-item.off { opacity: 0.3; }
svg.chart .hidden { display: none; }
svg.chart .point-label { font-size: 10px; fill: #555; }
svg.chart circle.point[data-regressed] { stroke: #c00; stroke-width: 3; }
.box { padding: 8px 16px; border-radius: 6px; margin: 16px 0; }
.box.fail { border: 2px solid #c00; background: #fdecea; }
.box.fail h2 { color: #c00; border: none; margin-top: 8px; }
.box.ok { border: 2px solid #2a2; background: #eefbea; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; }
th:nth-child(-n+4) { text-align: left; }
td.text { text-align: left; }
tr.regressed td { background: #fdecea; }
.note { color: #555; }
"""
# Legend entries toggle their series; `data-ready` on <body> tells a headless check the script ran.
SCRIPT = """
document.querySelectorAll("svg.chart .legend-item").forEach(function (item) {
  item.addEventListener("click", function () {
    var selector = '.series[data-series="' + item.dataset.series + '"]';
    var series = item.closest("svg").querySelector(selector);
    item.classList.toggle("off", series.classList.toggle("hidden"));
  });
});
document.body.dataset.ready = String(document.querySelectorAll("svg.chart").length);
"""


def _percent(value: float) -> str:
    return f"{value:.0%}" if value * 100 == round(value * 100) else f"{value:.1%}"


def regression_box(regressions: Sequence[Regression], thresholds: Thresholds) -> str:
    rule = (
        f"latest run of each config and max concurrency against the previous one: output "
        f"throughput down more than {_percent(thresholds.throughput)}, mean TTFT or TPOT up "
        f"more than {_percent(thresholds.latency)}"
    )
    if not regressions:
        return f'<section id="regressions" class="box ok"><p>No regressions ({rule}).</p></section>'
    items = []
    for reg in regressions:
        name, _ = WATCHED[reg.metric]
        before, after = reg.previous.metrics[reg.metric], reg.latest.metrics[reg.metric]
        items.append(
            f'<li class="regression" data-config="{escape(reg.config.label())}" '
            f'data-concurrency="{reg.latest.concurrency_label}" data-metric="{reg.metric}">'
            f"<b>{escape(reg.config.label())}</b>, concurrency {reg.latest.concurrency_label}: "
            f"{name} {before:,.2f} → {after:,.2f} ({reg.change:+.1%}); "
            f"{escape(reg.previous.path)} → {escape(reg.latest.path)}</li>"
        )
    return (
        f'<section id="regressions" class="box fail"><h2>{len(regressions)} regression'
        f"{'s' if len(regressions) != 1 else ''}</h2><p>{rule}.</p><ul>{''.join(items)}</ul>"
        f"</section>"
    )


def latest_table(runs: Sequence[Run], regressions: Sequence[Regression]) -> str:
    """The newest run of each (config, max concurrency), with its change against the one before."""
    regressed = {id(reg.latest) for reg in regressions}
    head = ("config", "max conc.", "date", "commit", "completed", "failed", "req/s")
    head += ("output tok/s", "tok/s/GPU", "tok/s/user", "TTFT mean ms", "TTFT p99 ms")
    head += ("TPOT mean ms", "TPOT p99 ms", "tok/s vs previous")
    rows = ["<tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for group in group_by(runs, lambda run: (run.config, run.max_concurrency)).values():
        run, m = group[-1], group[-1].metrics
        change = (
            f"{run.output_throughput / group[-2].output_throughput - 1:+.1%}"
            if len(group) > 1 and group[-2].output_throughput > 0
            else ""
        )
        user = "" if run.tok_s_user is None else f"{run.tok_s_user:,.1f}"
        cells = [
            f"{m.get('completed', 0):,.0f}",
            f"{m.get('failed', 0):,.0f}",
            f"{m.get('request_throughput', 0):,.2f}",
            f"{run.output_throughput:,.1f}",
            f"{run.tok_s_gpu:,.1f}",
            user,
            f"{m['mean_ttft_ms']:,.1f}",
            f"{m.get('p99_ttft_ms', 0):,.1f}",
            f"{m['mean_tpot_ms']:,.2f}",
            f"{m.get('p99_tpot_ms', 0):,.2f}",
            change,
        ]
        texts = [run.config.label(), run.concurrency_label, f"{run.date:%Y-%m-%d %H:%M}"]
        texts.append(run.commit or "")
        rows.append(
            f'<tr class="run{" regressed" if id(run) in regressed else ""}" '
            f'data-config="{escape(run.config.label())}" data-concurrency="'
            f'{run.concurrency_label}" data-file="{escape(run.path)}">'
            + "".join(f'<td class="text">{escape(t)}</td>' for t in texts)
            + "".join(f"<td>{c}</td>" for c in cells)
            + "</tr>"
        )
    return f'<table id="latest-runs">{"".join(rows)}</table>'


def model_section(charts: ModelCharts) -> str:
    parts = [f'<section class="model" id="model-{slug(charts.model)}">']
    parts.append(f"<h2>{escape(charts.model)}</h2>")
    parts.append(f'<div class="charts">{render(charts.pareto)}</div>')
    for config, trends in charts.trends:
        parts.append(f"<h3>{escape(config.label())}</h3>")
        parts.append(f'<div class="charts">{"".join(render(c) for c in trends)}</div>')
    parts.append("</section>")
    return "\n".join(parts)


def render_page(
    runs: Sequence[Run],
    skipped: Sequence[str],
    regressions: Sequence[Regression],
    thresholds: Thresholds,
    source: str,
) -> str:
    """The whole page; `source` names the results folder (never an absolute path)."""
    configs = {run.config for run in runs}
    summary = (
        f"{len(runs)} runs of {len(configs)} configs from <code>{escape(source)}</code>, "
        f"{runs[0].date:%Y-%m-%d} to {runs[-1].date:%Y-%m-%d}."
        if runs
        else f"No runs in <code>{escape(source)}</code>."
    )
    skipped_list = ""
    if skipped:
        items = "".join(f"<li>{escape(path)}</li>" for path in skipped)
        skipped_list = (
            f"<details id='skipped'><summary>{len(skipped)} files skipped (not serving-benchmark "
            f"results)</summary><ul>{items}</ul></details>"
        )
    note = (
        '<p class="note">tok/s/user = 1000 / mean TPOT (ms); tok/s/GPU = output throughput / '
        "num_gpus. Click a legend entry to hide its line; hover a point for its run.</p>"
    )
    body = [
        "<h1>ATOM serving benchmarks</h1>",
        f'<p class="summary">{summary}</p>',
        skipped_list,
        regression_box(regressions, thresholds),
        note,
        *(model_section(charts) for charts in build_charts(runs, regressions)),
        "<h2>Latest runs</h2>",
        latest_table(runs, regressions),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>ATOM serving benchmarks</title>"
        f"<style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + f"\n<script>{SCRIPT}</script>\n</body></html>\n"
    )
