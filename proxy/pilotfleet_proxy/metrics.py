"""Prometheus metrics of one proxy app, in a registry of its own (tests may run several apps at once)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Code completion lives in the 10 ms - 2 s range; streaming first tokens even lower.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Outstanding(Collector):
    """Requests in flight per Triton endpoint, read at scrape time from the live endpoints."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "pilotfleet_proxy_backend_outstanding_requests",
            "Requests in flight per Triton endpoint",
            labels=["endpoint"],
        )
        for url, count in self.source():
            family.add_metric([url], count)
        yield family


class ProxyMetrics:
    """The proxy's counters and histograms."""

    def __init__(self, outstanding: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pilotfleet_proxy_requests",
            "Completion requests by model, streaming and HTTP status",
            ["model", "stream", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pilotfleet_proxy_request_seconds",
            "Time from request to last byte of a completion",
            ["model", "stream"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "pilotfleet_proxy_time_to_first_token_seconds",
            "Time from request to the first streamed text",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "pilotfleet_proxy_prompt_tokens",
            "Prompt tokens sent to models",
            ["model"],
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "pilotfleet_proxy_completion_tokens",
            "Tokens returned to clients",
            ["model"],
            registry=self.registry,
        )
        self.trimmed_tokens = Counter(
            "pilotfleet_proxy_prompt_trimmed_tokens",
            "Prompt tokens cut to fit the context window",
            ["model"],
            registry=self.registry,
        )
        self.cancelled = Counter(
            "pilotfleet_proxy_cancelled_requests",
            "Requests whose client went away before the completion ended",
            ["model"],
            registry=self.registry,
        )
        self.route_reloads = Counter(
            "pilotfleet_proxy_route_table_reloads",
            "Route table loads by result",
            ["result"],
            registry=self.registry,
        )
        self.registry.register(_Outstanding(outstanding))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
