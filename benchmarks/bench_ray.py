"""Benchmark: what Ray Serve's proxy costs (issue 15): `rerankd bench` at concurrency 32 against one replica behind
Ray Serve (`rerankd serve --ray --num-replicas 1`) and against the same replica served directly (`rerankd serve`),
same model, threads and requests, one server at a time, alternating (direct, ray, direct, ray, ...).

The model is the mid-size random jina-reranker-m0 checkpoint of bench_m0_engine.py (hidden 512, 8 layers); the
requests are `rerankd bench`'s random workload (--docs documents of --tokens tokens each, --range-ratio 0.25). On one
machine the proxy, Ray's controller and its raylet share the cores with the replica: that is counted, as it is in a
real one-node deployment. Target: Ray keeps >= 90% of the direct pairs/s.

    .venv/bin/python benchmarks/bench_ray.py [--repeats 2] [--num-prompts 96] [--update-docs]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_m0_engine import CHECKPOINT, cpu_name, log  # noqa: E402
from bench_peer import free_port, run_bench, stop, wait_healthy  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
SECTION = "## Ray Serve's proxy vs the same replica served directly (CPU)"


def serve(ckpt: Path, port: int, threads: int, ray_priority: str | None) -> subprocess.Popen:
    """`rerankd serve` (ray_priority None), or `rerankd serve --ray` with that --ray-system-priority."""
    cmd = [sys.executable, "-m", "rerankd", "serve", "--model", str(ckpt), "--port", str(port), "--log-level",
           "warning", "--no-show-progress", "--num-threads", str(threads)]  # fmt: skip
    if ray_priority:
        cmd += ["--ray", "--num-replicas", "1", "--replica-cpus", str(threads), "--ray-system-priority", ray_priority]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_healthy(f"http://127.0.0.1:{port}/health", proc, timeout=300)
    return proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2, help="rounds of each system, alternating (default 2)")
    ap.add_argument("--num-prompts", type=int, default=96, help="requests a round (default 96)")
    ap.add_argument("--docs", type=int, default=8, help="documents per request (default 8)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per document (default 256)")
    ap.add_argument("--concurrency", default="32", help="requests in flight (default 32)")
    ap.add_argument("--range-ratio", type=float, default=0.25, help="document lengths' spread (default 0.25)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all CPUs)")
    ap.add_argument("--ray-system-priority", nargs="+", choices=["auto", "idle", "normal"], default=["auto"],
                    help="the Ray servers' --ray-system-priority; several: a Ray server with each, in turn (default "
                         "auto)")  # fmt: skip
    ap.add_argument("--json-out", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--update-docs", action="store_true", help=f"add the table row to {DOCS.name}")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from rerankd.tiny import make_tiny_checkpoint

    systems = {"direct": None} | {f"ray {p}": p for p in args.ray_system_priority}
    runs: dict[str, list[dict]] = {system: [] for system in systems}
    with tempfile.TemporaryDirectory(prefix="rerankd-bench-ray-") as tmp:
        ckpt = args.ckpt = Path(tmp) / "m0"
        log(f"writing the random checkpoint ({', '.join(f'{k}={v}' for k, v in CHECKPOINT.items())})")
        make_tiny_checkpoint("jina-reranker-m0", ckpt, seed=args.seed, **CHECKPOINT)
        for r in range(args.repeats):
            for system, priority in systems.items():
                port = free_port()
                log(f"round {r + 1}: starting {system} on port {port}")
                start = time.monotonic()
                proc = serve(ckpt, port, args.threads, priority)
                log(f"  healthy in {time.monotonic() - start:.1f}s; rerankd bench, {args.num_prompts} requests")
                try:
                    result = run_bench(f"http://127.0.0.1:{port}", "rerankd", args, Path(tmp) / f"{system}-{r}.json")
                finally:
                    stop(proc)
                if result["failed"]:
                    raise SystemExit(f"{system}: {result['failed']} requests failed: {result['failures']}")
                runs[system].append(result)
                log(f"  {result['pairs_per_s']:.2f} pairs/s, p50 {result['latency_ms']['p50']:.0f} ms, "
                    f"p99 {result['latency_ms']['p99']:.0f} ms")  # fmt: skip

    def med(system: str, key: str) -> float:
        return statistics.median(r["latency_ms"][key[8:]] if key.startswith("latency.") else r[key]
                                 for r in runs[system])  # fmt: skip

    rays = [system for system in systems if system != "direct"]
    share = {system: med(system, "pairs_per_s") / med("direct", "pairs_per_s") for system in rays}
    machine = f"{cpu_name()}, {os.cpu_count()} CPUs, {args.threads} torch threads"
    results = {"date": datetime.date.today().isoformat(), "machine": machine, "checkpoint": CHECKPOINT,
               "settings": vars(args) | {"json_out": None, "ckpt": None}, "runs": runs, "ray_share_of_direct": share}  # fmt: skip

    def cell(system: str) -> str:
        rates = ", ".join(f"{r['pairs_per_s']:.1f}" for r in runs[system])
        return f"{rates} (p99 {med(system, 'latency.p99'):.0f} ms)"

    rows = [f"| {results['date']} | {machine} | {args.num_prompts} x {args.docs} x {args.tokens} tok, "
            f"c={args.concurrency}, {args.repeats} rounds, --ray-system-priority {systems[system]} | "
            f"{cell('direct')} | {cell(system)} | {share[system]:.0%} |" for system in rays]  # fmt: skip
    print()
    for system in rays:
        print(f"Ray Serve ({system}) keeps {share[system]:.1%} of the direct server's pairs/s (median of "
              f"{args.repeats}; target >= 90%)")  # fmt: skip
    print("| date | machine | workload | direct pairs/s | Ray Serve pairs/s | Ray / direct |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    if args.update_docs:
        text = DOCS.read_text()
        header = ("| date | machine | workload | direct pairs/s | Ray Serve pairs/s | Ray / direct |\n"
                  "|---|---|---|---|---|---|\n")  # fmt: skip
        if SECTION not in text:
            what = " ".join(__doc__.split("\n\n")[0].split())
            text = text.rstrip() + f"\n\n{SECTION}\n\n`benchmarks/bench_ray.py`: {what}\n\n"
            text += "    .venv/bin/python benchmarks/bench_ray.py --update-docs\n\n" + header
        at = text.index(header, text.index(SECTION)) + len(header)
        DOCS.write_text(text[:at] + "".join(row + "\n" for row in rows) + text[at:])
        log(f"added {len(rows)} row(s) to {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
