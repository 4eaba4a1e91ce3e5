"""Long documents are scored as overlapping token windows, the maximum kept (`long_documents="chunk"`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rerankd import Reranker
from rerankd.engine import WINDOW_PAIRS
from rerankd.errors import PairErrors
from rerankd.inputs import TextItem
from rerankd.models.base import LengthOptions, Where
from rerankd.tiny import CORPUS, make_tiny_checkpoint

from .conftest import assert_close

WORDS = " ".join(CORPUS).split()


def text_of(n_words: int, seed: int) -> str:
    return " ".join(np.random.default_rng(seed).choice(WORDS, n_words))


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    pytest.importorskip("transformers")
    from .references import ReferenceCrossEncoder

    path = make_tiny_checkpoint("jina-reranker-v2", tmp_path_factory.mktemp("v2"), seed=3)
    return Reranker.from_pretrained(path, show_progress=False), ReferenceCrossEncoder(path)


def expected_windows(n_tokens: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """The rule of issue 3, written out independently of the code under test."""
    out, start = [], 0
    while True:
        out.append((start, min(start + size, n_tokens)))
        if start + size >= n_tokens:
            return out
        start += size - overlap


def reference_window_scores(ref, q_ids, d_ids, windows) -> list[float]:
    """Each window scored alone by transformers: `<s> q </s></s> window </s>`."""
    scores = []
    for s, e in windows:
        ids = torch.tensor([[0, *q_ids, 2, 2, *d_ids[s:e], 2]])
        with torch.inference_mode():
            scores.append(torch.sigmoid(ref.model(input_ids=ids).logits.view(-1)).item())
    return scores


@pytest.mark.parametrize("n_words,max_length,overlap", [(400, 64, 8), (150, 100, 0), (61, 40, 20), (800, 1024, 80)])
def test_window_rule_and_max_aggregation(v2, n_words, max_length, overlap):
    rr, ref = v2
    tok = rr.backend.tokenizer
    query, doc = text_of(5, 1), text_of(n_words, n_words)
    q_ids = tok.encode(query, add_special_tokens=False).ids
    d_ids = tok.encode(doc, add_special_tokens=False).ids
    size = max_length - len(q_ids) - 4
    windows = expected_windows(len(d_ids), size, overlap)

    seqs = rr.backend.prepare(TextItem(query), TextItem(doc), LengthOptions(max_length, 512, None, "chunk", overlap),
                              Where.for_document(0))  # fmt: skip
    assert len(seqs) == len(windows)
    for seq, (s, e) in zip(seqs, windows):
        assert seq.input_ids.tolist() == [0, *q_ids, 2, 2, *d_ids[s:e], 2]
        assert seq.length <= max_length
    assert windows[-1][1] == len(d_ids)  # the last window reaches the end
    if len(windows) > 1:
        assert all(b[0] == a[1] - overlap for a, b in zip(windows, windows[1:]))  # adjacent ones share `overlap`
        assert all(e - s == size for s, e in windows[:-1])

    expected = reference_window_scores(ref, q_ids, d_ids, windows)
    [result] = rr.rerank(query, [doc], max_length=max_length, overlap=overlap)
    assert_close([result["relevance_score"]], [max(expected)], 1e-5)
    if len(windows) > 1:
        w = result["window"]
        assert (w["index"], w["count"]) == (int(np.argmax(expected)), len(windows))
        span = tok.normalizer.normalize_str(doc[w["start"] : w["end"]])
        assert span.split() == tok.decode(d_ids[slice(*windows[w["index"]])]).split()
        assert len(set(np.round(expected, 6))) > 1  # the windows really score differently
    else:
        assert "window" not in result


def test_truncate_keeps_the_first_window_only(v2):
    rr, ref = v2
    query, doc = "capital of France", text_of(300, 5)
    tok = rr.backend.tokenizer
    q_ids, d_ids = tok.encode(query, add_special_tokens=False).ids, tok.encode(doc, add_special_tokens=False).ids
    size = 64 - len(q_ids) - 4
    [first] = reference_window_scores(ref, q_ids, d_ids, [(0, size)])
    [r] = rr.rerank(query, [doc], max_length=64, long_documents="truncate")
    assert_close([r["relevance_score"]], [first], 1e-5)
    assert "window" not in r


def test_query_is_cut_to_max_query_length(v2):
    rr, ref = v2
    query, doc = text_of(200, 6), text_of(500, 7)
    tok = rr.backend.tokenizer
    q_ids = tok.encode(query, add_special_tokens=False).ids[:30]
    d_ids = tok.encode(doc, add_special_tokens=False).ids
    windows = expected_windows(len(d_ids), 128 - 30 - 4, 10)
    [r] = rr.rerank(query, [doc], max_length=128, max_query_length=30, overlap=10)
    assert_close([r["relevance_score"]], [max(reference_window_scores(ref, q_ids, d_ids, windows))], 1e-5)
    assert r["window"]["count"] == len(windows) > 1


def test_empty_and_one_token_documents(v2):
    rr, ref = v2
    docs = ["", "a", text_of(3, 8)]
    results = rr.rerank("query", docs, max_length=64)
    got = {r["index"]: r["relevance_score"] for r in results}
    assert_close([got[i] for i in range(3)], ref.compute_score([["query", d] for d in docs], max_length=64), 1e-5)


def test_bad_window_options_name_the_document(v2):
    rr, _ = v2
    with pytest.raises(PairErrors, match=r"documents\[1\]: overlap=60 must be smaller than the document window"):
        rr.rerank("q", ["short", text_of(200, 9)], max_length=64, overlap=60)
    with pytest.raises(PairErrors, match=r"documents\[0\]: the query takes \d+ tokens and leaves no room"):
        rr.rerank(text_of(100, 9), ["doc"], max_length=40, max_query_length=100)
    with pytest.raises(ValueError, match="long_documents must be 'chunk' or 'truncate'"):
        rr.rerank("q", ["d"], long_documents="split")
    with pytest.raises(ValueError, match="overlap must be a non-negative integer"):
        rr.rerank("q", ["d"], overlap=-1)


def test_ten_thousand_documents_stream_through_bounded_memory(v2, monkeypatch):
    """Windows of 10,000 documents are prepared a window of pairs ahead of the model, never all at once."""
    rr, _ = v2
    backend = rr.backend
    prepared, forwarded, ahead = [0], [0], []
    real_prepare, real_forward = backend.prepare, backend.forward

    def prepare(*a, **kw):
        seqs = real_prepare(*a, **kw)
        prepared[0] += len(seqs)
        return seqs

    def forward(batch):
        ahead.append(prepared[0] - forwarded[0])
        forwarded[0] += len(batch)
        return real_forward(batch)

    monkeypatch.setattr(backend, "prepare", prepare)
    monkeypatch.setattr(backend, "forward", forward)
    docs = [f"doc {i} " + text_of(i % 13, i % 97) for i in range(10_000)]
    docs[5000] = text_of(400, 1)  # one long document among them, in several windows
    results = rr.rerank("capital of France", docs, max_length=64, overlap=8, return_documents=False)
    long_windows = prepared[0] - 9_999
    assert len(results) == 10_000 and forwarded[0] == prepared[0] and long_windows > 5
    assert max(ahead) <= 2 * WINDOW_PAIRS + long_windows, max(ahead)
    got = {r["index"]: r["relevance_score"] for r in results}
    picks = [0, 5000, 9999]
    alone = [rr.rerank("capital of France", [docs[i]], max_length=64, overlap=8)[0]["relevance_score"] for i in picks]
    assert_close([got[i] for i in picks], alone, 1e-5)


# ------------------------------------------------------------------------------------------- m0


def test_m0_chunks_long_text_documents(m0):
    query, doc = "slm markdown", text_of(600, 11)
    lengths = LengthOptions(160, 512, None, "chunk", 16)
    seqs = m0.backend.prepare(TextItem(query), TextItem(doc), lengths, Where.for_document(0))
    windows = [s.window for s in seqs]
    assert len(windows) > 2 and all(s.length <= 160 for s in seqs)
    assert windows[0].start == 0 and windows[-1].end == len(doc)
    assert all(b.start < a.end for a, b in zip(windows, windows[1:]))  # overlapping, no gap
    # each window scored alone as a plain pair (its text fits, so nothing is cut) -> the max is the document's
    alone = m0.compute_score([[query, doc[w.start : w.end]] for w in windows], max_length=160)
    [r] = m0.rerank(query, [doc], max_length=160, overlap=16)
    assert_close([r["relevance_score"]], [max(alone)], 1e-5)
    assert r["window"]["index"] == int(np.argmax(alone)) and r["window"]["count"] == len(windows)
    # compute_score keeps the model card's behaviour: truncation
    [cut] = m0.compute_score([[query, doc]], max_length=160)
    [first] = m0.rerank(query, [doc], max_length=160, long_documents="truncate")
    assert_close([cut], [first["relevance_score"]], 1e-6)


def test_the_window_bound_counts_exactly_the_windows_it_would_build():
    from rerankd.errors import InputError
    from rerankd.models.base import LengthOptions
    from rerankd.models.windows import document_spans, window_starts

    for n, room, overlap in [(10, 3, 0), (10, 3, 1), (11, 4, 2), (1000, 7, 6), (8, 8, 0), (9, 8, 7), (5000, 512, 80)]:
        count = len(window_starts(n, room, overlap))
        at = [(i, i + 1) for i in range(n)]
        ok = LengthOptions(10_000, None, None, "chunk", overlap, max_windows=count)
        assert len(document_spans(n, room, ok, lambda: at, "d", "", "")) == count
        if count > 1:
            with pytest.raises(InputError, match=f"would make {count} windows"):
                document_spans(n, room, LengthOptions(10_000, None, None, "chunk", overlap, max_windows=count - 1),
                               lambda: at, "d", "", "")  # fmt: skip


KINDS = ["jina-reranker-m0", "jina-reranker-v2", "bert-cross-encoder", "qwen3-reranker", "jina-reranker-v3"]
PIECES = ["gold", "rush", "Paris,", "capital.", "l'été", "don't", "3.14", "2026", "数据提取", "绿茶", "🙂", "(a)",
          "--", "café", "naïve", "x\ny", "tab\there", "end.\n\n", "  ", "\u00a0", "ÅNGSTRÖM", "e\u0301"]  # fmt: skip


def mixed_text(n: int, seed: int) -> str:
    """Words, punctuation, digits, CJK, emoji, runs of spaces, newlines and tabs: what a tokenizer splits oddly."""
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(PIECES + WORDS[:200], n))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {kind: make_tiny_checkpoint(kind, tmp_path_factory.mktemp(kind), seed=5) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_a_prefix_tokenizes_as_the_whole_text_does(kind, tiny_dirs):
    """text_prefix (issue 18): every token of the prefix is the whole text's token at that place, there are at
    least the tokens asked for, and a long text is cut well short of its end."""
    from rerankd.models.base import load_tokenizer, text_prefix

    tok = load_tokenizer(tiny_dirs[kind])
    for seed in range(12):
        text = mixed_text(4000, seed)
        full = tok.encode(text, add_special_tokens=False).ids
        for n in (1, 9, 200, 1000):
            cut = text_prefix(tok, text, n)
            ids = tok.encode(cut, add_special_tokens=False).ids
            assert text.startswith(cut) and len(ids) > n
            assert ids[:-1] == full[: len(ids) - 1], (kind, seed, n)  # all but the last (text_prefix's docstring)
            assert len(cut) < len(text) // 2 or n == 1000, (kind, n, len(cut), len(text))


@pytest.mark.parametrize("kind", KINDS)
def test_unspaced_text_is_cut_before_punctuation_where_the_tokenizer_splits_there(kind, tiny_dirs):
    """Chinese text has no spaces but punctuation: Qwen2's and BERT's pre-tokenizers split before it, so a prefix
    ends there and tokenizes as the whole text does; XLM-R's Metaspace splits on spaces only: no cut, the whole."""
    from rerankd.models.base import load_tokenizer, text_prefix

    tok = load_tokenizer(tiny_dirs[kind])
    rng = np.random.default_rng(7)
    pieces = ["数据提取", "绿茶富含儿茶素", "为什么不用正则", "Paris", "l'été", "2026", "🙂", "café", "e\u0301"]
    for seed in range(6):
        rng = np.random.default_rng(seed)
        text = "".join(str(rng.choice(pieces)) + str(rng.choice(["，", "。", "、", ",", ".", "!", "", "", ""]))
                       for _ in range(6000))  # fmt: skip
        full = tok.encode(text, add_special_tokens=False).ids
        cut = text_prefix(tok, text, 300)
        ids = tok.encode(cut, add_special_tokens=False).ids
        assert text.startswith(cut) and len(ids) > 300 and ids[:-1] == full[: len(ids) - 1], (kind, seed)
        assert (len(cut) < len(text) // 4) == (kind != "jina-reranker-v2"), (kind, len(cut), len(text))


def test_the_tokenizer_wrapper_copies_and_pickles(tiny_dirs):
    import copy
    import pickle

    from rerankd.models.base import load_tokenizer

    tok = load_tokenizer(tiny_dirs["jina-reranker-v2"])
    for other in (copy.deepcopy(tok), pickle.loads(pickle.dumps(tok))):
        assert other.encode("gold rush").ids == tok.encode("gold rush").ids == tok.inner.encode("gold rush").ids


@pytest.mark.parametrize("kind", KINDS)
def test_long_documents_score_as_if_tokenized_whole(kind, tiny_dirs, monkeypatch):
    """Truncated and windowed long documents get bit-identical scores whether only a prefix is tokenized or the
    whole text (PREFIX_CHARS_PER_TOKEN raised until text_prefix never cuts)."""
    from rerankd.models import base

    model = Reranker.from_pretrained(tiny_dirs[kind], show_progress=False)
    try:
        unspaced = "".join(["数据提取，", "绿茶富含儿茶素。", "Paris,", "为什么不用正则"][i % 4] for i in range(3000))
        docs = [mixed_text(n, 40 + n) for n in (3000, 6000)] + ["short document", unspaced]
        pairs = [["gold rush merchants", d] for d in docs]
        options = [dict(long_documents="truncate", max_length=160), dict(long_documents="truncate", max_length=192,
                   max_query_length=8, max_doc_length=40), dict(long_documents="chunk", max_length=160, overlap=8)]  # fmt: skip
        long_query = [[mixed_text(3000, 9), "short document"]]  # cut by max_query_length, from a prefix
        got = [model.compute_score(pairs, **o) for o in options] + [model.compute_score(long_query, **options[1])]
        monkeypatch.setattr(base, "PREFIX_CHARS_PER_TOKEN", 10**9)
        assert [model.compute_score(pairs, **o) for o in options] + [model.compute_score(long_query, **options[1])] \
            == got  # fmt: skip
    finally:
        model.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_document_over_the_window_limit_is_refused_from_its_prefix(kind, tiny_dirs):
    """'chunk' with a window limit: a document with more tokens than max_windows x room is refused, having
    tokenized only a prefix of it (the tokenizer is asked for kilobytes of a 20 MB text)."""
    from rerankd.errors import InputError

    model = Reranker.from_pretrained(tiny_dirs[kind], show_progress=False)
    backend = model.backend
    seen: list[int] = []
    real = backend.tokenizer.encode

    def counting(text, *args, **kwargs):
        seen.append(len(text))
        return real(text, *args, **kwargs)

    try:
        backend.tokenizer.encode = counting
        huge = mixed_text(2_000_000, 1)  # about 20 MB
        lengths = LengthOptions(160, None, None, "chunk", 8, max_windows=4)
        where = Where("query", "documents[0]", "documents[0]")
        with pytest.raises(InputError, match="over the limit of 4 windows a document"):
            if kind == "jina-reranker-v3":
                _, errors = backend.prepare_list(TextItem("gold"), [TextItem(huge)], lengths, [where], None)
                raise errors[0]
            backend.prepare(TextItem("gold"), TextItem(huge), lengths, where)
        assert max(seen) < 200_000, seen  # v3 windows by 2048 tokens: its prefix is the longest, 66 KB
    finally:
        backend.tokenizer.encode = real
        model.close()
