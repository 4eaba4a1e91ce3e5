"""The server over real HTTP on loopback: the clients people have, limits, auth, metrics, shutdown."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import re
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from ..conftest import assert_close, data_uri, encode, make_image
from .conftest import Server

SEED_CLIENT = '''
import requests

# Define query and documents to rerank
query = "What is the capital of France?"
documents = [
    "Paris is the capital and most populous city of France.",
    "Berlin is the capital of Germany.",
    "London is the capital of the United Kingdom.",
    "Madrid is the capital of Spain.",
    "Rome is the capital of Italy."
]

# Call the rerank API
response = requests.post(
    "http://localhost:30000/v1/rerank",
    json={
        "model": "jinaai/jina-reranker-m0",
        "query": query,
        "documents": documents,
        "top_n": 5,
        "return_documents": True
    }
)

results = response.json()

print("Ranked Documents:")
for result in results["results"]:
    idx = result["index"]
    score = result["relevance_score"]
    doc = result["document"]["text"]
    print(f"{idx + 1}. [Score: {score:.4f}] {doc}")
'''  # the serving guide's section 4.1, as given


@pytest.fixture(scope="module")
def local(m0):
    return m0


def test_the_serving_guides_client_runs_unchanged(server, local):
    code = SEED_CLIENT.replace("localhost:30000", f"localhost:{server.port}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "Ranked Documents:" and len(lines) == 6
    docs = ["Paris is the capital and most populous city of France.", "Berlin is the capital of Germany.",
            "London is the capital of the United Kingdom.", "Madrid is the capital of Spain.",
            "Rome is the capital of Italy."]  # fmt: skip
    expected = local.rerank("What is the capital of France?", docs, top_n=5)
    assert lines[1:] == [f"{r['index'] + 1}. [Score: {r['relevance_score']:.4f}] {docs[r['index']]}" for r in expected]


def test_jina_request_with_mixed_text_and_base64_images(server, local):
    img1, img2 = make_image(120, 80, 1), make_image(64, 200, 2)
    docs = [
        "a text document",
        {"text": "another one, as an object"},
        {"image": base64.b64encode(encode(img1)).decode()},  # bare base64
        {"image": data_uri(img2, "JPEG")},
    ]
    status, body, _ = server.post("/v1/rerank", {"model": "jinaai/jina-reranker-m0", "query": "slm markdown",
                                                 "documents": docs, "top_n": 3})  # fmt: skip
    assert status == 200, body
    assert body["model"] == "jinaai/jina-reranker-m0" and body["id"].startswith("rerank-")
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] > 20
    expected = local.rerank("slm markdown", docs, top_n=3)
    assert [r["index"] for r in body["results"]] == [r["index"] for r in expected]
    assert_close([r["relevance_score"] for r in body["results"]], [r["relevance_score"] for r in expected], 1e-5)
    for r in body["results"]:
        d = docs[r["index"]]
        assert r["document"] == ({"text": d} if isinstance(d, str) else d)
    status, body, _ = server.post("/rerank", {"query": "slm markdown", "documents": docs, "return_documents": False})
    assert status == 200 and len(body["results"]) == 4 and all("document" not in r for r in body["results"])


def test_image_query(server, local):
    q = {"image": data_uri(make_image(90, 90, 7))}
    docs = ["some text", {"image": data_uri(make_image(50, 120, 8))}]
    status, body, _ = server.post("/v1/rerank", {"query": q, "documents": docs})
    assert status == 200, body
    expected = local.rerank(q, docs)
    assert_close([r["relevance_score"] for r in body["results"]], [r["relevance_score"] for r in expected], 1e-5)


def scores_of(body) -> list[float]:
    """A rerank answer's scores in document order."""
    return [r["relevance_score"] for r in sorted(body["results"], key=lambda r: r["index"])]


