"""The one pipeline: the library's batches, failures through the library, the defaults table, the registry."""

from __future__ import annotations

import inspect
import threading
from dataclasses import replace

import pytest
import torch

from rerankd import Reranker
from rerankd.api.schemas import CohereRerankRequest, RerankRequest
from rerankd.cli import build_parser
from rerankd.config import COHERE_MAX_TOKENS_PER_DOC, RERANK_DEFAULTS, ScoreOptions
from rerankd.engine import WINDOW_PAIRS, plan_batches
from rerankd.errors import InputError, ModelLoadError
from rerankd.inputs import TextItem
from rerankd.models.base import LengthOptions, Where
from rerankd.models.registry import backend_for

from ..conftest import assert_close


class Recording:
    """A backend wrapper that records every forward batch (as the token ids of its sequences) and can fail."""

    def __init__(self, inner, fail: BaseException | None = None):
        self.inner, self.fail = inner, fail
        self.batches: list[list[tuple[int, ...]]] = []
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, batch):
        if self.fail is not None:
            raise self.fail
        with self.lock:
            self.batches.append([tuple(s.input_ids.tolist()) for s in batch])
        return self.inner.forward(batch)


def docs(n: int) -> list[str]:
    return [f"document {i} " + "gold " * (i * 7 % 23) for i in range(n)]


def test_library_batches_are_each_windows_planned_batches(m0):
    """A library call's batches are its windows of WINDOW_PAIRS pairs, each cut on its own by plan_batches, in
    order: they depend on the pairs alone, never on timing (so every run of a call sees the same batches)."""
    backend = Recording(m0.backend)
    rr = Reranker(backend, m0.model_dir, m0.options)
    pairs = [["query", d] for d in docs(2 * WINDOW_PAIRS + 44)]
    lengths = rr.length_options(None, 512, None, "truncate", 80)
    expected = []
    for start in range(0, len(pairs), WINDOW_PAIRS):
        window = [(i, m0.backend.prepare(TextItem(q), TextItem(d), lengths, Where.for_pair(i))[0])
                  for i, (q, d) in enumerate(pairs[start : start + WINDOW_PAIRS], start)]  # fmt: skip
        for b in plan_batches(window, 300, 5):
            expected.append([tuple(s.input_ids.tolist()) for s in b.sequences])
    small = Reranker(backend, m0.model_dir, replace(m0.options, max_batch_tokens=300))
    first = small.compute_score(pairs, batch_size=5)
    got, backend.batches = backend.batches, []
    again = small.compute_score(pairs, batch_size=5)
    assert got == expected and backend.batches == expected
    assert first == again  # bit for bit: the same batches
    assert_close(first, rr.compute_score(pairs), 1e-5)
    small.close()
    rr.close()


def test_concurrent_library_calls_share_the_scheduler(m0):
    alone = m0.compute_score([["query", d] for d in docs(40)])
    results: dict[int, list[float]] = {}

    def call(k: int) -> None:
        results[k] = m0.compute_score([["query", d] for d in docs(40)])

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        assert results[k] == alone


def test_a_model_failure_reaches_the_library_as_the_models_own_exception(m0):
    rr = Reranker(Recording(m0.backend, fail=RuntimeError("CUDA error: out of memory")), m0.model_dir, m0.options)
    with pytest.raises(RuntimeError, match="CUDA error: out of memory"):
        rr.compute_score([["q", "d"]])
    rr.backend.fail = None
    assert len(rr.compute_score([["q", "d"]])) == 1  # the scheduler lives on
    rr.close()


class Died(BaseException):
    pass


def test_a_dead_library_worker_is_replaced(m0):
    backend = Recording(m0.backend, fail=Died("gone"))
    rr = Reranker(backend, m0.model_dir, m0.options)
    with pytest.raises(Died):
        rr.compute_score([["q", "d"]])
    dead = rr._scheduler
    assert dead is not None and not dead.alive
    backend.fail = None
    assert len(rr.compute_score([["q", "d"]])) == 1
    assert rr.scheduler is not dead
    rr.close()


