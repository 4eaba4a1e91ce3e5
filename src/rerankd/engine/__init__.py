"""Pairs in, scores out: preparation off the forward path, token-budget batches, one compute loop."""

from .engine import Engine
from .scheduler import Batch, plan_batches

__all__ = ["Batch", "Engine", "plan_batches"]
