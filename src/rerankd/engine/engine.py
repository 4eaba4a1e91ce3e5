"""The engine: prepares pairs in a thread pool while the model computes, batches by tokens, gathers scores.

Pairs are taken in windows: while window k is being scored, window k + 1 is being tokenized and its images
decoded and preprocessed, so preparation overlaps the forward pass (torch releases the GIL in its kernels).
Only two windows of prepared pairs exist at a time, so memory stays bounded however many pairs a call has.
A pair may come as several sequences (a long document split into token windows, see LengthOptions): they are
batched like any other and the pair keeps the maximum logit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from concurrent.futures import Future, ThreadPoolExecutor

from tqdm.auto import tqdm

from ..errors import InputError
from ..inputs import Item
from ..models.base import Backend, LengthOptions, PreparedSequence, Where, Window
from .scheduler import plan_batches

WINDOW_PAIRS = 128  # pairs prepared ahead of the model; sorted by length within a window


class Engine:
    def __init__(self, backend: Backend, max_batch_tokens: int, preprocess_workers: int | None = None):
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.backend = backend
        self.max_batch_tokens = max_batch_tokens
        workers = preprocess_workers or max(2, min(8, os.cpu_count() or 2))
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="rerankd-prepare")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _prepare(
        self, query: Item, doc: Item, lengths: LengthOptions, where: Where
    ) -> list[PreparedSequence] | InputError:
        try:
            return self.backend.prepare(query, doc, lengths, where)
        except InputError as e:
            return e

    def score(
        self,
        pairs: Sequence[tuple[Item, Item]],
        lengths: LengthOptions,
        params: Sequence[Where],
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> tuple[list[Scored | None], dict[int, InputError]]:
        """Each pair's relevance logit (the max over its windows) and winning window; the failures by pair index."""
        results: list[Scored | None] = [None] * len(pairs)
        errors: dict[int, InputError] = {}

        def submit(start: int) -> list[Future]:
            stop = min(start + WINDOW_PAIRS, len(pairs))
            return [self._pool.submit(self._prepare, *pairs[i], lengths, params[i]) for i in range(start, stop)]

        with tqdm(total=len(pairs), unit="pair", desc="scoring", disable=not show_progress) as bar:
            start = 0
            pending = submit(0)
            while pending:
                nxt = submit(start + WINDOW_PAIRS) if start + WINDOW_PAIRS < len(pairs) else []
                ready: list[tuple[int, PreparedSequence]] = []
                left: dict[int, int] = {}  # pair -> windows not yet scored
                for offset, fut in enumerate(pending):
                    res = fut.result()
                    if isinstance(res, InputError):
                        errors[start + offset] = res
                        bar.update()
                    else:
                        ready.extend((start + offset, seq) for seq in res)
                        left[start + offset] = len(res)
                for batch in plan_batches(ready, self.max_batch_tokens, batch_size):
                    logits = self.backend.forward(batch.sequences).tolist()
                    for idx, seq, logit in zip(batch.indices, batch.sequences, logits):
                        results[idx] = keep_best(results[idx], logit, seq)
                        left[idx] -= 1
                        if not left[idx]:
                            bar.update()
                pending, start = nxt, start + WINDOW_PAIRS
        return results, errors


@dataclass(frozen=True)
class Scored:
    """A pair's relevance logit (score = sigmoid(logit)) and, for a chunked document, the window that gave it."""

    logit: float
    window: Window | None = None


def keep_best(best: Scored | None, logit: float, seq: PreparedSequence) -> Scored:
    """A pair's score so far, after one more of its sequences scored `logit`: the maximum over its windows; on
    equal logits the earlier window wins, whatever order the batches ran in."""
    if best is None or logit > best.logit:
        return Scored(logit, seq.window)
    if logit == best.logit and seq.window is not None and best.window is not None and seq.window.index < best.window.index:
        return Scored(logit, seq.window)
    return best
