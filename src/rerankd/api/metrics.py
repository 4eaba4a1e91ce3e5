"""Prometheus metrics of one server (its own registry, so several apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PAIR_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rerankd_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.request_seconds = Histogram(
            "rerankd_request_seconds", "Time from request to response", ["route"], buckets=TIME_BUCKETS, registry=r
        )
        self.pairs = Counter("rerankd_pairs", "(query, document) pairs scored", registry=r)
        self.tokens = Counter("rerankd_tokens", "Prompt tokens scored (all windows, image tokens included)", registry=r)
        self.batch_pairs = Histogram("rerankd_batch_sequences", "Sequences per forward batch", buckets=PAIR_BUCKETS,
                                     registry=r)  # fmt: skip
        self.batch_tokens = Histogram("rerankd_batch_tokens", "Tokens per forward batch", buckets=TOKEN_BUCKETS,
                                      registry=r)  # fmt: skip
        self.queue_pairs = Gauge("rerankd_queue_pairs", "Pairs admitted and not finished (waiting or running)",
                                 registry=r)  # fmt: skip
        self.queue_wait_seconds = Histogram(
            "rerankd_queue_wait_seconds", "Time a prepared sequence waits for its batch", buckets=TIME_BUCKETS, registry=r
        )
        self.model_seconds = Histogram(
            "rerankd_model_seconds", "Time of one forward batch", buckets=TIME_BUCKETS, registry=r
        )

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
