"""`rerankd bench`: a load generator and report for rerank servers (rerankd, Jina, Cohere, vLLM, TEI, SGLang,
Infinity). Counts documents, not generated tokens: pairs/s, requests/s, input tokens/s, latency percentiles, and
every failure with its HTTP status and first error message."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from .apis import APIS
from .runner import drive, format_summary, plot, summarize
from .workload import TokenCounter, file_workload, random_workload


DEFAULT_URL = "http://127.0.0.1:30000"
# sglang.bench_serving's --backend -> the API of that server (SGLang's accepts rerankd's answer too, so its command,
# pointed at rerankd in SGLang's place, runs unchanged)
BACKENDS = {"sglang": "sglang", "sglang-native": "sglang", "sglang-oai": "sglang", "vllm": "vllm", "tei": "tei",
            "jina": "jina", "cohere": "cohere", "infinity": "infinity", "rerankd": "rerankd"}  # fmt: skip


CLOSED_LOOP_CONCURRENCY = 32  # --max-concurrency's default without a --request-rate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None, help=f"the server (default: {DEFAULT_URL})")
    p.add_argument("--host", default=None, help="with --port, the server as sglang.bench_serving names it")
    p.add_argument("--port", type=int, default=None, help="with --host, the server as sglang.bench_serving names it")
    p.add_argument("--api", choices=sorted(APIS), default=None,
                   help="request/response schema (default rerankd): " + "; ".join(f"{a.name}: {a.description}"
                                                                           for a in APIS.values()))  # fmt: skip
    p.add_argument("--backend", choices=sorted(BACKENDS), default=None,
                   help="sglang.bench_serving's name for --api (sglang, vllm, tei, ...)")  # fmt: skip
    p.add_argument("--model", default=None, help="model name to send (default: the server's, from /v1/models)")
    p.add_argument("--dataset", "--dataset-name", dest="dataset", default="random",
                   help="'random' or a JSONL file, one {\"query\", \"documents\"} a line (--dataset-name: "
                        "sglang.bench_serving's name)")  # fmt: skip
    p.add_argument("--random-output", "--random-output-len", dest="random_output", type=int, default=None,
                   help="accepted for sglang.bench_serving's commands and ignored: a reranker generates nothing")  # fmt: skip
    p.add_argument("--dataset-path", default=None, help="sglang.bench_serving's dataset file: the same as --dataset FILE")
    p.add_argument("--num-prompts", type=int, default=500, help="requests to send (default 500)")
    p.add_argument("--random-input", "--random-input-len", dest="random_input", type=int, default=512,
                   help="tokens per random document (default 512)")  # fmt: skip
    p.add_argument("--random-range-ratio", type=float, default=1.0,
                   help="random documents have random-input x U[ratio, 1] tokens (default 1.0: all equal)")  # fmt: skip
    p.add_argument("--random-query", type=int, default=16, help="tokens per random query (default 16)")
    p.add_argument("--docs-per-request", type=int, default=16, help="documents per random request (default 16)")
    p.add_argument("--image-docs", type=int, default=0, help="of each random request's documents, this many are images")
    p.add_argument("--image-size", default="256x256", help="size of random images, WxH (default 256x256)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json, model directory or hub id to size random text exactly (default: the served "
                        "model's when it can be found locally, else an estimate)")  # fmt: skip
    p.add_argument("--top-n", type=int, default=None, help="top_n to request (default: all)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals on a fixed schedule, each latency from its scheduled "
                        "arrival (default: inf, closed loop at --max-concurrency)")  # fmt: skip
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at most (default: 32 in a closed loop, none at a --request-rate)")  # fmt: skip
    p.add_argument("--warmup-requests", type=int, default=1,
                   help="requests sent one at a time before timing starts, not counted (default 1, as "
                        "sglang.bench_serving's)")  # fmt: skip
    p.add_argument("--sweep-concurrency", default=None, help="run at several concurrencies, e.g. 1,4,16,64")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer <key>' (default: $RERANKD_API_KEY)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random workload (default 0)")
    p.add_argument("--output-file", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="draw throughput and p99 latency against concurrency to this PNG")
    p.add_argument("--no-progress", "--disable-tqdm", dest="no_progress", action="store_true", help="no progress bar")


def _served_model(base_url: str, headers: dict[str, str]) -> tuple[str | None, list[str]]:
    """The served model's name, and the names it may be found under (its id, and the `root` it was loaded from)."""
    import httpx

    try:
        r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=10)
        card = r.json()["data"][0] if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        card = None
    if not isinstance(card, dict) or "id" not in card:
        return None, []
    return card["id"], [x for x in (card.get("root"), card["id"]) if isinstance(x, str)]


