"""Driving a rerank server: closed loop at a concurrency, or Poisson arrivals at a rate; the report."""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import httpx
from tqdm.auto import tqdm

from .apis import Api, BadResponse
from .workload import Request

log = logging.getLogger("rerankd.bench")


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status: int  # HTTP status; 0 when no answer came (connection refused, timeout)
    latency: float
    pairs: int
    tokens: int
    error: str | None = None
    server_tokens: int | None = None  # the answer's own count (usage.total_tokens), where the API gives one


def server_tokens(body: Any) -> int | None:
    """The tokens the server says it put through the model: `usage.total_tokens` (rerankd, Jina, vLLM, Infinity;
    rerankd's counts image tokens, windows and the prompt around each pair too); None where the answer has none
    (TEI, SGLang's bare list, Cohere's billed search units)."""
    usage = body.get("usage") if isinstance(body, dict) else None
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return total if isinstance(total, int) and not isinstance(total, bool) and total >= 0 else None


async def _one(client: httpx.AsyncClient, api: Api, model: str | None, req: Request, top_n: int | None,
               arrival: float | None = None) -> Outcome:  # fmt: skip
    """One request, answered within the client's timeout in all (httpx's own is per phase: a server that trickles
    its answer would never time out); its latency from `arrival` (an open loop's scheduled arrival: the time it
    waited for a slot counts, no coordinated omission), else from its sending."""
    body = api.build(model, req.query, req.documents, top_n)
    start = time.perf_counter() if arrival is None else arrival
    limit = client.timeout.read or None
    try:
        resp = await asyncio.wait_for(client.post(api.path, json=body), limit)
    except asyncio.TimeoutError:
        return Outcome(False, 0, time.perf_counter() - start, 0, 0, f"no answer within {limit:g}s (--timeout)")
    except httpx.HTTPError as e:
        return Outcome(False, 0, time.perf_counter() - start, 0, 0, f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - start
    if resp.status_code // 100 != 2:
        return Outcome(False, resp.status_code, latency, 0, 0, _error_text(resp))
    try:
        body = resp.json()
        n = len(api.scores(body))
    except (ValueError, BadResponse) as e:
        return Outcome(False, resp.status_code, latency, 0, 0, f"unexpected response body: {e}")
    expected = min(len(req.documents), top_n or len(req.documents))
    if n != expected:
        return Outcome(False, resp.status_code, latency, 0, 0, f"{n} results for {expected} expected")
    return Outcome(True, resp.status_code, latency, len(req.documents), req.input_tokens,
                   server_tokens=server_tokens(body))  # fmt: skip


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return str(body["error"].get("message"))[:300]
        return str(body)[:300]
    except ValueError:
        return resp.text[:300]


async def drive(
    base_url: str,
    api: Api,
    requests: list[Request],
    model: str | None = None,
    top_n: int | None = None,
    max_concurrency: int | None = 32,
    request_rate: float = float("inf"),
    timeout: float = 600.0,
    headers: dict[str, str] | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "requests",
    warmup: int = 0,
) -> tuple[list[Outcome], float]:
    """Send every request; returns the outcomes and the wall time from the first send to the last answer. First,
    `warmup` requests (the workload's first ones, in turn) are sent one at a time and not counted. At a finite
    `request_rate`, arrivals follow a Poisson schedule fixed in advance (sleeps do not add up) and each latency counts
    from its scheduled arrival."""
    limits = httpx.Limits(max_connections=max_concurrency or 1000, max_keepalive_connections=max_concurrency or 1000)
    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    outcomes: list[Outcome | None] = [None] * len(requests)
    open_loop = request_rate != float("inf")
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits, headers=headers) as client:
        for i in range(warmup):  # untimed: the server's first requests (allocations, lazy set-up) are not measured
            warm = await _one(client, api, model, requests[i % len(requests)], top_n)
            if not warm.ok:
                log.warning("warm-up request %d failed (%s): %s", i + 1, warm.status or "no answer", warm.error)
        with tqdm(total=len(requests), desc=desc, unit="req", disable=not progress) as bar:

            async def task(i: int, arrival: float | None) -> None:
                if sem is None:
                    outcomes[i] = await _one(client, api, model, requests[i], top_n, arrival)
                else:
                    async with sem:
                        outcomes[i] = await _one(client, api, model, requests[i], top_n, arrival)
                bar.update()

            start = time.perf_counter()
            tasks, at = [], start
            for i in range(len(requests)):
                if open_loop and i:
                    at += rng.expovariate(request_rate)  # Poisson arrivals, each at its own scheduled time
                    await asyncio.sleep(max(0.0, at - time.perf_counter()))
                tasks.append(asyncio.create_task(task(i, at if open_loop else None)))
            await asyncio.gather(*tasks)
            duration = time.perf_counter() - start
    return outcomes, duration  # type: ignore[return-value]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]), as numpy's default."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(outcomes: list[Outcome], duration: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    failures: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        if not o.ok:
            f = failures.setdefault(str(o.status), {"count": 0, "first_error": o.error})
            f["count"] += 1
    lat = [o.latency * 1000 for o in ok]
    if not lat:  # nothing answered: no latency (null in the JSON, not NaN)
        return {"completed": 0, "failed": len(outcomes), "failures": failures, "duration_s": duration,
                "requests_per_s": 0.0, "pairs_per_s": 0.0, "input_tokens_per_s": 0.0, "server_tokens_per_s": None,
                "latency_ms": {"mean": None, "p50": None, "p90": None, "p99": None}}  # fmt: skip
    return {
        "completed": len(ok),
        "failed": len(outcomes) - len(ok),
        "failures": failures,
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration > 0 else 0.0,
        "pairs_per_s": sum(o.pairs for o in ok) / duration if duration > 0 else 0.0,
        "input_tokens_per_s": sum(o.tokens for o in ok) / duration if duration > 0 else 0.0,
        # null unless every answer counted its tokens (a partial sum would pass for a rate)
        "server_tokens_per_s": (sum(o.server_tokens for o in ok) / duration if duration > 0 else 0.0)
        if all(o.server_tokens is not None for o in ok) else None,
        "latency_ms": {
            "mean": statistics.fmean(lat),
            "p50": percentile(lat, 50),
            "p90": percentile(lat, 90),
            "p99": percentile(lat, 99),
        },
    }


