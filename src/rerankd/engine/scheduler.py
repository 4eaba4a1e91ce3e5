"""The one scheduler: every caller's pairs, prepared in a thread pool, cut into token-budget batches, one worker.

The library (`Reranker.compute_score`, `rerank`) calls it synchronously (`score_sync`), the server asynchronously
(`score`); both go through `submit`, which makes a Job. The path a pair takes:

    job (pairs) -> units (one pair each) -> prepared sequences -> the ready queue -> token-budget batches
        -> Backend.forward -> one logit per slot of each sequence -> each slot's reduction -> the job's results

* Preparation (tokenize, cut, window, decode images: rerankd.models) runs in the pool, a window of WINDOW_PAIRS
  units at a time and at most two windows of a job ahead of the model, so memory stays bounded however many pairs
  a call has, and preparation of later pairs overlaps the forward of earlier ones (torch releases the GIL in its
  kernels). A window's sequences join the ready queue together, longest first, when the whole window is prepared.
* One worker thread takes batches off the ready queue: it waits at most `max_batch_wait` after the oldest waiting
  sequence for company, then fills the batch in queue order up to `max_batch_tokens` (a longer sequence goes
  alone) and, where a job caps pairs per batch (`compute_score(batch_size=...)`), up to that many sequences. One
  job's sequences may span batches and share them with other jobs'. A pair's score never depends on its batch.
* A slot is one score a caller asked for. A sequence yields one logit per slot it names (today one: a pair, or one
  window of a chunked document); each slot reduces its logits with `keep_best`, the maximum over its windows.
* Admission: at most `max_queue_pairs` pairs waiting or running (None: no limit, the library's); beyond it
  `Overloaded` is raised at once. A cancelled job (deadline, client gone, Ctrl-C) is skipped by the preparers and
  dropped by the worker before it reaches the model. A forward that raises fails the jobs of that batch with
  `WorkerError` (the original exception as its __cause__); if the worker thread itself dies, every pending job
  fails and `alive` turns false. Nothing ever leaves a caller waiting.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import InputError, RerankdError
from ..inputs import Item
from ..inputs.images import ImagePolicy
from ..models.base import Backend, LengthOptions, PreparedSequence, Where, Window

log = logging.getLogger("rerankd.scheduler")

WINDOW_PAIRS = 128  # units of a job prepared together; at most two windows of a job are ahead of the model
_LIVE: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Stop every worker before the interpreter exits: a worker thread that ran torch kernels and is still alive
    when the process tears down its C++ runtime can abort it ('terminate called without an active exception')."""
    for scheduler in list(_LIVE):
        scheduler.close(timeout=10)


def default_prepare_workers() -> int:
    """Preparation threads when not configured: the cores, 2 to 8."""
    return max(2, min(8, os.cpu_count() or 2))


