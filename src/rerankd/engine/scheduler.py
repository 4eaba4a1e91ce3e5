"""The one scheduler: every caller's pairs, prepared in a thread pool, cut into token-budget batches, one worker.

The library (`Reranker.compute_score`, `rerank`) calls it synchronously (`score_sync`), the server asynchronously
(`score`); both go through `submit`, which makes a Job. The path a pair takes:

    job -> units (a pair each, or a listwise model's list) -> prepared sequences -> the ready queue
        -> token-budget batches -> Backend.forward -> outputs per slot -> each slot's reduction -> the job's results

* Preparation (tokenize, cut, window, decode images: rerankd.models) runs in the pool while the model computes
  (torch releases the GIL in its kernels). A job is prepared one of two ways:
  - windowed (the library's): WINDOW_PAIRS units at a time, at most two windows ahead of the model, so memory
    stays bounded however many pairs a call has (a listwise unit, every document of one query, is prepared
    whole). A prepared window is cut on its own into batches by
    `plan_batches` (longest first), which join the queue in window order: a call's batches depend on its pairs
    alone, never on timing or on other calls.
  - streaming (the server's): a pair's sequences join the queue as soon as it is prepared, so a slow image holds
    back nothing else, and batches mix requests (one request's pairs may span batches), waiting at most
    `max_batch_wait` after the oldest sequence for company. Each preparer takes its next pair from the oldest job
    that has fewer than `PREPARE_AHEAD_BATCHES` batches' worth of tokens waiting for the model: requests are
    prepared in arrival order, but a large one, once that far ahead, lets the requests behind it through, holds no
    more prepared memory than that, and stops being prepared when it is past its deadline.
* Fairness: the worker fills batches by fair queuing over the jobs with sequences waiting, in quanta of one batch's
  tokens: each job's virtual time advances by the tokens it has had through the model, the virtual clock by each
  waiting job's share of the tokens served (never back, never behind the job served), a newly waiting job starts
  at the clock, and jobs in the same quantum go in arrival order. A request of a few pairs is thus
  scored within a batch or two of arriving however much a large request before it still has queued, a large
  request keeps its share however many small ones keep arriving, and requests that each fit a quantum keep arrival
  order (no interleaving that would finish them all late together).
  A batch holds at most `max_batch_tokens` tokens, image tokens included (a longer sequence goes alone). A pair's
  score never depends on its batch (fp32; see README for int8).
* A unit owns one or more slots, a slot being one score the caller asked for (a pair); a sequence yields one
  output per slot it names (its `slots`, counted within its unit). For a pointwise model a unit is a pair with
  one slot, the windows of a chunked document are several sequences of that slot, and each slot reduces its
  logits with `keep_best`, the maximum over its windows. For a listwise model (`Backend.listwise`, e.g.
  jina-reranker-v3) a unit is every pair of the job with the same query, prepared together by
  `Backend.prepare_list` into one or more sequences (blocks of documents); when all of a unit's sequences are
  scored, `Backend.combine` turns their outputs into the slots' scores (v3 merges its blocks' query vectors).
* Admission: at most `max_queue_pairs` pairs waiting or running (None: no limit, the library's); beyond it
  `Overloaded` is raised at once. A cancelled job (deadline, client gone, Ctrl-C) is skipped by the preparers and
  dropped by the worker before it reaches the model. A forward of several jobs' sequences that raises is run
  again one job at a time, and a job whose own forward raises fails with `WorkerError` (the model's exception as
  its __cause__), so one request's bad sequence does not fail its batch mates (a device fault fails them all and
  the worker); preparing a pair that raises something other than InputError fails its job the same way; if the
  worker thread itself dies, every pending job fails and `alive` turns false. Nothing ever leaves a caller
  waiting.
"""

from __future__ import annotations

import asyncio
import atexit
import heapq
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

import torch

from ..errors import InputError, RerankdError
from ..inputs import Item, TextItem
from ..inputs.images import ImagePolicy
from ..models.base import Backend, Interrupted, LengthOptions, PreparedSequence, Where, Window, interruptible
from ..models.windows import item_tokens, tokens_bound

log = logging.getLogger("rerankd.scheduler")

WINDOW_PAIRS = 128  # units of a windowed job prepared together; at most two windows of a job are ahead of the model
PREPARE_AHEAD_BATCHES = 4  # a streaming job starts no preparation while it has this many batches' tokens waiting
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


