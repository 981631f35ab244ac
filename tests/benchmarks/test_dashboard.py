"""The benchmark dashboard: loading saved results, configs and sittings, regression rules, the CLI's
exit codes, and the page as headless Chromium renders it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from atom.benchmarks.dashboard import Thresholds, find_regressions, load_results
from atom.benchmarks.dashboard.results import NotAResultError, parse_result
from atom.benchmarks.dashboard.svg import nice_ticks, time_ticks

LLAMA = "Llama-3.1-8B-Instruct"
ATOM_LLAMA = f"{LLAMA} atom ISL/OSL 1024/1024 1 GPU gpu=H200"
CONCURRENCIES = (4, 16, 64)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def result(
    date: str,
    concurrency: int | None,
    throughput: float,
    ttft: float = 100.0,
    tpot: float = 20.0,
    **metadata: Any,
) -> dict[str, Any]:
    """A `benchmark_serving --save-result` record (vLLM's fields) with `--metadata` strings."""
    return {
        "date": date,
        "backend": "vllm",
        "model_id": f"meta-llama/{LLAMA}",
        "tokenizer_id": f"meta-llama/{LLAMA}",
        "num_prompts": 10 * (concurrency or 10),
        "request_rate": "inf",
        "burstiness": 1.0,
        "max_concurrency": concurrency,
        "duration": 60.0,
        "completed": 10 * (concurrency or 10),
        "failed": 0,
        "total_input_tokens": 1000 * 10 * (concurrency or 10),
        "total_output_tokens": 1024 * 10 * (concurrency or 10),
        "request_throughput": throughput / 1024,
        "request_goodput": None,
        "output_throughput": throughput,
        "total_token_throughput": throughput * 2,
        "concurrency": float(concurrency or 10),
        **{f"{s}_{m}_ms": v for s in ("mean", "median", "p99") for m, v in _latencies(ttft, tpot)},
        "dataset_name": "random",
        "random_input_len": 1024,
        "random_output_len": 1024,
        "random_range_ratio": 0.8,
        **metadata,
    }


def _latencies(ttft: float, tpot: float) -> list[tuple[str, float]]:
    return [("ttft", ttft), ("tpot", tpot), ("itl", tpot), ("e2el", ttft + 1023 * tpot)]


def write_sweeps(root: Path) -> None:
    """Two sittings of atom and vLLM on Llama (one regression: atom at 64 loses 20% throughput),
    a plain vLLM file of another model, and three files that are not results."""
    for day, commit in (("20261201", "aaa1111"), ("20261202", "bbb2222")):
        folder = root / f"{day}-h200"
        folder.mkdir(parents=True)
        for engine in ("atom", "vllm"):
            for i, conc in enumerate(CONCURRENCIES):
                speed = 1000.0 * conc**0.5 * (1.01 if day == "20261202" else 1.0)
                if (engine, conc, day) == ("atom", 64, "20261202"):
                    speed *= 0.8
                record = result(f"{day}-0{i}0000", conc, speed, tpot=10.0 + conc / 4, engine=engine)
                record |= {"gpu": "H200", "num_gpus": "1", "commit": commit}
                (folder / f"{engine}-c{conc}.json").write_text(json.dumps(record))
    plain = root / "plain"
    plain.mkdir()
    for conc, speed in ((8, 900.0), (32, 2400.0)):
        record = result("20261130-120000", conc, speed, tpot=15.0)
        record["model_id"] = "/models/Qwen3-0.6B/"
        for key in ("dataset_name", "random_input_len", "random_output_len", "random_range_ratio"):
            del record[key]
        record["request_goodput:"] = record.pop("request_goodput")  # vLLM's trailing colon
        (plain / f"vllm-infqps-concurrency{conc}-Qwen3-0.6B.json").write_text(json.dumps(record))
        (plain / f"vllm-c{conc}.pytorch.json").write_text(json.dumps([{"benchmark": {}}]))
    (root / "notes.json").write_text(json.dumps(["not", "a", "result"]))
    (root / "broken.json").write_text("{")


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "atom.benchmarks.dashboard", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def test_saved_result_fields() -> None:
    record = result("20261201-083000", 64, 5000.0, tpot=25.0, engine="atom", num_gpus="2")
    record |= {"kv_cache_dtype": "fp8", "commit": "abc1234", "run_date": "x", "git_sha": "y"}
    run = parse_result(record, "a/b.json", "a")
    config = run.config
    assert (config.model, config.engine, config.isl, config.osl, config.num_gpus) == (
        LLAMA,
        "atom",
        1024,
        1024,
        2,
    )
    assert config.extra == (("kv_cache_dtype", "fp8"),)  # commit and date-like keys left out
    assert run.commit == "abc1234" and run.sitting == "commit abc1234"
    assert run.max_concurrency == 64 and run.date.isoformat() == "2026-12-01T08:30:00"
    assert run.tok_s_user == pytest.approx(40.0) and run.tok_s_gpu == pytest.approx(2500.0)


def test_plain_vllm_result() -> None:
    record = result("20261130-120000", None, 900.0, request_rate=4.0)
    for key in ("random_input_len", "random_output_len"):
        del record[key]
    record["request_goodput:"] = record.pop("request_goodput")
    run = parse_result(record, "x.json", "")
    assert (run.config.engine, run.config.isl, run.config.osl, run.config.num_gpus) == (
        "vllm",
        1000,  # total_input_tokens / completed
        1024,
        1,
    )
    assert run.config.extra == (("request_rate", "4"),)  # a finite rate is part of the config
    assert run.max_concurrency is None and run.concurrency_label == "∞"
    assert run.sitting == "2026-11-30" and run.commit is None  # no commit, no folder: the day


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"output_throughput": "fast"}, "output_throughput"),
        ({"model_id": None}, "model_id"),
        ({"date": "yesterday"}, "date"),
        ({"num_gpus": "0"}, "num_gpus"),
        ({"random_input_len": None, "completed": 0}, "random_input_len"),
    ],
)
def test_not_a_result(change: dict[str, Any], message: str) -> None:
    with pytest.raises(NotAResultError, match=message):
        parse_result(result("20261201-000000", 4, 1.0) | change, "x.json", "")


