"""rerankd on Ray Serve: the app of `rerankd serve` (every route, schema, error, auth, limit and metric) as the
ingress of a deployment whose replicas each load the model once and run rerankd's own scheduler, so that requests
are batched across clients inside each replica. Ray gives the proxy and router, replicas across a cluster,
autoscaling, health checks (a replica whose model worker died fails them and is replaced) and rolling updates.

Three ways in:
* `rerankd serve --ray ...` (`run`): starts a local Ray instance, or joins one with --ray-address, deploys, serves
  until SIGTERM/SIGINT, then deletes the application, letting requests in flight finish;
* `serve run rerankd.api.ray_serve:build model=... num_replicas=2` or a `serve deploy` config file whose
  `import_path` is `rerankd.api.ray_serve:build` and whose `args` are the options of `rerankd serve` (`build`);
* `application(...)` from Python, for `serve.run`.

Every answer carries `x-rerankd-replica`, the replica that served it. Ray's own answers (no replica reachable, its
queue full, a replica dying mid-request) are made JSON errors of the server's shape by `proxy_middlewares`, which the
proxy runs when RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names it (`run` sets it for the Ray it starts).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any

from ray import serve
from ray.serve import Application

from ..config import LoadOptions, RayOptions, ServeOptions
from ..reranker import Reranker
from .app import create_app, error_body

log = logging.getLogger("rerankd.serve")

APP_NAME = "rerankd"
PROXY_CALLBACK = "rerankd.api.ray_serve:proxy_middlewares"
QUEUED_PER_ONGOING = 4  # requests Ray's router queues per request a replica may take, before it answers 503


@serve.ingress()
class Rerankd:
    """One replica: the model loaded once, its scheduler, and the server's app in front of them."""

    def __init__(self, model: str, names: list[str], load: dict[str, Any], options: dict[str, Any]):
        serve_options = ServeOptions(**options)
        self.replica = serve.get_replica_context().replica_id.unique_id
        reranker = Reranker.from_pretrained(model, **load)
        if not serve_options.skip_warmup:
            reranker.compute_score([["warm-up query", "warm-up document"]])
        self.served = create_app(reranker, serve_options, names, source=model, replica=self.replica)

    def __serve_build_asgi_app__(self):
        return self.served

    def check_health(self) -> None:
        """Ray's health check: fails when the model worker is not running, and Ray replaces the replica."""
        scheduler = self.served.state.rerankd.scheduler
        if not scheduler.alive:
            raise RuntimeError(f"replica {self.replica}: the model worker is not running "
                               f"({scheduler.error or 'stopping'})")  # fmt: skip


def deployment_options(load: LoadOptions, options: ServeOptions, scale: RayOptions, cluster_gpus: float) -> dict:
    """Ray's options of the deployment: replica count or autoscaling range, resources, queue and health settings."""
    cpus = scale.replica_cpus or load.num_threads or 1
    cuda = load.device is None or load.device.startswith("cuda")
    gpus = scale.replica_gpus if scale.replica_gpus is not None else (1 if cuda and cluster_gpus > 0 else 0)
    if cpus <= 0 or gpus < 0:
        raise ValueError(f"replica_cpus must be > 0 and replica_gpus >= 0, got {cpus} and {gpus}")
    if scale.max_ongoing_requests < 1:
        raise ValueError(f"max_ongoing_requests must be >= 1, got {scale.max_ongoing_requests}")
    found = {
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
        "max_ongoing_requests": scale.max_ongoing_requests,
        "health_check_period_s": 5,
        "health_check_timeout_s": 30,
        "graceful_shutdown_wait_loop_s": 1,
        # requests in flight at shutdown (SIGTERM, scale-down, rolling update) may finish
        "graceful_shutdown_timeout_s": options.body_timeout + options.request_timeout + 5,
    }
    if scale.min_replicas is None and scale.max_replicas is None:
        if scale.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {scale.num_replicas}")
        found["num_replicas"] = scale.num_replicas
        most = scale.num_replicas
    else:
        low, high = scale.min_replicas, scale.max_replicas
        if low is None or high is None or not 0 <= low <= high or high < 1:
            raise ValueError("autoscaling needs both min_replicas and max_replicas, 0 <= min <= max, max >= 1; got "
                             f"{scale.min_replicas} and {scale.max_replicas}")  # fmt: skip
        if scale.target_ongoing_requests <= 0:
            raise ValueError(f"target_ongoing_requests must be > 0, got {scale.target_ongoing_requests}")
        found["autoscaling_config"] = {"min_replicas": scale.min_replicas, "max_replicas": scale.max_replicas,
                                       "target_ongoing_requests": scale.target_ongoing_requests}  # fmt: skip
        most = scale.max_replicas
    found["max_queued_requests"] = QUEUED_PER_ONGOING * scale.max_ongoing_requests * most
    return found


def application(model: str, names: tuple[str, ...], load: LoadOptions, options: ServeOptions,
                scale: RayOptions = RayOptions()) -> Application:  # fmt: skip
    """The rerankd application, ready for `serve.run`: `model` served as `names`, replicas as `scale` says."""
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    settings = deployment_options(load, options, scale, cluster_gpus)
    load_args = dataclasses.asdict(load)
    if load.num_threads is None and settings["ray_actor_options"]["num_gpus"] == 0:
        load_args["num_threads"] = max(1, int(settings["ray_actor_options"]["num_cpus"]))  # torch's threads: its CPUs
    load_args["show_progress"] = False  # no terminal in a replica
    deployment = serve.deployment(Rerankd, name="Rerankd", **settings)
    return deployment.bind(model, list(names), load_args, dataclasses.asdict(options))


