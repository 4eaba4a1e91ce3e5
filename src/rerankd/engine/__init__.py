"""Pairs in, scores out: preparation off the forward path, token-budget batches, one compute loop."""

from .engine import Engine, Scored
from .scheduler import Batch, plan_batches

__all__ = ["Batch", "Engine", "Scored", "plan_batches"]
