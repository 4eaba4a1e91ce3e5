"""`rerankd serve --ray` (issue 15): the same app behind Ray Serve's proxy, on a local Ray instance over loopback,
two replicas of the tiny m0 checkpoint (one CPU each). Scores equal the single-process server's; requests spread
over the replicas; a replica killed mid-load is replaced while the other answers, and every client gets a 200 or a
JSON error; SIGTERM lets requests in flight finish. Every loop is bounded in count and time."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

import yaml  # noqa: E402 (Ray's dependency)

from rerankd import Reranker  # noqa: E402
from rerankd.api import create_app  # noqa: E402
from rerankd.api.ray_proxy import JsonErrorsMiddleware  # noqa: E402
from rerankd.api.ray_serve import (Rerankd, _answering, build, children, deployment_options, descendants,  # noqa: E402
                                   ray_system_processes, set_idle, system_priority)
from rerankd.config import LoadOptions, RayOptions, ServeOptions  # noqa: E402

from .conftest import Server  # noqa: E402

NAME = "jinaai/jina-reranker-m0"
SEED_REQUEST = {  # the seed document's client request (shared/seeds/000), unchanged
    "model": NAME,
    "query": "What is the capital of France?",
    "documents": ["Paris is the capital and most populous city of France.", "Berlin is the capital of Germany.",
                  "London is the capital of the United Kingdom."],  # fmt: skip
    "top_n": 5,
    "return_documents": True,
}
REPO = Path(__file__).resolve().parents[2]


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def replica_pids(server: Server) -> list[int]:
    pids = []
    for pid in descendants(server.proc.pid):
        try:
            if b"ServeReplica:rerankd:Rerankd" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return sorted(pids)


def ray_server(m0_dir, *args: str, healthy: bool = True) -> Server:
    """`rerankd serve --ray` with 2 one-CPU replicas; later `args` override these."""
    return Server(m0_dir, "--ray", "--num-replicas", "2", "--replica-cpus", "1", "--served-model-name", NAME,
                  "--max-batch-wait-ms", "20", *args, env={"RAY_USAGE_STATS_ENABLED": "0"}, healthy=healthy)  # fmt: skip


@pytest.fixture(scope="module")
def on_ray(m0_dir):
    s = ray_server(m0_dir, "--max-queue-pairs", "64", "--ray-system-priority", "idle")
    yield s
    assert s.stop() == 0, s.output[-3000:]


def test_the_seed_request_and_the_cohere_route_score_as_the_single_process_server(on_ray, server):
    status, via_ray, headers = on_ray.post("/v1/rerank", SEED_REQUEST)
    assert status == 200, via_ray
    _, direct, _ = server.post("/v1/rerank", SEED_REQUEST)
    assert [r["index"] for r in via_ray["results"]] == [r["index"] for r in direct["results"]]
    assert [r["document"] for r in via_ray["results"]] == [r["document"] for r in direct["results"]]
    for a, b in zip(via_ray["results"], direct["results"]):
        assert a["relevance_score"] == pytest.approx(b["relevance_score"], abs=1e-5)
    assert via_ray["model"] == NAME and headers.get("x-rerankd-replica")

    cohere = {"model": NAME, "query": SEED_REQUEST["query"], "documents": SEED_REQUEST["documents"], "top_n": 2}
    status, via_ray, _ = on_ray.post("/v2/rerank", cohere)
    assert status == 200, via_ray
    _, direct, _ = server.post("/v2/rerank", cohere)
    assert [r["index"] for r in via_ray["results"]] == [r["index"] for r in direct["results"]]
    for a, b in zip(via_ray["results"], direct["results"]):
        assert a["relevance_score"] == pytest.approx(b["relevance_score"], abs=1e-5)


def test_the_apps_own_answers_pass_through_the_proxy(on_ray):
    status, body, headers = on_ray.post("/v1/rerank", {"query": "q", "documents": 5})
    assert status == 422 and body["error"]["param"], body
    status, body, _ = on_ray.post("/v1/rerank", {"model": "other", "query": "q", "documents": ["a"]})
    assert status == 404 and "not served here" in body["error"]["message"]
    status, body, _ = on_ray.get("/health")
    assert status == 200 and body["status"] == "ok"
    status, text, headers = on_ray.get("/metrics")
    replica = headers.get("x-rerankd-replica")
    assert status == 200 and replica, headers
    # every series names the replica that answered the scrape (each replica's counters stay apart)
    for series in ("rerankd_queue_pairs", "rerankd_pairs_total"):
        assert f'{series}{{replica="{replica}"}}' in text, text
    assert all('replica="' in ln for ln in text.splitlines() if ln.startswith("rerankd_requests_total{")), text


def test_requests_spread_over_both_replicas_and_backpressure_stays_visible(on_ray):
    replicas: Counter = Counter()
    refused = []

    def send(docs: int, text: str = "gold rush") -> None:
        status, body, headers = on_ray.post("/v1/rerank", {"query": "q", "documents": [text] * docs})
        if status == 200:
            replicas[headers["x-rerankd-replica"]] += 1
        else:
            refused.append((status, body, headers))

    deadline = time.monotonic() + 60  # the proxy learns of a replica a moment after it is up
    while len(replicas) < 2 and time.monotonic() < deadline:
        threads = [threading.Thread(target=send, args=(1,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(replicas) == 2 and not refused, (replicas, refused)

    # a burst past the replicas' queues (--max-queue-pairs 64), released at once: the replica's own 429 reaches the
    # client as it is
    together = threading.Barrier(12, timeout=30)

    def send_together() -> None:
        together.wait()
        send(48, "gold rush " * 60)

    threads = [threading.Thread(target=send_together) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert refused and all(s == 429 and b["error"]["type"] and h.get("retry-after") for s, b, h in refused), refused


def test_a_killed_replica_is_replaced_while_the_other_answers(on_ray):
    before = replica_pids(on_ray)
    assert len(before) == 2, before
    outcomes: Counter = Counter()
    bad: list = []
    stop = time.monotonic() + 12

    def client() -> None:
        for _ in range(1000):
            if time.monotonic() > stop:
                return
            try:
                status, body, _ = on_ray.post("/v1/rerank", {"query": "q", "documents": ["gold rush " * 20] * 16},
                                              timeout=30)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - a hang or a dropped connection is what this test looks for
                bad.append(repr(e))
                continue
            outcomes[status] += 1
            if status != 200 and not (status in (500, 503) and isinstance(body, dict) and body["error"]["message"]):
                bad.append((status, body))

    threads = [threading.Thread(target=client) for _ in range(4)]  # 64 pairs at most: within one replica's queue
    for t in threads:
        t.start()
    time.sleep(3)
    os.kill(before[0], signal.SIGKILL)
    for t in threads:
        t.join(60)
    assert not bad and outcomes[200] > 20, (outcomes, bad[:5])
    # the replacement loads its model and the proxy learns of it: wait (bounded) until two replicas answer again
    deadline, replicas, after = time.monotonic() + 90, set(), []
    while time.monotonic() < deadline and len(replicas) < 2:
        status, _, headers = on_ray.post("/v1/rerank", {"query": "q", "documents": ["a"]})
        if status == 200:
            replicas.add(headers["x-rerankd-replica"])
        if len(replicas) < 2:
            time.sleep(0.2)
    after = replica_pids(on_ray)
    assert len(replicas) == 2 and len(after) == 2 and before[0] not in after and before[1] in after, (before, after)
    assert on_ray.get("/health")[0] == 200


def idle(pid: int) -> bool:
    """Whether every thread of the process runs under SCHED_IDLE."""
    return all(os.sched_getscheduler(int(t.name)) == os.SCHED_IDLE for t in Path(f"/proc/{pid}/task").glob("*"))


def test_rays_own_processes_run_at_idle_priority_and_the_replicas_do_not(on_ray):
    """--ray-system-priority idle: once the replicas are up, Ray's own processes (the GCS, Serve's proxy and
    controller, ...) run under SCHED_IDLE; the replicas, the raylet that starts them and the command keep theirs."""
    driver = on_ray.proc.pid
    (raylet,) = [p for p in children(driver) if Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].endswith(
        b"/raylet")]  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        system = {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in ray_system_processes(driver)}
        if all(map(idle, system)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    titles = [c.split(b"\0")[0].split(b"/")[-1].split()[0] for c in system.values()]
    for needed in (b"ray::ProxyActor", b"ray::ServeController", b"gcs_server"):  # (the controller's title names
        assert any(t.startswith(needed) for t in titles), titles  # the method it runs: ...Controller.listen_for_...)
    assert all(map(idle, system)), {t: idle(p) for p, t in zip(system, titles)}
    replicas = replica_pids(on_ray)
    assert len(replicas) == 2 and not set(replicas) & set(system) and raylet not in system
    assert not any(map(idle, [driver, raylet, *replicas]))


# ------------------------------------------------------------------------------------------ without a cluster


def test_system_priority_auto_is_idle_where_the_replicas_take_every_cpu(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    load, options = LoadOptions(device="cpu"), ServeOptions()

    def resolved(address=None, **scale):
        return system_priority(RayOptions(**scale), load, options, address)

    assert resolved(num_replicas=2, replica_cpus=2) == "idle"
    assert resolved(num_replicas=4) == "idle"  # one CPU each by default
    assert resolved(num_replicas=1, replica_cpus=2) == "normal"  # two cores left to Ray's processes
    assert resolved(min_replicas=1, max_replicas=4) == "idle"  # what the replicas may take at most
    assert resolved(num_replicas=1, replica_cpus=2, ray_system_priority="idle") == "idle"
    assert resolved(num_replicas=4, ray_system_priority="normal") == "normal"
    assert resolved("auto", num_replicas=4) == "normal"  # a cluster's processes are not this command's
    assert system_priority(RayOptions(num_replicas=4), LoadOptions(device="cuda"), options, None) == "normal"
    with pytest.raises(ValueError, match="with --ray-address the cluster's processes are not this command's"):
        resolved("ray://head:10001", ray_system_priority="idle")
    with pytest.raises(ValueError, match="num_replicas must be >= 1"):
        resolved(num_replicas=0)


def test_set_idle_sets_every_thread_once_and_skips_what_is_gone():
    import subprocess
    import sys

    code = "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while len(list(Path(f"/proc/{proc.pid}/task").glob("*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not idle(proc.pid)
        assert set_idle([proc.pid]) >= 2 and idle(proc.pid)
        assert set_idle([proc.pid]) == 0
    finally:
        proc.kill()
        proc.wait(10)
    assert set_idle([proc.pid]) == 0  # gone: nothing to set, no error




def test_a_stop_while_deploying_drains_once_a_replica_answers():
    """SIGTERM while `serve.run` still waits: a stop of a running server (drain) once the app is RUNNING or any of
    its replicas is up; before that, an abandoned start."""
    from ray.serve._private.common import ReplicaState

    def app(status, **states):
        replicas = {ReplicaState(k): n for k, n in states.items()}
        return SimpleNamespace(status=status, deployments={"Rerankd": SimpleNamespace(replica_states=replicas)})

    assert not _answering(None)
    assert not _answering(app("DEPLOYING", STARTING=2))
    assert _answering(app("DEPLOYING", RUNNING=1, STARTING=1))
    assert _answering(app("RUNNING", RUNNING=2))


def test_deployment_options_fixed_autoscaled_and_refused():
    load, options = LoadOptions(device="cpu", num_threads=2), ServeOptions()
    fixed = deployment_options(load, options, RayOptions(num_replicas=3), cluster_gpus=8)
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0}
    assert fixed["max_ongoing_requests"] == 256 and fixed["max_queued_requests"] == 4 * 256 * 3
    assert fixed["graceful_shutdown_timeout_s"] >= options.request_timeout
    gpu = deployment_options(LoadOptions(), options, RayOptions(min_replicas=1, max_replicas=4), cluster_gpus=8)
    assert gpu["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16.0}
    assert gpu["ray_actor_options"]["num_gpus"] == 1 and "num_replicas" not in gpu
    assert deployment_options(LoadOptions(), options, RayOptions(), cluster_gpus=0)["ray_actor_options"]["num_gpus"] == 0
    for bad in (RayOptions(num_replicas=0), RayOptions(min_replicas=2), RayOptions(min_replicas=3, max_replicas=2),
                RayOptions(max_ongoing_requests=0), RayOptions(replica_cpus=-1)):  # fmt: skip
        with pytest.raises(ValueError):
            deployment_options(load, options, bad, cluster_gpus=0)


@pytest.mark.parametrize("path", ["deploy/ray/serve-config.yaml", "deploy/kuberay/rayservice-cpu.yaml",
                                  "deploy/kuberay/rayservice-gpu.yaml"])  # fmt: skip
def test_the_documented_configs_build(path, m0_dir):
    config = yaml.safe_load((REPO / path).read_text())
    if config.get("kind") == "RayService":
        assert config["apiVersion"] == "ray.io/v1"
        config = yaml.safe_load(config["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "rerankd.api.ray_serve:build" and app["route_prefix"] == "/"
    built = build({**app["args"], "model": str(m0_dir)})
    assert type(built).__name__ == "Application"


def test_build_reads_args_as_the_command_line_does(m0_dir):
    """`serve run rerankd.api.ray_serve:build num_replicas=2` passes strings: they are read by the CLI's parser."""
    built = build({"model": str(m0_dir), "num_replicas": "2", "skip-warmup": "true", "replica_cpus": "1",
                   "served_model_name": ["a", "b"], "dtype": "float32"})  # fmt: skip
    deployment = built._bound_deployment  # noqa: SLF001 - what Ray will deploy
    assert deployment.num_replicas == 2 and deployment.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0}
    model, names, load, options = deployment.init_args
    assert model == str(m0_dir) and names == ["a", "b"] and load["num_threads"] == 1 and options["skip_warmup"] is True


