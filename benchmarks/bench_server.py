"""Benchmark: the HTTP server's throughput at concurrency 32 versus the in-process engine, same model and work.

Builds the mid-size random jina-reranker-m0 checkpoint of bench_m0_engine.py (hidden 512, 8 layers), makes
--requests rerank requests of --docs documents each (documents 16..512 tokens, queries from a small set), and
measures, in one run:

* engine: `Reranker.compute_score` over all the requests' pairs in one call (the engine's best case);
* server: `rerankd serve` on loopback (a subprocess, default settings), driven by --concurrency closed-loop
  clients posting the requests to /v1/rerank; pairs/s counted from the first request to the last response.

Scores from the server must equal the engine's (<= 1e-5). Target (issue 4): the server keeps >= 85% of the
engine's pairs/s.

    .venv/bin/python benchmarks/bench_server.py [--requests 64] [--docs 8] [--concurrency 32] [--json-out F]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_m0_engine import CHECKPOINT, QUERIES, cpu_name, log, make_pairs  # noqa: E402
from bench_peer import free_port, post, stop, wait_healthy  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64, help="rerank requests (default 64)")
    ap.add_argument("--docs", type=int, default=8, help="documents per request (default 8)")
    ap.add_argument("--concurrency", type=int, default=32, help="clients at once (default 32)")
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds; the best of each is kept (default 2)")
    ap.add_argument("--json-out", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from rerankd import Reranker
    from rerankd.tiny import make_tiny_checkpoint

    n_pairs = args.requests * args.docs
    with tempfile.TemporaryDirectory(prefix="rerankd-bench-server-") as tmp:
        ckpt = Path(tmp)
        log(f"writing the random checkpoint ({', '.join(f'{k}={v}' for k, v in CHECKPOINT.items())})")
        make_tiny_checkpoint("jina-reranker-m0", ckpt, seed=args.seed, **CHECKPOINT)
        pairs, lengths = make_pairs(ckpt / "tokenizer.json", n_pairs, 16, 512, args.seed)
        rng = random.Random(args.seed)
        requests = [
            {"query": rng.choice(QUERIES), "documents": [d for _, d in pairs[i * args.docs : (i + 1) * args.docs]]}
            for i in range(args.requests)
        ]
        flat = [[r["query"], d] for r in requests for d in r["documents"]]
        log(f"{args.requests} requests x {args.docs} documents = {n_pairs} pairs, {sum(lengths)} document tokens")

        log("engine: loading")
        rr = Reranker.from_pretrained(ckpt, show_progress=False)
        rr.compute_score(flat[:8])
        engine_best, engine_scores = float("inf"), None
        for r in range(args.repeats):
            t = time.perf_counter()
            engine_scores = rr.compute_score(flat)
            engine_best = min(engine_best, time.perf_counter() - t)
            log(f"engine round {r + 1}: {n_pairs / (time.perf_counter() - t):.1f} pairs/s")
        del rr

        port = free_port()
        url = f"http://127.0.0.1:{port}/v1/rerank"
        log(f"server: starting rerankd serve on port {port}")
        proc = subprocess.Popen(
            [sys.executable, "-m", "rerankd", "serve", "--model", str(ckpt), "--port", str(port), "--log-level",
             "warning", "--no-show-progress", "--max-documents", str(max(1000, args.docs))],
        )  # fmt: skip
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", proc, timeout=300)
            post(url, requests[0])
            server_best, responses = float("inf"), []
            for r in range(args.repeats):
                t = time.perf_counter()
                with ThreadPoolExecutor(args.concurrency) as pool:
                    responses = list(pool.map(lambda body: post(url, body, timeout=600), requests))
                server_best = min(server_best, time.perf_counter() - t)
                log(f"server round {r + 1}: {n_pairs / (time.perf_counter() - t):.1f} pairs/s")
        finally:
            stop(proc)

    server_scores = []
    for resp in responses:
        by_index = {x["index"]: x["relevance_score"] for x in resp["results"]}
        server_scores += [by_index[i] for i in range(args.docs)]
    max_diff = max(abs(a - b) for a, b in zip(engine_scores, server_scores))
    engine_pps, server_pps = n_pairs / engine_best, n_pairs / server_best
    share = server_pps / engine_pps
    machine = f"{cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    results = {
        "date": datetime.date.today().isoformat(), "machine": machine, "torch": torch.__version__,
        "checkpoint": CHECKPOINT, "requests": args.requests, "docs_per_request": args.docs,
        "concurrency": args.concurrency, "pairs": n_pairs, "engine_pairs_per_s": engine_pps,
        "server_pairs_per_s": server_pps, "server_share_of_engine": share, "max_abs_score_diff": max_diff,
    }  # fmt: skip
    print()
    print(f"engine: {engine_pps:.1f} pairs/s; server at concurrency {args.concurrency}: {server_pps:.1f} pairs/s "
          f"= {share:.0%} of the engine (target >= 85%); max |score diff| {max_diff:.1e}")  # fmt: skip
    print("| date | machine | engine pairs/s | server pairs/s (concurrency) | server / engine | max \\|diff\\| |")
    print("|---|---|---|---|---|---|")
    print(f"| {results['date']} | {machine} | {engine_pps:.1f} | {server_pps:.1f} ({args.concurrency}) | {share:.0%} "
          f"| {max_diff:.1e} |")  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if max_diff <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
