"""Prometheus metrics of the server (`GET /metrics`, text format 0.0.4 through prometheus-client).

Names follow vLLM's (vllm/v1/metrics/loggers.py) with the prefix `ascend_llm:`:
  gauges (read from `Scheduler.stats()` at scrape time): num_requests_running, num_requests_waiting,
    kv_cache_usage_perc (0..1), num_kv_blocks_used, num_kv_blocks_free, num_kv_blocks_total
  counters: prompt_tokens_total, generation_tokens_total, num_preemptions_total (scheduler totals),
    graph_compiles_total (distinct step shapes the engine ran: all compiled at start-up, constant under traffic),
    request_success_total{finished_reason} (stop | length | cancelled | error, counted by the server)
  histograms (seconds, one observation per finished request): time_to_first_token_seconds,
    time_per_output_token_seconds (mean over the request's tokens after the first), e2e_request_latency_seconds
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "ascend_llm:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class _SchedulerCollector:
    """Gauges and counters read from the scheduler's stats() dict at every scrape."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        total = max(int(s.get("kv_blocks_total", 0)), 1)
        for name, doc, value in [
                ("num_requests_running", "Requests in the running batch.", s.get("running", 0)),
                ("num_requests_waiting", "Requests waiting to be scheduled.", s.get("waiting", 0)),
                ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).",
                 s.get("kv_blocks_used", 0) / total),
                ("num_kv_blocks_used", "KV-cache blocks held by requests.", s.get("kv_blocks_used", 0)),
                ("num_kv_blocks_free", "KV-cache blocks free.", s.get("kv_blocks_free", 0)),
                ("num_kv_blocks_total", "KV-cache blocks in the pool.", s.get("kv_blocks_total", 0))]:
            yield GaugeMetricFamily(PREFIX + name, doc, value=float(value))
        for name, doc, key in [("prompt_tokens", "Prefill tokens processed.", "prompt_tokens_total"),
                               ("generation_tokens", "Generated tokens.", "generation_tokens_total"),
                               ("num_preemptions", "Requests preempted (recomputed later).", "num_preemptions"),
                               ("graph_compiles", "Distinct step shapes run by the engine (one graph compile each "
                                "in graph mode; all at start-up).", "graph_compiles")]:
            yield CounterMetricFamily(PREFIX + name, doc, value=float(s.get(key, 0)))


class ServerMetrics:
    """One registry per server. observe(request) once per finished request (arrival_s, first_token_s, finish_s
    are time.perf_counter() stamps; out: generated ids)."""

    def __init__(self, stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.registry.register(_SchedulerCollector(stats))
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Mean time per output token after the "
                              "first, per request.", buckets=TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=E2E_BUCKETS, registry=self.registry)
        self.finished = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                ["finished_reason"], registry=self.registry)

    def observe(self, request) -> None:
        reason = request.finish_reason or "cancelled"
        self.finished.labels(finished_reason=reason).inc()
        first, last = getattr(request, "first_token_s", None), getattr(request, "finish_s", None)
        if first is None:
            return
        self.ttft.observe(max(first - request.arrival_s, 0.0))
        if last is not None:
            self.e2e.observe(max(last - request.arrival_s, 0.0))
            if len(request.out) > 1:
                self.tpot.observe(max(last - first, 0.0) / (len(request.out) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
