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
queue full, a replica dying mid-request) are made JSON errors of the server's shape by
`rerankd.api.ray_proxy:proxy_middlewares`, which the proxy runs when RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names
it (`run` sets it for the Ray it starts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from ..config import LoadOptions, RayOptions, ServeOptions
from .app import load_app

log = logging.getLogger("rerankd.serve")

APP_NAME = "rerankd"
PROXY_CALLBACK = "rerankd.api.ray_proxy:proxy_middlewares"
QUEUED_PER_ONGOING = 4  # requests Ray's router queues per request a replica may take, before it answers 503
# The raylet's workers that are Ray's own (ray_system_processes); a replica, or an idle worker that may become one,
# keeps its priority.
RAY_SYSTEM_ACTORS = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent", b"ray::ServeController", b"ray::ProxyActor")


@serve.ingress()
class Rerankd:
    """One replica: the model loaded once, its scheduler, and the server's app in front of them."""

    def __init__(self, model: str, names: list[str], load: dict[str, Any], options: dict[str, Any]):
        self.replica = serve.get_replica_context().replica_id.unique_id
        serve_options = ServeOptions(**options).with_environment()  # $RERANKD_API_KEY of the replica's node
        self.served = load_app(model, names, LoadOptions(**load), serve_options, replica=self.replica)

    def __serve_build_asgi_app__(self):
        return self.served

    def check_health(self) -> None:
        """Ray's health check: fails when the model worker is not running, and Ray replaces the replica."""
        scheduler = self.served.state.rerankd.scheduler
        if not scheduler.alive:
            raise RuntimeError(f"replica {self.replica}: {scheduler.down_reason}")


def deployment_options(load: LoadOptions, options: ServeOptions, scale: RayOptions, cluster_gpus: float) -> dict:
    """Ray's options of the deployment: replica count or autoscaling range, resources, queue and health settings.
    GPUs per replica: `replica_gpus`, else 1 when `device` is CUDA (or unset and the cluster has GPUs), else 0."""
    cpus = scale.replica_cpus if scale.replica_cpus is not None else (load.num_threads or 1)
    if scale.replica_gpus is not None:
        gpus = scale.replica_gpus
    elif load.device is not None:
        gpus = 1 if load.device.startswith("cuda") else 0
    else:
        gpus = 1 if cluster_gpus > 0 else 0
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
        "graceful_shutdown_timeout_s": options.drain_seconds,
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
    if not ray.is_initialized() and scale.replica_gpus is None and load.device is None:
        log.warning("no Ray cluster to ask for GPUs yet: CPU replicas (set replica_gpus: 1, or device: cuda, for GPU "
                    "replicas)")  # fmt: skip
    settings = deployment_options(load, options, scale, cluster_gpus)
    load_args = dataclasses.asdict(load)
    if load.num_threads is None and settings["ray_actor_options"]["num_gpus"] == 0:
        load_args["num_threads"] = max(1, int(settings["ray_actor_options"]["num_cpus"]))  # torch's threads: its CPUs
    load_args["show_progress"] = False  # no terminal in a replica
    deployment = serve.deployment(Rerankd, name="Rerankd", **settings)
    return deployment.bind(model, list(names), load_args, dataclasses.asdict(options))


NOT_UNDER_RAY = {  # options of `rerankd serve` that Ray's proxy owns (a config file's http_options) or that pick Ray
    "host": "http_options.host", "port": "http_options.port", "keep_alive_timeout": "http_options.keep_alive_timeout_s",
    "max_connections": "Ray's proxy", "header_timeout": "Ray's proxy", "log_level": "Ray's logging_config",
    "ray": "the config file itself", "ray_address": "serve deploy --address",
    "ray_system_priority": "the CPU priority of the processes that `ray start` starts (chrt --idle 0 ...)",
}  # fmt: skip


def build(args: dict[str, Any]) -> Application:
    """The application from a `serve run` / `serve deploy` config's `args` (or `serve run ... key=value`): the
    options of `rerankd serve` (`model`, `served_model_name`, loading, server and scale-out options; dashes or
    underscores), read by the command line's own parser, so that values, types and choices mean the same."""
    import io
    import typing

    from ..cli import _options, build_parser

    argv = ["serve"]
    bools = {f.name for cls in (LoadOptions, ServeOptions, RayOptions) for f in dataclasses.fields(cls)
             if typing.get_type_hints(cls)[f.name] is bool}  # fmt: skip
    for key, value in (args or {}).items():
        name = key.replace("-", "_")
        if name in NOT_UNDER_RAY:
            raise ValueError(f"rerankd.api.ray_serve:build: args.{key} does not apply on Ray Serve; set "
                             f"{NOT_UNDER_RAY[name]} instead")  # fmt: skip
        flag = "--" + name.replace("_", "-")
        if name in bools:
            on = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
            argv.append(flag if on else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif value is not None:
            argv += [flag, str(value)]
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            parsed = build_parser().parse_args(argv)
    except SystemExit:
        problem = said.getvalue().strip().splitlines()[-1:] or ["unreadable args"]
        raise ValueError(f"rerankd.api.ray_serve:build: {problem[0].split(': error: ')[-1]} (the args are the "
                         "options of `rerankd serve --help`, dashes as underscores)") from None  # fmt: skip
    load, options, scale = (cls(**_options(parsed, cls)) for cls in (LoadOptions, ServeOptions, RayOptions))
    return application(parsed.model, tuple(options.served_model_name or (parsed.model,)), load, options, scale)


def run(model: str, names: tuple[str, ...], load: LoadOptions, options: ServeOptions, scale: RayOptions) -> int:
    """`rerankd serve --ray`: deploy on Ray (a new local instance, or the cluster at --ray-address / $RAY_ADDRESS),
    serve until SIGTERM/SIGINT, then delete the application (requests in flight finish within
    `options.drain_seconds`) and stop the Ray this process started. Ctrl-C also ends a deployment still waiting."""
    import ray

    deployment_options(load, options, scale, 0)  # bad replica settings fail here, before a Ray starts
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)  # for a Ray started here
    # Ray starts its workers, the proxy and the replicas among them, at nice 15: beside any busy process at the
    # default 0 they starve, and the proxy misses Ray's 5 s readiness check at start-up (seen with both cores busy)
    os.environ.setdefault("RAY_worker_niceness", "0")
    address = scale.ray_address or os.environ.get("RAY_ADDRESS")
    log.info("%s Ray", f"joining the cluster at {address}:" if address else "starting a local")
    # "local": a new instance, never one that `ray start` left running on this machine
    ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=options.log_level in ("info", "debug"))  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    deployed = up = False
    try:
        if address and _application(APP_NAME) is not None:
            raise ValueError(f"the cluster at {address} already runs an application named {APP_NAME!r}: delete "
                             f"it first (serve.delete({APP_NAME!r}) or serve shutdown) or use another cluster")
        idle = system_priority(scale, load, options, address) == "idle"
        serve.start(http_options={"host": options.host, "port": options.port,
                                  "keep_alive_timeout_s": max(1, round(options.keep_alive_timeout))})  # fmt: skip
        app = application(model, names, load, options, scale)
        count = scale.num_replicas if scale.min_replicas is None else f"{scale.min_replicas}..{scale.max_replicas}"
        log.info("deploying %s replica(s) of %s (each loads the model; this takes as long as a start-up)", count, model)
        start, failed = time.monotonic(), []
        deployed = True
        done = _in_thread(lambda: serve.run(app, name=APP_NAME, route_prefix="/", blocking=False), failed)
        while not done.wait(1.0):
            if stop.is_set():
                if _answering(_application(APP_NAME)):  # up (its proxy answers) before serve.run came back
                    break  # stop as when up
                log.warning("stopped before the replicas were up")
                return 1
            if round(time.monotonic() - start) % 60 == 0:
                status = serve.status().applications.get(APP_NAME)
                log.warning("still deploying after %.0fs: %s (replicas that cannot be placed wait for CPUs/GPUs: "
                            "see `ray status`)", time.monotonic() - start, status and status.message)  # fmt: skip
        if failed:
            raise failed[0]
        up = True
        where = (f"http://{options.host}:{options.port}" if not address else
                 "the cluster's Serve proxies (a Serve already running there keeps its own host and port)")  # fmt: skip
        log.info("serving %s on %s through Ray Serve (auth %s), deployed in %.1fs", " / ".join(map(repr, names)),
                 where, "on" if options.api_key else "off", time.monotonic() - start)  # fmt: skip
        idle = idle and _idle_ray_processes(first=True)
        last = "RUNNING"
        while not stop.wait(5.0):  # Ray replaces failed replicas itself; say when the application's state changes
            idle = idle and _idle_ray_processes(first=False)  # a proxy or controller Ray restarted
            status = serve.status().applications.get(APP_NAME)
            if status is not None and status.status != last:
                log.warning("the Ray Serve application is %s %s", status.status, status.message or "")
                last = status.status
        return 0
    finally:
        if up:
            log.info("stopping: letting requests in flight finish (up to %.0fs)", options.drain_seconds)
        with contextlib.suppress(Exception):
            if deployed:  # nothing can be in flight before the replicas were up: no waiting then
                serve.delete(APP_NAME, _blocking=up)
        if not address:
            if up:  # before, Serve's own shutdown would wait 30 s on replicas that cannot be placed; Ray goes anyway
                serve.shutdown()
            ray.shutdown()