def test_load_groups_and_skips(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_sweeps(tmp_path)
    with caplog.at_level(logging.WARNING):
        runs, skipped = load_results(tmp_path)
    assert skipped == ["broken.json", "notes.json"]  # *.pytorch.json companions pass silently
    assert all(name in caplog.text for name in skipped) and "pytorch" not in caplog.text
    assert len(runs) == 14 and [r.date for r in runs] == sorted(r.date for r in runs)
    assert {r.sitting for r in runs} == {"commit aaa1111", "commit bbb2222", "plain"}
    assert len({r.config for r in runs}) == 3
    qwen = [r for r in runs if r.config.model == "Qwen3-0.6B"]
    assert [(r.config.engine, r.config.isl, r.config.extra) for r in qwen] == [
        ("vllm", 1000, ())
    ] * 2


def _pair(before: dict[str, float], after: dict[str, float]) -> list[str]:
    base = {"throughput": 1000.0, "ttft": 100.0, "tpot": 20.0}
    old = parse_result(result("20261201-000000", 8, **base), "old.json", "")
    new = parse_result(result("20261202-000000", 8, **(base | after)), "new.json", "")
    older = parse_result(result("20261101-000000", 8, **(base | before)), "older.json", "")
    return [reg.metric for reg in find_regressions([older, old, new], Thresholds())]


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        ({"throughput": 950.0}, []),  # exactly 5% down: not more than the threshold
        ({"throughput": 949.0}, ["output_throughput"]),
        ({"throughput": 2000.0, "ttft": 50.0, "tpot": 10.0}, []),  # improvements
        ({"ttft": 110.0, "tpot": 22.0}, []),  # exactly 10% up
        ({"ttft": 111.0}, ["mean_ttft_ms"]),
        ({"tpot": 22.5}, ["mean_tpot_ms"]),
        (
            {"throughput": 500.0, "ttft": 500.0, "tpot": 40.0},
            ["output_throughput", "mean_ttft_ms", "mean_tpot_ms"],
        ),
    ],
)
def test_regression_rules(after: dict[str, float], expected: list[str]) -> None:
    # An older, much faster run does not count: only the run just before the latest.
    assert _pair({"throughput": 5000.0}, after) == expected


def test_regressions_per_config_and_concurrency(tmp_path: Path) -> None:
    write_sweeps(tmp_path)
    runs, _ = load_results(tmp_path)
    regs = find_regressions(runs, Thresholds())
    assert [(r.config.label(), r.max_concurrency, r.metric) for r in regs] == [
        (ATOM_LLAMA, 64, "output_throughput")
    ]
    assert regs[0].change == pytest.approx(0.8 * 1.01 - 1)
    assert find_regressions(runs, Thresholds(throughput=0.25)) == []
    with pytest.raises(ValueError, match="latency threshold"):
        Thresholds(latency=-0.1)


def test_ticks() -> None:
    assert nice_ticks(0.0, 7300.0) == (0.0, 8000.0, [0.0, 2000.0, 4000.0, 6000.0, 8000.0])
    lo, hi, ticks, fmt = time_ticks(1_800_000_000.0, 1_800_000_000.0 + 86400 * 3)
    assert lo < ticks[0] and ticks[-1] <= hi and fmt == "%Y-%m-%d"
    assert all(t % 86400 == 0 for t in ticks)  # whole days