def test_vllm_and_sglang_content_parts(server, local):
    """vLLM's multimodal shapes (its jina-reranker-m0 example: documents as one {"content": [parts]}, one document a
    part; a query as {"content": [part]}) and SGLang's (a document as a list of parts) score as rerankd's own."""
    uri = data_uri(make_image(70, 90, 9))
    text_part, image_part = {"type": "text", "text": "slm markdown"}, {"type": "image_url", "image_url": {"url": uri}}
    status, body, _ = server.post("/rerank", {"query": "q", "documents": {"content": [text_part, image_part]}})
    assert status == 200, body
    assert_close(scores_of(body), [r["relevance_score"] for r in sorted(local.rerank("q", ["slm markdown", {"image": uri}]),
                                                                       key=lambda r: r["index"])], 1e-5)  # fmt: skip
    echoed = {r["index"]: r["document"] for r in body["results"]}
    assert echoed == {0: {"text": "slm markdown"}, 1: {"multi_modal": [image_part]}}  # as vLLM echoes them
    docs = ["some text", [image_part], [text_part], {"content": [text_part]}]  # SGLang's and vLLM's, in a list
    status, body, _ = server.post("/v1/rerank", {"query": {"content": [image_part]}, "documents": docs})
    assert status == 200, body
    expected = local.rerank({"image": uri}, ["some text", {"image": uri}, "slm markdown", "slm markdown"])
    assert_close(scores_of(body), [r["relevance_score"] for r in sorted(expected, key=lambda r: r["index"])], 1e-5)
    status, body, _ = server.post("/rerank", {"query": "q", "documents": "one document"})  # vLLM: a bare string
    assert status == 200 and [r["document"] for r in body["results"]] == [{"text": "one document"}], body


def test_vllm_request_fields(server, local):
    """top_n 0 (vLLM's default) is all; use_activation false / raw_scores give the logits; "" names the served model;
    truncate_prompt_tokens cuts pairs; a document's null fields are echoed as sent."""
    docs = ["Paris is the capital of France.", "gold rush " * 60, "Berlin"]
    want = {r["index"]: r["relevance_score"] for r in local.rerank("capital", docs)}
    status, body, _ = server.post("/rerank", {"model": "", "query": "capital", "documents": docs, "top_n": 0})
    assert status == 200 and len(body["results"]) == 3, body
    logits = {r["index"]: r["relevance_score"] for r in local.rerank("capital", docs, activation=None)}
    for raw in ({"use_activation": False}, {"activation": False}, {"raw_scores": True}):
        status, body, _ = server.post("/v1/rerank", {"query": "capital", "documents": docs, **raw})
        assert_close(scores_of(body), [logits[i] for i in range(3)], 1e-5)
    assert max(abs(logits[i] - want[i]) for i in range(3)) > 0.1  # logits, not scores
    status, body, _ = server.post("/rerank", {"query": "capital", "documents": docs, "truncate_prompt_tokens": 20})
    cut = local.rerank("capital", docs, max_length=20, long_documents="truncate")
    assert_close(scores_of(body), [r["relevance_score"] for r in sorted(cut, key=lambda r: r["index"])], 1e-5)
    assert all("window" not in r for r in body["results"])
    status, body, _ = server.post("/v1/rerank", {"query": "q", "documents": [{"text": "a", "id": None, "tags": [None]}]})
    assert body["results"][0]["document"] == {"text": "a", "id": None, "tags": [None]}


