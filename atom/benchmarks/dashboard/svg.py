"""Line charts as inline SVG: axes with ticks, grid, title, legend, one element per data point.

No JavaScript is needed to read a chart: a point's tooltip is its SVG `<title>`. Each point carries
`data-*` attributes (its values, its run) so that tests and scripts can read the page back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape

PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
HEIGHT = 380
LEFT, RIGHT, TOP, BOTTOM = 72, 512, 44, 320  # the plot area; the legend sits right of it
LEGEND_ROW = 18
LEGEND_CHARS = 90  # longer series names are cut (the full name is the entry's tooltip)
CHAR_WIDTH = 6.4  # of 11px sans-serif, generously
HOUR, DAY = 3600, 86400
TIME_STEPS = (HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR, DAY, 2 * DAY, 7 * DAY, 14 * DAY, 30 * DAY)
TIME_STEPS += (91 * DAY, 182 * DAY, 365 * DAY)


@dataclass(frozen=True, slots=True)
class Point:
    x: float  # POSIX seconds on a time axis
    y: float
    label: str = ""  # drawn beside the point
    tooltip: str = ""
    attrs: Mapping[str, str] = field(default_factory=dict)  # data-* attributes, names without data-


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    color: str
    points: tuple[Point, ...]
    dashed: bool = False


@dataclass(frozen=True, slots=True)
class Chart:
    kind: str  # the data-chart attribute: pareto, throughput, ttft, tpot
    chart_id: str
    title: str
    x_label: str
    y_label: str
    series: tuple[Series, ...]
    time_x: bool = False
    attrs: Mapping[str, str] = field(default_factory=dict)


def timestamp(date: datetime) -> float:
    """Naive benchmark dates are wall-clock times: keep them as they read (as if UTC)."""
    return date.replace(tzinfo=timezone.utc).timestamp()


def nice_ticks(lo: float, hi: float, count: int = 5) -> tuple[float, float, list[float]]:
    """A range widened to round numbers, and its ticks (1, 2, 2.5 or 5 times a power of ten)."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * power >= raw)
    start, stop = math.floor(lo / step), math.ceil(hi / step)
    ticks = [i * step for i in range(start, stop + 1)]
    return ticks[0], ticks[-1], ticks


def format_number(value: float, step: float) -> str:
    if abs(value) >= 10_000 and step >= 1000:
        return f"{value / 1000:g}k"
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    return f"{value:,.{decimals}f}"


def time_ticks(lo: float, hi: float) -> tuple[float, float, list[float], str]:
    """A padded time range, ticks at whole hours or days, and the strftime format of the labels."""
    span = hi - lo
    lo, hi = (lo - span * 0.05, hi + span * 0.05) if span > 0 else (lo - DAY / 2, hi + DAY / 2)
    step = next((s for s in TIME_STEPS if (hi - lo) / s <= 6), TIME_STEPS[-1])
    first = math.ceil(lo / step) * step
    ticks = [float(t) for t in range(int(first), int(hi) + 1, step)]
    return lo, hi, ticks, "%m-%d %H:%M" if step < DAY else "%Y-%m-%d"


class _Scale:
    def __init__(self, lo: float, hi: float, out_lo: float, out_hi: float) -> None:
        self.lo, self.hi, self.out_lo, self.out_hi = lo, hi, out_lo, out_hi

    def __call__(self, value: float) -> float:
        frac = (value - self.lo) / (self.hi - self.lo)
        return round(self.out_lo + frac * (self.out_hi - self.out_lo), 2)


def _attrs(attrs: Mapping[str, str]) -> str:
    return "".join(f' data-{name}="{escape(str(value))}"' for name, value in attrs.items())