def system_priority(scale: RayOptions, load: LoadOptions, options: ServeOptions, address: str | None) -> str:
    """'idle' or 'normal' for the local Ray's own processes (`scale.ray_system_priority`, 'auto' resolved: 'idle'
    when CPU-only replicas, at most as many as `--num-replicas` or `--max-replicas`, reserve every CPU of the local
    Ray). Call after ray.init. ValueError for 'idle' where it cannot apply."""
    import ray

    asked = scale.ray_system_priority
    if asked == "idle" and address:
        raise ValueError("--ray-system-priority idle is for the local Ray that --ray starts; with --ray-address the "
                         "cluster's processes are not this command's (use auto or normal)")  # fmt: skip
    if asked == "idle" and not hasattr(os, "SCHED_IDLE"):
        raise ValueError(f"--ray-system-priority idle needs Linux's SCHED_IDLE, which {os.name} does not have")
    if asked != "auto":
        return asked
    if address or not hasattr(os, "SCHED_IDLE"):
        return "normal"
    resources = ray.cluster_resources()
    actor = deployment_options(load, options, scale, resources.get("GPU", 0))["ray_actor_options"]
    most = scale.num_replicas if scale.max_replicas is None else scale.max_replicas
    busy = actor["num_gpus"] == 0 and most * actor["num_cpus"] >= resources.get("CPU", 0)
    log.info("Ray's own processes: %s CPU priority once the replicas are up (auto: %d replica(s) of %g CPUs on a "
             "Ray of %g)", "idle" if busy else "normal", most, actor["num_cpus"], resources.get("CPU", 0))  # fmt: skip
    return "idle" if busy else "normal"