def test_vllm_score_api(server, local):
    """/score and /v1/score: pairs 1:N and N:N under each of vLLM's field names, in order, with vLLM's answer."""
    docs = ["Paris is the capital of France.", "Berlin", "gold rush"]
    one_to_n = local.compute_score([["capital", d] for d in docs])
    for names in (("queries", "documents"), ("text_1", "text_2"), ("data_1", "data_2"), ("queries", "items")):
        status, body, _ = server.post("/score", {names[0]: "capital", names[1]: docs})
        assert status == 200, body
        assert [d["index"] for d in body["data"]] == [0, 1, 2] and {d["object"] for d in body["data"]} == {"score"}
        assert_close([d["score"] for d in body["data"]], one_to_n, 1e-5)
    assert body["object"] == "list" and body["model"] == "jinaai/jina-reranker-m0" and body["id"].startswith("score-")
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    queries = ["capital", "city", "mining"]
    status, body, _ = server.post("/v1/score", {"text_1": queries, "text_2": docs, "use_activation": False})
    n_to_n = local.compute_score([[q, d] for q, d in zip(queries, docs)], activation=None)
    assert_close([d["score"] for d in body["data"]], n_to_n, 1e-5)
    uri = data_uri(make_image(40, 60, 3))
    status, body, _ = server.post("/score", {"queries": "q", "documents": {"content": [
        {"type": "text", "text": "Berlin"}, {"type": "image_url", "image_url": {"url": uri}}]}})  # fmt: skip
    assert_close([d["score"] for d in body["data"]], local.compute_score([["q", "Berlin"], ["q", {"image": uri}]]), 1e-5)


def test_cohere_v2(server, local):
    docs = ["Carson City is the capital city of the American state of Nevada.", "Washington, D.C. is the capital.",
            "Capitalization in English grammar", "word " * 300]  # fmt: skip
    status, body, _ = server.post("/v2/rerank", {"model": "jinaai/jina-reranker-m0", "query": "capital of the US",
                                                 "documents": docs, "top_n": 3, "max_tokens_per_doc": 50})  # fmt: skip
    assert status == 200, body
    assert len(body["results"]) == 3 and all("document" not in r for r in body["results"])  # default false
    assert body["meta"]["api_version"]["version"] == "2" and body["meta"]["tokens"]["input_tokens"] > 0
    assert body["model"] == "jinaai/jina-reranker-m0" and body["usage"]["total_tokens"] == body["meta"]["tokens"]["input_tokens"]
    expected = local.rerank("capital of the US", docs, top_n=3, max_doc_length=50, long_documents="truncate")
    assert [r["index"] for r in body["results"]] == [r["index"] for r in expected]
    assert_close([r["relevance_score"] for r in body["results"]], [r["relevance_score"] for r in expected], 1e-5)
    status, body, _ = server.post("/v2/rerank", {"query": "q", "documents": ["a"], "return_documents": True})
    assert body["results"][0]["document"] == {"text": "a"}


def test_32_concurrent_clients_get_the_scores_they_get_alone(server):
    requests_ = [
        {"query": f"query {i}", "documents": [f"document {j} " + "gold rush " * (i * j % 40) for j in range(1 + i % 7)]}
        for i in range(32)
    ]
    alone = [server.post("/v1/rerank", r)[1] for r in requests_]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda r: server.post("/v1/rerank", r)[1], requests_))
    for a, t in zip(alone, together):
        assert [r["index"] for r in a["results"]] == [r["index"] for r in t["results"]]
        assert_close([r["relevance_score"] for r in t["results"]], [r["relevance_score"] for r in a["results"]], 1e-5)


def test_long_documents_are_windowed_over_http(server, local):
    doc = " ".join(f"word{i % 50}" for i in range(900))
    status, body, _ = server.post("/v1/rerank", {"query": "q", "documents": ["short", doc], "max_length": 200,
                                                 "overlap": 20})  # fmt: skip
    assert status == 200, body
    res = {r["index"]: r for r in body["results"]}
    assert res[1]["window"]["count"] > 1 and "window" not in res[0]
    [expected] = [r for r in local.rerank("q", ["short", doc], max_length=200, overlap=20) if r["index"] == 1]
    assert res[1]["window"] == expected["window"]
    assert_close([res[1]["relevance_score"]], [expected["relevance_score"]], 1e-5)


# ------------------------------------------------------------------------------------------ errors and limits


def error_of(status_body, status: int, *fragments: str, param: str | None = None):
    got_status, body, _ = status_body
    assert got_status == status, body
    assert set(body) == {"error", "detail"} and set(body["error"]) == {"message", "type", "param"}, body
    for f in fragments:
        assert f in body["error"]["message"], body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body


