"""A pair's score does not depend on what else is in its batch (fp32: |diff| <= 1e-5)."""

from __future__ import annotations

import numpy as np

from rerankd import Reranker

from .conftest import assert_close, data_uri, make_image

WORDS = "alpha beta gamma 数据 delta Markdown web 🙂 gold".split()


def test_scores_alone_equal_scores_in_mixed_batches(m0_dir, m0):
    rng = np.random.default_rng(3)
    docs = [" ".join(rng.choice(WORDS, n)) for n in (1, 5, 17, 60, 200, 333)]
    docs += [{"image": data_uri(make_image(w, h, seed=w))} for w, h in ((60, 60), (300, 90))]
    alone = [m0.rerank("slm markdown", [d], max_length=2048)[0]["relevance_score"] for d in docs]
    together = {r["index"]: r["relevance_score"] for r in m0.rerank("slm markdown", docs, max_length=2048)}
    assert_close([together[i] for i in range(len(docs))], alone, 1e-5)
    # a tiny token budget cuts the same pairs into many different batches
    small = Reranker.from_pretrained(m0_dir, show_progress=False, max_batch_tokens=300)
    split = {r["index"]: r["relevance_score"] for r in small.rerank("slm markdown", docs, max_length=2048)}
    assert_close([split[i] for i in range(len(docs))], alone, 1e-5)
    # and a pair-count cap
    capped = m0.compute_score([["slm markdown", d] for d in docs[:6]], batch_size=2, max_length=2048)
    assert_close(capped, alone[:6], 1e-5)


def test_many_pairs_cross_windows(m0):
    """More pairs than one preparation window (128): order and scores are kept."""
    docs = [f"document number {i} " + "gamma " * (i % 37) for i in range(300)]
    scores = m0.compute_score([["query", d] for d in docs])
    again = m0.compute_score([["query", d] for d in docs[::-1]])[::-1]
    assert_close(scores, again, 1e-5)
    assert len(set(round(s, 6) for s in scores)) > 50
