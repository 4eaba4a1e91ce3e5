"""The scheduler's listwise units (Backend.listwise: one sequence scores many documents), on a fake backend whose
"score" of a document is a number read from its text, so every result can be checked exactly."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from rerankd.engine import Scheduler, WorkerError
from rerankd.errors import InputError
from rerankd.inputs import TextItem
from rerankd.models.base import LengthOptions, PreparedSequence, Where

LENGTHS = LengthOptions(1024, 512)


class FakeListwise:
    """Blocks of up to 2 documents; a document "bad" is refused, "worse" fails the whole list; forward returns each
    block's document values; combine adds the query's number to each (so that it needs every block)."""

    listwise = True

    def __init__(self, combine_fails: bool = False, combine_drops: bool = False, combine_strays: bool = False):
        self.combine_fails, self.combine_drops, self.combine_strays = combine_fails, combine_drops, combine_strays
        self.forwards: list[int] = []

    def prepare_list(self, query, docs, lengths, wheres, images):
        if any(d.text == "worse" for d in docs):
            raise InputError("the whole list is refused", wheres[0].pair)
        errors = {i: InputError("refused", w.document) for i, (d, w) in enumerate(zip(docs, wheres)) if d.text == "bad"}
        good = [i for i in range(len(docs)) if i not in errors]
        seqs = []
        for k in range(0, len(good), 2):
            slots = tuple(good[k : k + 2])
            values = [float(docs[i].text) for i in slots] + [float(query.text)]
            seqs.append(PreparedSequence(input_ids=torch.tensor(values), slots=slots))
        return seqs, errors

    def forward(self, batch: list[PreparedSequence]) -> list[torch.Tensor]:
        self.forwards.append(len(batch))
        return [s.input_ids.clone() for s in batch]

    def combine(self, outputs):
        if self.combine_fails:
            raise RuntimeError("combine broke")
        scored = [(slot, float(out[k] + out[-1]), None) for seq, out in outputs for k, slot in enumerate(seq.slots)]
        if self.combine_strays:  # a slot the list does not have
            return [*scored, (len(scored) + 5, 0.0, None)]
        return scored[1:] if self.combine_drops else scored


def pairs_of(spec: list[tuple[str, str]]):
    return [(TextItem(q), TextItem(d)) for q, d in spec]


@pytest.mark.parametrize("streaming", [False, True])
def test_pairs_are_grouped_by_query_and_answered_in_input_order(streaming):
    backend = FakeListwise()
    scheduler = Scheduler(backend, max_batch_tokens=3)
    spec = [("100", "1"), ("200", "2"), ("100", "3"), ("100", "bad"), ("200", "5"), ("100", "6"), ("300", "7")]
    done = []
    job = scheduler.submit(pairs_of(spec), LENGTHS, [Where.for_pair(i) for i in range(len(spec))], streaming=streaming,
                           on_pair_done=lambda: done.append(1))  # fmt: skip
    outcome = job.future.result(timeout=10)
    logits = [r.logit if not isinstance(r, InputError) else r for r in outcome.results]
    assert logits[:3] == [101.0, 202.0, 103.0] and logits[4:] == [205.0, 106.0, 307.0]
    assert isinstance(logits[3], InputError) and logits[3].param == "pairs[3].document"
    assert len(done) == len(spec) and scheduler.queued_pairs == 0
    assert sum(backend.forwards) == 4  # blocks: (1, 3), (6,) for "100"; (2, 5) for "200"; (7,) for "300"
    scheduler.close()


def test_a_refused_list_and_a_failing_combine():
    scheduler = Scheduler(FakeListwise(), max_batch_tokens=100)
    spec = [("1", "worse"), ("1", "2"), ("5", "3")]
    out = scheduler.score_sync(pairs_of(spec), LENGTHS, [Where.for_pair(i) for i in range(3)])
    assert [type(r).__name__ for r in out.results] == ["InputError", "InputError", "Scored"]
    assert out.results[2].logit == 8.0
    scheduler.close()

    failing = Scheduler(FakeListwise(combine_fails=True), max_batch_tokens=100)
    with pytest.raises(WorkerError, match="combining a list's scores: RuntimeError: combine broke"):
        failing.score_sync(pairs_of([("1", "2")]), LENGTHS, [Where.for_pair(0)])
    assert failing.alive and failing.queued_pairs == 0  # the worker lives on
    assert failing.score_sync([], LENGTHS, []).results == []
    failing.close()


def test_a_cancelled_list_is_dropped():
    backend = FakeListwise()
    scheduler = Scheduler(backend, max_batch_tokens=100, max_batch_wait=5.0)  # the batch waits for company

    async def go():
        task = asyncio.ensure_future(scheduler.score(pairs_of([("1", "2"), ("1", "3")]), LENGTHS,
                                                     [Where.for_pair(0), Where.for_pair(1)]))  # fmt: skip
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert scheduler.queued_pairs == 0
    scheduler.close()
    assert backend.forwards == []  # dropped before reaching the model


def test_a_backend_that_leaves_a_pair_unscored_fails_the_call_instead_of_answering_a_hole():
    scheduler = Scheduler(FakeListwise(combine_drops=True), max_batch_tokens=100)
    with pytest.raises(WorkerError, match=r"the backend gave no score for pairs \[0\]"):
        scheduler.score_sync(pairs_of([("1", "2"), ("1", "3")]), LENGTHS, [Where.for_pair(0), Where.for_pair(1)])
    assert scheduler.alive and scheduler.queued_pairs == 0
    scheduler.close()


def test_a_backend_that_names_a_slot_the_list_lacks_fails_the_call_and_the_worker_lives_on():
    scheduler = Scheduler(FakeListwise(combine_strays=True), max_batch_tokens=100)
    with pytest.raises(WorkerError, match="combining a list's scores: IndexError"):
        scheduler.score_sync(pairs_of([("1", "2"), ("1", "3")]), LENGTHS, [Where.for_pair(0), Where.for_pair(1)])
    assert scheduler.alive and scheduler.queued_pairs == 0
    scheduler.close()


def test_a_list_being_prepared_stops_once_its_request_is_answered():
    """A list of long documents takes seconds to prepare (jina-reranker-v3 tokenizes each): once its job is answered
    (a deadline's 504, a cancel) the preparation stops at the next document instead of running on and delaying the
    requests after it (a soak run saw a probe wait 35 s behind lists already answered with 504)."""
    from rerankd.models.base import between_layers

    seen = []

    class SlowList(FakeListwise):
        def prepare_list(self, query, docs, lengths, wheres, images):
            for d in docs:
                between_layers()
                seen.append(d.text)
                time.sleep(0.05)
            return super().prepare_list(query, docs, lengths, wheres, images)

    sched = Scheduler(SlowList(), max_batch_tokens=1024, max_batch_wait=0.0)
    try:
        wheres = [Where.for_document(i) for i in range(60)]
        job = sched.submit(pairs_of([("1", str(i)) for i in range(60)]), LENGTHS, wheres)
        time.sleep(0.3)
        sched.cancel(job)
        at_cancel = len(seen)
        time.sleep(1.0)  # another 20 documents' time
        assert 0 < at_cancel and len(seen) <= at_cancel + 1, (at_cancel, len(seen))  # stopped at the next document
        out = sched.score_sync(pairs_of([("1", "2"), ("1", "3")]), LENGTHS, [Where.for_document(i) for i in range(2)])
        assert [r.logit for r in out.results] == [3.0, 4.0]
    finally:
        sched.close()