def build(args: dict[str, Any]) -> Application:
    """The application from a `serve run` / `serve deploy` config's `args`: `model`, `served_model_name` (a name or
    a list) and any option of `rerankd serve` (LoadOptions, ServeOptions, RayOptions fields; dashes or underscores)."""
    args = {k.replace("-", "_"): v for k, v in (args or {}).items()}
    model = args.pop("model", None)
    if not model:
        raise ValueError("rerankd.api.ray_serve:build: args must name the model (args: {model: <hub id or path>})")
    names = args.pop("served_model_name", None) or model
    names = (names,) if isinstance(names, str) else tuple(names)
    known = {cls: {f.name for f in dataclasses.fields(cls)} for cls in (LoadOptions, ServeOptions, RayOptions)}
    unknown = sorted(set(args) - set().union(*known.values()))
    if unknown:
        raise ValueError(f"rerankd.api.ray_serve:build: unknown args {unknown}; the options of `rerankd serve` are "
                         "accepted (see `rerankd serve --help`, dashes as underscores)")  # fmt: skip
    load, options, scale = (cls(**{k: v for k, v in args.items() if k in known[cls]}) for cls in known)
    return application(model, names, load, options, scale)


def proxy_middlewares() -> list:
    """Starlette middlewares for Ray's HTTP proxy: its own error answers (plain text: no replica, queue full, a
    replica lost mid-request) become JSON errors of the server's shape, with the status kept."""
    from starlette.middleware import Middleware

    return [Middleware(JsonErrorsMiddleware)]


class JsonErrorsMiddleware:
    """Ray's proxy's own answers as JSON errors of the server's shape: a non-JSON error response (status >= 400) is
    rewritten, status and headers kept; a request that ends with no response at all (its replica died mid-request:
    Ray sends nothing, and uvicorn would answer a plain 'Internal Server Error') gets a JSON 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict[str, Any] = {}
        started = [False]

        async def send_json(status: int, message: str, headers: list) -> None:
            body = json.dumps(error_body(status, message)).encode()
            keep = [(k, v) for k, v in headers if k.lower() not in (b"content-type", b"content-length")]
            await send({"type": "http.response.start", "status": status, "headers": [
                *keep, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        async def json_send(message):
            if message["type"] == "http.response.start":
                started[0] = True
                headers = dict(message.get("headers") or [])
                if message["status"] >= 400 and not headers.get(b"content-type", b"").startswith(b"application/json"):
                    held.update(start=message, body=b"")
                    return None
            elif message["type"] == "http.response.body" and held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return None
                text = held["body"].decode("utf-8", "replace").strip() or "the request failed in Ray's proxy"
                start = held["start"]
                return await send_json(start["status"], f"Ray Serve: {text}", start.get("headers") or [])
            return await send(message)

        try:
            await self.app(scope, receive, json_send)
        finally:
            if not started[0]:
                await send_json(500, "Ray Serve: the replica serving this request was lost before it answered; "
                                "retry (Ray replaces failed replicas)", [])  # fmt: skip


def run(model: str, names: tuple[str, ...], load: LoadOptions, options: ServeOptions, scale: RayOptions) -> int:
    """`rerankd serve --ray`: deploy on Ray (local, or the cluster at --ray-address), serve until SIGTERM/SIGINT,
    then delete the application (requests in flight finish) and stop the Ray this process started."""
    import ray

    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)  # for a Ray started here
    joining = scale.ray_address or os.environ.get("RAY_ADDRESS")
    log.info("%s Ray", f"joining the cluster at {joining}:" if joining else "starting a local")
    ray.init(address=scale.ray_address, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=options.log_level in ("info", "debug"))  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": options.host, "port": options.port,
                                  "keep_alive_timeout_s": max(1, round(options.keep_alive_timeout))})  # fmt: skip
        app = application(model, names, load, options, scale)
        count = scale.num_replicas if scale.min_replicas is None else f"{scale.min_replicas}..{scale.max_replicas}"
        log.info("deploying %s replica(s) of %s (each loads the model; this takes as long as a start-up)", count, model)
        start = time.monotonic()
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        log.info("serving %s on http://%s:%d through Ray Serve (auth %s), deployed in %.1fs",
                 " / ".join(map(repr, names)), options.host, options.port, "on" if options.api_key else "off",
                 time.monotonic() - start)  # fmt: skip
        last = "RUNNING"
        while not stop.wait(5.0):  # Ray replaces failed replicas itself; say when the application's state changes
            status = serve.status().applications.get(APP_NAME)
            if status is not None and status.status != last:
                log.warning("the Ray Serve application is %s %s", status.status, status.message or "")
                last = status.status
        log.info("stopping: letting requests in flight finish (up to %.0fs)",
                 options.body_timeout + options.request_timeout + 5)  # fmt: skip
        serve.delete(APP_NAME)
        return 0
    finally:
        if not joining:
            serve.shutdown()
            ray.shutdown()
