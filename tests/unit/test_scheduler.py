import time

import torch

from rerankd.engine import plan_batches
from rerankd.models.base import PreparedSequence


def seq(n):
    return PreparedSequence(input_ids=torch.zeros(n, dtype=torch.long))


def test_batches_respect_token_budget_and_sort_by_length():
    lengths = [5, 300, 40, 40, 900, 1, 120, 64]
    batches = plan_batches([(i, seq(n)) for i, n in enumerate(lengths)], max_batch_tokens=400)
    assert sorted(i for b in batches for i in b.indices) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b.indices]
    assert flat == sorted(lengths, reverse=True)
    for b in batches:
        assert b.tokens <= 400 or len(b.indices) == 1  # only a single over-budget sequence may exceed it
    assert [lengths[i] for i in batches[0].indices] == [900]


def test_max_pairs_caps_batches():
    batches = plan_batches([(i, seq(3)) for i in range(10)], max_batch_tokens=10_000, max_batch_pairs=4)
    assert [len(b.indices) for b in batches] == [4, 4, 2]


class _Lengths:
    """A backend whose document text is its sequence's length in tokens and whose score is that length: no model,
    so batches are cut and ordered exactly as the scheduler decides."""

    listwise = False

    def __init__(self):
        self.batches: list[list[int]] = []

    def prepare(self, query, doc, lengths, where, images):
        return [PreparedSequence(input_ids=torch.zeros(int(doc.text), dtype=torch.long))]

    def forward(self, batch):
        time.sleep(0.002)  # small requests pile up meanwhile, so the batches are full of them
        self.batches.append([s.length for s in batch])
        return torch.tensor([float(s.length) for s in batch])


def test_a_large_request_keeps_its_share_while_small_ones_keep_coming():
    """Fair queuing's clock advances with the service given: a request of ten 600-token pairs, a quantum ahead of
    a stream of one-pair 50-token requests (40 outstanding at every moment: batches full of them), is scored at its
    share instead of waiting for the stream to stop."""
    import threading

    from rerankd.engine import Scheduler
    from rerankd.inputs import TextItem
    from rerankd.models.base import LengthOptions, Where

    backend = _Lengths()
    scheduler = Scheduler(backend, max_batch_tokens=1000, max_batch_wait=0.002, prepare_workers=2)
    lengths = LengthOptions(100_000, None)
    done = []
    big = scheduler.submit([(TextItem("q"), TextItem("600"))] * 10, lengths, [Where.for_document(i) for i in range(10)],
                           streaming=True, on_pair_done=lambda: done.append(len(backend.batches)))  # fmt: skip
    while len(done) < 2:  # the stream starts once the large request is under way, a quantum or so ahead
        time.sleep(0.001)
    slots = threading.Semaphore(40)
    try:
        while not big.future.done() and len(backend.batches) < 3000:
            slots.acquire()
            small = scheduler.submit([(TextItem("q"), TextItem("50"))], lengths, [Where.for_document(0)], streaming=True)
            small.future.add_done_callback(lambda _: slots.release())
        assert big.future.done(), f"after {len(backend.batches)} batches the large request had {len(done)} of 10 pairs"
        # a pair every few batches; when the clock only followed the start of the job served, the longest wait
        # between two of its pairs was 76 to 1,244 batches (one figure a run, 5 runs)
        gaps = [b - a for a, b in zip(done, done[1:])]
        assert max(gaps) <= 60, done  # at most 41 jobs share the model: 600 tokens of its share in 25 batches
    finally:
        scheduler.close()


def test_a_request_that_makes_the_forward_fail_fails_alone():
    """A forward of two requests' sequences raises because of one of them: each is run again alone, the other one
    gets its scores and only the culprit fails; the worker lives on."""
    import asyncio

    from rerankd.engine import Scheduler, WorkerError
    from rerankd.inputs import TextItem
    from rerankd.models.base import LengthOptions, Where

    class Poisoned(_Lengths):
        tried: list[list[int]] = []

        def forward(self, batch):
            self.tried.append(sorted(s.length for s in batch))
            if any(s.length == 13 for s in batch):
                raise RuntimeError("a 13-token sequence breaks this model")
            return super().forward(batch)

    backend = Poisoned()
    scheduler = Scheduler(backend, max_batch_tokens=1000, max_batch_wait=0.2, prepare_workers=2)
    lengths = LengthOptions(100_000, None)

    async def both():
        good = scheduler.score([(TextItem("q"), TextItem(n)) for n in ("7", "9")], lengths,
                               [Where.for_document(i) for i in range(2)], None)  # fmt: skip
        bad = scheduler.score([(TextItem("q"), TextItem(n)) for n in ("5", "13")], lengths,
                              [Where.for_document(i) for i in range(2)], None)  # fmt: skip
        return await asyncio.gather(good, bad, return_exceptions=True)

    good, bad = asyncio.run(both())
    assert [r.logit for r in good.results] == [7.0, 9.0]
    assert isinstance(bad, WorkerError) and "13-token" in str(bad.__cause__)
    assert scheduler.alive and scheduler.queued_pairs == 0
    assert backend.tried[0] == [5, 7, 9, 13] and sorted(backend.tried[1:]) == [[5, 13], [7, 9]]  # shared, then alone
    scheduler.close()
