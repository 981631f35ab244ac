"""The engine core's periodic log line while it serves (vLLM's "Avg prompt throughput..." line).

Every `interval` seconds in which a step ran, the core process logs what it did since the last
line: steps and their mean period, prompt (prefill) and generated tokens per second, prefix-cache
hits and preemptions in that time, and the scheduler's state. It is measured where the steps
run, so a front end that falls behind (a slow client, a busy event loop) does not bend the
figures: compare them with what a client measured to see which side caps a serving run.
`--disable-log-stats` turns it off; ATOM_LOG_STATS_INTERVAL sets the interval (seconds,
default 10).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from atom.engine.scheduler import SchedulerStats

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0


def interval_from_env() -> float:
    raw = os.environ.get("ATOM_LOG_STATS_INTERVAL", "")
    try:
        value = float(raw) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        logger.warning(
            "ATOM_LOG_STATS_INTERVAL=%r is not a number: using %s", raw, DEFAULT_INTERVAL_S
        )
        return DEFAULT_INTERVAL_S
    return value if value > 0 else DEFAULT_INTERVAL_S


class StatsLogger:
    def __init__(
        self,
        baseline: SchedulerStats,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """baseline: the stats before the first step to count (the start-up's warm-up steps
        count in the scheduler's totals too)."""
        self.interval_s = interval_from_env() if interval_s is None else interval_s
        self._clock = clock
        self._since = clock()
        self._steps = 0
        self._last_step = self._since
        self._last = baseline  # the counters at the last line

    def update(self, stats: SchedulerStats, stepped: bool) -> str | None:
        """Once per pass of the core loop, stepped or idle: logs (and returns) a line once the
        interval since the last one is over, if a step ran in it. A line's time runs from the
        pass before its first step to its last step: idle time before and after its steps counts
        in no line, a pause between them does (the period is that time over the steps)."""
        now = self._clock()
        if stepped:
            self._steps += 1
            self._last_step = now
        elif self._steps == 0:
            self._since = now
            return None
        if now - self._since < self.interval_s:
            return None
        # Gone idle: the line ends at its last step, not at the idle pass that logs it.
        elapsed = now - self._since if stepped else self._last_step - self._since
        line = self.line(stats, max(elapsed, 1e-9))
        logger.info("%s", line)
        self._since, self._steps, self._last = now, 0, stats
        return line

    def line(self, stats: SchedulerStats, elapsed: float) -> str:
        last = self._last
        prompt = stats.num_prompt_tokens - last.num_prompt_tokens
        generated = stats.num_generation_tokens - last.num_generation_tokens
        queries = stats.prefix_cache_queries - last.prefix_cache_queries
        hits = stats.prefix_cache_hits - last.prefix_cache_hits
        return (
            f"{self._steps} steps in {elapsed:.1f} s ({1e3 * elapsed / self._steps:.2f} ms each): "
            f"prompt {prompt / elapsed:.1f} tok/s, generation {generated / elapsed:.1f} tok/s; "
            f"running {stats.num_running}, waiting {stats.num_waiting}, "
            f"KV cache {100 * stats.kv_cache_usage:.1f}%, "
            f"prefix cache hits {100 * hits / queries if queries else 0.0:.1f}%, "
            f"preemptions {stats.num_preemptions - last.num_preemptions}"
        )
