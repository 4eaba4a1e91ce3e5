"""The scheduler and the server's failure paths, in process: merging, backpressure, cancellation, deadlines,
worker failures; and the SSRF rule for redirects."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from rerankd.config import ServeOptions
from rerankd.engine import Overloaded, Scheduler, WorkerError
from rerankd.errors import InputError
from rerankd.inputs import TextItem
from rerankd.inputs import urls
from rerankd.models.base import LengthOptions, Where
from rerankd.reranker import Reranker

from ..conftest import data_uri, encode, make_image

LENGTHS = LengthOptions(1024, 512)


class Died(BaseException):
    """Not an Exception: takes the worker loop itself down."""


class SlowBackend:
    """The tiny model's backend, slowed down, recording what reaches the model, failing on demand."""

    def __init__(self, inner, delay: float = 0.0, fail: BaseException | None = None):
        self.inner, self.delay, self.fail = inner, delay, fail
        self.batches: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, batch):
        time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        self.batches.append(len(batch))
        return self.inner.forward(batch)


def pairs(n: int, start: int = 0):
    return [(TextItem(f"query {i}"), TextItem(f"document {i} " + "gold " * (i % 9))) for i in range(start, start + n)]


def wheres(n: int):
    return [Where.for_document(i) for i in range(n)]


def test_concurrent_requests_are_merged_into_one_batch(m0):
    backend = SlowBackend(m0.backend)
    b = Scheduler(backend, max_batch_tokens=4096, max_batch_wait=0.2, max_queue_pairs=100)

    async def main():
        return await asyncio.gather(b.score(pairs(3), LENGTHS, wheres(3)), b.score(pairs(4, 3), LENGTHS, wheres(4)))

    one, two = asyncio.run(main())
    b.close()
    assert backend.batches == [7]
    alone = m0.compute_score([[q.text, d.text] for q, d in pairs(7)], activation=None)
    got = [r.logit for r in one.results + two.results]
    assert max(abs(a - g) for a, g in zip(alone, got)) < 1e-5
    assert one.tokens > 0 and two.tokens > 0


def test_a_full_queue_answers_overloaded_at_once(m0):
    b = Scheduler(SlowBackend(m0.backend, delay=0.3), 4096, 0.0, max_queue_pairs=4)

    async def main():
        first = asyncio.create_task(b.score(pairs(4), LENGTHS, wheres(4)))
        await asyncio.sleep(0.05)
        t = time.monotonic()
        with pytest.raises(Overloaded, match="4 pairs queued, this request adds 1, the limit is 4"):
            await b.score(pairs(1), LENGTHS, wheres(1))
        assert time.monotonic() - t < 0.1
        await first
        return await b.score(pairs(1), LENGTHS, wheres(1))  # room again

    assert len(asyncio.run(main()).results) == 1
    assert b.queued_pairs == 0
    b.close()


def test_a_cancelled_request_has_its_pairs_dropped(m0):
    backend = SlowBackend(m0.backend, delay=0.05)
    b = Scheduler(backend, max_batch_tokens=40, max_batch_wait=0.0, max_queue_pairs=1000)  # about a pair a batch

    async def main():
        task = asyncio.create_task(b.score(pairs(40), LENGTHS, wheres(40)))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert b.queued_pairs == 0
        await asyncio.sleep(0.3)
        return await b.score(pairs(2), LENGTHS, wheres(2))

    asyncio.run(main())
    b.close()
    assert sum(backend.batches) < 40 - 10  # most of the cancelled request never reached the model


def test_a_small_request_is_not_queued_behind_a_large_one(m0):
    """Fair queuing: a one-pair request that arrives while 300 pairs are queued is scored within a few batches,
    and the large request's preparation stays a few batches ahead of the model instead of running to the end."""
    backend = SlowBackend(m0.backend, delay=0.01)
    b = Scheduler(backend, max_batch_tokens=40, max_batch_wait=0.0, max_queue_pairs=1000, prepare_workers=2)

    async def main():
        large = asyncio.create_task(b.score(pairs(300), LENGTHS, wheres(300)))
        while len(backend.batches) < 5:
            await asyncio.sleep(0.01)
        job = next(iter(b._jobs))
        assert job.next_unit < 100, job.next_unit  # prepared a few batches ahead, not all 300
        before = len(backend.batches)
        await b.score(pairs(1, 1000), LENGTHS, wheres(1))
        waited = len(backend.batches) - before
        assert not large.done()
        await large
        return waited

    waited = asyncio.run(main())
    b.close()
    assert waited <= 6, f"the small request waited {waited} batches"


def test_bad_pairs_come_back_as_input_errors_and_the_rest_is_scored(m0):
    b = Scheduler(m0.backend, 4096, 0.0, 100)
    items = pairs(3)
    items[1] = (TextItem("q"), TextItem("the reserved token <|image_pad|> here"))

    async def main():
        return await b.score(items, LENGTHS, wheres(3))

    out = asyncio.run(main())
    b.close()
    assert isinstance(out.results[1], InputError) and "documents[1]" in str(out.results[1])
    assert all(not isinstance(out.results[i], InputError) for i in (0, 2))


