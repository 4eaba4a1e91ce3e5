"""Issue 18's load checks on a real server over loopback: a large request does not stall the others (stall test),
and a few thousand mixed text/image requests at concurrency 32 get no 5xx, the same scores for a fixed probe
throughout, and bounded memory (soak). Every loop is bounded in count and time."""

from __future__ import annotations

import base64
import io
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from ..conftest import data_uri, make_image
from .conftest import Server

SMALL = {"query": "gold rush", "documents": ["gold rush merchants", "the Paris metro"]}
PROBE = {"query": "where did the merchants go", "documents": ["gold rush merchants in California", "Paris, France",
                                                              "a harbour full of ships"], "return_documents": False}  # fmt: skip
STALL_BOUND_S = 1.5  # a small request's latency while the large one runs (measured: about 0.12 s, Zen 5, 2 cores)
SOAK_REQUESTS = 2000
SOAK_RSS_GROWTH_MB = 600  # the server's resident memory may grow by this much over the soak. Measured (Zen 5): 330-375
# MB over the first 2,000 requests, then 40-90 MB per further 2,000, slowing down; no Python object accumulates
# (tracemalloc), about a third is oneDNN's primitive cache (an entry per batch shape, at most 1024)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.fixture(scope="module")
def busy_server(m0_dir):
    s = Server(m0_dir, "--max-documents", "1000", "--request-timeout", "300", "--max-batch-wait-ms", "5")
    yield s
    assert s.stop() == 0


def test_a_large_request_does_not_stall_the_others(busy_server):
    """200 documents of 225 windows each (about 45k windows, several seconds of work) do not hold back a
    2-document request sent while they run: before fair queuing the first one waited 8.5 s, now about 0.12 s."""
    doc = "gold rush merchants Paris France " * 300
    large = {"query": "q", "documents": [doc] * 200, "max_doc_length": 16, "overlap": 0}
    answer: dict = {}

    def run_large():
        answer["status"] = busy_server.post("/v1/rerank", large, timeout=300)[0]

    thread = threading.Thread(target=run_large)
    thread.start()
    time.sleep(0.5)
    latencies = []
    for _ in range(8):
        start = time.monotonic()
        status, body, _ = busy_server.post("/v1/rerank", SMALL, timeout=60)
        latencies.append(time.monotonic() - start)
        assert status == 200, body
    still_running = thread.is_alive()
    thread.join(300)
    assert answer.get("status") == 200, answer
    assert still_running, "the large request ended before the small ones: make it larger, or the test shows nothing"
    assert max(latencies) < STALL_BOUND_S, [round(t, 3) for t in latencies]


def test_bodies_that_would_parse_huge_are_refused_without_blocking_the_others(busy_server):
    """The probe's 48 MB body of empty objects (+1.28 GB once parsed; three at once held /health for 2.1 s) is now
    counted before it is parsed, off the event loop: 413 naming --max-json-values, and /health answers meanwhile
    (measured, Zen 5: /health at most 0.64 s and server RSS +65 MB; before, 15.7 s and +2.45 GB)."""
    body = b'{"query":"q","documents":["a"],"ignored":[' + b"{}," * 16_000_000 + b"{}]}"
    rss_before = rss_mb(busy_server.proc.pid)
    answers: list = []
    senders = [threading.Thread(target=lambda: answers.append(busy_server.post("/v1/rerank", body, timeout=120)))
               for _ in range(3)]  # fmt: skip
    for t in senders:
        t.start()
    health = []
    while any(t.is_alive() for t in senders) and len(health) < 2000:
        start = time.monotonic()
        assert busy_server.get("/health")[0] == 200
        health.append(time.monotonic() - start)
        time.sleep(0.02)
    for t in senders:
        t.join(120)
    peak = rss_mb(busy_server.proc.pid) - rss_before
    print(f"/health while 3 x 48 MB bodies: max {max(health):.3f} s over {len(health)} calls; RSS +{peak:.0f} MB")
    assert [a[0] for a in answers] == [413] * 3, [a[1] for a in answers]
    assert all("--max-json-values" in a[1]["detail"] for a in answers)
    assert max(health) < 2.0, max(health)  # measured 0.64 s (Zen 5); 15.7 s before


def test_soak_mixed_text_and_image_requests(busy_server):
    rng = random.Random(0)
    images = [data_uri(make_image(rng.randint(20, 90), rng.randint(20, 90), seed)) for seed in range(8)]
    words = "gold rush merchants Paris France harbour ships river bank market price stock".split()

    def request(k: int) -> dict:
        if k % 50 == 0:
            return PROBE
        r = random.Random(k)
        docs = [{"image": r.choice(images)} if r.random() < 0.25 else " ".join(r.choices(words, k=r.randint(2, 60)))
                for _ in range(r.randint(1, 8))]  # fmt: skip
        return {"query": " ".join(r.choices(words, k=r.randint(1, 6))), "documents": docs}

    status, first, _ = busy_server.post("/v1/rerank", PROBE)
    assert status == 200, first
    probe = {r["index"]: r["relevance_score"] for r in first["results"]}
    rss_before = rss_mb(busy_server.proc.pid)

    def send(k: int) -> tuple[int, int, dict]:
        status, body, _ = busy_server.post("/v1/rerank", request(k), timeout=120)
        return k, status, body

    deadline = time.monotonic() + 600
    drift, statuses = 0.0, {}
    with ThreadPoolExecutor(32) as pool:
        for k, status, body in pool.map(send, range(SOAK_REQUESTS)):
            assert time.monotonic() < deadline, "the soak ran past 10 minutes"
            statuses[status] = statuses.get(status, 0) + 1
            assert status < 500, (k, status, body)
            if k % 50 == 0:
                drift = max(drift, *(abs(r["relevance_score"] - probe[r["index"]]) for r in body["results"]))
    rss_after = rss_mb(busy_server.proc.pid)
    print(f"soak: {statuses}, probe drift {drift:.2e}, RSS {rss_before:.0f} -> {rss_after:.0f} MB")
    assert statuses == {200: SOAK_REQUESTS}, statuses
    # fp32 scores do not depend on their batch beyond the last bits of a float32 (measured: 0 and 1.2e-7 in two runs);
    # the bound is tests/test_batch_invariance.py's
    assert drift <= 1e-5, drift
    assert rss_after - rss_before < SOAK_RSS_GROWTH_MB, (rss_before, rss_after)


