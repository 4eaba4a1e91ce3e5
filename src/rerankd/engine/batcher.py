"""The server's scheduler: pairs of concurrent requests merged into token-budget batches, one compute loop.

Requests arrive on the asyncio loop. Their pairs are prepared (tokenized, images decoded) in a thread pool and put
on one ready queue; a single worker thread takes batches off it: it waits at most `max_batch_wait` after the oldest
waiting pair for company, fills the batch up to `max_batch_tokens` in arrival order (one request's pairs may span
batches), runs the forward, and hands each pair's result back. Preparation of later pairs overlaps the forward.

Admission is explicit: at most `max_queue_pairs` pairs are admitted (waiting or running); beyond it `Overloaded`
is raised at once. A request whose awaiting task is cancelled (deadline, client gone) is marked so: its pairs are
skipped by the preparers and dropped by the worker before they reach the model. A forward that raises fails the
requests in that batch with `WorkerError`; if the worker thread itself dies, every pending request fails and
`alive` turns false. Nothing ever leaves a request waiting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import InputError, RerankdError
from ..inputs import Item
from ..models.base import Backend, LengthOptions, PreparedSequence, Where
from .engine import Scored, keep_best

log = logging.getLogger("rerankd.batcher")


class Overloaded(RerankdError):
    """The queue is full; try again later."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class WorkerError(RerankdError):
    """The model failed on a batch, or the worker is not running."""


