"""Prometheus metrics of one server (its own registry, so that apps in one process do not clash).

Per-request numbers (tokens, latencies, finish reasons) come from AsyncLLM.on_finished; engine
state (queues, KV blocks, prefix cache, preemptions) is read from the latest SchedulerStats when
/metrics is scraped, which costs nothing per engine step.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from atom.engine.scheduler import SchedulerStats
from atom.outputs import RequestOutput

LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, num_total_blocks: int) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.running = gauge("atom:num_requests_running", "Requests being computed.")
        self.waiting = gauge("atom:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("atom:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.")
        self.free_blocks = gauge("atom:num_free_kv_blocks", "KV-cache blocks free (or cached).")
        self.total_blocks = gauge("atom:num_total_kv_blocks", "KV-cache blocks in all.")
        self.hit_rate = gauge(
            "atom:prefix_cache_hit_rate", "Prefix-cache hits / queries, in tokens, since start."
        )
        self.prompt_tokens = Counter(
            "atom:prompt_tokens", "Prompt tokens of finished requests.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "atom:generation_tokens", "Generated tokens of finished requests.", labels, registry=r
        )
        self.preemptions = Counter(
            "atom:num_preemptions", "Preemptions by the scheduler.", labels, registry=r
        )
        self.success = Counter(
            "atom:request_success",
            "Finished requests, by finish reason.",
            [*labels, "finished_reason"],
            registry=r,
        )
        self.ttft = hist(
            "atom:time_to_first_token_seconds", "Arrival to first token.", LATENCY_BUCKETS
        )
        self.tpot = hist(
            "atom:time_per_output_token_seconds",
            "Mean time per token after the first.",
            TPOT_BUCKETS,
        )
        self.e2e = hist("atom:e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS)
        self.queue = hist(
            "atom:request_queue_time_seconds", "Arrival to first scheduled.", LATENCY_BUCKETS
        )
        self.total_blocks.labels(model_name).set(num_total_blocks)
        # Children made up front, so that every series shows (at 0) from the first scrape.
        for metric in (self.prompt_tokens, self.generation_tokens, self.preemptions):
            metric.labels(model_name)
        for histogram in (self.ttft, self.tpot, self.e2e, self.queue):
            histogram.labels(model_name)
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)
        self._seen_preemptions = 0

    def on_finished(self, out: RequestOutput) -> None:
        name = self.model_name
        self.prompt_tokens.labels(name).inc(len(out.prompt_token_ids))
        num_generated = sum(len(c.token_ids) for c in out.outputs)
        self.generation_tokens.labels(name).inc(num_generated)
        for c in out.outputs:
            self.success.labels(name, c.finish_reason or "unknown").inc()
        m = out.metrics
        if m.first_token_time is not None:
            self.ttft.labels(name).observe(m.first_token_time - m.arrival_time)
            if m.last_token_time is not None and num_generated > len(out.outputs):
                per_token = (m.last_token_time - m.first_token_time) / (num_generated - 1)
                self.tpot.labels(name).observe(per_token)
        if m.finished_time is not None:
            self.e2e.labels(name).observe(m.finished_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue.labels(name).observe(m.first_scheduled_time - m.arrival_time)

    def update(self, stats: SchedulerStats) -> None:
        name = self.model_name
        self.running.labels(name).set(stats.num_running)
        self.waiting.labels(name).set(stats.num_waiting)
        self.kv_usage.labels(name).set(stats.kv_cache_usage)
        self.free_blocks.labels(name).set(stats.num_free_blocks)
        queries = stats.prefix_cache_queries
        self.hit_rate.labels(name).set(stats.prefix_cache_hits / queries if queries else 0.0)
        # The scheduler counts preemptions since start; the counter takes the difference.
        if stats.num_preemptions > self._seen_preemptions:
            self.preemptions.labels(name).inc(stats.num_preemptions - self._seen_preemptions)
            self._seen_preemptions = stats.num_preemptions

    def render(self, stats: SchedulerStats) -> bytes:
        self.update(stats)
        return generate_latest(self.registry)
