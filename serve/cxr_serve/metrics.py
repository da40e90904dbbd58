"""The service's Prometheus metrics (``GET /metrics``): requests, errors, latency, batch sizes and
queue depth, in a registry of the service's own (several services in one process stay apart).

Labels hold the route template (``/v2/models/{name}/infer``) and the status code only, never
anything of a request's content.

Examples:
    >>> m = Metrics()
    >>> m.observe_request("/v1/classify", 200, 0.012)
    >>> b"cxr_requests_total" in m.render()[0]
    True
"""
from __future__ import annotations

from typing import Callable, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The counters, histograms and gauges of one service."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("cxr_requests", "HTTP requests answered, by route and status code",
                                ["route", "code"], registry=r)
        self.errors = Counter("cxr_request_errors", "HTTP requests answered with a status of 400 or more",
                              ["route", "code"], registry=r)
        self.latency = Histogram("cxr_request_duration_seconds", "Time from request to answer", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("cxr_images", "Images classified", registry=r)
        self.batch_size = Histogram("cxr_batch_size", "Images per model run", buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("cxr_queue_depth", "Images decoded and waiting for a model run", registry=r)
        self.in_flight = Gauge("cxr_requests_in_flight", "Scoring requests being answered", registry=r)
        self.rejected = Counter("cxr_rejected", "Requests refused before any work, by reason", ["reason"],
                                registry=r)

    def observe_request(self, route: str, code: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(route, str(code)).inc()
        if code >= 400:
            self.errors.labels(route, str(code)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, size: int) -> None:
        """Count one model run of ``size`` images."""
        self.batch_size.observe(size)
        self.images.inc(size)

    def track_queue(self, depth: Callable[[], float]) -> None:
        """Read the queue depth from ``depth()`` whenever the metrics are scraped."""
        self.queue_depth.set_function(depth)

    def render(self) -> Tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
