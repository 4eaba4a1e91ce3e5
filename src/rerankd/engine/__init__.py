"""Pairs in, scores out: the one scheduler under the library and the server (see scheduler.py)."""

from .scheduler import (
    WINDOW_PAIRS,
    Batch,
    Outcome,
    Overloaded,
    Scheduler,
    Scored,
    TooLarge,
    WorkerError,
    keep_best,
    plan_batches,
)

__all__ = ["WINDOW_PAIRS", "Batch", "Outcome", "Overloaded", "Scheduler", "Scored", "TooLarge", "WorkerError",
           "keep_best", "plan_batches"]  # fmt: skip
