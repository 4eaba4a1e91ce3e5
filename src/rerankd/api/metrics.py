"""Prometheus metrics of one server (its own registry, so several apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PAIR_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class Metrics:
    """The server's metrics, and the process's own (memory, CPU, open descriptors against their limit). `replica`
    (a Ray Serve replica's id) labels every rerankd series: a scrape through Ray's proxy reaches one replica or
    another, and without the label their counters would read as one counter that keeps resetting."""

    def __init__(self, replica: str | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self._replica = () if replica is None else (replica,)
        extra = ["replica"] if replica is not None else []

        def one(metric, name: str, doc: str, **kw):  # a metric of no labels but the replica's
            m = metric(name, doc, extra, registry=r, **kw)
            return m.labels(*self._replica) if replica is not None else m

        self.requests = Counter("rerankd_requests", "HTTP requests by route and status", ["route", "status", *extra],
                                registry=r)  # fmt: skip
        self.request_seconds = Histogram(
            "rerankd_request_seconds", "Time from request to response, by route and status (fast refusals such as "
            "429 apart from answers)", ["route", "status", *extra], buckets=TIME_BUCKETS, registry=r,
        )  # fmt: skip
        self.pairs = one(Counter, "rerankd_pairs", "(query, document) pairs scored")
        self.tokens = one(Counter, "rerankd_tokens", "Prompt tokens scored (all windows, image tokens included)")
        self.batch_pairs = one(Histogram, "rerankd_batch_sequences", "Sequences per forward batch",
                               buckets=PAIR_BUCKETS)  # fmt: skip
        self.batch_tokens = one(Histogram, "rerankd_batch_tokens", "Tokens per forward batch", buckets=TOKEN_BUCKETS)
        self.queue_pairs = one(Gauge, "rerankd_queue_pairs", "Pairs admitted and not finished (waiting or running)")
        self.queue_wait_seconds = one(Histogram, "rerankd_queue_wait_seconds",
                                      "Time a prepared sequence waits for its batch", buckets=TIME_BUCKETS)  # fmt: skip
        self.model_seconds = one(Histogram, "rerankd_model_seconds", "Time of one forward batch", buckets=TIME_BUCKETS)
        self.queue_tokens = one(Gauge, "rerankd_queue_tokens", "Tokens of work admitted and not answered (bounds until "
                                "prepared), against --max-queue-tokens")  # fmt: skip
        self.worker_up = one(Gauge, "rerankd_worker_up", "1 while the model worker runs, 0 once it stopped or died")
        self.connections_closed = Counter("rerankd_connections_closed", "Connections the server closed before a "
                                          "request reached it: idle_evicted and refused (503) at --max-connections, "
                                          "head_timeout (--header-timeout)", ["reason", *extra], registry=r)  # fmt: skip

    def connection_closed(self, reason: str) -> None:
        self.connections_closed.labels(reason, *self._replica).inc()

    def watch(self, scheduler) -> None:
        """Read the scheduler's token queue and worker state at each scrape."""
        self.queue_tokens.set_function(lambda: scheduler.queued_tokens)
        self.worker_up.set_function(lambda: 1.0 if scheduler.alive else 0.0)

    def request(self, route: str, status: int, seconds: float) -> None:
        """One HTTP request answered."""
        self.requests.labels(route, str(status), *self._replica).inc()
        self.request_seconds.labels(route, str(status), *self._replica).observe(seconds)

    # the scheduler's Observer
    def queue_depth(self, pairs: int) -> None:
        self.queue_pairs.set(pairs)

    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_seconds.observe(seconds)

    def batch(self, pairs: int, tokens: int, model_seconds: float) -> None:
        self.batch_pairs.observe(pairs)
        self.batch_tokens.observe(tokens)
        self.model_seconds.observe(model_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
