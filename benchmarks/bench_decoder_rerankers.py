"""Benchmark: rerankd's decoder rerankers vs their references (CPU, fp32 unless --dtype), in one process.

Three workloads (the third only when asked for) on random checkpoints in the real layouts, at the real Qwen3-0.6B
widths (hidden 1024, 16 query and 8 key/value heads of head_dim 128, intermediate 3072) and --layers decoder layers
(default 8), weights drawn at a realistic scale (std 0.02):

* qwen3: Qwen3-Reranker, --pairs (64) (query, document) pairs of --min-tokens..--max-tokens (16..1024) document
  tokens, shuffled. rerankd's `compute_score` against the model card's usage on transformers' Qwen3ForCausalLM
  (left-padded batches of 8), with attention "eager" and "sdpa"; and rerankd without its own attention kernel
  ("sdpa-loop") and without shared prompt prefixes ("whole-prompts", share_prefixes=False), where they apply.
* v3: jina-reranker-v3, one query and --docs (100) documents of --v3-min-tokens..--v3-max-tokens (64..512)
  tokens. rerankd's `rerank` against `JinaForRanking.rerank` rebuilt on transformers' Qwen3 modules
  (tests/references.py: one sequence per block of documents, sdpa attention: eager would hold a [heads, n, n]
  matrix of the ~30k-token block).
* qwen3-server (only with --only qwen3-server): `rerankd serve` on the Qwen3-Reranker checkpoint with its shared
  prompt prefixes and without (`--no-share-prefixes`), in turn: `rerankd bench`, --server-requests requests of 8
  documents of 26..256 tokens, concurrency 8; the median pairs/s of each.

Each engine is warmed up, then the engines are timed in turn, --repeats rounds, and the best time of each is kept.
For v3 the script also times the decoder's parts on the block (attention vs the rest) to say where the time goes.
Scores must agree within --tolerance (1e-4), else the exit code is 1.

    .venv/bin/python benchmarks/bench_decoder_rerankers.py [--only qwen3|v3|qwen3-server] [--repeats 2] [--json-out F]

Needs the `dev` extra (transformers) for the references.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_m0_engine import add_repo_root_to_path, cpu_name, log, make_pairs, timed

QWEN3_MAX_LENGTH = 8192  # the model card's
REFERENCE_BATCH = 8
WIDTHS = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=128)
QUERY = "slm markdown"


def time_engines(engines: dict, inputs, repeats: int, warm) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Warm each engine up on `warm`, then time them in turn over `inputs`; the best time of each, and its scores."""
    for name, fn in engines.items():
        t, _ = timed(fn, warm)
        log(f"warm-up {name}: {t:.2f}s")
    best: dict[str, float] = {}
    scores: dict[str, list[float]] = {}
    for r in range(repeats):
        for name, fn in engines.items():
            t, s = timed(fn, inputs)
            log(f"round {r + 1}/{repeats} {name}: {t:.2f}s")
            best[name] = min(best.get(name, float("inf")), t)
            scores.setdefault(name, s)
    return best, scores


def qwen3_workload(args, ckpt: Path) -> dict:
    from rerankd import Reranker
    from rerankd.tiny import make_tiny_checkpoint
    from tests.references import ReferenceQwen3Reranker

    log(f"writing a Qwen3-Reranker checkpoint ({args.layers} layers, {WIDTHS})")
    make_tiny_checkpoint("qwen3-reranker", ckpt, seed=args.seed, num_hidden_layers=args.layers, weight_std=0.02,
                         tie_word_embeddings=False, **WIDTHS)  # fmt: skip
    pairs, lengths = make_pairs(ckpt / "tokenizer.json", args.pairs, args.min_tokens, args.max_tokens, args.seed)
    log(f"{len(pairs)} pairs, document tokens {min(lengths)}..{max(lengths)}, total {sum(lengths)}")
    ours = Reranker.from_pretrained(ckpt, show_progress=False, dtype=args.dtype)
    engines = {"rerankd": lambda p: ours.compute_score(p)}
    if ours.options.attention != "sdpa":  # what rerankd's own attention kernel is worth in the whole model
        loop = Reranker.from_pretrained(ckpt, show_progress=False, dtype=args.dtype, attention="sdpa")
        engines["rerankd sdpa-loop"] = lambda p: loop.compute_score(p)
    if ours.backend.share_prefixes:  # what computing the shared prompt prefixes once is worth
        whole = Reranker.from_pretrained(ckpt, show_progress=False, dtype=args.dtype, share_prefixes=False)
        engines["rerankd whole-prompts"] = lambda p: whole.compute_score(p)
    for impl in ("eager", "sdpa"):
        ref = ReferenceQwen3Reranker(ckpt, attn_implementation=impl)
        if args.dtype == "bfloat16":
            ref.model.to(torch.bfloat16)
        engines[f"reference {impl}"] = lambda p, ref=ref: ref.compute_score(p, batch_size=REFERENCE_BATCH)
    best, scores = time_engines(engines, pairs, args.repeats, pairs[:REFERENCE_BATCH])
    return report("qwen3", best, scores, len(pairs), ours, {"doc_tokens": [min(lengths), max(lengths), sum(lengths)]})


