"""Benchmark: rerankd's padding-free jina-reranker-m0 engine vs the padded transformers reference (CPU, fp32).

Builds a mid-size random checkpoint in the real jina-reranker-m0 layout (hidden 512, 8 decoder layers, 8 heads,
2 kv heads, intermediate 1408; vision tower 320 wide, 4 blocks), makes N (query, document) text pairs whose
documents span --min-tokens..--max-tokens tokens (measured with the checkpoint's tokenizer.json) in shuffled order,
and times, in one process on the same weights and pairs:

* rerankd: `Reranker.from_pretrained(...).compute_score(pairs, max_length=1024)` (packed, token-budget batches);
* the reference: transformers' Qwen2VLForConditionalGeneration with left-padded batches of 8, attention "eager"
  (what the model card runs on CPU) and, unless --no-sdpa, "sdpa";
* rerankd torch-gemm: when rerankd picked oneDNN for its fp32 linear layers (`cpu_gemm="auto"`), the same engine
  with `cpu_gemm="torch"` (torch's default kernel, which the reference uses), to show what the kernel is worth;
* rerankd sdpa-loop: when rerankd's attention is its own CPU kernel (`attention="auto"` took "avx512"), the same
  engine with `attention="sdpa"` (one torch SDPA call per sequence), likewise;
* rerankd torch-elementwise: when rerankd's element-wise work runs on its own CPU kernels (`cpu_elementwise="auto"`
  took "avx512"), the same engine with `cpu_elementwise="torch"` (RMSNorm, residual adds, rotary and SiLU products
  on torch's ops), likewise.

Each engine is warmed up on a few pairs, then the engines are timed in turn over the same pairs, --repeats rounds,
and the best time of each is kept. Scores must agree within --tolerance (default 1e-4), else the exit code is 1.

    .venv/bin/python benchmarks/bench_m0_engine.py [--pairs 64] [--repeats 3] [--json-out results.json]

Needs the `dev` extra (transformers) for the reference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

MAX_LENGTH = 1024
REFERENCE_BATCH = 8
CHECKPOINT = dict(
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    mrope_section=[8, 12, 12],  # head_dim 64 = 2 * (8 + 12 + 12)
    vision_embed_dim=320,
    vision_depth=4,
    vision_num_heads=4,
)
QUERIES = [
    "slm markdown", "organic skincare for sensitive skin", "capital of France", "green tea antioxidants",
    "price of coffee this year", "gold rush merchants", "rerank documents by query", "web content extraction",
]  # fmt: skip


def add_repo_root_to_path() -> None:
    """Make `tests.references` (the transformers-based references) importable: a script's path is benchmarks/."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_name() -> str:
    """The CPU's model name, with its widest vector ISA (the machines of one name differ: AVX2 or AVX-512)."""
    name, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and (not name or name in ("x86_64", "aarch64", "arm64")):
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    name = name or platform.machine() or "unknown CPU"
    return f"{name} with {isa}" if isa else name


def make_pairs(
    tokenizer_json: Path, n: int, min_tokens: int, max_tokens: int, seed: int, special_tokens: bool = True
) -> tuple[list, list[int]]:
    """n (query, document) pairs; document token counts (with the tokenizer's special tokens unless not
    special_tokens) spread evenly over [min_tokens, max_tokens], shuffled."""
    from tokenizers import Tokenizer

    from rerankd.tiny import CORPUS

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    rng = random.Random(seed)
    words = sorted({w for text in CORPUS for w in text.split()})

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=special_tokens).ids)

    if n == 1:
        targets = [max_tokens]
    else:
        targets = [round(min_tokens + i * (max_tokens - min_tokens) / (n - 1)) for i in range(n)]
    rng.shuffle(targets)
    pairs, lengths = [], []
    for target in targets:
        doc: list[str] = []
        # add words until the next one would pass the target, then fill the rest exactly with single letters
        while True:
            w = rng.choice(words)
            if count(" ".join(doc + [w])) > target:
                break
            doc.append(w)
        filler = 0
        while count(" ".join(doc)) < target and filler < 4 * target:
            doc.append(rng.choice("abcdefghijklmnopqrstuvwxyz"))
            if count(" ".join(doc)) > target:
                doc.pop()
                filler += 1
        text = " ".join(doc)
        pairs.append([rng.choice(QUERIES), text])
        lengths.append(count(text))
    return pairs, lengths


