"""The service's Prometheus metrics, in a registry of its own (no process-wide globals)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds from a request's arrival to its answer; CPU toy models to large GPU models.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Requests by status, latency, queue depth, group sizes, and bytes the ranks sent."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], int], in_flight: Callable[[], int], world_size: int) -> None:
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
            "Seconds of one pipeline call of a group (one image, or several with --max-batch; as in the "
            "X-Generation-Seconds header).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Gauge("distfd_queue_depth", "Requests waiting in the queue.", registry=r)
        self.queue.set_function(lambda: float(queue_depth()))
        self.in_flight = Gauge("distfd_in_flight", "Images being generated now.", registry=r)
        self.in_flight.set_function(lambda: float(in_flight()))
        self.bytes = Counter(
            "distfd_broadcast_bytes",
            "Payload bytes the first rank of each group handed to collectives while generating.",
            registry=r,
        )
        Gauge("distfd_world_size", "Ranks of the service.", registry=r).set(world_size)
        self.size = Gauge(
            "distfd_ranks_per_image", "Ranks that shared the most recently started image.", registry=r
        )
        self.size.set(world_size)
        self.images = Counter(
            "distfd_images", "Images started, by the number of ranks that shared each.", ["ranks"], registry=r
        )

    def count(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    # The coordinator's hooks.

    def dispatched(self, size: int, images: int) -> None:
        self.size.set(size)
        self.images.labels(ranks=str(size)).inc(images)

    def finished(self, seconds: float, bytes_sent: int) -> None:
        self.generation.observe(seconds)
        self.bytes.inc(bytes_sent)

    def render(self) -> bytes:
        return generate_latest(self.registry)
