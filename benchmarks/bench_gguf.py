"""Benchmark: jina-reranker-m0 as GGUF through llama.cpp (q8_0, f16, f32) vs rerankd's torch fp32 engine, on CPU.

Builds the mid-size random checkpoint of bench_m0_engine.py (hidden 512, 8 decoder layers, real layout), converts
it with `rerankd convert-gguf` to each --outtypes, makes N text pairs whose documents span
--min-tokens..--max-tokens tokens, and times, in one process on the same pairs, each engine's
`compute_score(pairs, max_length=1024)`: the torch engine and every GGUF file (all through Reranker, so the same
prompts, batching by tokens, and head). Reports pairs/s, the ratio to torch, and each GGUF's score deviation
from torch (max and mean |diff|). Each engine is warmed up, then the engines are timed in turn, --repeats
rounds, best time kept.

    .venv/bin/python benchmarks/bench_gguf.py [--pairs 64] [--repeats 3] [--json-out results.json]

Needs the `gguf` extra (llama-cpp-python, gguf).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_m0_engine import (  # noqa: E402
    CHECKPOINT,
    MAX_LENGTH,
    add_pair_arguments,
    check_pair_arguments,
    cpu_name,
    log,
    make_pairs,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_arguments(ap)
    ap.add_argument("--outtypes", default="q8_0,f16,f32", help="GGUF types to compare (default q8_0,f16,f32)")
    ap.add_argument("--max-batch-tokens", type=int, help="token budget per batch, both engines (default: rerankd's)")
    ap.add_argument("--ckpt-dir", type=Path, help="where to write the checkpoint and GGUFs (default: a temp dir)")
    ap.add_argument("--json-out", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and of the text")
    args = ap.parse_args(argv)
    check_pair_arguments(ap, args)
    outtypes = [t.strip() for t in args.outtypes.split(",") if t.strip()]

    from rerankd import Reranker
    from rerankd.convert_gguf import OUTTYPES, convert_gguf
    from rerankd.tiny import make_tiny_checkpoint

    bad = [t for t in outtypes if t not in OUTTYPES]
    if bad:
        ap.error(f"unknown outtypes {bad}; choose from {', '.join(OUTTYPES)}")
    tmp = tempfile.TemporaryDirectory(prefix="rerankd-bench-gguf-") if args.ckpt_dir is None else None
    root = Path(tmp.name) if tmp else args.ckpt_dir
    try:
        ckpt = root / "hf"
        log(f"writing the random checkpoint to {ckpt} ({', '.join(f'{k}={v}' for k, v in CHECKPOINT.items())})")
        make_tiny_checkpoint("jina-reranker-m0", ckpt, seed=args.seed, **CHECKPOINT)
        files = {}
        for t in outtypes:
            log(f"rerankd convert-gguf --outtype {t}")
            files[t] = convert_gguf(ckpt, root / t, t, show_progress=False)
            log(f"  {files[t].name}: {files[t].stat().st_size / 2**20:.1f} MiB")

        pairs, doc_lengths = make_pairs(ckpt / "tokenizer.json", args.pairs, args.min_tokens, args.max_tokens, args.seed)
        log(f"{args.pairs} pairs, document tokens {min(doc_lengths)}..{max(doc_lengths)}, total {sum(doc_lengths)}")

        opts = {} if args.max_batch_tokens is None else {"max_batch_tokens": args.max_batch_tokens}
        engines = {"torch fp32": Reranker.from_pretrained(ckpt, show_progress=False, **opts)}
        for t, f in files.items():
            engines[f"gguf {t}"] = Reranker.from_pretrained(f, **opts)
        best = {name: float("inf") for name in engines}
        scores: dict[str, list[float]] = {}
        for name, rr in engines.items():
            rr.compute_score(pairs[:4], max_length=MAX_LENGTH)  # warm-up
        for r in range(args.repeats):
            for name, rr in engines.items():
                t0 = time.perf_counter()
                scores[name] = rr.compute_score(pairs, max_length=MAX_LENGTH)
                best[name] = min(best[name], time.perf_counter() - t0)
                log(f"round {r + 1}/{args.repeats} {name}: {time.perf_counter() - t0:.2f} s")

        ref = np.array(scores["torch fp32"])
        rows = []
        for name in engines:
            diff = np.abs(np.array(scores[name]) - ref)
            rows.append({
                "engine": name,
                "seconds": round(best[name], 3),
                "pairs_per_s": round(args.pairs / best[name], 2),
                "vs_torch": round(best["torch fp32"] / best[name], 2),
                "max_abs_diff": float(diff.max()),
                "mean_abs_diff": float(diff.mean()),
            })  # fmt: skip
        print()
        print(f"{'engine':<12} {'pairs/s':>8} {'vs torch':>9} {'max|diff|':>10} {'mean|diff|':>11}")
        for row in rows:
            print(f"{row['engine']:<12} {row['pairs_per_s']:>8.2f} {row['vs_torch']:>8.2f}x "
                  f"{row['max_abs_diff']:>10.2e} {row['mean_abs_diff']:>11.2e}")  # fmt: skip
        import llama_cpp

        result = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), llama-cpp-python {llama_cpp.__version__}",
            "checkpoint": CHECKPOINT,
            "pairs": args.pairs,
            "doc_tokens": [min(doc_lengths), max(doc_lengths)],
            "results": rows,
        }
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
