"""The serving engine's periodic stats line: rates over the interval, idle time left out."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from atom.engine.scheduler import SchedulerStats
from atom.engine.stats_logger import DEFAULT_INTERVAL_S, StatsLogger, interval_from_env

ZERO = SchedulerStats(0, 0, 0.0, 100, 0, 0, 0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def stats(**changes: float) -> SchedulerStats:
    return dataclasses.replace(ZERO, **changes)  # type: ignore[arg-type]


def test_a_line_per_interval_with_rates_since_the_last_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    baseline = stats(num_prompt_tokens=7, num_generation_tokens=3)  # the warm-up's steps
    log = StatsLogger(baseline, interval_s=2.0, clock=clock)
    clock.now = 1.0
    assert log.update(stats(num_prompt_tokens=1007), stepped=True) is None
    clock.now = 2.5
    with caplog.at_level(logging.INFO, logger="atom.engine.stats_logger"):
        line = log.update(
            stats(
                num_running=3,
                num_waiting=1,
                kv_cache_usage=0.25,
                num_prompt_tokens=1007,
                num_generation_tokens=503,
                prefix_cache_queries=400,
                prefix_cache_hits=100,
                num_preemptions=2,
            ),
            stepped=True,
        )
    assert line == (
        "2 steps in 2.5 s (1250.00 ms each): prompt 400.0 tok/s, generation 200.0 tok/s; "
        "running 3, waiting 1, KV cache 25.0%, prefix cache hits 25.0%, preemptions 2"  # since 0
    )
    assert caplog.messages == [line]
    clock.now = 4.0
    second = log.update(stats(num_prompt_tokens=1007, num_generation_tokens=803), stepped=True)
    assert second is None  # 1.5 s into the next interval
    clock.now = 4.5  # gone idle: the line covers 2.5-4.0 s, up to its last step
    later = stats(num_prompt_tokens=1007, num_generation_tokens=803, num_preemptions=5)
    second = log.update(later, stepped=False)
    assert second is not None and second.startswith("1 steps in 1.5 s (1500.00 ms each)")
    assert "prompt 0.0 tok/s, generation 200.0 tok/s" in second
    assert second.endswith("preemptions 3")  # in this line's time


def test_idle_time_starts_the_next_interval_afresh() -> None:
    clock = Clock()
    log = StatsLogger(ZERO, interval_s=2.0, clock=clock)
    for t in (1.0, 50.0, 100.0):  # idle: no line, and the interval keeps restarting
        clock.now = t
        assert log.update(ZERO, stepped=False) is None
    clock.now = 101.0
    assert log.update(stats(num_generation_tokens=10), stepped=True) is None
    clock.now = 102.5
    line = log.update(stats(num_generation_tokens=10), stepped=False)
    assert line is not None and line.startswith("1 steps in 1.0 s")  # the idle pass at 100 s
    assert "generation 10.0 tok/s" in line


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", DEFAULT_INTERVAL_S), ("2.5", 2.5), ("0", DEFAULT_INTERVAL_S), ("x", DEFAULT_INTERVAL_S)],
)
def test_interval_from_env(monkeypatch: pytest.MonkeyPatch, raw: str, expected: float) -> None:
    monkeypatch.setenv("ATOM_LOG_STATS_INTERVAL", raw)
    assert interval_from_env() == expected