def test_bad_input_gets_clear_json_errors(server, media_dir):
    post = server.post
    error_of(post("/v1/rerank", {"model": "other", "query": "q", "documents": ["d"]}), 404,
             "model 'other' is not served here", "jinaai/jina-reranker-m0", param="model")  # fmt: skip
    error_of(post("/v1/rerank", {"query": "q", "documents": ["d"] * 65}), 413, "65 documents", "limit of 64",
             param="documents")  # fmt: skip
    error_of(post("/v1/rerank", b"x" * 3_000_001), 413, "over the limit of 3000000 bytes")
    error_of(post("/v1/rerank", b"{not json"), 400, "not valid JSON")
    error_of(post("/v1/rerank", {"query": "q"}), 422, "documents: Field required", param="documents")
    error_of(post("/v1/rerank", {"query": "q", "documents": ["a", 5]}), 422, "documents[1]", param="documents[1]")
    error_of(post("/v1/rerank", {"query": "q", "documents": [{"text": "a", "image": "b"}]}), 422,
             'give one of "text" or "image", not both')  # fmt: skip
    error_of(post("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": -1}), 422, "top_n", param="top_n")
    error_of(post("/v1/rerank", {"query": "q", "documents": {"text": "a"}}), 422, "documents: Input should be a valid "
             "list", param="documents")  # fmt: skip
    error_of(post("/v1/rerank", {"query": "q", "documents": [[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]]}),
             400, "give one content part (a text or an image) an input, not 2", param="documents[0]")  # fmt: skip
    error_of(post("/v1/rerank", {"query": "q", "documents": {"content": [{"type": "video_url", "video_url": {"url": "x"}}]}}),
             400, "a content part must be", "got type 'video_url'", param="documents[0].content[0]")  # fmt: skip
    error_of(post("/score", {"queries": ["a", "b"], "documents": ["c", "d", "e"]}), 400,
             "2 queries and 3 documents: pair them 1:1, 1:N or N:N", param="documents")  # fmt: skip
    error_of(post("/score", {"text_1": "a"}), 422, "documents: Field required")
    error_of(post("/v1/rerank", {"query": "q", "documents": ["a"], "long_documents": "x"}), 422, "long_documents")
    error_of(post("/v1/rerank", {"query": "q", "documents": ["a", {"image": "bm90IGFuIGltYWdlIGF0IGFsbA=="}]}), 400,
             "documents[1].image: not a PNG/JPEG", param="documents[1].image")  # fmt: skip
    error_of(post("/v1/rerank", {"query": {"image": "not-an-image-at-all!"}, "documents": ["a"]}), 400, "query.image")
    big = Image.new("RGB", (2100, 2000), (200, 10, 10))  # 4.2 MP > 4 MP, a small file
    error_of(post("/v1/rerank", {"query": "q", "documents": [{"image": data_uri(big, "PNG")}]}), 400,
             "over the limit of 4000000", param="documents[0].image")  # fmt: skip
    noisy = base64.b64encode(bytes(range(256)) * 4000).decode()  # 1 MB of bytes > 1,000,000
    error_of(post("/v1/rerank", {"query": "q", "documents": [{"image": noisy}]}), 400, "over the limit of 1000000")
    error_of(post("/v1/rerank", {"query": "q", "documents": [{"image": "file:///etc/passwd"}]}), 400,
             "documents[0].image")  # fmt: skip
    error_of(post("/v1/rerank", {"query": "q", "documents": [{"image": __file__}]}), 400,
             "no readable image file at this path in the folder the server allows")  # fmt: skip
    error_of(server.get("/nope"), 404, "no route GET /nope")
    error_of(server.get("/v1/rerank"), 405)


