"""Benchmark: rerankd against a peer server (Infinity, `infinity-emb` from PyPI) on the same checkpoint, driven
by `rerankd bench` at several concurrencies.

Builds the full-size jina-reranker-v2 architecture with random weights in standard Hugging Face names (hidden 768,
12 layers; its config.json says model_type "xlm-roberta", which Infinity needs to load it without remote code),
starts `rerankd serve` and Infinity on loopback, one at a time, and runs the same seeded workload against each
with `rerankd bench --api rerankd` / `--api infinity`. Prints pairs/s and p99 latency per concurrency and the
ratios. Target (issue 5): rerankd >= 1.5x Infinity's pairs/s at concurrency 32, no failures, a lower p99.

Infinity is best installed apart from rerankd's environment (it pins its own versions):

    python3 -m venv /tmp/inf && /tmp/inf/bin/pip install torch==2.13.0 "infinity-emb[server,torch]"
    .venv/bin/python benchmarks/bench_peer.py --infinity /tmp/inf/bin/infinity_emb [--json-out results.json]

`--infinity-engine optimum` runs Infinity on ONNX Runtime instead (`pip install "infinity-emb[optimum]"` in its
venv): the checkpoint is exported to ONNX with that venv's optimum first, and Infinity is started from inside the
checkpoint folder without its warm-up, working around two problems of Infinity 0.0.78 with a local ONNX model
(see the comments below).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_m0_engine import cpu_name, log  # noqa: E402

FULL_SIZE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def write_v2_full_size(path: Path) -> None:
    """The full-size jina-reranker-v2 architecture with random weights (std 0.02) in standard Hugging Face names,
    its config.json saying model_type "xlm-roberta", so that peers load it without remote code."""
    from rerankd.tiny import make_tiny_checkpoint

    log("writing the full-size jina-reranker-v2 architecture, random weights, standard names")
    make_tiny_checkpoint("jina-reranker-v2", path, seed=0, naming="hf", dtype=torch.float32, **FULL_SIZE)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("auto_map", None)
    cfg["model_type"] = "xlm-roberta"
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after a minute."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_bench(base_url: str, api: str, args, out: Path, model: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "rerankd", "bench", "--base-url", base_url, "--api", api, "--num-prompts",
           str(args.num_prompts), "--docs-per-request", str(args.docs), "--random-input", str(args.tokens),
           "--random-range-ratio", str(args.range_ratio), "--sweep-concurrency", args.concurrency, "--seed", "0", "--tokenizer",
           str(args.ckpt), "--output-file", str(out), "--no-progress"]  # fmt: skip
    if model:
        cmd += ["--model", model]
    subprocess.run(cmd, check=False)
    return json.loads(out.read_text())


def post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def serve_and_drive(name: str, cmd: list[str], env: dict, args, workdir: Path, tag: str, probe: dict) -> dict:
    """Start server `name` ('rerankd', else a vLLM-style /rerank) with `cmd` ("{port}" filled in) and `env`, post
    the `probe` request, drive it with run_bench, stop it: pairs/s, p99, failures and the probe's scores by index, or
    {"error": ...} with the server's log tail logged."""
    port = free_port()
    log(f"{name} ({tag}): starting on port {port}")
    logfile = workdir / f"{name}-{tag}.log"
    proc = subprocess.Popen([c.replace("{port}", str(port)) for c in cmd], stdout=subprocess.DEVNULL,
                            stderr=open(logfile, "w"), env={**os.environ, **env})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/health", proc)
        path = "/v1/rerank" if name == "rerankd" else "/rerank"
        answer = post(url + path, probe)
        scores = {r["index"]: r["relevance_score"] for r in answer["results"]}
        log(f"{name} ({tag}): healthy; driving it at concurrency {args.concurrency}")
        result = run_bench(url, "rerankd" if name == "rerankd" else "vllm", args, workdir / f"{name}-{tag}.json")
        return {"pairs_per_s": result["pairs_per_s"], "p99_ms": result["latency_ms"]["p99"], "failed": result["failed"],
                "scores": scores}  # fmt: skip
    except (RuntimeError, OSError, KeyError, ValueError) as e:
        tail = logfile.read_text()[-2000:]
        log(f"{name} ({tag}): {type(e).__name__}: {e}\n{tail}")
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        stop(proc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--infinity", default="infinity_emb", help="the infinity_emb executable")
    ap.add_argument("--infinity-engine", default="torch", choices=["torch", "optimum"],
                    help="Infinity's engine: torch (default) or optimum (ONNX Runtime; needs infinity-emb[optimum])")
    ap.add_argument("--num-prompts", type=int, default=64, help="requests per concurrency (default 64)")
    ap.add_argument("--docs", type=int, default=4, help="documents per request (default 4)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per document, at most (default 128)")
    ap.add_argument("--range-ratio", type=float, default=0.25,
                    help="documents have tokens x U[ratio, 1] tokens (default 0.25)")  # fmt: skip
    ap.add_argument("--concurrency", default="1,8,32", help="concurrencies (default 1,8,32)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="rerankd-bench-peer-") as tmp:
        args.ckpt = Path(tmp) / "ckpt"
        write_v2_full_size(args.ckpt)
        if args.infinity_engine == "optimum":  # Infinity's ONNX Runtime engine wants an .onnx file in the model dir
            exe = shutil.which(args.infinity) or args.infinity
            python = Path(exe).parent / "python"  # the interpreter of Infinity's venv, which has optimum
            log(f"exporting the checkpoint to ONNX with optimum ({python}) for Infinity's optimum engine")
            export = ("import sys; from optimum.onnxruntime import ORTModelForSequenceClassification as M; "
                      "M.from_pretrained(sys.argv[1], export=True).save_pretrained(sys.argv[2])")  # fmt: skip
            subprocess.run([str(python), "-c", export, str(args.ckpt), str(Path(tmp) / "onnx")], check=True)
            shutil.move(Path(tmp) / "onnx" / "model.onnx", args.ckpt / "model.onnx")
            # Infinity 0.0.78 hands optimum the .onnx path it globbed under --model-id as the file name, and optimum
            # wants a bare name in the model folder: with the file at the top and the folder given as ".", they agree.
            # Its warm-up sends one token more than the 1024 positions (ONNX Runtime: "indices element out of data
            # bounds, idx=1026"); the benchmark's documents are far shorter
            infinity_model, infinity_cwd, infinity_extra = ".", args.ckpt, ["--no-model-warmup"]
        else:
            infinity_model, infinity_cwd, infinity_extra = str(args.ckpt), None, []

        servers = {
            # Infinity has no request deadline; rerankd's default (60 s) would answer 504 to requests that wait
            # longer under this overload, which measures shedding, not throughput: both queue without a deadline
            "rerankd": ([sys.executable, "-m", "rerankd", "serve", "--model", str(args.ckpt), "--port", "{port}",
                         "--log-level", "warning", "--no-show-progress", "--request-timeout", "3600"], "/health",
                        "rerankd", None),
            "infinity": ([args.infinity, "v2", "--model-id", infinity_model, "--port", "{port}", "--engine",
                          args.infinity_engine, "--device", "cpu", "--dtype", "float32", "--served-model-name",
                          "peer", *infinity_extra], "/health", "infinity", "peer"),
        }  # fmt: skip
        cwd = {"infinity": infinity_cwd}
        for name, (cmd, health, api, model) in servers.items():
            port = free_port()
            log(f"{name}: starting on port {port}")
            try:
                proc = subprocess.Popen([c.replace("{port}", str(port)) for c in cmd], stdout=subprocess.DEVNULL,
                                        stderr=open(Path(tmp) / f"{name}.log", "w"), cwd=cwd.get(name))  # fmt: skip
            except OSError as e:
                results[name] = {"error": f"could not start: {e}"}
                log(results[name]["error"])
                continue
            try:
                wait_healthy(f"http://127.0.0.1:{port}{health}", proc)
                log(f"{name}: healthy; driving it at concurrency {args.concurrency}")
                results[name] = run_bench(f"http://127.0.0.1:{port}", api, args, Path(tmp) / f"{name}.json", model)
            except RuntimeError as e:
                tail = (Path(tmp) / f"{name}.log").read_text()[-2000:]
                results[name] = {"error": f"{e}; log tail: {tail}"}
                log(f"{name}: {e}\n{tail}")
            finally:
                stop(proc)

    rows = []
    ours, peer = results.get("rerankd", {}), results.get("infinity", {})
    if "completed" in ours and "completed" in peer:  # one concurrency: the top level; several: each in "sweep"
        for a, b in zip(ours.get("sweep", [ours]), peer.get("sweep", [peer])):
            rows.append({
                "concurrency": a["max_concurrency"], "rerankd_pairs_per_s": a["pairs_per_s"],
                "infinity_pairs_per_s": b["pairs_per_s"], "ratio": a["pairs_per_s"] / max(b["pairs_per_s"], 1e-9),
                "rerankd_p99_ms": a["latency_ms"]["p99"], "infinity_p99_ms": b["latency_ms"]["p99"],
                "rerankd_failed": a["failed"], "infinity_failed": b["failed"],
            })  # fmt: skip
    machine = f"{cpu_name()}, {os.cpu_count()} CPUs"
    summary = {"date": datetime.date.today().isoformat(), "machine": machine, "rows": rows, "raw": results}
    print()
    print("| date | machine | concurrency | rerankd pairs/s | Infinity pairs/s | ratio | rerankd p99 ms | Infinity p99 ms | failures |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {summary['date']} | {machine} | {r['concurrency']} | {r['rerankd_pairs_per_s']:.2f} | "
              f"{r['infinity_pairs_per_s']:.2f} | {r['ratio']:.2f}x | {r['rerankd_p99_ms']:.0f} | "
              f"{r['infinity_p99_ms']:.0f} | {r['rerankd_failed']} / {r['infinity_failed']} |")  # fmt: skip
    for name, r in results.items():
        if "error" in r:
            print(f"{name}: {r['error'][:500]}")
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
