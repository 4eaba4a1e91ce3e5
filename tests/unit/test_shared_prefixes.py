"""layers.prefix_units and shared_packing (LoadOptions.share_prefixes): a batch's sequences as a tree of units, each
run of tokens that several sequences begin with computed once; the avx512 kernel's spans and key layout for it."""

from __future__ import annotations

import random

import pytest
import torch

from rerankd.models import cpu_kernels
from rerankd.models.layers import (SHARED_KERNELS, packing, prefix_units, row_attention, shared_packing,
                                   varlen_attention)


def chain(units, i) -> list[int]:
    """The tokens unit i's queries see: its ancestors' and its own."""
    out = []
    while i is not None:
        out = units[i].ids + out
        i = units[i].parent
    return out


def check_tree(seqs, units, min_shared):
    """Every sequence is its last unit's chain, parents come first, each shared unit is long enough and shared."""
    last = {u.seq: i for i, u in enumerate(units) if u.seq is not None}
    assert sorted(last) == list(range(len(seqs)))
    for s, i in last.items():
        assert chain(units, i) == seqs[s] and len(units[i].ids) >= 1
    for i, u in enumerate(units):
        assert u.parent is None or u.parent < i
        assert u.start == (0 if u.parent is None else units[u.parent].start + len(units[u.parent].ids))
        if u.seq is None:
            below = [j for j, w in enumerate(units) if w.parent == i]
            assert len(u.ids) >= min_shared and len(below) >= 2


def test_the_common_prefix_then_each_querys_are_shared():
    system, q1, q2 = list(range(100, 140)), list(range(200, 220)), list(range(300, 305))
    seqs = [system + q1 + [1, 2, 3], system + q1 + [4], system + q2 + [5, 6], system + q2 + [7], system + [9] * 20]
    units = prefix_units(seqs, min_shared=16)
    check_tree(seqs, units, 16)
    shared = [(u.start, len(u.ids)) for u in units if u.seq is None]
    assert shared == [(0, 40), (40, 20)]  # q2's 5 tokens are too few to be a unit: each of its sequences has them
    assert sum(len(u.ids) for u in units) == 40 + 20 + 3 + 1 + 7 + 6 + 20


def test_duplicates_prefixes_of_one_another_and_nothing_to_share():
    a = list(range(50))
    seqs = [a, a, a[:30], a + [7], [1, 2], [3]]
    units = prefix_units(seqs, min_shared=16)
    check_tree(seqs, units, 16)
    # a duplicate keeps its last token, and so does a sequence that begins another: a[:29] for all four, then
    # a[29:49] for the three that go on
    assert [(u.start, len(u.ids)) for u in units if u.seq is None] == [(0, 29), (29, 20)]
    assert prefix_units([], 16) == []
    assert [(u.ids, u.seq) for u in prefix_units([[5, 6]], 1)] == [([5, 6], 0)]
    assert all(u.parent is None for u in prefix_units([[1] * 10, [1] * 9 + [2]], 16))  # 9 shared: under 16


@pytest.mark.parametrize("seed", range(20))
def test_random_batches_make_a_valid_tree(seed):
    rng = random.Random(seed)
    stems = [[rng.randrange(4) for _ in range(rng.randrange(0, 40))] for _ in range(4)]
    seqs = []
    for _ in range(rng.randrange(1, 12)):
        s = rng.choice(stems) + rng.choice(stems) + [rng.randrange(4) for _ in range(rng.randrange(0, 6))]
        seqs.append(s or [0])
    min_shared = rng.choice([1, 4, 16])
    check_tree(seqs, prefix_units(seqs, min_shared), min_shared)


@pytest.mark.parametrize("kernel", SHARED_KERNELS)
def test_shared_attention_equals_each_sequence_whole(kernel):
    """Attention over the units, each seeing its ancestors' keys, gives each sequence's rows as attention over the
    whole sequence does; the head rows' one-query attention too."""
    if kernel == "avx512" and cpu_kernels.unavailable() is not None:
        pytest.skip(f"rerankd's CPU kernels cannot run here: {cpu_kernels.unavailable()}")
    g = torch.Generator().manual_seed(0)
    base = list(range(30))
    seqs = [base + [40, 41, 42], base + [50], base[:20] + [60] * 5, [70, 71]]
    units = prefix_units(seqs, min_shared=8)
    assert sum(u.seq is None for u in units) == 2  # base[:20], then base[20:] under it
    table = {t: (torch.randn(4, 16, generator=g), torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g))
             for s in seqs for t in s}  # a token's q, k, v: the same wherever it stands (a causal prefix's are)

    def qkv(ids):
        return [torch.stack([table[t][i] for t in ids]) for i in range(3)]

    whole = packing([len(s) for s in seqs], torch.device("cpu"), "sdpa")  # one SDPA call a sequence: the reference
    want = varlen_attention(*qkv([t for s in seqs for t in s]), whole, causal=True)
    pack = shared_packing(units, torch.device("cpu"), kernel)
    rows = [t for u in units for t in u.ids]
    got = varlen_attention(*qkv(rows), pack, causal=True)
    for s, seq in enumerate(seqs):  # each sequence's rows, gathered from its chain of units
        i = next(j for j, u in enumerate(units) if u.seq == s)
        picked = []
        while i is not None:
            picked = list(range(pack.offsets[i], pack.offsets[i + 1])) + picked
            i = units[i].parent
        torch.testing.assert_close(got[picked], want[whole.offsets[s]:whole.offsets[s + 1]], atol=1e-6, rtol=0)
    q, k, v = qkv(rows)
    heads = row_attention(q[pack.heads], k, v, pack)
    torch.testing.assert_close(heads, want[[end - 1 for end in whole.offsets[1:]]], atol=1e-6, rtol=0)


def test_other_kernels_are_refused():
    with pytest.raises(ValueError, match="shared prefixes run on the avx512 and sdpa attention kernels, not 'flex'"):
        shared_packing(prefix_units([[1, 2], [1, 3]], 1), torch.device("cpu"), "flex")