def test_local_files_beneath_the_allowed_folder(server, media_dir, local):
    path = media_dir / "page.png"
    make_image(80, 60, 4).save(path)
    status, body, _ = server.post("/v1/rerank", {"query": "q", "documents": [{"image": str(path)}]})
    assert status == 200, body
    assert_close([body["results"][0]["relevance_score"]], [local.rerank("q", [{"image": str(path)}])[0]["relevance_score"]],
                 1e-5)  # fmt: skip


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        data = encode(make_image(40, 40, 5))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def image_server(host: str = "127.0.0.1"):
    srv = http.server.ThreadingHTTPServer((host, 0), _ImageHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://{host}:{srv.server_address[1]}/img.png"
    finally:
        srv.shutdown()


def test_urls_to_private_addresses_are_refused(server, m0_dir):
    with image_server() as url:
        error_of(server.post("/v1/rerank", {"query": "q", "documents": [{"image": url}]}), 400,
                 "resolves to the non-public address 127.0.0.1", param="documents[0].image")  # fmt: skip
        localhost_url = url.replace("127.0.0.1", "localhost")
        error_of(server.post("/v1/rerank", {"query": "q", "documents": [{"image": localhost_url}]}), 400,
                 "non-public address")  # fmt: skip
        # the same URL is fetched when the operator allows private addresses
        open_server = Server(m0_dir, "--allow-private-urls", "--skip-warmup")
        try:
            status, body, _ = open_server.post("/v1/rerank", {"query": "q", "documents": [{"image": url}]})
            assert status == 200, body
        finally:
            assert open_server.stop() == 0


def test_auth(m0_dir):
    s = Server(m0_dir, "--skip-warmup", env={"RERANKD_API_KEY": "s3cret"})
    try:
        assert s.get("/health")[0] == 200  # no key needed
        body = error_of(s.post("/v1/rerank", {"query": "q", "documents": ["d"]}), 401, "no Authorization header")
        assert body["error"]["type"] == "authentication_error"
        error_of(s.post("/v1/rerank", {"query": "q", "documents": ["d"]}, {"Authorization": "Bearer nope"}), 401,
                 "a wrong API key")  # fmt: skip
        error_of(s.get("/metrics"), 401)
        error_of(s.get("/docs"), 401)
        ok = {"Authorization": "Bearer s3cret"}
        assert s.post("/v1/rerank", {"query": "q", "documents": ["d"]}, ok)[0] == 200
        assert s.get("/v1/models", ok)[0] == 200 and s.get("/docs", ok)[0] == 200
    finally:
        assert s.stop() == 0


def test_health_models_metrics_openapi(server):
    status, body, _ = server.get("/health")
    assert status == 200 and body["status"] == "ok"
    status, body, _ = server.get("/v1/models")
    assert status == 200 and body["data"][0]["id"] == "jinaai/jina-reranker-m0" and body["object"] == "list"
    server.post("/v1/rerank", {"query": "q", "documents": ["a", "b", "c"]})
    server.post("/v1/rerank", {"query": "q"})  # a 422
    status, text, headers = server.get("/metrics")
    assert status == 200 and {k.lower(): v for k, v in headers.items()}["content-type"].startswith("text/plain")
    metrics = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            metrics[name] = float(value)
    assert metrics['rerankd_requests_total{route="/v1/rerank",status="200"}'] >= 1
    assert metrics['rerankd_requests_total{route="/v1/rerank",status="422"}'] >= 1
    assert metrics["rerankd_pairs_total"] >= 3 and metrics["rerankd_tokens_total"] > 10
    assert metrics["rerankd_batch_sequences_count"] >= 1 and metrics["rerankd_batch_tokens_sum"] > 10
    assert metrics["rerankd_queue_wait_seconds_count"] >= 3 and metrics["rerankd_model_seconds_count"] >= 1
    assert "rerankd_queue_pairs" in metrics and metrics["rerankd_worker_up"] == 1.0
    assert metrics["rerankd_queue_tokens"] == 0.0  # all answered: nothing admitted is left
    # the time of answers apart from that of refusals; the process's own memory and descriptors
    assert metrics['rerankd_request_seconds_count{route="/v1/rerank",status="200"}'] >= 1
    assert metrics['rerankd_request_seconds_count{route="/v1/rerank",status="422"}'] >= 1
    assert metrics["process_resident_memory_bytes"] > 1e6
    assert 0 < metrics["process_open_fds"] < metrics["process_max_fds"]
    status, spec, _ = server.get("/openapi.json")
    assert status == 200 and {"/v1/rerank", "/v2/rerank", "/health"} <= set(spec["paths"])
    assert server.get("/docs")[0] == 200


def queued_pairs(s: Server) -> float:
    return s.metric("rerankd_queue_pairs")


def test_sigterm_finishes_requests_in_flight_and_exits_0(m0_dir):
    s = Server(m0_dir, "--skip-warmup", "--max-batch-tokens", "64")  # one sequence a batch: slow on purpose
    docs = ["gold rush merchants " * 30 + str(i) for i in range(60)]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(s.post, "/v1/rerank", {"query": f"q{i}", "documents": docs}) for i in range(4)]
        deadline = time.monotonic() + 30
        while queued_pairs(s) == 0 and time.monotonic() < deadline:  # wait until the requests are in the server
            time.sleep(0.01)
        assert queued_pairs(s) > 0
        s.proc.send_signal(signal.SIGTERM)
        results = [f.result() for f in futures]
    assert s.proc.wait(60) == 0
    assert all(status == 200 and len(body["results"]) == 60 for status, body, _ in results), [r[:2] for r in results]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", s.port), timeout=1)


