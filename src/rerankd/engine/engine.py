"""The engine: prepares pairs in a thread pool while the model computes, batches by tokens, gathers scores.

Pairs are taken in windows: while window k is being scored, window k + 1 is being tokenized and its images
decoded and preprocessed, so preparation overlaps the forward pass (torch releases the GIL in its kernels).
Only two windows of prepared pairs exist at a time, so memory stays bounded however many pairs a call has.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from tqdm.auto import tqdm

from ..errors import InputError
from ..inputs import Item
from ..models.base import Backend, LengthOptions, PreparedSequence, Where
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

    def _prepare(self, query: Item, doc: Item, lengths: LengthOptions, where: Where) -> PreparedSequence | InputError:
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
    ) -> tuple[list[float | None], dict[int, InputError]]:
        """Scores (None where a pair failed) and the failures by pair index."""
        scores: list[float | None] = [None] * len(pairs)
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
                for offset, fut in enumerate(pending):
                    res = fut.result()
                    if isinstance(res, InputError):
                        errors[start + offset] = res
                        bar.update()
                    else:
                        ready.append((start + offset, res))
                for batch in plan_batches(ready, self.max_batch_tokens, batch_size):
                    probs = self.backend.activation(self.backend.forward(batch.sequences))
                    for idx, p in zip(batch.indices, probs.tolist()):
                        scores[idx] = p
                    bar.update(len(batch.indices))
                pending, start = nxt, start + WINDOW_PAIRS
        return scores, errors