def test_a_failing_progress_callback_does_not_hang_the_call(m0):
    def boom():
        raise ValueError("progress bar broke")

    lengths = LengthOptions(1024, 512)
    pairs = [(TextItem("q"), TextItem(d)) for d in docs(5)]
    out = m0.scheduler.score_sync(pairs, lengths, [Where.for_pair(i) for i in range(5)], on_pair_done=boom)
    assert len(out.results) == 5 and out.tokens > 0


def test_each_default_is_read_from_the_one_table():
    signature = inspect.signature(Reranker.rerank).parameters
    fields = RerankRequest.model_fields
    parsed = build_parser().parse_args(["rerank", "--query", "q", "d"])
    for name in ScoreOptions.__dataclass_fields__:
        default = getattr(RERANK_DEFAULTS, name)
        assert signature[name].default == default, name
        assert fields[name].default == default, name
        assert getattr(parsed, name) == default, name
    assert inspect.signature(Reranker.compute_score).parameters["overlap"].default == RERANK_DEFAULTS.overlap
    assert CohereRerankRequest.model_fields["max_tokens_per_doc"].default == COHERE_MAX_TOKENS_PER_DOC


def test_the_registry_maps_files_and_architectures(m0_dir, tmp_path):
    cls, config = backend_for(m0_dir)
    assert cls.__name__ == "JinaM0Backend" and config["architectures"] == ["JinaVLForRanking"]
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert backend_for(gguf)[0].__name__ == "GGUFBackend" and backend_for(gguf)[1] is None
    other = tmp_path / "m.onnx"
    other.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"a \.onnx file is not a model rerankd loads; model files: \.gguf"):
        backend_for(other)


def test_a_failed_request_leaves_nothing_in_the_preparation_queue(m0):
    """Issue 18, item 6: a request that failed with a 500 (a bug in preparing one pair) used to leave its other
    pairs queued for preparation; after three such 1,000-pair requests a 1-pair one waited 4.7 s. A failed job's
    pairs are dropped: the preparers see only a handful of them, and the next request is served at once."""
    import asyncio
    import time

    from rerankd.engine import Scheduler, WorkerError

    class Buggy(Recording):
        calls = 0

        def prepare(self, query, doc, lengths, where, images=None):
            with self.lock:
                Buggy.calls += 1
            if doc.text == "boom":
                raise TypeError("a bug, not bad input")
            return self.inner.prepare(query, doc, lengths, where, images)

    scheduler = Scheduler(Buggy(m0.backend), 4096, 0.005, 20_000, prepare_workers=2)
    lengths = LengthOptions(1024, 512)

    async def run() -> float:
        for _ in range(3):
            pairs = [(TextItem("q"), TextItem("boom"))] + [(TextItem("q"), TextItem(f"doc {i}")) for i in range(999)]
            with pytest.raises(WorkerError, match="preparing documents\\[0\\] failed"):
                await scheduler.score(pairs, lengths, [Where.for_document(i) for i in range(1000)])
        start = time.monotonic()
        await scheduler.score([(TextItem("q"), TextItem("x"))], lengths, [Where.for_document(0)])
        return time.monotonic() - start

    try:
        took = asyncio.run(run())
    finally:
        scheduler.close()
    assert Buggy.calls < 60, Buggy.calls  # measured 9: the failed jobs' other 2,997 pairs were never prepared
    assert took < 1.0 and scheduler.queued_pairs == 0, took