def test_a_client_that_disconnects_has_its_pairs_dropped(m0_dir):
    s = Server(m0_dir, "--skip-warmup", "--max-batch-tokens", "64")  # one sequence a batch: slow on purpose
    try:
        docs = ["gold rush merchants " * 30 + str(i) for i in range(600)]
        body = json.dumps({"query": "q", "documents": docs}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
        deadline = time.monotonic() + 30
        while queued_pairs(s) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        sock.close()  # gone before the answer
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = s.get("/metrics")[1]
            if 'rerankd_requests_total{route="/v1/rerank",status="499"} 1.0' in text:
                break
            time.sleep(0.2)
        assert 'status="499"' in text
        queue = [ln for ln in text.splitlines() if ln.startswith("rerankd_queue_pairs ")]
        assert queue == ["rerankd_queue_pairs 0.0"]
        scored = [ln for ln in text.splitlines() if ln.startswith("rerankd_batch_sequences_sum")]
        assert float(scored[0].split()[-1]) < 600  # not all of its pairs reached the model
        assert s.post("/v1/rerank", {"query": "q", "documents": ["still serving"]})[0] == 200
    finally:
        assert s.stop() == 0


def test_fuzzed_requests_never_get_5xx(server):
    """Property-based: arbitrary JSON bodies and near-valid requests never get a 5xx nor take the server down."""
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30)
    json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                               max_leaves=12)  # fmt: skip
    doc = st.text(max_size=40) | st.fixed_dictionaries({"text": st.text(max_size=40)}) | st.fixed_dictionaries(
        {"image": st.text(max_size=40)}) | json_values  # fmt: skip
    near_valid = st.fixed_dictionaries(
        {"query": doc, "documents": st.lists(doc, max_size=5)},
        optional={"model": st.text(max_size=10) | st.just("jinaai/jina-reranker-m0"), "top_n": scalars,
                  "return_documents": scalars, "max_length": st.integers(-5, 20000) | scalars,
                  "max_query_length": st.integers(-5, 600) | scalars, "max_doc_length": st.integers(-5, 600) | scalars,
                  "long_documents": st.sampled_from(["chunk", "truncate", "x"]), "overlap": st.integers(-5, 300)},
    )  # fmt: skip
    cohere = st.fixed_dictionaries({"query": scalars, "documents": st.lists(scalars, max_size=4)},
                                   optional={"top_n": scalars, "max_tokens_per_doc": st.integers(-3, 100)})  # fmt: skip
    part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"])},
                                 optional={"text": scalars, "image_url": scalars | st.fixed_dictionaries({"url": scalars})})
    content = st.fixed_dictionaries({"content": st.lists(part | json_values, max_size=3)})
    inputs = doc | content | st.lists(part, max_size=2) | st.lists(doc | content, max_size=4)
    vllm = st.fixed_dictionaries({"query": inputs, "documents": inputs},
                                 optional={"top_n": scalars, "use_activation": scalars, "truncate_prompt_tokens": scalars})
    names = st.sampled_from([("queries", "documents"), ("queries", "items"), ("text_1", "text_2"), ("data_1", "data_2")])
    extra = st.dictionaries(st.sampled_from(["use_activation", "truncate_prompt_tokens"]), scalars | st.integers(-3, 40),
                            max_size=2)  # fmt: skip
    score = st.tuples(names, inputs, inputs, extra).map(lambda t: {t[0][0]: t[1], t[0][1]: t[2], **t[3]})

    @settings(max_examples=160, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.sampled_from(["/v1/rerank", "/rerank", "/v2/rerank", "/score"]), near_valid | cohere | vllm | score | json_values)
    def check(path, body):
        status, answer, _ = server.post(path, body)
        assert status < 500, (path, body, answer)
        ok = "data" if path == "/score" else "results"
        assert isinstance(answer, dict) and (ok in answer or "error" in answer), answer

    check()
    assert server.get("/health")[0] == 200