def format_summary(s: dict[str, Any], title: str) -> str:
    lat = s["latency_ms"]
    lines = [
        f"{'=' * 16} {title} {'=' * 16}",
        f"completed / failed:      {s['completed']} / {s['failed']}",
        f"duration:                {s['duration_s']:.2f} s",
        f"requests/s:              {s['requests_per_s']:.2f}",
        f"pairs/s:                 {s['pairs_per_s']:.2f}",
        f"input tokens/s:          {s['input_tokens_per_s']:.1f}",
        *([] if s.get("server_tokens_per_s") is None else
          [f"server-counted tokens/s: {s['server_tokens_per_s']:.1f}"]),  # fmt: skip
        "latency ms mean/p50/p90/p99: " + " / ".join("n/a" if lat[k] is None else f"{lat[k]:.1f}"
                                                     for k in ("mean", "p50", "p90", "p99")),  # fmt: skip
    ]
    for status, f in sorted(s["failures"].items()):
        what = "no answer" if status == "0" else f"HTTP {status}"
        lines.append(f"failed with {what}: {f['count']}, first error: {f['first_error']}")
    return "\n".join(lines)


def plot(sweep: list[dict[str, Any]], path: str) -> None:
    """Throughput and p99 latency against concurrency."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'rerankd[bench]'") from None
    conc = [r["max_concurrency"] for r in sweep]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(conc, [r["pairs_per_s"] for r in sweep], marker="o")
    a.set(xlabel="concurrency", ylabel="pairs/s", title="throughput", xscale="log")
    b.plot(conc, [r["latency_ms"]["p99"] for r in sweep], marker="o", color="tab:red")
    b.set(xlabel="concurrency", ylabel="p99 latency (ms)", title="p99 latency", xscale="log")
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