def test_cli_exit_codes_and_summary(tmp_path: Path) -> None:
    results = tmp_path / "results"
    write_sweeps(results)
    page, summary = tmp_path / "out" / "dashboard.html", tmp_path / "summary.json"
    proc = run_cli(results, "-o", page, "--json-summary", summary)
    assert proc.returncode == 1, proc.stderr
    assert "1 regression(s)" in proc.stdout and ATOM_LLAMA in proc.stdout
    assert "broken.json" in proc.stderr and "notes.json" in proc.stderr
    record = json.loads(summary.read_text())
    assert [(r["config"], r["max_concurrency"], r["metric"]) for r in record["regressions"]] == [
        (ATOM_LLAMA, 64, "output_throughput")
    ]
    assert record["num_runs"] == 14 and len(record["latest"]) == 8
    html = page.read_text()
    assert "<script src" not in html and "http://" not in html.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
    assert str(tmp_path) not in html  # no absolute paths
    assert run_cli(results, "-o", page, "--no-fail").returncode == 0
    assert run_cli(results, "-o", page, "--throughput-threshold", "0.3").returncode == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli(empty, "-o", page)
    assert proc.returncode == 2 and "no serving-benchmark results" in proc.stderr
    assert run_cli(tmp_path / "missing").returncode == 2
    assert run_cli(results, "--latency-threshold", "-1").returncode == 2


class _Dom(HTMLParser):
    """A DOM dump as a list of (tag, attributes, id of the enclosing chart), and the text of the
    regression box."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], str | None]] = []
        self.chart: str | None = None
        self.in_box = False
        self.box_text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "svg" and "chart" in values.get("class", "").split():
            self.chart = values["id"]
        self.in_box = self.in_box or values.get("id") == "regressions"
        self.elements.append((tag, values, self.chart))

    def handle_endtag(self, tag: str) -> None:
        self.chart = None if tag == "svg" else self.chart
        self.in_box = self.in_box and tag != "section"

    def handle_data(self, data: str) -> None:
        self.box_text += data if self.in_box else ""

    def find(self, tag: str, css_class: str = "", **attrs: str) -> list[dict[str, str]]:
        return [
            values
            for t, values, _ in self.elements
            if t == tag
            and (not css_class or css_class in values.get("class", "").split())
            and all(values.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


def _chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def test_page_renders_in_chromium(tmp_path: Path) -> None:
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run tries)")
    results = tmp_path / "results"
    write_sweeps(results)
    page = tmp_path / "dashboard.html"
    assert run_cli(results, "-o", page).returncode == 1
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    flags += [f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,3000"]
    shot = tmp_path / "shot.png"
    cmd = [chromium, *flags, f"--screenshot={shot}", "--dump-dom", page.as_uri()]
    env = {**os.environ, "HOME": str(tmp_path)}  # chromium writes caches under HOME
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = _Dom()
    dom.feed(proc.stdout)

    charts = dom.find("svg", "chart")
    assert dom.find("body")[0].get("data-ready") == str(len(charts)), "the script did not run"
    # Per model one pareto chart; per config throughput, TTFT and TPOT over time.
    kinds = [(c["data-chart"], c.get("data-model") or c["data-config"]) for c in charts]
    configs = [
        ATOM_LLAMA,
        ATOM_LLAMA.replace("atom", "vllm"),
        "Qwen3-0.6B vllm ISL/OSL 1000/1024 1 GPU",
    ]
    trends = [(kind, config) for config in configs for kind in ("throughput", "ttft", "tpot")]
    assert sorted(kinds) == sorted([("pareto", LLAMA), ("pareto", "Qwen3-0.6B"), *trends])
    for chart in charts:  # a title, a legend, both axes' labels and ticks
        inside = [(tag, v.get("class", "")) for tag, v, c in dom.elements if c == chart["id"]]
        for css_class in ("chart-title", "legend", "x-label", "y-label", "x-tick", "y-tick"):
            assert any(css_class in classes.split() for _, classes in inside), css_class
    points: dict[str, int] = {}
    for tag, values, chart in dom.elements:
        if tag == "circle" and "point" in values.get("class", ""):
            points[chart] = points.get(chart, 0) + 1
    for chart in charts:  # pareto: engines x sittings x concurrencies; trends: conc. x runs
        key = chart.get("data-model") or chart["data-config"]
        if chart["data-chart"] == "pareto":
            want = {LLAMA: 2 * 2 * 3, "Qwen3-0.6B": 1 * 1 * 2}[key]
        else:
            want = 2 * 1 if key.startswith("Qwen3") else 3 * 2
        assert points[chart["id"]] == want, (chart["id"], points)

    regressed = [p for p in dom.find("circle", "point") if p.get("data-regressed")]
    assert [(p["data-config"], p["data-concurrency"]) for p in regressed] == [(ATOM_LLAMA, "64")]
    assert "fail" in dom.find("section", id="regressions")[0]["class"]
    items = dom.find("li", "regression")
    assert [(i["data-config"], i["data-concurrency"]) for i in items] == [(ATOM_LLAMA, "64")]
    assert ATOM_LLAMA in dom.box_text and "1 regression" in dom.box_text
    assert len(dom.find("tr", "run")) == 8 and len(dom.find("tr", "regressed")) == 1
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