def test_build_names_what_is_wrong(m0_dir):
    with pytest.raises(ValueError, match="unrecognized arguments: --num-replicaz 2"):
        build({"model": str(m0_dir), "num_replicaz": 2})
    with pytest.raises(ValueError, match="argument --num-replicas: invalid int value: 'two'"):
        build({"model": str(m0_dir), "num_replicas": "two"})
    with pytest.raises(ValueError, match="args.port does not apply on Ray Serve; set http_options.port"):
        build({"model": str(m0_dir), "port": 8000})
    with pytest.raises(ValueError, match="args.ray_system_priority does not apply on Ray Serve"):
        build({"model": str(m0_dir), "ray_system_priority": "idle"})
    with pytest.raises(ValueError, match="min_replicas and max_replicas"):
        build({"model": str(m0_dir), "max-replicas": 2})


def test_bad_replica_settings_fail_before_a_ray_starts(m0_dir):
    out = subprocess.run([sys.executable, "-m", "rerankd", "serve", "--model", str(m0_dir), "--ray", "--min-replicas", "2"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "autoscaling needs both min_replicas and max_replicas" in out.stderr, out.stderr
    assert "starting a local Ray" not in out.stderr


def test_health_check_fails_when_the_model_worker_is_gone(m0_dir):
    app = create_app(Reranker.from_pretrained(m0_dir, show_progress=False), ServeOptions(), "m")
    replica = SimpleNamespace(served=app, replica="r1")
    Rerankd.check_health(replica)  # alive: passes
    app.state.rerankd.scheduler.close(timeout=10)
    with pytest.raises(RuntimeError, match="replica r1: the model worker is not running"):
        Rerankd.check_health(replica)


def test_a_cancelled_request_drops_its_work(m0_dir):
    """Ray Serve cancels a replica's request when its client goes away (it does not send http.disconnect): the
    scoring it started is withdrawn from the scheduler, not left to run for no one."""
    app = create_app(Reranker.from_pretrained(m0_dir, show_progress=False), ServeOptions(), "m")
    scheduler = app.state.rerankd.scheduler
    body = json.dumps({"query": "q", "documents": ["gold rush " * 1000] * 200}).encode()  # seconds of work

    async def main() -> tuple[int, int]:
        async def receive():
            if body_sent.is_set():
                await asyncio.Event().wait()  # the client says nothing more
            body_sent.set()
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            pass

        body_sent = asyncio.Event()
        scope = {"type": "http", "method": "POST", "path": "/v1/rerank", "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1),
            "root_path": ""}  # fmt: skip
        request = asyncio.ensure_future(app(scope, receive, send))
        for _ in range(200):  # until the pairs are admitted (bounded: 10 s)
            if scheduler.queued_pairs:
                break
            await asyncio.sleep(0.05)
        admitted = scheduler.queued_pairs
        request.cancel()
        for _ in range(20):  # withdrawn within a second (the batch running finishes), long before the work would
            if not scheduler.queued_pairs:
                break
            await asyncio.sleep(0.05)
        return admitted, scheduler.queued_pairs

    try:
        admitted, left = asyncio.run(main())
        assert admitted == 200 and left == 0, (admitted, left)
    finally:
        scheduler.close(timeout=10)


def test_the_proxys_own_answers_become_json_errors():
    async def call(inner, sent: list | None = None) -> list[dict]:
        sent = [] if sent is None else sent

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        await JsonErrorsMiddleware(inner)({"type": "http"}, receive, send)
        return sent

    async def plain_503(scope, receive, send):
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"text/plain"), (b"retry-after", b"2")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"Service unavailable", "more_body": True})
        await send({"type": "http.response.body", "body": b": queue full"})

    async def nothing(scope, receive, send):  # a replica lost mid-request: Ray's proxy sends nothing
        return None

    async def cut_short(scope, receive, send):  # an error's head, then the proxy fails before its body
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain")]})
        raise RuntimeError("lost")

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"fine"})

    sent = asyncio.run(call(plain_503))
    headers = dict(sent[0]["headers"])
    body = json.loads(sent[1]["body"])
    assert sent[0]["status"] == 503 and headers[b"retry-after"] == b"2" and headers[b"content-type"] == b"application/json"
    assert body["error"]["message"] == "Ray Serve: Service unavailable: queue full" and len(sent) == 2
    sent = asyncio.run(call(nothing))
    assert sent[0]["status"] == 500 and "replica serving this request was lost" in json.loads(sent[1]["body"])["detail"]
    assert [m.get("body") for m in asyncio.run(call(ok))] == [None, b"fine"]
    with pytest.raises(RuntimeError, match="lost"):
        asyncio.run(call(cut_short, sent := []))
    assert sent[0]["status"] == 503 and json.loads(sent[1]["body"])["error"]["message"].startswith("Ray Serve:")
    assert dict(sent[0]["headers"])[b"retry-after"] == b"1"  # Ray gave none: the server's own default
