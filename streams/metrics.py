"""Prometheus metrics of one worker, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

GaugeSource = Callable[[], Iterable[tuple[tuple[str, ...], float]]]


class _CallbackCollector(Collector):
    """A gauge family whose samples are computed at scrape time."""

    def __init__(
        self, name: str, documentation: str, labels: list[str], source: GaugeSource
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.source = source

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        for label_values, value in self.source():
            family.add_metric(list(label_values), value)
        yield family


class Metrics:
    """Counters and histograms of the pipeline; labels never carry secrets."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.alerts = Counter(
            "autopull_alerts",
            "Raw alerts by source and outcome (normalized or dead).",
            ["source", "outcome"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "autopull_dead_letters",
            "Dead letters by pipeline stage.",
            ["stage"],
            registry=self.registry,
        )
        self.pulls = Counter(
            "autopull_pulls",
            "Pull outcomes by platform, kind and status.",
            ["platform", "kind", "status"],
            registry=self.registry,
        )
        self.pull_latency = Histogram(
            "autopull_pull_latency_seconds",
            "Seconds from an alert's arrival to the end of its quarantine.",
            ["platform"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.retries = Counter(
            "autopull_platform_retries",
            "Repeated platform calls after transient errors, by platform.",
            ["platform"],
            registry=self.registry,
        )
        self.throttled_responses = Counter(
            "autopull_platform_throttled_responses",
            "Responses in which a platform asked to slow down (429, or 503 with "
            "Retry-After), retries inside client libraries included, by platform.",
            ["platform"],
            registry=self.registry,
        )
        self.throttled = Counter(
            "autopull_platform_throttled",
            "Pulls parked because the platform kept throttling (429, 503 with "
            "Retry-After, or a throttling code), by platform. Outages and server "
            "errors are parked too but not counted here.",
            ["platform"],
            registry=self.registry,
        )

    def gauge(
        self, name: str, documentation: str, labels: list[str], source: GaugeSource
    ) -> None:
        """Add a gauge computed from `source` at every scrape."""
        self.registry.register(_CallbackCollector(name, documentation, labels, source))

    def count_throttled(self, platform: str) -> None:
        """Count one response in which `platform` asked to slow down."""
        self.throttled_responses.labels(platform).inc()

    def record_outcome(self, outcome: dict[str, object]) -> None:
        """Count one pull outcome, its retries and its latency."""
        platform = str(outcome["platform"])
        status = str(outcome["status"])
        self.pulls.labels(platform, str(outcome["kind"]), status).inc()
        attempts = int(str(outcome["attempts"]))
        if attempts > 1:
            self.retries.labels(platform).inc(attempts - 1)
        if status == "throttled" and outcome.get("error_class") == "throttled":
            self.throttled.labels(platform).inc()
        seconds = outcome.get("seconds_from_alert")
        if status == "quarantined" and isinstance(seconds, float):
            self.pull_latency.labels(platform).observe(seconds)

    def render(self) -> bytes:
        """Return the metrics in the Prometheus text format."""
        return generate_latest(self.registry)
