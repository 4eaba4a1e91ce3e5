"""`rerankd bench` against a live tiny-model server and against stub servers of every supported API."""

from __future__ import annotations

import contextlib
import http.server
import json
import random
import subprocess
import sys
import threading
import time

import pytest

from rerankd.bench.apis import APIS
from rerankd.bench.workload import TokenCounter, random_workload


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rerankd", "bench", "--no-progress", *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_random_documents_have_the_asked_token_counts(m0_dir):
    counter = TokenCounter(str(m0_dir))
    reqs = random_workload(5, 6, 40, 0.5, 8, 0, (8, 8), counter, seed=1)
    for r in reqs:
        assert len(r.documents) == 6 and counter.count(r.query) == 8
        for d in r.documents:
            assert 20 <= counter.count(d) <= 40
    assert reqs == random_workload(5, 6, 40, 0.5, 8, 0, (8, 8), counter, seed=1)  # --seed repeats the workload
    assert reqs != random_workload(5, 6, 40, 0.5, 8, 0, (8, 8), counter, seed=2)


def test_against_a_live_server(server, tmp_path, m0_dir):
    out = tmp_path / "out.json"
    r = bench("--base-url", server.url, "--num-prompts", "12", "--docs-per-request", "4", "--random-input", "24",
              "--random-range-ratio", "0.5", "--max-concurrency", "4", "--output-file", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    assert "pairs/s" in r.stdout and f"token counts: {m0_dir}" in r.stderr  # the served model's own tokenizer
    res = json.loads(out.read_text())
    assert res["completed"] == 12 and res["failed"] == 0 and res["completed"] + res["failed"] == 12
    assert res["pairs_per_s"] == pytest.approx(4 * res["requests_per_s"], rel=1e-9)
    assert res["requests_per_s"] == pytest.approx(12 / res["duration_s"], rel=1e-9)
    assert res["input_tokens_per_s"] > res["pairs_per_s"] * 12
    # the server's own count adds m0's prompt around each pair to the documents' and queries' text
    assert res["server_tokens_per_s"] > res["input_tokens_per_s"]
    assert "server-counted tokens/s:" in r.stdout
    lat = res["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] and lat["mean"] > 0
    assert res["settings"]["num_prompts"] == 12 and res["settings"]["model_sent"] == "jinaai/jina-reranker-m0"


def test_sweep_with_plot_and_images(server, tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    r = bench("--base-url", server.url, "--num-prompts", "6", "--docs-per-request", "3", "--random-input", "16",
              "--image-docs", "1", "--image-size", "32x32", "--sweep-concurrency", "1,3", "--output-file", str(out),
              "--plot", str(png))  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    res = json.loads(out.read_text())
    assert [s["max_concurrency"] for s in res["sweep"]] == [1, 3]
    for s in res["sweep"]:
        assert s["completed"] == 6 and s["pairs_per_s"] == pytest.approx(3 * s["requests_per_s"], rel=1e-9)
        # the client counts text only; the server counts each image's tokens too (a 32x32 image: at least 4)
        assert s["server_tokens_per_s"] > s["input_tokens_per_s"] + 4 * s["requests_per_s"]
    assert res["completed"] == 12 and res["failed"] == 0
    assert png.read_bytes().startswith(b"\x89PNG")


# ------------------------------------------------------------------------------------------ stub servers


RESPONSES = {  # what each API answers for n documents
    "/v1/rerank": lambda n: {"results": [{"index": i, "relevance_score": 0.5} for i in range(n)]},
    "/v2/rerank": lambda n: {"id": "x", "results": [{"index": i, "relevance_score": 0.5} for i in range(n)]},
    "/rerank": lambda n: {"results": [{"index": i, "relevance_score": 0.5} for i in range(n)]},
}
BARE = lambda n: [{"index": i, "score": 0.5} for i in range(n)]  # noqa: E731  TEI, SGLang
SHAPES = {  # api -> (path, required body keys, the documents' key, response)
    "rerankd": ("/v1/rerank", {"query", "documents", "model"}, "documents", RESPONSES["/v1/rerank"]),
    "jina": ("/v1/rerank", {"query", "documents", "model"}, "documents", RESPONSES["/v1/rerank"]),
    "cohere": ("/v2/rerank", {"query", "documents", "model"}, "documents", RESPONSES["/v2/rerank"]),
    "vllm": ("/rerank", {"query", "documents", "model"}, "documents", RESPONSES["/rerank"]),
    "tei": ("/rerank", {"query", "texts"}, "texts", BARE),
    "sglang": ("/v1/rerank", {"query", "documents"}, "documents", BARE),
    "infinity": ("/rerank", {"query", "documents", "model"}, "documents", RESPONSES["/rerank"]),
}


@contextlib.contextmanager
def stub(api: str, fail_every: int = 0, wrong_body: bool = False, delay: float = 0.0):
    path, keys, docs_key, respond = SHAPES[api]
    seen = {"n": 0, "bad": [], "in_flight": 0, "most_in_flight": 0}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  /v1/models
            self._send(200, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                seen["n"] += 1
                n = seen["n"]
            problems = []
            if self.path != path:
                problems.append(f"path {self.path}")
            if not keys <= set(body):
                problems.append(f"missing {keys - set(body)}")
            docs = body.get(docs_key)
            objects_ok = api in ("rerankd", "jina")  # Jina's shape also takes {"text"} / {"image"} documents
            ok_doc = lambda d: isinstance(d, str) or objects_ok and isinstance(d, dict) and len(d) == 1 and (  # noqa: E731
                set(d) <= {"text", "image"})
            if not isinstance(docs, list) or not all(ok_doc(d) for d in docs) or not ok_doc(body.get("query")):
                problems.append("documents/query are not of the API's types")
            if problems:
                seen["bad"].append(problems)
                return self._send(422, {"error": {"message": "; ".join(problems)}})
            if fail_every and n % fail_every == 0:
                return self._send(503, {"error": {"message": f"overloaded, request {n}"}})
            with lock:
                seen["in_flight"] += 1
                seen["most_in_flight"] = max(seen["most_in_flight"], seen["in_flight"])
            time.sleep(delay)
            with lock:
                seen["in_flight"] -= 1
            self._send(200, {} if wrong_body else respond(len(docs)))

        def _send(self, status, obj):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", seen
    finally:
        srv.shutdown()


@pytest.mark.parametrize("api", sorted(APIS))
def test_each_api_schema_against_a_stub(api, tmp_path):
    out = tmp_path / "out.json"
    with stub(api) as (url, seen):
        r = bench("--base-url", url, "--api", api, "--num-prompts", "5", "--docs-per-request", "3", "--random-input",
                  "10", "--max-concurrency", "2", "--output-file", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    assert seen["bad"] == [] and seen["n"] == 6  # one warm-up request, not counted
    res = json.loads(out.read_text())
    assert res["completed"] == 5 and res["failed"] == 0
    assert res["server_tokens_per_s"] is None  # the stubs' answers carry no usage


def test_failures_are_counted_with_their_status_and_message(tmp_path):
    out = tmp_path / "out.json"
    with stub("rerankd", fail_every=3) as (url, _):
        r = bench("--base-url", url, "--num-prompts", "9", "--docs-per-request", "2", "--random-input", "8",
                  "--max-concurrency", "1", "--warmup-requests", "0", "--output-file", str(out))  # fmt: skip
    assert r.returncode == 1  # failures make the exit code non-zero
    res = json.loads(out.read_text())
    assert res["completed"] == 6 and res["failed"] == 3 and res["completed"] + res["failed"] == 9
    assert res["failures"]["503"]["count"] == 3 and res["failures"]["503"]["first_error"] == "overloaded, request 3"
    assert res["pairs_per_s"] == pytest.approx(2 * res["requests_per_s"], rel=1e-9)  # successes only
    assert "failed with HTTP 503: 3, first error: overloaded, request 3" in r.stdout


def test_a_wrong_response_shape_is_a_failure_and_no_server_is_status_0(tmp_path):
    out = tmp_path / "out.json"
    with stub("tei", wrong_body=True) as (url, _):
        r = bench("--base-url", url, "--api", "tei", "--num-prompts", "2", "--random-input", "8", "--output-file", str(out))
    res = json.loads(out.read_text())
    assert r.returncode == 1 and res["failed"] == 2 and "unexpected response body" in res["failures"]["200"]["first_error"]
    port = random.randint(20000, 30000)
    r = bench("--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "2", "--random-input", "8", "--timeout", "5",
              "--output-file", str(out))  # fmt: skip
    res = json.loads(out.read_text())
    assert r.returncode == 1 and res["failures"]["0"]["count"] == 2 and "Connect" in res["failures"]["0"]["first_error"]


def test_an_open_loop_counts_latency_from_each_scheduled_arrival(tmp_path):
    """At a --request-rate, requests are not capped by default (an open loop), and where a cap makes them wait, the
    wait is latency: 8 requests arriving at once-ish on a server that takes 0.2 s each, one at a time, cannot all be
    answered within 0.3 s of their arrival (coordinated omission would report 0.2 s for every one)."""
    out = tmp_path / "out.json"
    with stub("rerankd", delay=0.2) as (url, seen):
        r = bench("--base-url", url, "--num-prompts", "8", "--docs-per-request", "2", "--random-input", "8",
                  "--request-rate", "1000", "--output-file", str(out))  # fmt: skip
        assert r.returncode == 0, r.stderr + r.stdout
        assert seen["most_in_flight"] >= 6  # not capped: all of them in flight together
        res = json.loads(out.read_text())
        assert res["settings"]["max_concurrency"] is None and res["latency_ms"]["p99"] < 600
        r = bench("--base-url", url, "--num-prompts", "8", "--docs-per-request", "2", "--random-input", "8",
                  "--request-rate", "1000", "--max-concurrency", "1", "--output-file", str(out))  # fmt: skip
    res = json.loads(out.read_text())
    assert res["latency_ms"]["p50"] > 600 and res["latency_ms"]["p99"] > 1400, res["latency_ms"]  # queued, counted


def test_no_answer_at_all_is_null_latency_in_valid_json(tmp_path):
    out = tmp_path / "out.json"
    r = bench("--base-url", "http://127.0.0.1:1", "--num-prompts", "2", "--random-input", "8", "--timeout", "5",
              "--output-file", str(out))  # fmt: skip
    assert r.returncode == 1 and "NaN" not in out.read_text()
    assert json.loads(out.read_text())["latency_ms"] == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert "latency ms mean/p50/p90/p99: n/a / n/a / n/a / n/a" in r.stdout


def test_dataset_file_and_bad_options(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"query": "q", "documents": ["a", "b", {"text": "c"}]}) + "\n")
    with stub("rerankd") as (url, seen):
        r = bench("--base-url", url, "--dataset", str(data), "--num-prompts", "4", "--output-file", str(tmp_path / "o.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o.json").read_text())["pairs_per_s"] > 0
    r = bench("--base-url", "http://127.0.0.1:1", "--api", "cohere", "--image-docs", "1")
    assert r.returncode != 0 and "takes text documents only" in r.stderr
    (tmp_path / "bad.jsonl").write_text('{"query": "q"}\n')
    r = bench("--base-url", "http://127.0.0.1:1", "--dataset", str(tmp_path / "bad.jsonl"))
    assert r.returncode != 0 and "bad.jsonl:1: need a JSON object with 'query' and 'documents'" in r.stderr


def test_timeout_bounds_a_whole_request_not_each_read(tmp_path):
    """A server that trickles its answer (a byte every 0.2 s) never trips a per-read timeout; --timeout 1 ends
    each request after 1 s in all, as a failure with no answer."""

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(15):
                try:
                    self.wfile.write(b" ")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    out = tmp_path / "out.json"
    try:
        r = bench("--base-url", f"http://127.0.0.1:{srv.server_address[1]}", "--model", "m", "--num-prompts", "2",
                  "--random-input", "8", "--timeout", "1", "--warmup-requests", "0", "--output-file", str(out))  # fmt: skip
    finally:
        srv.shutdown()
    res = json.loads(out.read_text())
    assert r.returncode == 1 and res["failures"]["0"]["count"] == 2, res
    assert res["failures"]["0"]["first_error"] == "no answer within 1s (--timeout)"
    assert res["duration_s"] < 2.5


def test_a_concurrency_below_one_is_refused():
    r = bench("--base-url", "http://127.0.0.1:1", "--max-concurrency", "0")
    assert r.returncode != 0 and "--max-concurrency must be >= 1" in r.stderr