def test_a_dead_model_worker_stops_the_server_with_exit_status_1(m0_dir, tmp_path):
    """A sticky device fault kills the worker: every request would get 503 from then on, so the server stops (exit
    status 1) for its supervisor to restart it. The fault is injected by a sitecustomize module in the server's
    process: its model's forward raises CUDA's illegal-address error."""
    (tmp_path / "sitecustomize.py").write_text(
        "from rerankd.models import jina_m0\n"
        "def forward(self, batch):\n"
        "    raise RuntimeError('CUDA error: an illegal memory access was encountered')\n"
        "jina_m0.JinaM0Backend.forward = forward\n"
    )  # fmt: skip
    s = Server(m0_dir, "--skip-warmup", env={"PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"})
    try:
        status, body, _ = s.post("/v1/rerank", {"query": "q", "documents": ["d"]})
        assert status in (500, 503) and "illegal memory access" in body["error"]["message"], body
        assert s.proc.wait(30) == 1
    finally:
        s.stop()
    assert "the model worker is not running" in s.output and "for its supervisor to restart it" in s.output, s.output


def test_access_log_lines_and_the_request_id(m0_dir):
    """One rerankd.access line a request (client, method, route, status, seconds, pairs and tokens, the client's
    X-Request-Id), the id echoed; probes that answer fine only at DEBUG; no uvicorn access line besides."""
    s = Server(m0_dir, "--skip-warmup", "--log-level", "info")
    try:
        status, body, headers = s.post("/v1/rerank", {"query": "q", "documents": ["a", "b"]},
                                       headers={"X-Request-Id": "trace-42"})  # fmt: skip
        assert status == 200 and {k.lower(): v for k, v in headers.items()}["x-request-id"] == "trace-42"
        status, _, headers = s.post("/v1/rerank", {"query": "q"}, headers={"X-Request-Id": "bad id forged"})
        assert status == 422 and "x-request-id" not in {k.lower() for k in headers}  # not echoed, not logged
        assert s.get("/health")[0] == 200
        tokens = body["usage"]["total_tokens"]
        deadline = time.monotonic() + 10
        while "422" not in s.output and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        assert s.stop() == 0
    lines = [ln for ln in s.output.splitlines() if "rerankd.access" in ln]
    assert len(lines) == 2, s.output
    assert re.search(rf'rerankd\.access: 127\.0\.0\.1:\d+ "POST /v1/rerank" 200 \d+\.\d{{3}}s pairs=2 tokens={tokens} '
                     r'request_id=trace-42$', lines[0]), lines[0]  # fmt: skip
    assert re.search(r'"POST /v1/rerank" 422 \d+\.\d{3}s$', lines[1]), lines[1]
    assert "forged" not in s.output and "GET /health" not in s.output and '"POST /v1/rerank HTTP/1.1"' not in s.output
