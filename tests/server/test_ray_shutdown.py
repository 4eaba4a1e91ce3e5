"""`rerankd serve --ray` stops cleanly (issue 15): SIGTERM lets the requests in flight finish, Ctrl-C ends a
deployment that cannot start, and no Ray process outlives it. Its own module, so that no other Ray instance shares
the machine meanwhile."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("ray.serve")

from .conftest import free_port  # noqa: E402
from .test_ray import descendants, ray_server, replica_pids, running  # noqa: E402


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
    deadline = time.monotonic() + 30  # Ray's workers exit a moment after their raylet
    while [pid for pid in ray_processes if running(pid)] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in ray_processes if running(pid)], "Ray's processes outlived rerankd serve --ray"


def test_ctrl_c_ends_a_deployment_whose_replicas_cannot_be_placed(m0_dir):
    """Replicas asking for more CPUs than the cluster has wait for ever in Ray: Ctrl-C still ends it, quickly, and
    takes the local Ray down with it."""
    cmd = [sys.executable, "-m", "rerankd", "serve", "--ray", "--model", str(m0_dir), "--port", str(free_port()),
           "--replica-cpus", "1000", "--log-level", "info", "--no-show-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("deploying" in line for line in lines) and time.monotonic() < deadline:
            assert proc.poll() is None, "".join(lines)[-3000:]
            time.sleep(0.5)
        time.sleep(3)  # the replica is pending now
        ray_processes = descendants(proc.pid)
        assert ray_processes
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 1 and time.monotonic() - start < 30, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
    assert any("stopped before the replicas were up" in line for line in lines)
    deadline = time.monotonic() + 30
    while [pid for pid in ray_processes if running(pid)] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in ray_processes if running(pid)], "Ray's processes outlived rerankd serve --ray"
