"""What clients people already have send, against a real `rerankd serve` on loopback (issue 17): null optionals
(langchain-cohere), `detail` in error bodies (Jina clients), vLLM's max_tokens_per_doc / max_tokens_per_query,
several served model names, /rerank in the OpenAPI document, and sglang.bench_serving's flags on `rerankd bench`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rerankd import Reranker

from ..conftest import assert_close
from .conftest import Server

DOCS = ["Paris is the capital of France. " * 6, "gold rush merchants", "数据提取 " * 30]


@pytest.fixture(scope="module")
def named(m0_dir):
    s = Server(m0_dir, "--served-model-name", "jinaai/jina-reranker-m0", "rerank-v3.5", "jina-reranker-v1-base-en",
               "--max-batch-wait-ms", "5")  # fmt: skip
    yield s
    assert s.stop() == 0


def test_null_optionals_mean_their_defaults(named, m0):
    # langchain-cohere's body: every unset optional as null
    status, body, _ = named.post("/v2/rerank", {"model": "rerank-v3.5", "query": "capital", "documents": DOCS,
                                                "top_n": None, "max_tokens_per_doc": None, "return_documents": None,
                                                "rank_fields": None})  # fmt: skip
    assert status == 200, body
    assert "document" not in body["results"][0]  # return_documents: Cohere's default (false)
    want = m0.rerank("capital", DOCS, max_doc_length=4096, long_documents="truncate")
    assert_close([r["relevance_score"] for r in body["results"]], [r["relevance_score"] for r in want], 1e-5)
    status, body, _ = named.post("/v1/rerank", {"query": "capital", "documents": DOCS, "top_n": None, "overlap": None,
                                                "max_query_length": None, "long_documents": None})  # fmt: skip
    assert status == 200 and len(body["results"]) == 3, body
    status, body, _ = named.post("/v1/rerank", {"query": None, "documents": DOCS})  # a required field stays required
    assert status == 422 and body["error"]["param"] == "query", body


def test_errors_carry_detail_for_jina_clients(named):
    status, body, _ = named.post("/v1/rerank", {"query": "q", "documents": ["a"], "model": "nope"})
    assert status == 404 and body["detail"] == body["error"]["message"] and "rerank-v3.5" in body["detail"]
    status, body, _ = named.post("/v1/rerank", {"query": "q", "documents": 5})  # (a bare string is one document)
    assert status == 422 and body["detail"] == "documents: Input should be a valid list", body
    status, body, _ = named.get("/no/such/route")
    assert status == 404 and body["detail"] == "no route GET /no/such/route"


def test_vllms_max_tokens_fields(named, m0):
    status, body, _ = named.post("/rerank", {"query": "capital of France", "documents": DOCS,
                                             "max_tokens_per_doc": 12, "max_tokens_per_query": 2})  # fmt: skip
    assert status == 200, body
    want = m0.rerank("capital of France", DOCS, max_doc_length=12, max_query_length=2, long_documents="truncate")
    assert_close([r["relevance_score"] for r in body["results"]], [r["relevance_score"] for r in want], 1e-5)
    assert all("window" not in r for r in body["results"])  # cut, not windowed
    full = m0.rerank("capital of France", DOCS)
    assert max(abs(a["relevance_score"] - b["relevance_score"]) for a, b in zip(want, full)) > 1e-4


def test_every_served_name_is_answered_as_the_model(named):
    for name in ("jinaai/jina-reranker-m0", "rerank-v3.5", "jina-reranker-v1-base-en"):
        status, body, _ = named.post("/v1/rerank", {"model": name, "query": "q", "documents": ["a"]})
        assert status == 200 and body["model"] == "jinaai/jina-reranker-m0", body
    status, body, _ = named.get("/v1/models")
    assert [m["id"] for m in body["data"]] == ["jinaai/jina-reranker-m0", "rerank-v3.5", "jina-reranker-v1-base-en"]
    # Infinity's clients send "default/not-specified" when no model is named: the served one, as vLLM's ""
    for name in ("default/not-specified", ""):
        status, body, _ = named.post("/rerank", {"model": name, "query": "q", "documents": ["a"]})
        assert status == 200 and body["model"] == "jinaai/jina-reranker-m0", body


def test_openapi_describes_every_route_with_nullable_fields(named):
    status, spec, _ = named.get("/openapi.json")
    assert status == 200
    for path in ("/v1/rerank", "/rerank", "/v2/rerank", "/health", "/v1/models"):
        assert path in spec["paths"], path
    props = spec["components"]["schemas"]["RerankRequest"]["properties"]
    assert {"type": "null"} in props["top_n"]["anyOf"] and "max_tokens_per_doc" in props
    assert "detail" in spec["components"]["schemas"]["ErrorResponse"]["properties"]


def test_the_seeds_sglang_bench_command_runs_with_only_the_program_name_changed(named, tmp_path):
    port = named.url.rsplit(":", 1)[1]
    out = subprocess.run(
        [sys.executable, "-m", "rerankd", "bench", "--backend", "sglang", "--host", "127.0.0.1", "--port", port,
         "--dataset-name", "random", "--num-prompts", "6", "--random-input", "32", "--random-output", "1",
         "--max-concurrency", "3", "--docs-per-request", "2", "--no-progress", "--output-file", str(tmp_path / "o.json")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads((tmp_path / "o.json").read_text())
    assert result["completed"] == 6 and result["failed"] == 0 and result["settings"]["api"] == "sglang"
    clash = subprocess.run([sys.executable, "-m", "rerankd", "bench", "--backend", "sglang", "--api", "cohere"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert clash.returncode != 0 and "--backend sglang means --api sglang" in clash.stderr


def test_served_names_from_the_library_side(m0_dir):
    """create_app takes one name or several (the CLI passes what --served-model-name lists)."""
    from fastapi.testclient import TestClient

    from rerankd.api import create_app
    from rerankd.config import ServeOptions

    rr = Reranker.from_pretrained(m0_dir, show_progress=False)
    with TestClient(create_app(rr, ServeOptions(), ["a", "b"])) as client:
        r = client.post("/v1/rerank", json={"model": "b", "query": "q", "documents": ["d"]})
        assert r.status_code == 200 and r.json()["model"] == "a"
        assert client.post("/v1/rerank", json={"model": "c", "query": "q", "documents": ["d"]}).status_code == 404


def test_tei_request_shape_on_rerank(named, m0):
    texts = DOCS + ["short"]
    status, body, _ = named.post("/rerank", {"query": "capital", "texts": texts, "raw_scores": False,
                                             "return_text": True, "truncate": False})  # fmt: skip
    assert status == 200 and isinstance(body, list), body
    want = m0.rerank("capital", texts)
    assert [r["index"] for r in body] == [r["index"] for r in want]
    assert_close([r["score"] for r in body], [r["relevance_score"] for r in want], 1e-5)
    assert all(r["text"] == texts[r["index"]] for r in body) and set(body[0]) == {"index", "score", "text"}
    status, raw, _ = named.post("/rerank", {"query": "capital", "texts": texts, "raw_scores": True, "truncate": True})
    assert status == 200 and set(raw[0]) == {"index", "score"}
    logits = m0.rerank("capital", texts, activation=None, long_documents="truncate")
    assert_close([r["score"] for r in raw], [r["relevance_score"] for r in logits], 1e-5)
    status, body, _ = named.post("/rerank", {"query": "q", "texts": ["a"], "truncation_direction": "Left"})
    assert status == 422 and "truncation_direction" in body["detail"], body


def test_cohere_v1_object_documents_with_rank_fields(named, m0):
    docs = [{"title": "France", "content": "Paris is the capital"}, {"title": "Gold", "content": "merchants"}]
    status, body, _ = named.post("/v1/rerank", {"query": "capital", "documents": docs, "rank_fields": ["content"]})
    assert status == 200, body
    by_index = {r["index"]: r for r in body["results"]}
    assert by_index[0]["document"] == docs[0]  # echoed as sent
    want = m0.rerank("capital", ["Paris is the capital", "merchants"])
    assert_close([by_index[r["index"]]["relevance_score"] for r in want], [r["relevance_score"] for r in want], 1e-5)
    status, body, _ = named.post("/v1/rerank", {"query": "capital", "documents": docs, "rank_fields": ["title", "content"]})
    want = m0.rerank("capital", ["title: France\ncontent: Paris is the capital", "title: Gold\ncontent: merchants"])
    assert_close(sorted(r["relevance_score"] for r in body["results"]), sorted(r["relevance_score"] for r in want), 1e-5)
    status, body, _ = named.post("/v1/rerank", {"query": "capital", "documents": docs})
    assert status == 400 and body["error"]["param"] == "documents[0]" and "rank_fields" in body["detail"], body
    status, body, _ = named.post("/v1/rerank", {"query": "q", "documents": docs, "rank_fields": ["author"]})
    assert status == 400 and "has none of the rank_fields" in body["detail"], body


def test_the_cohere_sdk_unchanged(named, m0):
    """The cohere SDK's documented calls, pointed at rerankd (`base_url`): ClientV2, Client (v1), and both async."""
    import asyncio

    cohere = pytest.importorskip("cohere")
    want = m0.rerank("capital", DOCS, max_doc_length=4096, long_documents="truncate", top_n=2)
    v2 = cohere.ClientV2(api_key="unused", base_url=named.url)
    got = v2.rerank(model="rerank-v3.5", query="capital", documents=DOCS, top_n=2)
    assert [r.index for r in got.results] == [r["index"] for r in want]
    assert_close([r.relevance_score for r in got.results], [r["relevance_score"] for r in want], 1e-5)
    v1 = cohere.Client(api_key="unused", base_url=named.url)
    got1 = v1.rerank(model="rerank-v3.5", query="capital", documents=DOCS, top_n=2, return_documents=True)
    assert [r.index for r in got1.results] == [r["index"] for r in m0.rerank("capital", DOCS, top_n=2)]
    assert got1.results[0].document.text == DOCS[got1.results[0].index]

    async def both_async():
        a2 = await cohere.AsyncClientV2(api_key="unused", base_url=named.url).rerank(
            model="rerank-v3.5", query="capital", documents=DOCS, top_n=2)
        a1 = await cohere.AsyncClient(api_key="unused", base_url=named.url).rerank(
            model="rerank-v3.5", query="capital", documents=DOCS, top_n=2)
        return a2, a1

    a2, a1 = asyncio.run(both_async())
    assert [r.index for r in a2.results] == [r.index for r in got.results] and len(a1.results) == 2


