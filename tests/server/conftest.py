"""A real `rerankd serve` process on loopback, on a tiny checkpoint."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, *args: str, env: dict | None = None, preexec_fn=None, healthy: bool = True):
        """Start it; with `healthy` (the default), wait until /health answers 200 (120 s at most)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "rerankd", "serve", "--model", str(model_dir), "--port", str(self.port),
               "--no-show-progress", "--log-level", "warning", *args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)  # fmt: skip
        # read the server's output as it comes: a full pipe would block the server's logging, and its event loop
        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()
        if not healthy:
            return
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.reader.join(5)
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become healthy in 120 s")

    @property
    def output(self) -> str:
        """The last 400 lines the server printed."""
        return "".join(self.lines)

    def post(self, path: str, body, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})  # fmt: skip
        return _send(req, timeout)

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict | str, dict]:
        return _send(urllib.request.Request(self.url + path, headers=headers or {}), 30)

    def metric(self, series: str) -> float:
        """The value /metrics gives one series (its name and labels as written there), 0 when it is not there."""
        text = self.get("/metrics")[1]
        return float(next((ln.split()[-1] for ln in text.splitlines() if ln.startswith(series + " ")), 0))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(10)  # everything the server printed is in `output`
        return self.proc.returncode


def _send(req: urllib.request.Request, timeout: float):
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, headers = r.read(), r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, status, headers = e.read(), e.code, dict(e.headers)
    text = raw.decode()
    try:
        return status, json.loads(text), headers
    except json.JSONDecodeError:
        return status, text, headers


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def server(m0_dir, media_dir):
    s = Server(m0_dir, "--served-model-name", "jinaai/jina-reranker-m0", "--max-documents", "64",
               "--max-request-bytes", "3000000", "--allowed-local-media-path", str(media_dir),
               "--max-image-bytes", "1000000", "--max-image-pixels", "4000000", "--max-batch-wait-ms", "20")  # fmt: skip
    yield s
    assert s.stop() == 0
