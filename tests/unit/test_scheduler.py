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