def _axes(chart: Chart, points: Sequence[Point]) -> tuple[_Scale, _Scale, list[str]]:
    """The scales, and the grid, ticks and labels of both axes."""
    xs = [p.x for p in points] or [0.0]
    ys = [p.y for p in points] or [0.0]
    parts: list[str] = []
    if chart.time_x:
        x_lo, x_hi, x_ticks, fmt = time_ticks(min(xs), max(xs))
        x_text = [datetime.fromtimestamp(t, timezone.utc).strftime(fmt) for t in x_ticks]
    else:
        x_lo, x_hi, x_ticks = nice_ticks(min(0.0, *xs), max(xs))
        x_text = [format_number(t, x_ticks[1] - x_ticks[0]) for t in x_ticks]
    y_lo, y_hi, y_ticks = nice_ticks(min(0.0, *ys), max(ys))
    y_text = [format_number(t, y_ticks[1] - y_ticks[0]) for t in y_ticks]
    sx, sy = _Scale(x_lo, x_hi, LEFT, RIGHT), _Scale(y_lo, y_hi, BOTTOM, TOP)
    for tick, text in zip(x_ticks, x_text, strict=True):
        x = sx(tick)
        parts.append(f'<line class="grid" x1="{x}" y1="{TOP}" x2="{x}" y2="{BOTTOM}"/>')
        parts.append(f'<text class="tick x-tick" x="{x}" y="{BOTTOM + 16}">{escape(text)}</text>')
    for tick, text in zip(y_ticks, y_text, strict=True):
        y = sy(tick)
        parts.append(f'<line class="grid" x1="{LEFT}" y1="{y}" x2="{RIGHT}" y2="{y}"/>')
        parts.append(f'<text class="tick y-tick" x="{LEFT - 6}" y="{y + 4}">{escape(text)}</text>')
    parts.append(f'<line class="axis" x1="{LEFT}" y1="{BOTTOM}" x2="{RIGHT}" y2="{BOTTOM}"/>')
    parts.append(f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{BOTTOM}"/>')
    mid_x, mid_y = (LEFT + RIGHT) / 2, (TOP + BOTTOM) / 2
    parts.append(
        f'<text class="axis-label x-label" x="{mid_x}" y="{BOTTOM + 40}">'
        f"{escape(chart.x_label)}</text>"
    )
    parts.append(
        f'<text class="axis-label y-label" x="{-mid_y}" y="16" transform="rotate(-90)">'
        f"{escape(chart.y_label)}</text>"
    )
    return sx, sy, parts


def _series(index: int, series: Series, sx: _Scale, sy: _Scale) -> str:
    dash = ' stroke-dasharray="6 4"' if series.dashed else ""
    parts = [f'<g class="series" data-series="{index}" data-name="{escape(series.name)}">']
    coords = " ".join(f"{sx(p.x)},{sy(p.y)}" for p in series.points)
    if len(series.points) > 1:
        parts.append(f'<polyline points="{coords}" stroke="{series.color}"{dash}/>')
    for p in series.points:
        x, y = sx(p.x), sy(p.y)
        parts.append(
            f'<circle class="point" cx="{x}" cy="{y}" r="4" fill="{series.color}"'
            f"{_attrs(p.attrs)}><title>{escape(p.tooltip)}</title></circle>"
        )
        if p.label:
            parts.append(
                f'<text class="point-label" x="{x + 6}" y="{y - 6}">{escape(p.label)}</text>'
            )
    parts.append("</g>")
    return "".join(parts)


def _legend(chart: Chart) -> str:
    parts = ['<g class="legend">']
    for index, series in enumerate(chart.series):
        y = TOP + index * LEGEND_ROW
        name = series.name
        short = name if len(name) <= LEGEND_CHARS else name[: LEGEND_CHARS - 1] + "…"
        dash = ' stroke-dasharray="6 4"' if series.dashed else ""
        parts.append(
            f'<g class="legend-item" data-series="{index}"><title>{escape(name)}</title>'
            f'<line x1="{RIGHT + 16}" y1="{y}" x2="{RIGHT + 40}" y2="{y}" '
            f'stroke="{series.color}"{dash}/>'
            f'<circle cx="{RIGHT + 28}" cy="{y}" r="3" fill="{series.color}"/>'
            f'<text x="{RIGHT + 46}" y="{y + 4}">{escape(short)}</text></g>'
        )
    parts.append("</g>")
    return "".join(parts)


def render(chart: Chart) -> str:
    """One <svg class="chart" data-chart=KIND> holding the whole chart."""
    points = [p for s in chart.series for p in s.points]
    height = max(HEIGHT, TOP + LEGEND_ROW * len(chart.series) + 10)
    # The legend's width follows its longest name, so that names are rarely cut.
    chars = min(LEGEND_CHARS, max((len(s.name) for s in chart.series), default=0))
    width = RIGHT + 56 + math.ceil(CHAR_WIDTH * chars)
    sx, sy, axes = _axes(chart, points)
    body = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="{escape(chart.chart_id)}" '
        f'data-chart="{escape(chart.kind)}"{_attrs(chart.attrs)} '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">',
        f'<text class="chart-title" x="{LEFT}" y="24">{escape(chart.title)}</text>',
        *axes,
        *(_series(i, s, sx, sy) for i, s in enumerate(chart.series)),
        _legend(chart),
    ]
    if not points:
        mid_x, mid_y = (LEFT + RIGHT) / 2, (TOP + BOTTOM) / 2
        body.append(f'<text class="no-data" x="{mid_x}" y="{mid_y}">no data</text>')
    body.append("</svg>")
    return "\n".join(body)