class Overloaded(RerankdError):
    """The queue is full; try again later."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class WorkerError(RerankdError):
    """The model failed on a batch, preparing a pair failed unexpectedly, or the worker is not running."""


class Observer(Protocol):
    """What the scheduler reports (the server's metrics implement it)."""

    def queue_depth(self, pairs: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def batch(self, pairs: int, tokens: int, model_seconds: float) -> None: ...


class _NoObserver:
    def queue_depth(self, pairs: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def batch(self, pairs: int, tokens: int, model_seconds: float) -> None: ...


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Scored:
    """A slot's relevance logit (score = sigmoid(logit)) and, for a chunked document, the window that gave it."""

    logit: float
    window: Window | None = None


def keep_best(best: Scored | None, logit: float, window: Window | None) -> Scored:
    """A slot's reduction: its score so far, after one more of its sequences scored `logit`: the maximum over its
    windows; on equal logits the earlier window wins, whatever order the batches ran in."""
    if best is None or logit > best.logit:
        return Scored(logit, window)
    if logit == best.logit and window is not None and best.window is not None and window.index < best.window.index:
        return Scored(logit, window)
    return best


@dataclass(frozen=True)
class Outcome:
    """A job's results: per pair a Scored, or the InputError that kept it from the model; the tokens scored."""

    results: list[Scored | InputError]
    tokens: int


# ------------------------------------------------------------------------------------------------ batching


@dataclass(frozen=True)
class Batch:
    indices: list[int]  # the items' keys (their positions in the caller's list)
    sequences: list[PreparedSequence]

    @property
    def tokens(self) -> int:
        return sum(s.length for s in self.sequences)


def longest_first(items: list[tuple[int, PreparedSequence]]) -> list[tuple[int, PreparedSequence]]:
    """The order in which a window of prepared sequences joins the ready queue: longest first, then by key. It
    keeps similar lengths together, which balances per-sequence attention work, and runs the longest work first."""
    return sorted(items, key=lambda it: (-it[1].length, it[0]))


def fits(tokens: int, count: int, seq: PreparedSequence, max_batch_tokens: int, max_batch_pairs: int | None) -> bool:
    """Whether `seq` joins a batch that holds `count` sequences of `tokens` tokens (an empty batch takes anything)."""
    if count == 0:
        return True
    return tokens + seq.length <= max_batch_tokens and (max_batch_pairs is None or count < max_batch_pairs)


def plan_batches(
    items: list[tuple[int, PreparedSequence]], max_batch_tokens: int, max_batch_pairs: int | None = None
) -> list[Batch]:
    """The batches the worker cuts from one window of (key, sequence) items when nothing else is queued: in
    `longest_first` order, each filled up to `max_batch_tokens` tokens (image tokens count) and `max_batch_pairs`
    sequences; a sequence longer than the budget gets a batch of its own."""
    batches: list[Batch] = []
    keys: list[int] = []
    seqs: list[PreparedSequence] = []
    tokens = 0
    for key, seq in longest_first(items):
        if not fits(tokens, len(seqs), seq, max_batch_tokens, max_batch_pairs):
            batches.append(Batch(keys, seqs))
            keys, seqs, tokens = [], [], 0
        keys.append(key)
        seqs.append(seq)
        tokens += seq.length
    if seqs:
        batches.append(Batch(keys, seqs))
    return batches


# ------------------------------------------------------------------------------------------------ jobs


@dataclass(eq=False)
class Job:
    """One caller's pairs inside the scheduler. `future` resolves to the Outcome (or the error)."""

    pairs: Sequence[tuple[Item, Item]]
    lengths: LengthOptions
    wheres: Sequence[Where]
    images: ImagePolicy | None
    max_batch_pairs: int | None
    on_pair_done: Callable[[], None] | None
    future: Future = field(default_factory=Future)
    results: list = field(default_factory=list)  # per slot: None, Scored or InputError
    left: list[int] = field(default_factory=list)  # per slot: logits still to come
    open: int = 0  # slots not finished
    tokens: int = 0
    windows_unprepared: dict[int, int] = field(default_factory=dict)  # window -> units not yet prepared
    windows_unscored: dict[int, int] = field(default_factory=dict)  # window -> units not yet finished
    staged: dict[int, list[tuple[int, PreparedSequence]]] = field(default_factory=dict)  # window -> (unit, seq)
    cancelled: bool = False
    done: bool = False

    @property
    def windows(self) -> int:
        return -(-len(self.pairs) // WINDOW_PAIRS)


@dataclass(eq=False)
class _Entry:
    job: Job
    unit: int  # the unit the sequence was prepared from; its slots are unit + seq.slots
    seq: PreparedSequence
    enqueued: float


class Scheduler:
    def __init__(
        self,
        backend: Backend,
        max_batch_tokens: int,
        max_batch_wait: float = 0.0,
        max_queue_pairs: int | None = None,
        prepare_workers: int | None = None,
        observer: Observer | None = None,
    ):
        if max_batch_tokens < 1 or (max_queue_pairs is not None and max_queue_pairs < 1) or max_batch_wait < 0:
            raise ValueError(
                f"need max_batch_tokens >= 1, max_queue_pairs >= 1 (or None) and max_batch_wait >= 0; got "
                f"{max_batch_tokens}, {max_queue_pairs}, {max_batch_wait}"
            )
        self.backend = backend
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_wait = max_batch_wait
        self.max_queue_pairs = max_queue_pairs
        self.observer: Observer = observer or _NoObserver()
        self.pool = ThreadPoolExecutor(prepare_workers or default_prepare_workers(), thread_name_prefix="rerankd-prepare")
        self._cond = threading.Condition()
        self._ready: deque[_Entry] = deque()
        self._ready_tokens = 0
        self._admitted = 0  # pairs admitted and not finished
        self._jobs: set[Job] = set()
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rerankd-worker", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stopping

    @property
    def queued_pairs(self) -> int:
        return self._admitted

    # ------------------------------------------------------------------------------------------ the callers' side

    def submit(
        self,
        pairs: Sequence[tuple[Item, Item]],
        lengths: LengthOptions,
        wheres: Sequence[Where],
        images: ImagePolicy | None = None,
        max_batch_pairs: int | None = None,
        on_pair_done: Callable[[], None] | None = None,
    ) -> Job:
        """Admit the pairs (or raise Overloaded / WorkerError at once) and start preparing them."""
        n = len(pairs)
        job = Job(pairs, lengths, wheres, images, max_batch_pairs, on_pair_done)
        job.future.set_running_or_notify_cancel()  # only the scheduler resolves it, cancellation included
        job.results = [None] * n
        job.left = [0] * n
        job.open = n
        with self._cond:
            if not self.alive:
                raise WorkerError(f"the model worker is not running ({self.error or 'stopped'})")
            if self.max_queue_pairs is not None and self._admitted and self._admitted + n > self.max_queue_pairs:
                raise Overloaded(
                    f"the server is busy: {self._admitted} pairs queued, this request adds {n}, the limit is "
                    f"{self.max_queue_pairs}; retry later",
                    retry_after=1.0,
                )
            self._admitted += n
            self._jobs.add(job)
            self.observer.queue_depth(self._admitted)
            if n == 0:
                self._finish(job)
            for w in range(min(2, job.windows)):
                self._submit_window(job, w)
        return job

    def score_sync(
        self,
        pairs: Sequence[tuple[Item, Item]],
        lengths: LengthOptions,
        wheres: Sequence[Where],
        images: ImagePolicy | None = None,
        max_batch_pairs: int | None = None,
        on_pair_done: Callable[[], None] | None = None,
    ) -> Outcome:
        """Score the pairs, blocking (the library's call). An interrupt withdraws them."""
        job = self.submit(pairs, lengths, wheres, images, max_batch_pairs, on_pair_done)
        try:
            return job.future.result()
        except BaseException:
            self.cancel(job)
            raise

    async def score(
        self,
        pairs: Sequence[tuple[Item, Item]],
        lengths: LengthOptions,
        wheres: Sequence[Where],
        images: ImagePolicy | None = None,
    ) -> Outcome:
        """Score the pairs (the server's call); cancel the awaiting task to withdraw them."""
        job = self.submit(pairs, lengths, wheres, images)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            self.cancel(job)
            raise

    def cancel(self, job: Job) -> None:
        with self._cond:
            if job.done:
                return
            job.cancelled = True
            self._close(job)
            job.future.set_exception(asyncio.CancelledError())

    # ------------------------------------------------------------------------------------ the preparers' side

    def _submit_window(self, job: Job, w: int) -> None:
        """Under the lock: start preparing window w of the job."""
        units = range(w * WINDOW_PAIRS, min((w + 1) * WINDOW_PAIRS, len(job.pairs)))
        job.windows_unprepared[w] = job.windows_unscored[w] = len(units)
        job.staged[w] = []
        for i in units:
            self.pool.submit(self._prepare, job, w, i)

    def _prepare(self, job: Job, w: int, i: int) -> None:
        if job.cancelled or job.done:
            return
        q, d = job.pairs[i]
        where = job.wheres[i]
        try:
            seqs = self.backend.prepare(q, d, job.lengths, where, job.images)
        except InputError as e:
            seqs, error = [], e
        except Exception as e:  # a bug, not bad input: the job fails whole, the scheduler lives on
            log.exception("preparing %s failed", where.pair)
            failure = WorkerError(f"preparing {where.pair} failed: {type(e).__name__}: {e}")
            failure.__cause__ = e
            self._fail(job, failure)
            return
        else:
            error = None
        with self._cond:
            if job.done:
                return
            if error is not None:
                job.results[i] = error
            for s in seqs:
                for r in s.slots:
                    job.left[i + r] += 1
                job.tokens += s.length
            job.staged[w].extend((i, s) for s in seqs)
            job.windows_unprepared[w] -= 1
            if error is not None or not seqs:
                self._slot_done(job, i)
            if job.windows_unprepared[w] == 0 and not job.done:
                now = time.monotonic()
                for unit, s in longest_first(job.staged.pop(w)):
                    self._ready.append(_Entry(job, unit, s, now))
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
                pending = list(self._jobs)
            for job in pending:
                self._fail(job, WorkerError(f"the model worker died: {type(e).__name__}: {e}"))

    def _next_batch(self) -> list[_Entry] | None:
        with self._cond:
            while True:
                while self._ready and self._ready[0].job.done:
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
            cap: int | None = None
            while self._ready:
                e = self._ready[0]
                if not e.job.done:
                    limit = e.job.max_batch_pairs if cap is None else min(cap, e.job.max_batch_pairs or cap)
                    if not fits(tokens, len(batch), e.seq, self.max_batch_tokens, limit):
                        break
                    cap = limit
                    batch.append(e)
                    tokens += e.seq.length
                self._ready.popleft()
                self._ready_tokens -= e.seq.length
            return batch

    def _forward(self, batch: list[_Entry]) -> None:
        if not batch:
            return
        start = time.monotonic()
        for e in batch:
            self.observer.queue_wait(start - e.enqueued)
        try:
            logits = self.backend.forward([e.seq for e in batch]).tolist()
            expected = sum(len(e.seq.slots) for e in batch)
            if len(logits) != expected:
                raise RuntimeError(f"the backend returned {len(logits)} logits for {expected} slots")
        except Exception as e:
            log.exception("forward of a batch of %d sequences failed", len(batch))
            failure = WorkerError(f"the model failed on a batch: {type(e).__name__}: {e}")
            failure.__cause__ = e
            for job in {id(x.job): x.job for x in batch}.values():
                self._fail(job, failure)
            return
        self.observer.batch(len(batch), sum(e.seq.length for e in batch), time.monotonic() - start)
        with self._cond:
            at = 0
            for e in batch:
                job = e.job
                for r in e.seq.slots:
                    logit, at = logits[at], at + 1
                    if job.done:
                        continue
                    slot = e.unit + r
                    job.results[slot] = keep_best(job.results[slot], logit, e.seq.window)
                    job.left[slot] -= 1
                    if not job.left[slot]:
                        self._slot_done(job, slot)

    # ------------------------------------------------------------------------------------------ bookkeeping

    def _slot_done(self, job: Job, slot: int) -> None:
        """Under the lock: one more slot of the job is finished (scored, or failed as bad input)."""
        job.open -= 1
        self._admitted -= 1
        if job.on_pair_done is not None:
            job.on_pair_done()
        w = slot // WINDOW_PAIRS
        job.windows_unscored[w] -= 1
        if not job.windows_unscored[w] and w + 2 < job.windows:
            self._submit_window(job, w + 2)
        if job.open == 0:
            self._finish(job)

    def _close(self, job: Job) -> None:
        """Under the lock: the job leaves the books (its unfinished pairs are released)."""
        job.done = True
        self._admitted -= job.open
        job.open = 0
        self._jobs.discard(job)
        job.staged.clear()
        self.observer.queue_depth(self._admitted)

    def _finish(self, job: Job) -> None:
        """Under the lock: every slot is done."""
        if job.done:
            return
        self._close(job)
        job.future.set_result(Outcome(job.results, job.tokens))

    def _fail(self, job: Job, error: BaseException) -> None:
        with self._cond:
            if job.done:
                return
            self._close(job)
            job.future.set_exception(error)

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the worker and the preparers."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self._cond:
            pending = list(self._jobs)
        for job in pending:
            self._fail(job, WorkerError("the server is shutting down"))