class Observer(Protocol):
    """What the batcher reports (the server's metrics implement it)."""

    def queue_depth(self, pairs: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def batch(self, pairs: int, tokens: int, model_seconds: float) -> None: ...


class _NoObserver:
    def queue_depth(self, pairs: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def batch(self, pairs: int, tokens: int, model_seconds: float) -> None: ...


@dataclass(eq=False)
class _Request:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    results: list[Scored | InputError | None]
    windows_left: list[int]
    open: int  # pairs not finished
    tokens: int = 0
    cancelled: bool = False
    done: bool = False


@dataclass(eq=False)
class _Entry:
    request: _Request
    pair: int
    seq: PreparedSequence
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Outcome:
    """A request's results: per pair a Scored or the InputError that kept it from the model; tokens scored."""

    results: list[Scored | InputError]
    tokens: int


class Batcher:
    def __init__(
        self,
        backend: Backend,
        max_batch_tokens: int,
        max_batch_wait: float,
        max_queue_pairs: int,
        prepare_workers: int | None = None,
        observer: Observer | None = None,
    ):
        if max_batch_tokens < 1 or max_queue_pairs < 1 or max_batch_wait < 0:
            raise ValueError("need max_batch_tokens >= 1, max_queue_pairs >= 1 and max_batch_wait >= 0")
        self.backend = backend
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_wait = max_batch_wait
        self.max_queue_pairs = max_queue_pairs
        self.observer: Observer = observer or _NoObserver()
        workers = prepare_workers or max(2, min(8, os.cpu_count() or 2))
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="rerankd-prepare")
        self._cond = threading.Condition()
        self._ready: deque[_Entry] = deque()
        self._ready_tokens = 0
        self._admitted = 0  # pairs admitted and not finished
        self._requests: set[_Request] = set()
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rerankd-worker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ the loop side

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stopping

    @property
    def queued_pairs(self) -> int:
        return self._admitted

    async def score(self, pairs: Sequence[tuple[Item, Item]], lengths: LengthOptions, wheres: Sequence[Where]) -> Outcome:
        """Score the pairs; cancel the awaiting task to withdraw them."""
        n = len(pairs)
        loop = asyncio.get_running_loop()
        req = _Request(loop, loop.create_future(), [None] * n, [0] * n, n)
        with self._cond:
            if not self.alive:
                raise WorkerError(f"the model worker is not running ({self.error or 'stopped'})")
            if self._admitted and self._admitted + n > self.max_queue_pairs:
                raise Overloaded(
                    f"the server is busy: {self._admitted} pairs queued, this request adds {n}, the limit is "
                    f"{self.max_queue_pairs}; retry later",
                    retry_after=1.0,
                )
            self._admitted += n
            self._requests.add(req)
            self.observer.queue_depth(self._admitted)
        if n == 0:
            self._finish(req)
        for i, (q, d) in enumerate(pairs):
            self.pool.submit(self._prepare, req, i, q, d, lengths, wheres[i])
        try:
            await req.future
        except asyncio.CancelledError:
            self._cancel(req)
            raise
        return Outcome(req.results, req.tokens)  # type: ignore[arg-type]

    def _cancel(self, req: _Request) -> None:
        with self._cond:
            if req.done:
                return
            req.cancelled = True
            self._close(req)

    # ------------------------------------------------------------------------------------ the preparers' side

    def _prepare(self, req: _Request, i: int, q: Item, d: Item, lengths: LengthOptions, where: Where) -> None:
        if req.cancelled:
            return
        try:
            seqs = self.backend.prepare(q, d, lengths, where)
        except InputError as e:
            with self._cond:
                if not req.cancelled:
                    req.results[i] = e
                    self._pair_done(req)
            return
        except Exception as e:  # a bug, not bad input: the request fails whole, the server lives on
            log.exception("preparing %s failed", where.pair)
            self._fail(req, WorkerError(f"preparing {where.pair} failed: {type(e).__name__}: {e}"))
            return
        with self._cond:
            if req.cancelled or req.done:
                return
            req.windows_left[i] = len(seqs)
            req.tokens += sum(s.length for s in seqs)
            now = time.monotonic()
            for s in seqs:
                self._ready.append(_Entry(req, i, s, now))
                self._ready_tokens += s.length
            self._cond.notify()

    # ------------------------------------------------------------------------------------------ the worker

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                self._forward(batch)
        except BaseException as e:  # the loop itself broke: nobody may be left waiting
            log.exception("the model worker died")
            self.error = e
            with self._cond:
                pending = list(self._requests)
            for req in pending:
                self._fail(req, WorkerError(f"the model worker died: {type(e).__name__}: {e}"))

    def _next_batch(self) -> list[_Entry] | None:
        with self._cond:
            while True:
                while self._ready and self._ready[0].request.cancelled:
                    self._ready_tokens -= self._ready.popleft().seq.length
                if not self._ready:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                wait = self._ready[0].enqueued + self.max_batch_wait - time.monotonic()
                if self._ready_tokens >= self.max_batch_tokens or wait <= 0 or self._stopping:
                    break
                self._cond.wait(wait)
            batch: list[_Entry] = []
            tokens = 0
            while self._ready and (not batch or tokens + self._ready[0].seq.length <= self.max_batch_tokens):
                e = self._ready.popleft()
                self._ready_tokens -= e.seq.length
                if not e.request.cancelled:
                    batch.append(e)
                    tokens += e.seq.length
            return batch

    def _forward(self, batch: list[_Entry]) -> None:
        if not batch:
            return
        start = time.monotonic()
        for e in batch:
            self.observer.queue_wait(start - e.enqueued)
        try:
            logits = self.backend.forward([e.seq for e in batch]).tolist()
        except Exception as e:
            log.exception("forward of a batch of %d sequences failed", len(batch))
            for req in {id(x.request): x.request for x in batch}.values():
                self._fail(req, WorkerError(f"the model failed on a batch: {type(e).__name__}: {e}"))
            return
        self.observer.batch(len(batch), sum(e.seq.length for e in batch), time.monotonic() - start)
        with self._cond:
            for e, logit in zip(batch, logits):
                req = e.request
                if req.cancelled or req.done:
                    continue
                best = req.results[e.pair]
                req.results[e.pair] = keep_best(best if isinstance(best, Scored) else None, logit, e.seq)
                req.windows_left[e.pair] -= 1
                if not req.windows_left[e.pair]:
                    self._pair_done(req)

    # ------------------------------------------------------------------------------------------ bookkeeping

    def _pair_done(self, req: _Request) -> None:
        """Under the lock: one more pair of req is finished."""
        req.open -= 1
        self._admitted -= 1
        if req.open == 0:
            self._finish(req)

    def _close(self, req: _Request) -> None:
        """Under the lock: req leaves the books (its unfinished pairs are released)."""
        if req.done:
            return
        req.done = True
        self._admitted -= req.open
        req.open = 0
        self._requests.discard(req)
        self.observer.queue_depth(self._admitted)

    def _finish(self, req: _Request) -> None:
        with self._cond:
            self._close(req)
        req.loop.call_soon_threadsafe(_resolve, req.future, None)

    def _fail(self, req: _Request, error: BaseException) -> None:
        with self._cond:
            if req.done:
                return
            self._close(req)
        req.loop.call_soon_threadsafe(_resolve, req.future, error)

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the worker and the preparers."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self._cond:
            pending = list(self._requests)
        for req in pending:
            self._fail(req, WorkerError("the server is shutting down"))


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