def test_a_bad_rerank_body_is_answered_in_its_own_shapes_terms(named):
    status, body, _ = named.post("/rerank", {"query": "q", "documents": ["a"], "top_n": -1})
    assert status == 422 and body["error"]["param"] == "top_n" and "texts" not in body["detail"], body
    status, body, _ = named.post("/rerank", {"query": "q", "texts": ["a"], "truncation_direction": "Left"})
    assert status == 422 and body["error"]["param"] == "truncation_direction" and "documents" not in body["detail"], body


def test_bench_reads_sglangs_flag_spellings():
    import argparse

    from rerankd.bench import add_arguments, resolve_server

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--backend", "sglang", "--host", "[::1]", "--port", "30001", "--random-input-len", "64",
                         "--random-output-len", "1", "--dataset-path", "q.jsonl", "--disable-tqdm"])  # fmt: skip
    resolve_server(args)
    assert (args.base_url, args.api, args.random_input, args.dataset, args.no_progress) == (
        "http://[::1]:30001", "sglang", 64, "q.jsonl", True)
    args = p.parse_args(["--base-url", "http://h:1", "--port", "2"])
    resolve_server(args)
    assert args.base_url == "http://h:1" and args.api == "rerankd"  # --base-url wins, as in sglang.bench_serving


def test_sglangs_answer_on_v1_rerank_when_asked(m0_dir, m0):
    s = Server(m0_dir, "--v1-rerank-response", "sglang")
    try:
        # SGLang's documented client: iterate the answer, read item['score'] and item['document']
        status, body, _ = s.post("/v1/rerank", {"query": "capital", "documents": DOCS, "instruct": None})
        assert status == 200 and isinstance(body, list), body
        want = m0.rerank("capital", DOCS)
        assert [item["index"] for item in body] == [r["index"] for r in want]  # best first
        assert_close([item["score"] for item in body], [r["relevance_score"] for r in want], 1e-5)
        assert [item["document"] for item in body] == [DOCS[r["index"]] for r in want]
        assert all(set(item) == {"score", "document", "index"} for item in body)  # no window: not SGLang's shape
        status, body, _ = s.post("/v1/rerank", {"query": "capital", "documents": DOCS, "top_n": 2,
                                                "return_documents": False})  # fmt: skip
        assert status == 200 and [set(item) for item in body] == [{"score", "index"}] * 2, body
        parts = [[{"type": "text", "text": "gold rush merchants"}], {"text": "an object", "id": 7}]
        status, body, _ = s.post("/v1/rerank", {"query": "capital", "documents": parts})
        assert status == 200 and {item["index"]: item["document"] for item in body} == \
            {0: "gold rush merchants", 1: {"text": "an object", "id": 7}}, body  # fmt: skip
        status, body, _ = s.post("/rerank", {"query": "capital", "documents": DOCS})  # vLLM's route keeps its shape
        assert status == 200 and len(body["results"]) == 3, body
        status, body, _ = s.post("/v1/rerank", {"query": "q", "documents": 5})  # errors keep the error shape
        assert status == 422 and body["error"]["param"] == "documents", body
    finally:
        assert s.stop() == 0