def test_huge_text_documents_neither_stall_nor_swell_the_server(m0_dir):
    """Issue 18's large documents. Two 16 MB documents to truncate (before: the whole of each was tokenized under
    Python's lock, 100 s and +7.5 GB for two of 32 MB, every other client stalled) are cut from a prefix; a 5 MB
    document over the window limit is refused from a prefix; a 2 MB run of CJK characters (no space to cut at) is
    tokenized whole, but with the lock released. Meanwhile small requests and /health answer promptly."""
    words = "gold rush merchants Paris France harbour ships river bank market price stock ".split()
    big = " ".join(words[i % len(words)] + str(i % 997) for i in range(1_700_000))  # ~16 MB
    cjk = "数据提取绿茶富含儿茶素" * 200_000  # 2.2 M characters, no spaces
    server = Server(m0_dir)
    try:
        base = rss_mb(server.proc.pid)
        out: dict = {}

        def send(key: str, body: dict) -> None:
            start = time.monotonic()
            status, got, _ = server.post("/v1/rerank", body, timeout=120)
            out[key] = (status, time.monotonic() - start, got)

        heavy = [("trunc0", {"query": "q", "documents": [big], "long_documents": "truncate"}),
                 ("trunc1", {"query": "q", "documents": [big], "long_documents": "truncate"}),
                 ("windows", {"query": "q", "documents": ["short", big[:5_000_000]], "max_doc_length": 16, "overlap": 0}),
                 ("cjk", {"query": "q", "documents": [cjk], "max_doc_length": 16, "overlap": 0})]  # fmt: skip
        threads = [threading.Thread(target=send, args=item) for item in heavy]
        for t in threads:
            t.start()
        small, peak = [], base
        while any(t.is_alive() for t in threads) and len(small) < 200:
            start = time.monotonic()
            status, _, _ = server.post("/v1/rerank", SMALL, timeout=60)
            health, _, _ = server.get("/health")
            small.append((status, health, time.monotonic() - start))
            peak = max(peak, rss_mb(server.proc.pid))
            time.sleep(0.05)
        for t in threads:
            t.join(120)
        assert out["trunc0"][0] == out["trunc1"][0] == 200 and max(out["trunc0"][1], out["trunc1"][1]) < 20, out
        assert out["windows"][0] == 400 and out["windows"][1] < 20, out["windows"]
        assert "over the limit of 256 windows a document" in out["windows"][2]["detail"]
        assert out["windows"][2]["error"]["param"] == "documents[1]"
        assert out["cjk"][0] == 400 and "windows" in out["cjk"][2]["detail"], out["cjk"]
        assert small and all(s == 200 and h == 200 for s, h, _ in small), small
        # a small request and /health one after the other: 0.97 s at most measured (Intel Xeon, 2 cores), the CJK text's
        # millions of token ids turned into Python lists under the lock; 3 s leaves room for a loaded CI machine
        assert max(t for _, _, t in small) < 3, small
        assert peak - base < 1500, (base, peak)  # measured +710 MB, most of it the CJK text's whole encoding
    finally:
        assert server.stop() == 0


def test_a_request_of_decompression_bombs_leaves_a_preparer_to_the_others(m0_dir):
    """Issue 18: a 10 KB PNG can declare 36 M pixels (0.4 s and +140 MB to decode); a request of 16 of them used to
    hold every preparer in turn, and a small request sent meanwhile waited for all of them (14.7 s for 30 bombs of
    81 M pixels). Now a job holds at most all but one preparer while another waits: the small one waits for one
    decode at most. Decoded bytes stay within --max-decoded-bytes."""
    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, "PNG", optimize=True)
    bomb = {"image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}
    server = Server(m0_dir, "--max-decoded-bytes", str(400 << 20))
    try:
        base = rss_mb(server.proc.pid)
        out: dict = {}

        def send() -> None:
            start = time.monotonic()
            status, _, _ = server.post("/v1/rerank", {"query": "q", "documents": [bomb] * 16}, timeout=120)
            out["bombs"] = (status, time.monotonic() - start)

        thread = threading.Thread(target=send)
        thread.start()
        time.sleep(0.5)
        small, peak = [], base
        while thread.is_alive() and len(small) < 100:
            start = time.monotonic()
            status, _, _ = server.post("/v1/rerank", SMALL, timeout=60)
            small.append((status, time.monotonic() - start))
            peak = max(peak, rss_mb(server.proc.pid))
        thread.join(120)
        assert out["bombs"][0] == 200 and len(small) >= 2, (out, small)
        assert all(s == 200 for s, _ in small) and max(t for _, t in small) < 2.5, small  # measured 0.12-0.72 s
        assert peak - base < 1200, (base, peak)
    finally:
        assert server.stop() == 0