def test_m0_windows_a_long_document_in_linear_time(m0):
    """Issue 18, item 2: m0's windows read the token lists on every window (each read rebuilds the list), so a
    20,000-character document in windows of 2 tokens took 96.5 s to prepare. Its ids and offsets are read once now:
    four times the document takes four times as long, not sixteen (measured 4.1x: 0.045 s and 0.19 s, Intel Xeon)."""
    import time

    from rerankd.models.base import LengthOptions as L

    def prepare(chars: int) -> float:
        text = ("gold rush merchants Paris France " * (chars // 33 + 1))[:chars]
        start = time.perf_counter()
        seqs = m0.backend.prepare(TextItem("q"), TextItem(text), L(64, 8, 2, "chunk", 1), Where.for_document(0))
        assert len(seqs) > chars // 10
        return time.perf_counter() - start

    prepare(2_000)  # warm up
    short, long = min(prepare(5_000) for _ in range(3)), min(prepare(20_000) for _ in range(3))
    assert long < 8 * short and long < 5.0, (short, long)


def test_a_forward_nobody_waits_for_stops_between_layers(m0, tmp_path):
    """Issue 18, item 2: a forward whose every request is gone (deadline, cancel) stops within one layer, and the
    worker takes the next batch: the models' layer loops (decoder, vision tower, cross-encoder) check between
    layers, and the scheduler stops a batch whose jobs are all done."""
    import time

    from rerankd.engine import Scheduler
    from rerankd.inputs import ImageItem
    from rerankd.models.base import Interrupted, between_layers, interruptible
    from rerankd.tiny import make_tiny_checkpoint

    from ..conftest import make_image

    v2 = Reranker.from_pretrained(make_tiny_checkpoint("jina-reranker-v2", tmp_path, seed=1), show_progress=False)
    try:
        lengths = LengthOptions(256, 64)
        for backend, doc in [(m0.backend, TextItem("gold")), (m0.backend, ImageItem(make_image(56, 56))),
                             (v2.backend, TextItem("gold"))]:  # fmt: skip
            batch = backend.prepare(TextItem("q"), doc, lengths, Where.for_document(0))
            with pytest.raises(Interrupted), interruptible(lambda: True):
                backend.forward(batch)
            assert len(backend.forward(batch)) == 1  # outside, the same batch runs to the end
    finally:
        v2.close()

    class Slow(Recording):
        layers = 0
        forwards = 0

        def forward(self, batch):  # the first forward: 40 layers of 50 ms before the real one
            Slow.forwards += 1
            for _ in range(40 if Slow.forwards == 1 else 0):
                between_layers()
                time.sleep(0.05)
                Slow.layers += 1
            return self.inner.forward(batch)

    scheduler = Scheduler(Slow(m0.backend), 4096, 0.0, None, prepare_workers=2)
    try:
        job = scheduler.submit([(TextItem("q"), TextItem("slow"))], LengthOptions(256, 64), [Where.for_document(0)])
        time.sleep(0.3)
        scheduler.cancel(job)
        start = time.monotonic()
        outcome = scheduler.score_sync([(TextItem("q"), TextItem("next"))], LengthOptions(256, 64),
                                       [Where.for_document(0)])  # fmt: skip
        assert len(outcome.results) == 1 and time.monotonic() - start < 1.0  # not after the 2 s of the first
        assert Slow.layers < 30, Slow.layers  # the cancelled one stopped after about 6 of its 40 layers
    finally:
        scheduler.close()


def test_an_image_stays_within_its_admission_bound_with_small_pixel_limits(m0_dir):
    """m0 loaded with small pixel limits: a 200:1 image is resized past max_pixels (its short side raised to one
    patch group), and the admission bound of its tokens (max_image_tokens) still covers what it puts through."""
    from rerankd.inputs import ImageItem
    from rerankd.inputs.images import qwen2_vl_patches
    from rerankd.models.windows import item_tokens, tokens_bound

    from ..conftest import make_image

    small = Reranker.from_pretrained(m0_dir, show_progress=False, min_pixels=28 * 28, max_pixels=4 * 28 * 28)
    vision = small.backend.vision
    img = make_image(4000, 20)
    patches = qwen2_vl_patches(img, patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                               merge_size=vision.spatial_merge_size, min_pixels=28 * 28, max_pixels=4 * 28 * 28,
                               param="documents[0]")  # fmt: skip
    image_tokens = patches.merged_tokens(vision.spatial_merge_size) + 2  # and its two markers
    assert image_tokens == 28 + 2  # 28 x 784 pixels, against max_pixels' 4 x 784
    assert small.backend.max_image_tokens >= image_tokens
    lengths, bound = LengthOptions(4096, 512), small.backend.max_image_tokens
    real = sum(s.length for s in small.backend.prepare(TextItem("q"), ImageItem(img), lengths, Where.for_document(0)))
    assert real <= tokens_bound(item_tokens(TextItem("q"), bound), ImageItem(img), lengths, bound)


def test_the_queue_is_bounded_in_tokens_of_work(m0):
    """Issue 18's cost model: a request is admitted with what it may need at most (tokens_bound: bytes, max_length,
    windows), known before preparation; that gives way to its real tokens as it is prepared; a request that would
    pass --max-queue-tokens while others are queued is a 429 (Overloaded) naming the budget and the amounts; an idle
    server admits any request."""
    import time

    from rerankd.engine import Overloaded, Scheduler
    from rerankd.models.base import between_layers
    from rerankd.inputs import ImageItem
    from rerankd.models.windows import item_tokens, tokens_bound

    from ..conftest import make_image

    lengths = LengthOptions(256, 64, long_documents="chunk", max_windows=8)
    long_doc = TextItem("gold rush merchants " * 200)  # 4,000 bytes: 84 windows of 127 at most, 8 allowed
    assert tokens_bound(1, TextItem("gold"), lengths, 768) == 1 + 4 + 128
    assert tokens_bound(1, long_doc, lengths, 768) == 8 * 256
    assert tokens_bound(1, long_doc, replace(lengths, long_documents="truncate"), 768) == 256
    # an upper bound of what preparation makes, for text and image pairs, windows or not
    image = ImageItem(make_image(60, 40))
    for q, d in [("q", "gold"), ("gold rush", long_doc.text), ("a longer query " * 8, long_doc.text[:900]),
                 ("q", image), (image, "gold rush merchants")]:  # fmt: skip
        q, d = (TextItem(x) if isinstance(x, str) else x for x in (q, d))
        for opts in (lengths, replace(lengths, max_windows=None), replace(lengths, max_doc_length=16, overlap=4),
                     replace(lengths, long_documents="truncate")):  # fmt: skip
            try:
                real = sum(s.length for s in m0.backend.prepare(q, d, opts, Where.for_document(0)))
            except InputError:  # refused (over the window limit): nothing goes through the model
                continue
            bound = tokens_bound(item_tokens(q, m0.backend.max_image_tokens), d, opts, m0.backend.max_image_tokens)
            assert real <= bound, (q, d, opts, real, bound)

    gate = threading.Event()  # preparation waits for it: the bound is what is charged until then

    class Slow(Recording):
        def prepare(self, *args):
            gate.wait(10)
            return self.inner.prepare(*args)

        def forward(self, batch):
            for _ in range(20):
                between_layers()
                time.sleep(0.02)
            return self.inner.forward(batch)

    scheduler = Scheduler(Slow(m0.backend), 4096, 0.0, None, prepare_workers=2, max_queue_tokens=3000)
    where = [Where.for_document(0)]
    try:
        big = scheduler.submit([(TextItem("q"), long_doc)], lengths, where)  # admitted by its bound: 2,048
        with pytest.raises(Overloaded, match=r"2048 tokens of work queued, this request adds up to 2048, the limit "
                                             r"is 3000 \(--max-queue-tokens\)"):  # fmt: skip
            scheduler.submit([(TextItem("q"), long_doc)], lengths, where)
        gate.set()
        deadline = time.monotonic() + 10
        while scheduler._admitted_tokens == 2048 and time.monotonic() < deadline:
            time.sleep(0.01)
        real = scheduler._admitted_tokens  # prepared: its windows' real tokens, fewer than the bound
        assert 0 < real < 2048 and real == big.tokens, (real, big.tokens)
        small = scheduler.submit([(TextItem("q"), TextItem("gold"))], lengths, where)  # fits beside it now
        big.future.result(30), small.future.result(30)
        assert scheduler._admitted_tokens == 0
        huge = [(TextItem("q"), long_doc)] * 3  # 6,144 at most, over the whole budget: admitted when idle
        assert len(scheduler.score_sync(huge, lengths, where * 3).results) == 3
        assert scheduler._admitted_tokens == 0
    finally:
        scheduler.close()


class Deferred:
    """A forward's output as CUDA gives it: queued, read back later (tolist: the host sync), where an error of the
    kernels shows."""

    def __init__(self, out, events: list, n: int, fail: BaseException | None):
        self.out, self.events, self.n, self.fail = out, events, n, fail

    def __len__(self) -> int:
        return len(self.out)

    def tolist(self) -> list[float]:
        self.events.append(("read", self.n))
        if self.fail is not None:
            raise self.fail
        return self.out.tolist()


def logit_alone(m0, query: str, doc: str, lengths: LengthOptions) -> float:
    """A pair's logit from a forward of its sequence alone."""
    seq = m0.backend.prepare(TextItem(query), TextItem(doc), lengths, Where.for_pair(0))[0]
    return m0.backend.forward([seq]).tolist()[0]


class Queued(Recording):
    """Each forward's output Deferred; `events` records the launches and read-backs; batch n's read-back raises
    `fail[n]`."""

    def __init__(self, inner, fail: dict[int, BaseException] | None = None):
        super().__init__(inner)
        self.events: list[tuple[str, int]] = []
        self.failures = fail or {}

    def forward(self, batch):
        n = sum(1 for kind, _ in self.events if kind == "launch")
        self.events.append(("launch", n))
        return Deferred(self.inner.forward(batch), self.events, n, fail=self.failures.get(n))


@pytest.mark.parametrize("overlap", [False, True])
def test_a_batch_in_flight_overlaps_the_next_and_each_pair_keeps_its_score(m0, overlap):
    """Issue 14: on CUDA batch k+1 is launched before batch k is read back. Forced on the CPU here: the launches
    and read-backs interleave (launch 1 before read 0), and every pair gets its own score."""
    from rerankd.engine import Scheduler

    backend = Queued(m0.backend)
    scheduler = Scheduler(backend, 300, 0.0, None, prepare_workers=2, overlap=overlap)
    lengths = LengthOptions(1024, 512)
    pairs = [("slm markdown", d) for d in docs(24)]
    try:
        got = scheduler.score_sync([(TextItem(q), TextItem(d)) for q, d in pairs], lengths,
                                   [Where.for_pair(i) for i in range(len(pairs))])  # fmt: skip
    finally:
        scheduler.close()
    assert_close([s.logit for s in got.results], [logit_alone(m0, q, d, lengths) for q, d in pairs], 1e-5)
    events = backend.events
    launches = [n for kind, n in events if kind == "launch"]
    assert len(launches) >= 3, events  # several batches
    if overlap:
        assert events.index(("launch", 1)) < events.index(("read", 0)), events
    else:
        assert events[:4] == [("launch", 0), ("read", 0), ("launch", 1), ("read", 1)], events
    assert sorted(n for kind, n in events if kind == "read") == launches  # every launched batch is read once


def test_an_error_shown_at_the_read_back_fails_that_batch_alone(m0):
    """An error of a batch shows at its read-back, after the next batch may have been launched: running out of
    memory fails the job of that batch alone, the next one gets its score, and the worker lives on."""
    from rerankd.engine import Scheduler, WorkerError

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    scheduler = Scheduler(Queued(m0.backend, fail={0: oom}), 4096, 0.0, None, prepare_workers=2, overlap=True)
    lengths = LengthOptions(1024, 512)
    try:
        with pytest.raises(WorkerError, match="the model failed on a batch: OutOfMemoryError: CUDA out of memory"):
            scheduler.score_sync([(TextItem("q"), TextItem("first"))], lengths, [Where.for_pair(0)])
        ok = scheduler.score_sync([(TextItem("q"), TextItem("second"))], lengths, [Where.for_pair(0)])
        assert scheduler.alive
    finally:
        scheduler.close()
    assert_close([ok.results[0].logit], [logit_alone(m0, "q", "second", lengths)], 1e-5)


def test_a_device_fault_stops_the_worker(m0):
    """A CUDA fault (an illegal memory access, a device-side assert) is sticky: every later call on the device would
    fail. The worker stops (`alive` false: /health answers 503, Ray replaces the replica) and later calls fail at
    once instead of each failing on the broken device."""
    from rerankd.engine import Scheduler, WorkerError

    fault = RuntimeError("CUDA error: an illegal memory access was encountered")
    scheduler = Scheduler(Queued(m0.backend, fail={0: fault}), 4096, 0.0, None, prepare_workers=2, overlap=True)
    lengths = LengthOptions(1024, 512)
    try:
        with pytest.raises(WorkerError, match="CUDA error: an illegal memory access"):
            scheduler.score_sync([(TextItem("q"), TextItem("first"))], lengths, [Where.for_pair(0)])
        scheduler._thread.join(10)
        assert not scheduler.alive and "the device failed" in str(scheduler.error)
        with pytest.raises(WorkerError):
            scheduler.score_sync([(TextItem("q"), TextItem("second"))], lengths, [Where.for_pair(0)])
    finally:
        scheduler.close()