def _local_tokenizer(names: list[str]) -> str | None:
    """The served model's tokenizer if it is on this machine (a directory, or the hub cache)."""
    for name in names:
        if (Path(name) / "tokenizer.json").is_file() or (Path(name).suffix == ".gguf" and Path(name).is_file()):
            return name
        try:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(name, "tokenizer.json", local_files_only=True)
        except Exception:  # not cached, not a repo id: try the next, else estimate
            continue
    return None


def resolve_server(args: argparse.Namespace) -> None:
    """--base-url, or sglang.bench_serving's --host/--port; --api, or its --backend (SystemExit when they clash)."""
    if args.base_url is None and (args.host is not None or args.port is not None):  # --base-url wins, as there
        host = (args.host or "127.0.0.1").strip("[]")
        args.base_url = f"http://{'[' + host + ']' if ':' in host else host}:{args.port or 30000}"
    args.base_url = args.base_url or DEFAULT_URL
    if args.dataset_path is not None:
        args.dataset = args.dataset_path
    if args.backend is not None:
        if args.api is not None and args.api != BACKENDS[args.backend]:
            raise SystemExit(f"--backend {args.backend} means --api {BACKENDS[args.backend]}, but --api {args.api} "
                             "was given; give one of them")  # fmt: skip
        args.api = BACKENDS[args.backend]
    args.api = args.api or "rerankd"


def run(args: argparse.Namespace) -> int:
    resolve_server(args)
    api = APIS[args.api]
    key = args.api_key or os.environ.get("RERANKD_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if args.image_docs and not api.images:
        raise SystemExit(f"--image-docs: the {api.name} API takes text documents only")
    capped = args.max_concurrency is not None
    if args.num_prompts < 1 or args.docs_per_request < 1 or (capped and args.max_concurrency < 1):
        raise SystemExit("--num-prompts, --docs-per-request and --max-concurrency must be >= 1")
    try:
        w, h = (int(x) for x in args.image_size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--image-size must look like 256x256, got {args.image_size!r}") from None
    served, names = _served_model(args.base_url, headers)
    model = args.model or (served if args.api in ("rerankd", "jina", "vllm", "infinity") else None)
    counter = TokenCounter(args.tokenizer or _local_tokenizer([*([args.model] if args.model else []), *names]))
    print(f"token counts: {counter.source}", file=sys.stderr)
    if args.dataset == "random":
        requests = random_workload(args.num_prompts, args.docs_per_request, args.random_input, args.random_range_ratio,
                                   args.random_query, args.image_docs, (w, h), counter, args.seed)  # fmt: skip
    else:
        try:
            requests = file_workload(Path(args.dataset), args.num_prompts, counter)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--dataset: {e}") from None
    if args.warmup_requests < 0:
        raise SystemExit(f"--warmup-requests must be >= 0, got {args.warmup_requests}")
    closed = args.request_rate == float("inf")
    default = CLOSED_LOOP_CONCURRENCY if closed else None
    concurrencies = [args.max_concurrency if args.max_concurrency is not None else default]
    if args.sweep_concurrency:
        try:
            concurrencies = [int(c) for c in args.sweep_concurrency.split(",")]
        except ValueError:
            raise SystemExit(f"--sweep-concurrency must be integers separated by commas, got {args.sweep_concurrency!r}")

    settings = {k: (v if v != float("inf") else "inf") for k, v in vars(args).items() if k not in ("func", "api_key")}
    settings["model_sent"] = model
    settings["token_counts"] = counter.source
    sweep: list[dict[str, Any]] = []
    everything, total = [], 0.0
    for n, c in enumerate(concurrencies):
        label = f"concurrency {c}" if closed else f"{args.request_rate:g} requests/s"
        label += f", at most {c} in flight" if c and not closed else ""
        outcomes, duration = asyncio.run(
            drive(args.base_url, api, requests, model, args.top_n, c, args.request_rate, args.timeout, headers,
                  args.seed, not args.no_progress, desc=label, warmup=args.warmup_requests if n == 0 else 0)  # fmt: skip
        )
        summary = summarize(outcomes, duration) | {"max_concurrency": c}
        print(format_summary(summary, f"{api.name} at {label}"))
        sweep.append(summary)
        everything += outcomes
        total += duration
    # the top level covers every request sent; a sweep also has each concurrency's own numbers
    result = summarize(everything, total) if len(sweep) > 1 else dict(sweep[0])
    result["settings"] = settings
    if len(sweep) > 1:
        result["sweep"] = sweep
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output_file}", file=sys.stderr)
    if args.plot:
        plot(sweep, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if all(s["failed"] == 0 for s in sweep) else 1
