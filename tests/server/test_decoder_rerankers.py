"""Qwen3-Reranker and jina-reranker-v3 behind a real `rerankd serve` on loopback: the library's scores over HTTP,
instructions (also SGLang's "instruct"), and concurrent requests of different lists and instructions batched
together, each getting the scores it gets alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rerankd import Reranker
from rerankd.tiny import make_tiny_checkpoint

from ..conftest import assert_close
from .conftest import Server

WORDS = "markdown model web content extraction gold rush Paris France capital 数据 Beiträge 🙂".split()


def docs_of(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(k))) for k in rng.integers(1, 60, n)]


@pytest.fixture(scope="module", params=["qwen3-reranker", "jina-reranker-v3"])
def served(request, tmp_path_factory):
    path = make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=3)
    server = Server(path, "--max-batch-wait-ms", "20", "--max-batch-tokens", "2048")
    yield request.param, Reranker.from_pretrained(path, show_progress=False), server
    assert server.stop() == 0


def test_scores_over_http_equal_the_library(served):
    kind, rr, server = served
    docs = docs_of(12, 1)
    status, body, _ = server.post("/v1/rerank", {"query": "slm markdown", "documents": docs, "top_n": 5})
    assert status == 200, body
    want = rr.rerank("slm markdown", docs, top_n=5)
    assert [r["index"] for r in body["results"]] == [r["index"] for r in want]
    assert_close([r["relevance_score"] for r in body["results"]], [r["relevance_score"] for r in want], 1e-5)
    if kind == "jina-reranker-v3":  # the cosine, no sigmoid
        assert_close([r["relevance_score"] for r in want], [r["relevance_score"] for r in rr.rerank(
            "slm markdown", docs, top_n=5, activation=None)], 0)  # fmt: skip
    status, body, _ = server.post("/v2/rerank", {"query": "slm markdown", "documents": docs[:3]})
    assert status == 200 and len(body["results"]) == 3, body


def test_instruction_and_sglangs_instruct(served):
    _, rr, server = served
    docs = docs_of(6, 2)
    task = "Rank documents about gold first"
    want = rr.rerank("slm markdown", docs, instruction=task)
    for key in ("instruction", "instruct"):
        status, body, _ = server.post("/rerank", {"query": "slm markdown", "documents": docs, key: task})
        assert status == 200, body
        assert_close([r["relevance_score"] for r in body["results"]], [r["relevance_score"] for r in want], 1e-5)
    plain = rr.rerank("slm markdown", docs)
    assert max(abs(a["relevance_score"] - b["relevance_score"]) for a, b in zip(want, plain)) > 1e-4


def test_concurrent_mixed_requests_get_their_scores_alone(served):
    _, rr, server = served
    requests = [(q, docs_of(n, seed), task) for seed, (q, n, task) in enumerate([
        ("slm markdown", 20, None), ("gold rush", 3, "Rank German first"), ("Paris", 9, None), ("数据", 1, None),
        ("web content", 14, "Prefer short documents"), ("capital of France", 6, None),
    ] * 3)]  # fmt: skip
    alone = [rr.compute_score([[q, d] for d in docs], instruction=task) for q, docs, task in requests]

    def call(req):
        q, docs, task = req
        body = {"query": q, "documents": docs, "return_documents": False}
        if task is not None:
            body["instruction"] = task
        status, out, _ = server.post("/v1/rerank", body)
        assert status == 200, out
        return [r["relevance_score"] for r in sorted(out["results"], key=lambda r: r["index"])]

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(call, requests))
    for scores, want in zip(got, alone):
        assert_close(scores, want, 1e-5)


def test_bad_requests(served):
    kind, _, server = served
    status, body, _ = server.post("/v1/rerank", {"query": "q", "documents": ["a", {"image": "data:image/png;base64,AAAA"}]})
    assert status == 400 and "documents[1]" in body["error"]["message"] and "text only" in body["error"]["message"]
    status, body, _ = server.post("/v1/rerank", {"query": "q", "documents": ["a"], "max_length": 10_000_000})
    assert status == 400 and "positions" in body["error"]["message"] and body["error"]["param"] == "max_length", body
    status, body, _ = server.post("/v1/rerank", {"query": "q", "documents": ["a"], "instruct": "<|rerank_token|>"})
    if kind == "jina-reranker-v3":
        assert status == 400 and body["error"]["param"] == "instruction", body
    else:
        assert status == 200, body