def v3_workload(args, ckpt: Path) -> dict:
    from rerankd import Reranker
    from rerankd.tiny import make_tiny_checkpoint
    from tests.references import ReferenceJinaV3

    log(f"writing a jina-reranker-v3 checkpoint ({args.layers} layers, {WIDTHS})")
    make_tiny_checkpoint("jina-reranker-v3", ckpt, seed=args.seed, num_hidden_layers=args.layers, weight_std=0.02,
                         **WIDTHS)  # fmt: skip
    pairs, lengths = make_pairs(ckpt / "tokenizer.json", args.docs, args.v3_min_tokens, args.v3_max_tokens, args.seed)
    docs = [d for _, d in pairs]
    log(f"{len(docs)} documents, tokens {min(lengths)}..{max(lengths)}, total {sum(lengths)}")
    ours = Reranker.from_pretrained(ckpt, show_progress=False, dtype=args.dtype)
    ref = ReferenceJinaV3(ckpt, attn_implementation="sdpa")
    if args.dtype == "bfloat16":
        ref.model.to(torch.bfloat16)
        ref.projector.to(torch.bfloat16)
    _, blocks = ref.blocks(QUERY, docs, 131072)
    engines = {
        "rerankd": lambda ds: [r["relevance_score"] for r in sorted(ours.rerank(QUERY, ds), key=lambda r: r["index"])],
        "reference sdpa": lambda ds: ref.rerank(QUERY, ds),
    }
    best, scores = time_engines(engines, docs, args.repeats, docs[:8])
    where = where_the_time_goes(ours, docs)
    return report("v3", best, scores, len(docs), ours, {"doc_tokens": [min(lengths), max(lengths), sum(lengths)],
                                                         "blocks": len(blocks), "rerankd_time_split": where})  # fmt: skip


def where_the_time_goes(rr, docs: list[str]) -> dict:
    """Seconds of one forward of the v3 block in rerankd, split into attention (the per-sequence SDPA calls) and
    the rest (linear layers, norms, rotary, MLP), by timing the same forward with attention swapped for a no-op."""
    from rerankd.inputs import TextItem
    from rerankd.models import decoder
    from rerankd.models.base import LengthOptions, Where

    be = rr.backend
    seqs, _ = be.prepare_list(TextItem(QUERY), [TextItem(d) for d in docs], LengthOptions(be.default_max_length, 512),
                              [Where.for_pair(0)] * len(docs), None)  # fmt: skip
    t0 = time.perf_counter()
    be.forward(seqs)
    whole = time.perf_counter() - t0
    real = decoder.varlen_attention
    decoder.varlen_attention = lambda q, k, v, pack, causal: torch.empty_like(q)
    try:
        t0 = time.perf_counter()
        be.forward(seqs)
        rest = time.perf_counter() - t0
    finally:
        decoder.varlen_attention = real
    tokens = sum(s.length for s in seqs)
    log(f"one forward of the {tokens}-token block: {whole:.1f}s, of which attention {whole - rest:.1f}s "
        f"({100 * (whole - rest) / whole:.0f}%)")  # fmt: skip
    return {"block_tokens": tokens, "forward_s": whole, "attention_s": whole - rest}


def report(name: str, best: dict, scores: dict, items: int, ours, extra: dict) -> dict:
    rate = {k: items / t for k, t in best.items()}
    diffs = {k: max(abs(a - b) for a, b in zip(scores["rerankd"], s)) for k, s in scores.items() if k != "rerankd"}
    speedup = {k: rate["rerankd"] / v for k, v in rate.items() if k != "rerankd"}
    for k in best:
        more = "" if k == "rerankd" else f", rerankd {speedup[k]:.2f}x, max |diff| {diffs[k]:.1e}"
        log(f"{name} {k}: {rate[k]:.2f} documents/s (best {best[k]:.2f}s){more}")
    return {"best_seconds": best, "per_second": rate, "speedup": speedup, "max_abs_score_diff": diffs,
            "cpu_gemm": ours.options.cpu_gemm, "attention": ours.options.attention,
            "max_batch_tokens": ours.options.max_batch_tokens, **extra}  # fmt: skip


