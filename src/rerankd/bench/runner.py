"""Driving a rerank server: closed loop at a concurrency, or Poisson arrivals at a rate; the report."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import httpx
from tqdm.auto import tqdm

from .apis import Api, BadResponse
from .workload import Request


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status: int  # HTTP status; 0 when no answer came (connection refused, timeout)
    latency: float
    pairs: int
    tokens: int
    error: str | None = None


async def _one(client: httpx.AsyncClient, api: Api, model: str | None, req: Request, top_n: int | None) -> Outcome:
    body = api.build(model, req.query, req.documents, top_n)
    start = time.perf_counter()
    try:
        resp = await client.post(api.path, json=body)
    except httpx.HTTPError as e:
        return Outcome(False, 0, time.perf_counter() - start, 0, 0, f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - start
    if resp.status_code // 100 != 2:
        return Outcome(False, resp.status_code, latency, 0, 0, _error_text(resp))
    try:
        n = len(api.scores(resp.json()))
    except (ValueError, BadResponse) as e:
        return Outcome(False, resp.status_code, latency, 0, 0, f"unexpected response body: {e}")
    expected = min(len(req.documents), top_n or len(req.documents))
    if n != expected:
        return Outcome(False, resp.status_code, latency, 0, 0, f"{n} results for {expected} expected")
    return Outcome(True, resp.status_code, latency, len(req.documents), req.input_tokens)


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
) -> tuple[list[Outcome], float]:
    """Send every request; returns the outcomes and the wall time from the first send to the last answer."""
    limits = httpx.Limits(max_connections=max_concurrency or 1000, max_keepalive_connections=max_concurrency or 1000)
    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    outcomes: list[Outcome | None] = [None] * len(requests)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits, headers=headers) as client:
        with tqdm(total=len(requests), desc=desc, unit="req", disable=not progress) as bar:

            async def task(i: int) -> None:
                if sem is None:
                    outcomes[i] = await _one(client, api, model, requests[i], top_n)
                else:
                    async with sem:
                        outcomes[i] = await _one(client, api, model, requests[i], top_n)
                bar.update()

            start = time.perf_counter()
            tasks = []
            for i in range(len(requests)):
                tasks.append(asyncio.create_task(task(i)))
                if request_rate != float("inf") and i < len(requests) - 1:
                    await asyncio.sleep(rng.expovariate(request_rate))  # Poisson arrivals
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
    return {
        "completed": len(ok),
        "failed": len(outcomes) - len(ok),
        "failures": failures,
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration > 0 else 0.0,
        "pairs_per_s": sum(o.pairs for o in ok) / duration if duration > 0 else 0.0,
        "input_tokens_per_s": sum(o.tokens for o in ok) / duration if duration > 0 else 0.0,
        "latency_ms": {
            "mean": statistics.fmean(lat) if lat else float("nan"),
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
        f"latency ms mean/p50/p90/p99: {lat['mean']:.1f} / {lat['p50']:.1f} / {lat['p90']:.1f} / {lat['p99']:.1f}",
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
