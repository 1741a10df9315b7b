"""The service's Prometheus metrics, in a registry of its own (no process-wide globals)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds from a request's arrival to its answer; CPU toy models to large GPU models.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Requests by status, latency, queue depth and bytes rank 0 handed to collectives."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], int], world_size: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "distfd_requests", "HTTP requests to /generate, by response status.", ["status"], registry=r
        )
        self.latency = Histogram(
            "distfd_request_seconds",
            "Seconds from a /generate request's arrival to its image (queueing included).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generation = Histogram(
            "distfd_generation_seconds",
            "Seconds the ranks spent generating one image (as in the X-Generation-Seconds header).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Gauge("distfd_queue_depth", "Requests waiting in the queue.", registry=r)
        self.queue.set_function(lambda: float(queue_depth()))
        self.bytes = Counter(
            "distfd_broadcast_bytes",
            "Payload bytes rank 0 handed to collectives: requests and heartbeats to the other ranks, "
            "and the features it sent while generating.",
            registry=r,
        )
        Gauge("distfd_world_size", "Ranks sharing each image.", registry=r).set(world_size)

    def count(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    # the rank loop's hooks

    def sent(self, nbytes: int) -> None:
        self.bytes.inc(nbytes)

    def finished(self, seconds: float, bytes_sent: int) -> None:
        self.generation.observe(seconds)
        self.bytes.inc(bytes_sent)

    def render(self) -> bytes:
        return generate_latest(self.registry)