def qwen3_server_workload(args, ckpt: Path) -> dict:
    """`rerankd serve` on a Qwen3-Reranker checkpoint with shared prompt prefixes and without (--no-share-prefixes),
    one server at a time, in turn, --repeats rounds: one probe request whose scores the two must agree on, then
    `rerankd bench` with --server-requests requests of 8 documents of 26..256 tokens (16-token queries) at
    concurrency 8 (bench_peer.serve_and_drive)."""
    from bench_peer import serve_and_drive
    from rerankd.tiny import make_tiny_checkpoint

    log(f"writing a Qwen3-Reranker checkpoint ({args.layers} layers, {WIDTHS})")
    make_tiny_checkpoint("qwen3-reranker", ckpt, seed=args.seed, num_hidden_layers=args.layers, weight_std=0.02,
                         tie_word_embeddings=False, **WIDTHS)  # fmt: skip
    bench = argparse.Namespace(num_prompts=args.server_requests, docs=8, tokens=256, range_ratio=0.1,
                               concurrency="8", ckpt=ckpt)  # fmt: skip
    probe = {"query": QUERY, "documents": [d for _, d in make_pairs(ckpt / "tokenizer.json", 8, 16, 256, 1)[0]]}
    systems = {"shared-prefixes": [], "whole-prompts": ["--no-share-prefixes"]}
    runs: dict = {name: [] for name in systems}
    for r in range(args.repeats):
        for name, extra in systems.items():
            cmd = [sys.executable, "-m", "rerankd", "serve", "--model", str(ckpt), "--port", "{port}", "--log-level",
                   "warning", "--no-show-progress", *extra]  # fmt: skip
            result = serve_and_drive("rerankd", cmd, {}, bench, ckpt, f"{name}-{r}", probe)
            if "error" in result:
                raise SystemExit(f"qwen3-server ({name}): {result['error']}")
            runs[name].append(result)
            log(f"round {r + 1}/{args.repeats} {name}: {result['pairs_per_s']:.2f} pairs/s, p99 "
                f"{result['p99_ms']:.0f} ms, {result['failed']} failed")  # fmt: skip
    median = {name: statistics.median(x["pairs_per_s"] for x in v) for name, v in runs.items()}
    shared, whole = runs["shared-prefixes"][-1]["scores"], runs["whole-prompts"][-1]["scores"]
    diff = max(abs(shared[i] - whole[i]) for i in shared)
    ratio = median["shared-prefixes"] / median["whole-prompts"]
    log(f"qwen3-server: shared prefixes {median['shared-prefixes']:.2f} pairs/s, whole prompts "
        f"{median['whole-prompts']:.2f}: {ratio:.2f}x, max |diff| {diff:.1e}")  # fmt: skip
    return {"runs": runs, "median_pairs_per_s": median, "max_abs_score_diff": {"whole-prompts": diff}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["qwen3", "v3", "qwen3-server"],
                    help="run one workload (default: qwen3 and v3)")  # fmt: skip
    ap.add_argument("--server-requests", type=int, default=24, help="qwen3-server: requests a round (default 24)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of both checkpoints (default 8)")
    ap.add_argument("--pairs", type=int, default=64, help="Qwen3-Reranker pairs (default 64)")
    ap.add_argument("--min-tokens", type=int, default=16, help="Qwen3-Reranker: shortest document (16)")
    ap.add_argument("--max-tokens", type=int, default=1024, help="Qwen3-Reranker: longest document (1024)")
    ap.add_argument("--docs", type=int, default=100, help="v3: documents of the one query (default 100)")
    ap.add_argument("--v3-min-tokens", type=int, default=64, help="v3: shortest document (64)")
    ap.add_argument("--v3-max-tokens", type=int, default=512, help="v3: longest document (512)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both engines' dtype")
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds; the best time of each engine is kept")
    ap.add_argument("--tolerance", type=float, default=None, help="largest |score diff| (1e-4 fp32, 0.05 bf16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", type=Path, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    tolerance = args.tolerance if args.tolerance is not None else (1e-4 if args.dtype == "float32" else 0.05)
    add_repo_root_to_path()
    random.seed(args.seed)
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "dtype": args.dtype, "layers": args.layers,
        "widths": WIDTHS, "repeats": args.repeats, "tolerance": tolerance,
    }  # fmt: skip
    workloads = {"qwen3": qwen3_workload, "v3": v3_workload, "qwen3-server": qwen3_server_workload}
    ok = True
    for name, run in workloads.items():
        if args.only != name and (args.only is not None or name == "qwen3-server"):
            continue
        with tempfile.TemporaryDirectory(prefix=f"rerankd-bench-{name}-") as tmp:
            results[name] = run(args, Path(tmp))
        ok &= max(results[name]["max_abs_score_diff"].values()) <= tolerance
    print(json.dumps(results, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    if not ok:
        print(f"FAIL: a score differs by more than {tolerance:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
