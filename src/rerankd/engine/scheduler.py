"""Cutting prepared sequences into forward batches by a token budget."""

from __future__ import annotations

from dataclasses import dataclass

from ..models.base import PreparedSequence


@dataclass(frozen=True)
class Batch:
    indices: list[int]  # the pairs' positions in the caller's list
    sequences: list[PreparedSequence]

    @property
    def tokens(self) -> int:
        return sum(s.length for s in self.sequences)


def plan_batches(
    items: list[tuple[int, PreparedSequence]], max_batch_tokens: int, max_batch_pairs: int | None = None
) -> list[Batch]:
    """Sort by length (longest first) and fill each batch up to `max_batch_tokens` tokens (image tokens count).

    A sequence longer than the budget gets a batch of its own. `max_batch_pairs` optionally caps pairs per batch.
    Sorting keeps similar lengths together, which keeps per-sequence attention work balanced and lets a
    streaming caller hand the model its longest work first.
    """
    order = sorted(items, key=lambda it: (-it[1].length, it[0]))
    batches: list[Batch] = []
    cur_idx: list[int] = []
    cur_seq: list[PreparedSequence] = []
    cur_tokens = 0
    for idx, seq in order:
        full = cur_seq and (
            cur_tokens + seq.length > max_batch_tokens or (max_batch_pairs is not None and len(cur_seq) >= max_batch_pairs)
        )
        if full:
            batches.append(Batch(cur_idx, cur_seq))
            cur_idx, cur_seq, cur_tokens = [], [], 0
        cur_idx.append(idx)
        cur_seq.append(seq)
        cur_tokens += seq.length
    if cur_seq:
        batches.append(Batch(cur_idx, cur_seq))
    return batches
