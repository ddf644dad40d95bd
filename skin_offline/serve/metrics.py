"""Prometheus metrics (`GET /metrics`), one registry per server so several apps never share counters."""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineCollector:
    """Slots, active rows and queue depth read from the engine at scrape time (no bookkeeping to drift)."""

    def __init__(self, state: Any):
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engine = self.state.engine
        stats = engine.stats() if engine is not None else None
        for name, doc, value in (
            ("skin_offline_slots", "requests the engine runs in parallel", stats.slots if stats else 0),
            ("skin_offline_active_slots", "requests running now", stats.active if stats else 0),
            ("skin_offline_queue_depth", "prepared requests waiting for a slot", stats.queued if stats else 0),
            (
                "skin_offline_admitted_requests",
                "requests admitted by the engine (running, waiting or being prepared)",
                stats.active + stats.queued if stats else 0,
            ),
            ("skin_offline_ready", "1 once the model is loaded", 1 if engine is not None else 0),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g


class Metrics:
    def __init__(self, state: Any):
        disable_created_metrics()  # no *_created series: scrapers do not need them and they double the output
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "skin_offline_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("skin_offline_prompt_tokens", "prompt positions (text + image rows)", registry=r)
        self.completion_tokens = Counter("skin_offline_completion_tokens", "generated tokens", registry=r)
        self.finished = Counter(
            "skin_offline_completions", "finished completions by finish reason", ["finish_reason"], registry=r
        )
        self.ttft = Histogram(
            "skin_offline_ttft_seconds",
            "request arrival to first token",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
        )
        self.decode_rate = Histogram(
            "skin_offline_decode_tokens_per_second",
            "decode speed per request",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
        )
        self.cancel_tokens = Histogram(
            "skin_offline_tokens_after_cancel",
            "tokens a row generated after its client left",
            registry=r,
            buckets=(0, 1, 2, 4, 8, 16),
        )
        r.register(_EngineCollector(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)