def test_a_failing_forward_fails_its_requests_and_the_worker_lives_on(m0):
    backend = SlowBackend(m0.backend, fail=RuntimeError("CUDA error: out of memory"))
    b = Scheduler(backend, 4096, 0.0, 100)

    async def main():
        with pytest.raises(WorkerError, match="the model failed on a batch: RuntimeError: CUDA error: out of memory"):
            await b.score(pairs(2), LENGTHS, wheres(2))
        backend.fail = None
        return await b.score(pairs(2), LENGTHS, wheres(2))

    assert len(asyncio.run(main()).results) == 2 and b.alive
    b.close()


def wrapped(m0, backend) -> Reranker:
    """A Reranker around a wrapped backend."""
    return Reranker(backend, m0.model_dir, m0.options)


def test_a_dead_worker_fails_everyone_and_health_says_so(m0):
    backend = SlowBackend(m0.backend, delay=0.2, fail=Died("segfault-like"))
    app = create(m0, backend)
    with TestClient(app) as client:
        r = client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]})
        assert r.status_code == 503 and "the model worker died: Died: segfault-like" in r.json()["error"]["message"]
        h = client.get("/health")
        assert h.status_code == 503 and "not running" in h.json()["error"]["message"]
        r = client.post("/v1/rerank", json={"query": "q", "documents": ["a"]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"


def create(m0, backend, **options):
    from rerankd.api import create_app

    return create_app(wrapped(m0, backend), ServeOptions(**options), "tiny")


def test_deadline_gives_504_and_frees_the_queue(m0):
    backend = SlowBackend(m0.backend, delay=0.5)
    app = create(m0, backend, request_timeout=0.3)
    with TestClient(app) as client:
        r = client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b", "c"]})
        assert r.status_code == 504 and "limit of 0.3s" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "timeout_error"
        assert app.state.rerankd.scheduler.queued_pairs == 0


def test_overload_gives_429_with_retry_after(m0):
    backend = SlowBackend(m0.backend, delay=0.4)
    app = create(m0, backend, max_queue_pairs=3)
    with TestClient(app) as client:
        results = {}

        def big():
            results["big"] = client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b", "c"]})

        t = threading.Thread(target=big)
        t.start()
        deadline = time.monotonic() + 5
        while app.state.rerankd.scheduler.queued_pairs == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = client.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
        # an image query is not even decoded when the queue would refuse its request
        decoded = []
        backend.prepare_query = lambda *a: decoded.append(a) or backend.inner.prepare_query(*a)
        image_query = client.post("/v1/rerank", json={"query": {"image": data_uri(make_image(40, 30))},
                                                      "documents": ["d"]})  # fmt: skip
        t.join()
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert "the limit is 3" in r.json()["error"]["message"] and r.json()["error"]["type"] == "rate_limit_error"
        assert image_query.status_code == 429 and decoded == [], image_query.json()
        assert results["big"].status_code == 200
        assert client.post("/v1/rerank", json={"query": {"image": data_uri(make_image(40, 30))},
                                               "documents": ["d"]}).status_code == 200 and len(decoded) == 1  # fmt: skip


def test_text_only_models_refuse_images_with_400(tmp_path):
    from rerankd.api import create_app
    from rerankd.tiny import make_tiny_checkpoint

    rr = Reranker.from_pretrained(make_tiny_checkpoint("jina-reranker-v2", tmp_path / "v2"), show_progress=False)
    with TestClient(create_app(rr, ServeOptions(), "v2")) as client:
        r = client.post("/v1/rerank", json={"query": "q", "documents": ["a", {"image": "aGVsbG8="}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "documents[1]"
        assert "text only" in r.json()["error"]["message"]
        r = client.post("/v1/rerank", json={"query": "q", "documents": ["a " * 2000, "b"], "max_length": 64,
                                            "overlap": 8})  # fmt: skip
        assert r.status_code == 200 and r.json()["results"][0]["index"] in (0, 1)


# ------------------------------------------------------------------------------------------ SSRF and redirects


def _server(host: str, handler) -> http.server.ThreadingHTTPServer:
    srv = http.server.ThreadingHTTPServer((host, 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@contextlib.contextmanager
def image_and_redirect_servers():
    png = encode(make_image(30, 30, 1))

    class Image(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *a):
            pass

    image = _server("127.0.0.1", Image)
    target = f"http://127.0.0.1:{image.server_address[1]}/x.png"

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", target if self.path != "/loop" else "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    redirect = _server("127.0.0.2", Redirect)
    try:
        yield f"http://127.0.0.2:{redirect.server_address[1]}", target
    finally:
        image.shutdown()
        redirect.shutdown()


def test_redirects_are_checked_hop_by_hop(monkeypatch):
    # pretend 127.0.0.2 is a public host: it answers with a redirect to 127.0.0.1, which must be refused
    real = urls.is_public
    monkeypatch.setattr(urls, "is_public", lambda addr: str(addr) == "127.0.0.2" or real(addr))
    with image_and_redirect_servers() as (redirector, target):
        with pytest.raises(InputError, match="non-public address 127.0.0.1"):
            urls.fetch_url(redirector + "/to-private", 10**6, 5.0, False, "documents[0].image")
        with pytest.raises(InputError, match="more than 5 redirects"):
            urls.fetch_url(redirector + "/loop", 10**6, 5.0, False, "documents[0].image")
        data = urls.fetch_url(redirector + "/to-private", 10**6, 5.0, True, "documents[0].image")  # allowed
        assert data.startswith(b"\x89PNG")
        with pytest.raises(InputError, match=r"is \d+ bytes, over the limit of 100"):  # by Content-Length
            urls.fetch_url(target, 100, 5.0, True, "x")


@pytest.mark.parametrize("drip", ["head", "body"])
def test_a_server_that_drips_bytes_is_cut_at_the_fetch_timeout(drip):
    """Each byte arrives within the socket's timeout, so only a deadline over the whole fetch ends it: the head
    (status line and headers) or the body sent a byte every 0.1 s, 1 s allowed in all."""
    stop = threading.Event()

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
            data = (head + b"\x89PNG" + b"x" * 1000) if drip == "head" else head
            if drip == "body":
                self.wfile.write(head)
                self.wfile.flush()
                data = b"\x89PNG" + b"x" * 1000
            for i in range(len(data)):
                if stop.is_set():
                    return
                with contextlib.suppress(OSError):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                time.sleep(0.1)

        def log_message(self, *a):
            pass

    server = _server("127.0.0.1", Drip)
    try:
        start = time.monotonic()
        with pytest.raises(InputError, match="took longer than 1s"):
            urls.fetch_url(f"http://127.0.0.1:{server.server_address[1]}/x.png", 10**6, 1.0, True, "x")
        assert time.monotonic() - start < 2.5
    finally:
        stop.set()
        server.shutdown()


def test_non_http_urls_and_bad_hosts(monkeypatch):
    with pytest.raises(InputError, match="is not an http"):
        urls.fetch_url("ftp://example.com/a.png", 10, 1.0, True, "x")
    with pytest.raises(InputError, match="cannot resolve image host"):
        urls.fetch_url("http://no-such-host.invalid/a.png", 10, 1.0, True, "x")
    for addr in ("10.0.0.1", "169.254.169.254", "::1", "::ffff:127.0.0.1", "fd00::1", "0.0.0.0", "224.0.0.1", "fec0::1",
                 "ff02::1", "::ffff:239.1.1.1"):  # fmt: skip
        assert not urls.is_public(__import__("ipaddress").ip_address(addr)), addr
    assert urls.is_public(__import__("ipaddress").ip_address("8.8.8.8"))


def test_the_server_refuses_a_redirect_to_a_private_address(m0, monkeypatch):
    """Through the app: a 'public' host (127.0.0.2, by decree) redirecting to 127.0.0.1 gets a 400 naming the field."""
    real = urls.is_public
    monkeypatch.setattr(urls, "is_public", lambda addr: str(addr) == "127.0.0.2" or real(addr))
    with image_and_redirect_servers() as (redirector, target), TestClient(create(m0, SlowBackend(m0.backend))) as client:
        r = client.post("/v1/rerank", json={"query": "q", "documents": ["text", {"image": redirector + "/x"}]})
        assert r.status_code == 400, r.json()
        err = r.json()["error"]
        assert err["param"] == "documents[1].image" and "non-public address 127.0.0.1" in err["message"]
        r = client.post("/v1/rerank", json={"query": "q", "documents": [{"image": target}]})
        assert r.status_code == 400 and "non-public address 127.0.0.1" in r.json()["error"]["message"]
    # the server's policy travels with its calls; the same loaded model still trusts the library's caller
    with image_and_redirect_servers() as (redirector, target):
        assert len(m0.rerank("q", [{"image": target}])) == 1


def test_a_request_cancelled_as_ray_serve_cancels_it_counts_as_499(m0):
    """Ray Serve cancels a request whose client went away (the app sees no http.disconnect): that is the client
    closing (499), in the metrics and the access log, not a server error (500)."""
    from prometheus_client import generate_latest

    app = create(m0, m0.backend)
    body = json.dumps({"query": "q", "documents": ["a", "b"]}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/rerank", "raw_path": b"/v1/rerank", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}  # fmt: skip
    parts = [{"type": "http.request", "body": body[:5], "more_body": True}]

    async def receive():
        if parts:
            return parts.pop()
        await asyncio.sleep(3600)  # the rest of the body never comes

    async def send(message):
        raise AssertionError(f"nothing is answered to a cancelled request: {message}")

    async def cancelled():
        task = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    text = generate_latest(app.state.rerankd.metrics.registry).decode()
    assert 'rerankd_requests_total{route="/v1/rerank",status="499"} 1.0' in text, text
    assert 'status="500"' not in text