def ray_system_processes(driver: int) -> list[int]:
    """The local Ray's own processes, below `driver`, the process that started it: all of them but the raylet, which
    starts the workers (a policy set on it would pass to each replica it starts later, and an unprivileged process
    cannot set it back), and of its workers, Ray's own actors (RAY_SYSTEM_ACTORS) only."""
    found = []
    for pid in children(driver):
        command = _cmdline(pid)
        if Path(command.split(b"\0")[0].decode(errors="replace")).name == "raylet":
            found += [w for w in children(pid) if _cmdline(w).startswith(RAY_SYSTEM_ACTORS)]
        elif command:
            found += [pid, *descendants(pid)]
    return found


def set_idle(pids: list[int]) -> int:
    """SCHED_IDLE for every thread of these processes (threads they start later inherit it); the number of threads
    changed. Processes or threads gone meanwhile are skipped; OSError when the OS refuses."""
    changed = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                if os.sched_getscheduler(int(task.name)) != os.SCHED_IDLE:
                    os.sched_setscheduler(int(task.name), os.SCHED_IDLE, os.sched_param(0))
                    changed += 1
            except ProcessLookupError:
                continue
    return changed


def _idle_ray_processes(first: bool) -> bool:
    """The local Ray's own processes at idle priority (set_idle); False, after a warning, when the OS refuses."""
    try:
        changed = set_idle(ray_system_processes(os.getpid()))
    except OSError as e:
        log.warning("Ray's own processes keep their CPU priority: setting SCHED_IDLE failed (%s); "
                    "--ray-system-priority normal does without", e)  # fmt: skip
        return False
    if first or changed:
        log.info("Ray's own processes run at idle CPU priority (%d threads set)", changed)
    return True


def children(pid: int) -> list[int]:
    """The processes `pid` started (Linux /proc), [] when it is gone."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        below = children(todo.pop())
        found += below
        todo += below
    return found


def _cmdline(pid: int) -> bytes:
    """A process's command line as /proc has it (Ray's workers: their title, "ray::ProxyActor ..."), b"" once gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _application(name: str):
    """The application's status on the cluster (its `.status`: DEPLOYING, RUNNING, ...), or None when it has none or
    no Serve is reachable there yet."""
    try:
        return serve.status().applications.get(name)
    except Exception:  # noqa: BLE001 - no Serve running on the cluster yet
        return None


def _answering(status) -> bool:
    """Whether an application (its `_application` status) answers requests: RUNNING, or still deploying with a
    replica up, to which the proxy already routes: a SIGTERM then drains instead of abandoning a start (with 2
    replicas, one answered /health while the other was still starting, in CI under load)."""
    if status is None:
        return False
    if status.status == "RUNNING":
        return True
    return any(d.replica_states.get("RUNNING", 0) > 0 for d in status.deployments.values())  # str-valued enum keys


def _in_thread(work, failed: list) -> threading.Event:
    """Run `work` in a daemon thread; the event is set when it returns, its exception appended to `failed`."""
    done = threading.Event()

    def target() -> None:
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            failed.append(e)
        finally:
            done.set()

    threading.Thread(target=target, name="rerankd-ray-deploy", daemon=True).start()
    return done