def best_time(fn, repeats: int) -> float:
    """The best of `repeats` timed calls of fn(), after one untimed warm-up call (first-use setup: kernels, caches)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def timed(fn, pairs) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    scores = fn(pairs)
    return time.perf_counter() - t0, scores


def add_pair_arguments(ap: argparse.ArgumentParser) -> None:
    """The workload and timing options shared by the m0 benchmarks (this one and bench_gguf.py)."""
    ap.add_argument("--pairs", type=int, default=64, help="number of (query, document) pairs (default 64)")
    ap.add_argument("--min-tokens", type=int, default=16, help="shortest document, in tokens (default 16)")
    ap.add_argument("--max-tokens", type=int, default=512, help="longest document, in tokens (default 512)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds; the best time of each engine is kept")


def check_pair_arguments(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 1 <= args.min_tokens <= args.max_tokens or args.pairs < 1 or args.repeats < 1:
        ap.error("need 1 <= --min-tokens <= --max-tokens, --pairs >= 1 and --repeats >= 1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_arguments(ap)
    ap.add_argument("--max-batch-tokens", type=int, help="rerankd's token budget per batch (default: its own)")
    ap.add_argument("--ckpt-dir", type=Path, help="where to write the random checkpoint (default: a temp dir)")
    ap.add_argument("--json-out", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--no-sdpa", action="store_true", help="skip the reference with attn_implementation='sdpa'")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |score difference| (1e-4)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and of the text")
    args = ap.parse_args(argv)
    check_pair_arguments(ap, args)

    from rerankd import Reranker
    from rerankd.tiny import make_tiny_checkpoint

    add_repo_root_to_path()
    from tests.references import ReferenceM0

    tmp = None
    if args.ckpt_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="rerankd-bench-m0-")
        ckpt = Path(tmp.name)
    else:
        ckpt = args.ckpt_dir
    try:
        log(f"writing the random checkpoint to {ckpt} ({', '.join(f'{k}={v}' for k, v in CHECKPOINT.items())})")
        make_tiny_checkpoint("jina-reranker-m0", ckpt, seed=args.seed, **CHECKPOINT)

        log(f"making {args.pairs} pairs, documents {args.min_tokens}..{args.max_tokens} tokens, shuffled")
        pairs, doc_lengths = make_pairs(ckpt / "tokenizer.json", args.pairs, args.min_tokens, args.max_tokens, args.seed)
        log(f"document tokens: min {min(doc_lengths)}, max {max(doc_lengths)}, total {sum(doc_lengths)}, "
            f"first ten in order {doc_lengths[:10]}")  # fmt: skip

        log("loading rerankd")
        ours = Reranker.from_pretrained(ckpt, show_progress=False, max_batch_tokens=args.max_batch_tokens)
        budget = ours.options.max_batch_tokens
        engines = {"rerankd": lambda p: ours.compute_score(p, max_length=MAX_LENGTH)}
        log(f"rerankd's fp32 linear layers run on {ours.options.cpu_gemm!r} (cpu_gemm='auto')")
        if ours.options.cpu_gemm != "torch":
            ours_torch = Reranker.from_pretrained(ckpt, show_progress=False, max_batch_tokens=args.max_batch_tokens,
                                                  cpu_gemm="torch")  # fmt: skip
            engines["rerankd torch-gemm"] = lambda p: ours_torch.compute_score(p, max_length=MAX_LENGTH)
        log(f"rerankd's attention runs on {ours.options.attention!r} (attention='auto')")
        if ours.options.attention != "sdpa":
            ours_loop = Reranker.from_pretrained(ckpt, show_progress=False, max_batch_tokens=args.max_batch_tokens,
                                                 attention="sdpa")  # fmt: skip
            engines["rerankd sdpa-loop"] = lambda p: ours_loop.compute_score(p, max_length=MAX_LENGTH)
        log(f"rerankd's element-wise work runs on {ours.options.cpu_elementwise!r} (cpu_elementwise='auto')")
        if ours.options.cpu_elementwise != "torch":
            ours_ops = Reranker.from_pretrained(ckpt, show_progress=False, max_batch_tokens=args.max_batch_tokens,
                                                cpu_elementwise="torch")  # fmt: skip
            engines["rerankd torch-elementwise"] = lambda p: ours_ops.compute_score(p, max_length=MAX_LENGTH)
        impls = ["eager"] + ([] if args.no_sdpa else ["sdpa"])
        for impl in impls:
            log(f"loading the reference ({impl})")
            ref = ReferenceM0(ckpt, attn_implementation=impl)
            engines[f"reference {impl}"] = (
                lambda p, ref=ref: ref.compute_score(p, max_length=MAX_LENGTH, batch_size=REFERENCE_BATCH)
            )

        warm = pairs[: min(len(pairs), REFERENCE_BATCH)]
        for name, fn in engines.items():
            t, _ = timed(fn, warm)
            log(f"warm-up {name}: {len(warm)} pairs in {t:.2f}s")

        best: dict[str, float] = {}
        scores: dict[str, list[float]] = {}
        for r in range(args.repeats):
            for name, fn in engines.items():
                t, s = timed(fn, pairs)
                log(f"round {r + 1}/{args.repeats} {name}: {t:.3f}s ({len(pairs) / t:.1f} pairs/s)")
                best[name] = min(best.get(name, float("inf")), t)
                scores.setdefault(name, s)

        diffs = {
            name: max(abs(a - b) for a, b in zip(scores["rerankd"], s)) for name, s in scores.items() if name != "rerankd"
        }
        pps = {name: len(pairs) / t for name, t in best.items()}
        speedup = {name: pps["rerankd"] / v for name, v in pps.items() if name != "rerankd"}
        max_diff = max(diffs.values())
        ref_speedup = {name: v for name, v in speedup.items() if name.startswith("reference")}
        ok = max_diff <= args.tolerance
    finally:
        if tmp is not None:
            tmp.cleanup()

    machine = f"{cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "checkpoint": CHECKPOINT,
        "pairs": len(pairs),
        "doc_tokens": {"min": min(doc_lengths), "max": max(doc_lengths), "total": sum(doc_lengths)},
        "max_length": MAX_LENGTH,
        "reference_batch_size": REFERENCE_BATCH,
        "max_batch_tokens": budget,
        "cpu_gemm": ours.options.cpu_gemm,
        "repeats": args.repeats,
        "best_seconds": best,
        "pairs_per_second": pps,
        "speedup": ref_speedup,
        "speedup_vs_torch_gemm": speedup.get("rerankd torch-gemm"),
        "attention": ours.options.attention,
        "speedup_vs_sdpa_loop": speedup.get("rerankd sdpa-loop"),
        "cpu_elementwise": ours.options.cpu_elementwise,
        "speedup_vs_torch_elementwise": speedup.get("rerankd torch-elementwise"),
        "max_abs_score_diff": diffs,
        "tolerance": args.tolerance,
        "scores_match": ok,
    }

    print()
    for name in best:
        kernels = (f"linear layers: {ours.options.cpu_gemm}, attention: {ours.options.attention}, element-wise: "
                   f"{ours.options.cpu_elementwise}")  # fmt: skip
        extra = (f" ({kernels})" if name == "rerankd"
                 else f", rerankd is {speedup[name]:.2f}x faster, max |diff| {diffs[name]:.2e}")  # fmt: skip
        print(f"{name:>25}: {pps[name]:7.1f} pairs/s (best {best[name]:.3f}s of {args.repeats}){extra}")
    print()
    head = ["date", "machine", "torch", "rerankd pairs/s", "reference eager pairs/s"]
    row = [results["date"], machine, torch.__version__, f"{pps['rerankd']:.1f}", f"{pps['reference eager']:.1f}"]
    if "reference sdpa" in pps:
        head.append("reference sdpa pairs/s")
        row.append(f"{pps['reference sdpa']:.1f}")
    head.append("speed-up vs eager")
    row.append(f"{speedup['reference eager']:.2f}x")
    if "reference sdpa" in pps:
        head.append("speed-up vs sdpa")
        row.append(f"{speedup['reference sdpa']:.2f}x")
    head.append("max \\|score diff\\|")
    row.append(f"{max_diff:.1e}")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    print("| " + " | ".join(row) + " |")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {args.json_out}")
    if not ok:
        print(f"FAIL: max |score diff| {max_diff:.3e} > tolerance {args.tolerance:g}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
