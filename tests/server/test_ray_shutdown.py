"""`rerankd serve --ray` stops cleanly (issue 15): SIGTERM lets the requests in flight finish, Ctrl-C ends a
deployment that cannot start, and no Ray process outlives it. Its own module, so that no other Ray instance shares
the machine meanwhile."""

from __future__ import annotations

import signal
import threading
import time

import pytest

pytest.importorskip("ray.serve")

from rerankd.api.ray_serve import descendants  # noqa: E402

from .test_ray import ray_server, replica_pids, running  # noqa: E402


def test_sigterm_lets_the_requests_in_flight_finish(m0_dir):
    server = ray_server(m0_dir)
    results: list = []

    def send() -> None:  # about a second of work each on a replica's one thread: 4 a replica
        try:
            status = server.post("/v1/rerank", {"query": "q", "documents": ["gold rush " * 500] * 64}, timeout=60)[0]
            results.append((status, time.monotonic()))
        except Exception as e:  # noqa: BLE001
            results.append((repr(e), time.monotonic()))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    ray_processes = descendants(server.proc.pid)
    assert len(replica_pids(server)) == 2
    sent = time.monotonic()
    code = server.stop(timeout=90)
    for t in threads:
        t.join(60)
    assert code == 0 and [r for r, _ in results] == [200] * 8, (code, results, server.output[-3000:])
    assert max(t for _, t in results) > sent, "no request was still in flight at SIGTERM: the test proves nothing"
    assert time.monotonic() - sent < 60
    assert_gone(ray_processes)


def test_sigterm_as_soon_as_the_proxy_answers_is_a_graceful_stop(m0_dir):
    """/health answers through the proxy before serve.run is back in the driver: a SIGTERM then is a stop of a
    running application (drain, exit 0), not one before the replicas were up (exit 1); that was 2 of 2 before."""
    server = ray_server(m0_dir, "--log-level", "info")
    assert server.stop(timeout=90) == 0, server.output[-3000:]
    assert "letting requests in flight finish" in server.output
    assert "stopped before the replicas were up" not in server.output


def test_ctrl_c_ends_a_deployment_whose_replicas_cannot_be_placed(m0_dir):
    """Replicas asking for more CPUs than the cluster has wait for ever in Ray: Ctrl-C still ends it, quickly, and
    takes the local Ray down with it."""
    server = ray_server(m0_dir, "--replica-cpus", "1000", "--log-level", "info", healthy=False)
    deadline = time.monotonic() + 120
    while "deploying" not in server.output and time.monotonic() < deadline:
        assert server.proc.poll() is None, server.output[-3000:]
        time.sleep(0.5)
    time.sleep(3)  # the replica is pending now
    ray_processes = descendants(server.proc.pid)
    assert ray_processes
    start = time.monotonic()
    assert server.stop(signal.SIGINT, timeout=60) == 1 and time.monotonic() - start < 30, server.output[-3000:]
    assert "stopped before the replicas were up" in server.output
    assert_gone(ray_processes)


def assert_gone(pids: list[int]) -> None:
    """Every one of `pids` exits within 30 s (Ray's workers exit a moment after their raylet)."""
    deadline = time.monotonic() + 30
    while [pid for pid in pids if running(pid)] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in pids if running(pid)], "Ray's processes outlived rerankd serve --ray"