class TooLarge(RerankdError):
    """A job needs more tokens than the scheduler's per-job budget (`max_request_tokens`)."""


class WorkerError(RerankdError):
    """The model failed on a batch, preparing a pair failed unexpectedly, or the worker is not running."""


class Observer(Protocol):
    """What the scheduler reports (the server's metrics implement it)."""

    def queue_depth(self, pairs: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def batch(self, pairs: int, tokens: int, model_seconds: float) -> None: ...


def _failure(what: str, cause: BaseException) -> WorkerError:
    failure = WorkerError(f"{what}: {type(cause).__name__}: {cause}")
    failure.__cause__ = cause
    return failure


class _NoObserver:
    def queue_depth(self, pairs: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def batch(self, pairs: int, tokens: int, model_seconds: float) -> None: ...


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Scored:
    """A slot's relevance logit (the score is its Backend.score_activation: sigmoid(logit), or the logit itself for
    a model whose output is a score already) and, for a chunked document, the window that gave it."""

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
    indices: list[int]  # the items' keys (the units the sequences came from)
    sequences: list[PreparedSequence]

    @property
    def tokens(self) -> int:
        return sum(s.length for s in self.sequences)


def plan_batches(
    items: list[tuple[int, PreparedSequence]], max_batch_tokens: int, max_batch_pairs: int | None = None
) -> list[Batch]:
    """One window's (key, sequence) items cut into batches: longest first (then by key), each filled up to
    `max_batch_tokens` tokens (image tokens count) and `max_batch_pairs` sequences; a sequence longer than the
    budget gets a batch of its own. Sorting keeps similar lengths together, which balances per-sequence attention
    work, and runs the longest work first."""
    batches: list[Batch] = []
    keys: list[int] = []
    seqs: list[PreparedSequence] = []
    tokens = 0
    for key, seq in sorted(items, key=lambda it: (-it[1].length, it[0])):
        full = seqs and (
            tokens + seq.length > max_batch_tokens or (max_batch_pairs is not None and len(seqs) >= max_batch_pairs)
        )
        if full:
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
    streaming: bool
    max_batch_pairs: int | None
    on_pair_done: Callable[[], None] | None
    future: Future = field(default_factory=Future)
    unit_slots: list[list[int]] = field(default_factory=list)  # per unit: its slots (pair indices), in order
    unit_left: list[int] = field(default_factory=list)  # per unit: sequences prepared and not yet scored
    unit_outputs: dict[int, list[tuple[PreparedSequence, torch.Tensor]]] = field(default_factory=dict)  # listwise
    results: list = field(default_factory=list)  # per slot: None, Scored or InputError
    open: int = 0  # slots not finished
    tokens: int = 0
    window: int = 0  # units per preparation window
    unprepared: dict[int, int] = field(default_factory=dict)  # window -> units not yet prepared
    unscored: dict[int, int] = field(default_factory=dict)  # window -> units not yet finished
    staged: dict[int, list[tuple[int, PreparedSequence]]] = field(default_factory=dict)  # window -> (unit, seq)
    next_window: int = 0  # a windowed job's next window to join the queue (they join in order)
    next_unit: int = 0  # a streaming job's next unit to hand to the preparers
    unit_bounds: list[int] = field(default_factory=list)  # per unit not yet prepared: its tokens_bound (queue tokens)
    charged: int = 0  # tokens it holds of the scheduler's max_queue_tokens: bounds, then each unit's real tokens
    preparing: int = 0  # a streaming job's units in the preparers' hands now
    waiting_tokens: int = 0  # tokens of its sequences on the ready queue
    vtime: int = 0  # fair queuing: its virtual time (tokens through the model, from when it started waiting)
    arrival: int = 0  # fair queuing: its place in arrival order, among equals in virtual time
    done: bool = False  # answered: scored, failed or cancelled

    @property
    def preparable(self) -> bool:
        """A streaming job with units not yet handed to the preparers, still wanted."""
        return not self.done and self.next_unit < len(self.unit_slots)

    @property
    def windows(self) -> int:
        units = len(self.unit_slots)
        return -(-units // self.window) if units else 0


def group_units(pairs: Sequence[tuple[Item, Item]], listwise: bool) -> list[list[int]]:
    """The units of work a job's pairs make: one per pair, or for a listwise model one per distinct query (its
    pairs in input order), units ordered by their first pair."""
    if not listwise:
        return [[i] for i in range(len(pairs))]
    units: dict[object, list[int]] = {}
    for i, (q, _) in enumerate(pairs):
        units.setdefault(q.text if isinstance(q, TextItem) else id(q), []).append(i)  # (an image may be unhashable)
    return list(units.values())


_NOT_YET = object()  # _next_batch without waiting: no batch to launch now


# CUDA errors that are sticky: the context is unusable afterwards and every later call fails too (CUDA's
# documentation of cudaErrorIllegalAddress, cudaErrorAssert, cudaErrorLaunchFailure, ...); running out of memory is not
STICKY_DEVICE_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                        "misaligned address", "illegal instruction", "uncorrectable ECC error")  # fmt: skip


def device_fault(e: BaseException) -> bool:
    """Whether a forward's error leaves the device unusable (STICKY_DEVICE_ERRORS)."""
    return any(marker in str(e) for marker in STICKY_DEVICE_ERRORS)


@dataclass(eq=False)
class _Flight:
    """A batch whose forward was launched (Scheduler._launch) and whose outputs are not read back yet."""

    batch: list[_Entry]
    jobs: list[Job]
    out: object  # the backend's outputs: a tensor (on the host, or on its way there), or a listwise list
    start: float
    copied: torch.cuda.Event | None = None  # recorded after the read-back copy from CUDA was queued


@dataclass(eq=False)
class _Entry:
    """One sequence on the ready queue; `planned` when it belongs to a batch cut by plan_batches (the entries of one
    planned batch lie together on the queue, `planned` being their count on the first and 0 on the others)."""

    job: Job
    unit: int
    seq: PreparedSequence
    enqueued: float
    planned: int | None = None


class Scheduler:
    def __init__(
        self,
        backend: Backend,
        max_batch_tokens: int,
        max_batch_wait: float = 0.0,
        max_queue_pairs: int | None = None,
        prepare_workers: int | None = None,
        observer: Observer | None = None,
        max_request_tokens: int | None = None,
        max_queue_tokens: int | None = None,
        overlap: bool | None = None,
    ):
        if max_batch_tokens < 1 or (max_queue_pairs is not None and max_queue_pairs < 1) or max_batch_wait < 0 or \
                (max_queue_tokens is not None and max_queue_tokens < 1):  # fmt: skip
            raise ValueError("need max_batch_tokens >= 1, max_queue_pairs >= 1, max_queue_tokens >= 1 and "
                             "max_batch_wait >= 0")  # fmt: skip
        self.backend = backend
        self.listwise = getattr(backend, "listwise", False)  # Backend.listwise: one sequence scores a list
        # one batch in flight: batch k+1 is packed and queued on the GPU before batch k's scores are read back
        # (a host sync), so the GPU does not idle between batches; None: on CUDA for pointwise models (a listwise
        # forward reads its outputs back itself). On the CPU a forward computes as it is called: nothing to gain.
        device = getattr(backend, "device", None)
        self.overlap = overlap if overlap is not None else \
            (device is not None and device.type == "cuda" and not self.listwise)  # fmt: skip
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_wait = max_batch_wait
        self.max_queue_pairs = max_queue_pairs
        self.max_request_tokens = max_request_tokens  # per job (None: no bound); passing it fails the job (TooLarge)
        self.max_queue_tokens = max_queue_tokens  # over all jobs admitted and not answered (None: no bound): 429
        self.image_tokens: int | None = getattr(backend, "max_image_tokens", None)  # an image's tokens at most
        self.observer: Observer = observer or _NoObserver()
        self._workers = prepare_workers or default_prepare_workers()
        self.pool = ThreadPoolExecutor(self._workers, thread_name_prefix="rerankd-prepare")
        self._cond = threading.Condition()  # an RLock: bookkeeping under it may call bookkeeping
        self._ready: dict[Job, deque[_Entry]] = {}  # the jobs with sequences waiting, each's in order
        self._ready_tokens = 0
        self._vclock = 0  # fair queuing's virtual time: each waiting job's share of the tokens served so far
        self._arrivals = 0
        self._streams: deque[Job] = deque()  # streaming jobs, in arrival order, while they have units to prepare
        self._pulls = 0  # preparer turns (_pull) queued
        self._admitted = 0  # pairs admitted and not finished
        self._admitted_tokens = 0  # tokens of the jobs admitted and not answered: bounds until prepared, then real
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
    def down_reason(self) -> str:
        """Why the worker is not running, for answers and health checks."""
        return f"the model worker is not running ({self.error or 'stopped'})"

    @property
    def queued_pairs(self) -> int:
        return self._admitted

    @property
    def queued_tokens(self) -> int:
        """Tokens of the jobs admitted and not answered: each unit's bound until it is prepared, then its tokens."""
        return self._admitted_tokens

    # ------------------------------------------------------------------------------------------ the callers' side

    def submit(
        self,
        pairs: Sequence[tuple[Item, Item]],
        lengths: LengthOptions,
        wheres: Sequence[Where],
        images: ImagePolicy | None = None,
        streaming: bool = True,
        max_batch_pairs: int | None = None,
        on_pair_done: Callable[[], None] | None = None,
    ) -> Job:
        """Admit the pairs (or raise Overloaded / WorkerError at once) and start preparing them: streaming (the
        server's way) or windowed (the library's; only windowed jobs take a `max_batch_pairs` cap)."""
        n = len(pairs)
        job = Job(pairs, lengths, wheres, images, streaming, max_batch_pairs, on_pair_done)
        job.future.set_running_or_notify_cancel()  # only the scheduler resolves it, cancellation included
        job.unit_slots = group_units(pairs, self.listwise)
        job.unit_left = [0] * len(job.unit_slots)
        job.results = [None] * n
        job.open = n
        job.window = max(len(job.unit_slots), 1) if streaming else WINDOW_PAIRS
        if self.max_queue_tokens is not None:
            job.unit_bounds = self._bounds(job)
        with self._cond:
            bound = sum(job.unit_bounds)
            self._refuse_if_full(n, bound)
            self._admitted += n
            self._admitted_tokens += bound
            job.charged = bound
            self._arrivals += 1
            job.arrival = self._arrivals
            self._jobs.add(job)
            self.observer.queue_depth(self._admitted)
            if n == 0:
                self._resolve(job, Outcome([], 0))
            for w in range(min(2, job.windows)):
                self._submit_window(job, w)
        return job

    def check_admission(self, pairs: Sequence[tuple[Item, Item]], lengths: LengthOptions) -> None:
        """Raise Overloaded (or WorkerError) now where `submit` would refuse these pairs now: a caller with work to do
        before it submits (an image query to decode) is spared that work on a full queue. `submit` checks again."""
        job = Job(pairs, lengths, (), None, True, None, None)
        job.unit_slots = group_units(pairs, self.listwise)
        bound = sum(self._bounds(job)) if self.max_queue_tokens is not None else 0
        with self._cond:
            self._refuse_if_full(len(pairs), bound)

    def _refuse_if_full(self, n: int, bound: int) -> None:
        """Under the lock: WorkerError when the worker is down, Overloaded when n more pairs of at most `bound`
        tokens would pass a queue limit (an idle server admits anything)."""
        if not self.alive:
            raise WorkerError(self.down_reason)
        if self.max_queue_pairs is not None and self._admitted and self._admitted + n > self.max_queue_pairs:
            raise Overloaded(
                f"the server is busy: {self._admitted} pairs queued, this request adds {n}, the limit is "
                f"{self.max_queue_pairs}; retry later",
                retry_after=1.0,
            )
        if self.max_queue_tokens is not None and self._admitted_tokens and \
                self._admitted_tokens + bound > self.max_queue_tokens:  # fmt: skip
            raise Overloaded(
                f"the server is busy: {self._admitted_tokens} tokens of work queued, this request adds up to "
                f"{bound}, the limit is {self.max_queue_tokens} (--max-queue-tokens); retry later",
                retry_after=1.0,
            )

    def _bounds(self, job: Job) -> list[int]:
        """Each unit's windows.tokens_bound: the most tokens it may put through the model (a query measured once)."""
        image = self.image_tokens or job.lengths.max_length
        queries: dict[int, int] = {}
        bounds = []
        for slots in job.unit_slots:
            bound = 0
            for i in slots:
                query, doc = job.pairs[i]
                if id(query) not in queries:
                    queries[id(query)] = item_tokens(query, image)
                bound += tokens_bound(queries[id(query)], doc, job.lengths, image)
            bounds.append(bound)
        return bounds

    def score_sync(
        self,
        pairs: Sequence[tuple[Item, Item]],
        lengths: LengthOptions,
        wheres: Sequence[Where],
        max_batch_pairs: int | None = None,
        on_pair_done: Callable[[], None] | None = None,
    ) -> Outcome:
        """Score the pairs, windowed, blocking (the library's call). An interrupt withdraws them."""
        job = self.submit(pairs, lengths, wheres, None, False, max_batch_pairs, on_pair_done)
        try:
            return job.future.result()
        except BaseException:
            self.cancel(job)
            raise

    async def score(
        self, pairs: Sequence[tuple[Item, Item]], lengths: LengthOptions, wheres: Sequence[Where],
        images: ImagePolicy | None = None,
    ) -> Outcome:  # fmt: skip
        """Score the pairs, streaming (the server's call); cancel the awaiting task to withdraw them."""
        job = self.submit(pairs, lengths, wheres, images)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            self.cancel(job)
            raise

    def cancel(self, job: Job) -> None:
        with self._cond:
            self._resolve(job, error=asyncio.CancelledError())

    # ------------------------------------------------------------------------------------ the preparers' side

    def _submit_window(self, job: Job, w: int) -> None:
        """Under the lock: start preparing window w of the job (a streaming job's one window: its units go to the
        preparers as _pump allows)."""
        units = range(w * job.window, min((w + 1) * job.window, len(job.unit_slots)))
        job.unprepared[w] = job.unscored[w] = len(units)
        job.staged[w] = []
        if job.streaming:
            job.next_unit = units.start
            self._streams.append(job)
            return self._pump()
        try:
            for u in units:
                self.pool.submit(self._prepare, job, w, u)
        except RuntimeError as e:  # the pool is shut down: the scheduler is closing
            self._resolve(job, error=WorkerError(f"the model worker is shutting down ({e})"))

    def _pump(self) -> None:
        """Under the lock: keep a preparer's turn (_pull) queued for each preparer while a streaming job has a unit
        it may prepare."""
        while self._pulls < self._workers and self._next_stream() is not None:
            try:
                self.pool.submit(self._pull)
            except RuntimeError as e:  # the pool is shut down: the scheduler is closing
                for job in list(self._streams):
                    self._resolve(job, error=WorkerError(f"the model worker is shutting down ({e})"))
                return
            self._pulls += 1

    def _next_stream(self) -> Job | None:
        """Under the lock: the streaming job whose unit is prepared next: the oldest with units left that has fewer
        than PREPARE_AHEAD_BATCHES batches' tokens waiting for the model, and that does not hold all but one of the
        preparers while a younger one waits (one slow to prepare, a page of decompression bombs say, then leaves a
        preparer to the others); the oldest even so when no other job waits."""
        while self._streams and not self._streams[0].preparable:
            self._streams.popleft()
        ahead = PREPARE_AHEAD_BATCHES * self.max_batch_tokens
        share = max(1, self._workers - 1)
        first = None
        for job in self._streams:
            if job.preparable and job.waiting_tokens < ahead:
                if job.preparing < share:
                    return job
                first = first or job
        return first

    def _pull(self) -> None:
        """A preparer's turn for the server's jobs: the next unit of the job _next_stream names, if any."""
        with self._cond:
            self._pulls -= 1
            job = self._next_stream()
            if job is None:
                return
            u = job.next_unit
            job.next_unit += 1
            job.preparing += 1
        try:
            self._prepare(job, 0, u)
        finally:
            with self._cond:
                job.preparing -= 1
                self._pump()

    def _prepare(self, job: Job, w: int, u: int) -> None:
        if job.done:
            return
        slots = job.unit_slots[u]
        where = job.wheres[slots[0]]
        errors: dict[int, InputError] = {}  # slot -> why it cannot be scored
        try:
            if self.listwise:
                query = job.pairs[slots[0]][0]
                docs = [job.pairs[i][1] for i in slots]
                with interruptible(lambda: job.done):  # answered (deadline, cancel): its list's preparation stops
                    seqs, bad = self.backend.prepare_list(query, docs, job.lengths, [job.wheres[i] for i in slots],
                                                          job.images)  # fmt: skip
                errors = {slots[r]: e for r, e in bad.items()}
            else:
                q, d = job.pairs[slots[0]]
                seqs = self.backend.prepare(q, d, job.lengths, where, job.images)
        except Interrupted:  # the job was answered while its list was prepared: nothing left to do
            return
        except InputError as e:  # the whole unit failed; each of a list's pairs is named as itself
            seqs = []
            errors = {i: e if len(slots) == 1 else
                      InputError(e.reason, job.wheres[i].query if e.param == where.query else job.wheres[i].pair)
                      for i in slots}  # fmt: skip
        except BaseException as e:  # a bug, not bad input: the job fails whole, the scheduler lives on
            log.exception("preparing %s failed", where.pair)
            self._fail(job, f"preparing {where.pair} failed", e)
            return
        try:
            with self._cond:
                if job.done:
                    return
                for i, e in errors.items():
                    job.results[i] = e
                job.unit_left[u] += len(seqs)
                job.tokens += sum(s.length for s in seqs)
                if job.unit_bounds:  # the unit's bound gives way to its real tokens
                    change = sum(s.length for s in seqs) - job.unit_bounds[u]
                    job.charged += change
                    self._admitted_tokens += change
                if self.max_request_tokens is not None and job.tokens > self.max_request_tokens:
                    self._resolve(job, error=TooLarge(
                        f"the request needs more than the server's limit of {self.max_request_tokens} tokens through "
                        f"the model (--max-request-tokens; it reached {job.tokens} while being prepared): send fewer "
                        "or shorter documents, or lower max_length"))  # fmt: skip
                    return
                job.unprepared[w] -= 1
                if job.streaming:
                    self._enqueue(job, [(u, s) for s in seqs])
                else:
                    job.staged[w].extend((u, s) for s in seqs)
                    self._enqueue_windows(job)
                if not seqs:
                    self._unit_done(job, u)
        except BaseException as e:  # the bookkeeping itself failed (a progress callback): fail the job, not hang it
            log.exception("scheduling %s failed", where.pair)
            self._fail(job, f"scheduling {where.pair} failed", e)

    def _enqueue(self, job: Job, items: list[tuple[int, PreparedSequence]], planned: bool = False) -> None:
        """Under the lock: sequences join the ready queue (a planned batch as one block)."""
        if not items:
            return
        now = time.monotonic()
        if job not in self._ready:  # it starts waiting: at the current virtual time, never behind it
            job.vtime = max(job.vtime, self._vclock)
        queue = self._ready.setdefault(job, deque())
        for k, (unit, s) in enumerate(items):
            queue.append(_Entry(job, unit, s, now, (len(items) if k == 0 else 0) if planned else None))
            self._ready_tokens += s.length
            job.waiting_tokens += s.length
        self._cond.notify()

    def _enqueue_windows(self, job: Job) -> None:
        """Under the lock: the windowed job's prepared windows join the queue in order, as their planned batches."""
        while job.next_window in job.staged and job.unprepared[job.next_window] == 0:
            items = job.staged.pop(job.next_window)
            job.next_window += 1
            for b in plan_batches(items, self.max_batch_tokens, job.max_batch_pairs):
                self._enqueue(job, list(zip(b.indices, b.sequences)), planned=True)

    # ------------------------------------------------------------------------------------------ the worker

    def _run(self) -> None:
        try:
            flight: _Flight | None = None  # launched on the device, its outputs not read back yet (overlap)
            while True:
                batch = self._next_batch(wait=flight is None)
                if batch is _NOT_YET:  # nothing else to launch now: read the batch in flight back, then wait
                    self._finish(flight)
                    flight = None
                    continue
                if batch is None:  # stopping, nothing left
                    break
                launched = self._launch(batch)
                if flight is not None:
                    self._finish(flight)
                flight = None
                if launched is not None:
                    if self.overlap:
                        flight = launched
                    else:
                        self._finish(launched)
            if flight is not None:
                self._finish(flight)
        except BaseException as e:  # the loop itself broke: nobody may be left waiting
            log.exception("the model worker died")
            self.error = e
            with self._cond:
                pending = list(self._jobs)
            for job in pending:
                self._fail(job, "the model worker died", e)

    def _next_batch(self, wait: bool = True) -> list[_Entry] | None | object:
        """The next batch to run; None when stopping with nothing left; _NOT_YET, without `wait`, where it would
        wait (nothing ready, or streaming sequences waiting for company)."""
        with self._cond:
            while True:
                for job in [j for j in self._ready if j.done]:
                    self._ready_tokens -= sum(e.seq.length for e in self._ready.pop(job))
                if not self._ready:
                    if self._stopping:
                        return None
                    if not wait:
                        return _NOT_YET
                    self._cond.wait()
                    continue
                job = min(self._ready, key=self._turn)
                head = self._ready[job][0]
                if head.planned is not None:  # a planned batch runs as it was cut
                    return [self._pop(job) for _ in range(head.planned)]
                if not wait and self._ready_tokens < self.max_batch_tokens // 2:
                    return _NOT_YET  # a batch is in flight: read it back first rather than launch a small one
                oldest = min(q[0].enqueued for q in self._ready.values() if q[0].planned is None)
                left = oldest + self.max_batch_wait - time.monotonic()
                if self._ready_tokens >= self.max_batch_tokens or left <= 0 or self._stopping:
                    break
                if not wait:
                    return _NOT_YET
                self._cond.wait(left)
            batch: list[_Entry] = []
            tokens = 0
            # streaming sequences, fairest job first, each job's in arrival order; a heap of the jobs keeps a batch's
            # cost at O(jobs + sequences x log jobs) however many requests wait (turns are unique: arrival breaks ties)
            turns = [(self._turn(j), j) for j, q in self._ready.items() if q[0].planned is None]
            heapq.heapify(turns)
            while turns:
                _, job = heapq.heappop(turns)
                if batch and tokens + self._ready[job][0].seq.length > self.max_batch_tokens:
                    continue  # its next sequence does not fit: the job waits for the next batch
                e = self._pop(job)
                batch.append(e)
                tokens += e.seq.length
                if job in self._ready and self._ready[job][0].planned is None:
                    heapq.heappush(turns, (self._turn(job), job))
            self._pump()  # the jobs that were too far ahead may be prepared again
            return batch

    def _turn(self, job: Job) -> tuple[int, int]:
        """Fair queuing's order: the job's quantum of virtual time (a batch's tokens), then its arrival."""
        return job.vtime // self.max_batch_tokens, job.arrival

    def _pop(self, job: Job) -> _Entry:
        """Under the lock: the job's next waiting sequence leaves the queue; its virtual time advances."""
        queue = self._ready[job]
        waiting = len(self._ready)  # the jobs sharing the model now, this one included
        e = queue.popleft()
        if not queue:
            del self._ready[job]
        self._ready_tokens -= e.seq.length
        job.waiting_tokens -= e.seq.length
        # the virtual clock never goes back and advances with the service given, each waiting job's share of it (fair
        # queuing's clock): when it only followed the start of the job served, a stream of small requests, each
        # starting at it and done within one quantum, held it still, and a large request a quantum ahead waited
        # for as long as they kept coming
        self._vclock = max(self._vclock + -(-e.seq.length // waiting), job.vtime)
        job.vtime += e.seq.length
        return e

    def _launch(self, batch: list[_Entry], retry: bool = False) -> _Flight | None:
        """Run the backend's forward on the batch's live sequences (on CUDA: queue it on the GPU); None when none
        is left, when it stopped early or when it failed. A batch of several requests that fails (not the device)
        is run again one request at a time, so that one request's bad sequence fails that request alone."""
        batch = [e for e in batch if not e.job.done]
        if not batch:
            return None
        start = time.monotonic()
        for e in batch if not retry else ():
            self.observer.queue_wait(start - e.enqueued)
        jobs = list({id(e.job): e.job for e in batch}.values())
        try:
            with interruptible(lambda: all(job.done for job in jobs)):
                out = self.backend.forward([e.seq for e in batch])
        except Interrupted:  # every job of the batch was answered (deadline, cancel) while it ran: it stopped early
            log.info("a forward of %d sequences stopped after %.2f s: its requests are gone", len(batch),
                     time.monotonic() - start)  # fmt: skip
            return None
        except Exception as e:
            if len(jobs) > 1 and not device_fault(e):
                log.warning("a forward of %d sequences of %d requests failed (%s: %s); running each request alone",
                            len(batch), len(jobs), type(e).__name__, e)  # fmt: skip
                for job in jobs:
                    alone = self._launch([x for x in batch if x.job is job], retry=True)
                    if alone is not None:
                        self._finish(alone)
                return None
            self._batch_failed(batch, jobs, e)
            return None
        copied = None
        if isinstance(out, torch.Tensor) and out.device.type == "cuda":
            # the read-back queued now, behind this batch's kernels and ahead of the next batch's: _finish waits for
            # this batch alone
            # on the output's own device's stream: the worker thread's current device is cuda:0 whatever the model's
            device = out.device
            out = out.to("cpu", non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(device))
        return _Flight(batch, jobs, out, start, copied)

    def _batch_failed(self, batch: list[_Entry], jobs: list[Job], e: Exception) -> None:
        log.exception("forward of a batch of %d sequences failed", len(batch), exc_info=e)
        for job in jobs:
            self._fail(job, "the model failed on a batch", e)
        if device_fault(e):  # the device is unusable from now on: the worker dies, /health turns 503
            raise WorkerError(f"the device failed: {type(e).__name__}: {e}") from e

    def _finish(self, flight: _Flight) -> None:
        """Read a launched batch's outputs back (the one host sync a batch has on CUDA, where a kernel's error
        shows too) and hand each slot its logit."""
        batch, jobs, out = flight.batch, flight.jobs, flight.out
        try:
            if flight.copied is not None:
                flight.copied.synchronize()
            expected = len(batch) if self.listwise else sum(len(e.seq.slots) for e in batch)
            if len(out) != expected:
                raise RuntimeError(f"the backend returned {len(out)} outputs for {expected} {'sequences' if self.listwise else 'slots'}")
            logits = out if self.listwise else out.tolist()
        except Exception as e:
            self._batch_failed(batch, jobs, e)
            return
        self.observer.batch(len(batch), sum(e.seq.length for e in batch), time.monotonic() - flight.start)
        with self._cond:
            at = 0
            for k, e in enumerate(batch):
                job = e.job
                if self.listwise:
                    if not job.done:
                        job.unit_outputs.setdefault(e.unit, []).append((e.seq, logits[k]))
                else:
                    for r in e.seq.slots:
                        logit, at = logits[at], at + 1
                        if not job.done:
                            slot = job.unit_slots[e.unit][r]
                            job.results[slot] = keep_best(job.results[slot], logit, e.seq.window)
                if job.done:
                    continue
                job.unit_left[e.unit] -= 1
                if not job.unit_left[e.unit]:  # (a unit's sequences are all counted before any is queued)
                    self._unit_done(job, e.unit)

    # ------------------------------------------------------------------------------------------ bookkeeping

    def _unit_done(self, job: Job, u: int) -> None:
        """Under the lock: every sequence of unit u is scored (or it failed as bad input): its slots are finished.
        A listwise unit's slots get their scores now, from all of its sequences' outputs (Backend.combine)."""
        slots = job.unit_slots[u]
        outputs = job.unit_outputs.pop(u, None)
        if outputs is not None:
            try:  # what combine gives is placed under the same guard: a backend bug fails this job, not the worker
                for r, logit, window in self.backend.combine(outputs):
                    job.results[slots[r]] = keep_best(job.results[slots[r]], logit, window)
            except Exception as e:
                log.exception("combining the scores of %s failed", job.wheres[slots[0]].pair)
                self._resolve(job, error=_failure("the model failed combining a list's scores", e))
                return
        unscored = [i for i in slots if job.results[i] is None]
        if unscored:  # a backend bug; the caller must not get a hole where a score should be
            failure = RuntimeError(f"the backend gave no score for pairs {unscored[:8]}")
            log.error("%s", failure)
            self._resolve(job, error=_failure("the model failed", failure))
            return
        for _ in slots:
            job.open -= 1
            self._admitted -= 1
            if job.on_pair_done is not None:
                try:
                    job.on_pair_done()
                except Exception:  # a progress bar must not stop the scoring
                    log.exception("the progress callback failed")
        w = u // job.window
        job.unscored[w] -= 1
        if not job.unscored[w] and w + 2 < job.windows:
            self._submit_window(job, w + 2)
        if job.open == 0:
            self._resolve(job, Outcome(job.results, job.tokens))

    def _resolve(self, job: Job, outcome: Outcome | None = None, error: BaseException | None = None) -> None:
        """Under the lock: the job leaves the books (its unfinished pairs are released) and its caller is answered."""
        if job.done:
            return
        job.done = True
        self._admitted -= job.open
        job.open = 0
        self._admitted_tokens -= job.charged
        job.charged = 0
        self._jobs.discard(job)
        job.staged.clear()
        self.observer.queue_depth(self._admitted)
        if error is None:
            job.future.set_result(outcome)
        else:
            job.future.set_exception(error)

    def _fail(self, job: Job, what: str, cause: BaseException) -> None:
        """The job fails with a WorkerError of its own that names `what` and carries `cause`."""
        with self._cond:
            self._resolve(job, error=_failure(what, cause))

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
                self._resolve(job, error=WorkerError("the server is shutting down"))
