"""Benchmark: rerankd's padding-free text cross-encoder (jina-reranker-v2 size) vs transformers, sentence-transformers.

Builds a random checkpoint of the full-size jina-reranker-v2 architecture (XLM-RoBERTa: hidden 768, 12 layers,
12 heads, intermediate 3072, 1024 positions) with standard Hugging Face tensor names and the tiny test tokenizer
(a ~600-token vocabulary: only the embedding table shrinks, which costs no FLOPs; the real model's 278M
parameters are mostly its 250002 x 768 embedding table, the ~86M of the encoder and head are what compute).
It makes N (query, document) pairs whose documents span --min-tokens..--max-tokens tokens (measured with the
checkpoint's tokenizer.json) in shuffled order, and times, in one process on the same weights and pairs (fp32, CPU):

* rerankd: `Reranker.from_pretrained(...).compute_score(pairs, max_length=1024)` (packed, token-budget batches);
* rerankd int8: the same with `quantize="int8"` (dynamic int8 linear layers), and rerankd bf16: the same with
  `dtype="bfloat16"` (fast only on CPUs with AVX512-BF16 or AMX). Their score deviation from fp32 rerankd is
  reported, not held to --tolerance;
* rerankd torch-gemm: when rerankd picked oneDNN for its fp32 linear layers (`cpu_gemm="auto"`), the same with
  `cpu_gemm="torch"` (torch's default kernel, as the other engines use), to show what the kernel choice is worth;
  likewise rerankd sdpa-loop (`attention="sdpa"`) and rerankd torch-elementwise (`cpu_elementwise="torch"`: GELU,
  the residual adds and LayerNorm on torch's ops) when `auto` took rerankd's own CPU kernels;
* the reference: transformers' XLMRobertaForSequenceClassification in padded batches of 16, as the model card's
  `compute_score` runs them (`tests/references.py`'s ReferenceCrossEncoder), attention "eager" and "sdpa";
* sentence-transformers' `CrossEncoder(..., max_length=1024).predict(pairs)` (batch size 32, its default; it sorts
  pairs by length before batching, and applies a sigmoid for one label). The checkpoint's config.json names Jina's
  remote code (auto_map, no model_type), as the real one does, which CrossEncoder would only load with
  trust_remote_code and a network; it is given a copy of the checkpoint whose config.json says
  model_type "xlm-roberta" instead (weights and tokenizer linked, not changed), i.e. the standard transformers model.

Each engine is warmed up on a few pairs, then the engines are timed in turn over the same pairs, --repeats rounds,
and the best time of each is kept. Scores of the fp32 engines must agree with rerankd's within --tolerance
(default 1e-4), else the exit code is 1.

It also counts the useful FLOPs of rerankd's work (each pair at its real token count n: the linear layers and
attention of 11 full layers, the last layer's K/V projections for all tokens and the rest of it for the first token
only, the head), measures this CPU's fp32 matmul rate in the same process (before and after the timed rounds, best
of 5 each, of a square 2048^3 matmul and of a 2048 x 768 -> 3072 linear layer, each through torch's default kernel
and through oneDNN; the best rate of all is the reference), and reports the share of that rate rerankd reaches.

    .venv/bin/python benchmarks/bench_cross_encoder.py [--pairs 48] [--repeats 3] [--json-out results.json]

Needs the `bench` extra (sentence-transformers, transformers): `pip install -e '.[dev,bench]'`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_m0_engine import add_repo_root_to_path, best_time, cpu_name, log, make_pairs, timed  # noqa: E402

MAX_LENGTH = 1024
REFERENCE_BATCH = 16  # the model card's compute_score default
ST_BATCH = 32  # CrossEncoder.predict's default
WARMUP_PAIRS = 8
REAL_VOCAB = 250002  # jina-reranker-v2-base-multilingual's vocabulary
CHECKPOINT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TARGETS = {"reference": 1.8, "crossencoder": 1.5, "flop_share": 0.85}
MATMUL_SHAPES = {  # name -> (m, k, n): [m, k] @ [k, n]
    "mm 2048x2048x2048": (2048, 2048, 2048),
    "linear 2048x768->3072": (2048, 768, 3072),
}


def sentence_transformers_view(ckpt: Path, out: Path) -> Path:
    """A copy of the checkpoint that transformers' AutoConfig reads without remote code: config.json with
    model_type "xlm-roberta" and no auto_map; every other file linked."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("auto_map", None)
    cfg["model_type"] = "xlm-roberta"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ckpt.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    return out


def parameter_counts(ckpt: Path) -> dict[str, int]:
    from safetensors import safe_open

    counts = {"total": 0, "word_embeddings": 0, "position_and_type_embeddings": 0}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                size = 1
                for d in st.get_slice(name).get_shape():
                    size *= d
                counts["total"] += size
                if "word_embeddings" in name:
                    counts["word_embeddings"] += size
                elif "embeddings." in name:
                    counts["position_and_type_embeddings"] += size
    counts["without_word_embeddings"] = counts["total"] - counts["word_embeddings"]
    return counts


def useful_flops(lengths: list[int], h: int, inter: int, layers: int) -> float:
    """FLOPs rerankd has to do for sequences of these token counts (2 per multiply-add): the linear layers
    (4h^2 + 2h*inter per token) and attention (QK^T and PV: 4 n^2 h) of layers - 1 full layers; in the last layer
    the K and V projections for all n tokens (4 n h^2) and, for the first token only, its Q projection, its
    attention over n keys (4 n h), out_proj and the MLP; then the head (dense h x h, out_proj h x 1)."""
    total = 0.0
    per_token = 4 * h * h + 2 * h * inter
    for n in lengths:
        full = 2 * n * per_token + 4 * n * n * h
        last = 2 * 2 * n * h * h + 2 * h * h + 4 * n * h + 2 * h * h + 2 * 2 * h * inter
        head = 2 * h * h + 2 * h
        total += (layers - 1) * full + last + head
    return total


def matmul_rates(repeats: int = 5) -> dict[str, float]:
    """Best-of-`repeats` fp32 GFLOP/s of a few matmul shapes on this CPU, with torch's threads, through torch's
    default kernel (MKL on x86) and through oneDNN (the other fp32 kernel torch ships, which rerankd may pick)."""
    from rerankd.models.layers import onednn_available, onednn_linear

    g = torch.Generator().manual_seed(0)
    rates = {}
    with torch.inference_mode():
        for name, (m, k, n) in MATMUL_SHAPES.items():
            a = torch.randn(m, k, generator=g)
            w = torch.randn(n, k, generator=g)  # nn.Linear's [out, in] weight, as the model's layers run it
            kernels = {"torch": (lambda a=a, w=w: torch.nn.functional.linear(a, w))}
            if name.startswith("mm"):
                b = w.t().contiguous()  # [k, n]
                kernels["torch"] = lambda a=a, b=b: torch.mm(a, b)
            if onednn_available():
                kernels["oneDNN"] = lambda a=a, w=w: onednn_linear(a, w, None)
            for kernel, fn in kernels.items():
                rates[f"{name} ({kernel})"] = 2 * m * k * n / best_time(fn, repeats) / 1e9
    return rates


def padded_tokens(lengths: list[int], batch: int, sort: bool) -> int:
    """Tokens a padded engine runs through its layers: every batch padded to its longest sequence."""
    order = sorted(lengths, reverse=True) if sort else list(lengths)
    return sum(len(order[i : i + batch]) * max(order[i : i + batch]) for i in range(0, len(order), batch))


def mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=48, help="number of (query, document) pairs (default 48)")
    ap.add_argument("--min-tokens", type=int, default=16, help="shortest document, in tokens (default 16)")
    ap.add_argument("--max-tokens", type=int, default=500, help="longest document, in tokens (default 500)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds; the best time of each engine is kept")
    ap.add_argument("--max-batch-tokens", type=int, help="rerankd's token budget per batch (default: its own)")
    ap.add_argument("--ckpt-dir", type=Path, help="where to write the random checkpoint (default: a temp dir)")
    ap.add_argument("--json-out", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |score difference| (1e-4)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and of the text")
    ap.add_argument("--no-bf16", action="store_true", help="skip rerankd bf16 (very slow on CPUs without AVX512-BF16)")
    args = ap.parse_args(argv)
    if not 1 <= args.min_tokens <= args.max_tokens or args.pairs < 1 or args.repeats < 1:
        ap.error("need 1 <= --min-tokens <= --max-tokens, --pairs >= 1 and --repeats >= 1")

    import sentence_transformers
    import transformers
    from sentence_transformers import CrossEncoder

    from rerankd import Reranker
    from rerankd.inputs import TextItem
    from rerankd.models.base import LengthOptions, Where
    from rerankd.tiny import make_tiny_checkpoint

    add_repo_root_to_path()
    from tests.references import ReferenceCrossEncoder

    h, inter, n_layers = CHECKPOINT["hidden_size"], CHECKPOINT["intermediate_size"], CHECKPOINT["num_hidden_layers"]
    log("measuring this CPU's fp32 matmul rate (best of 5)")
    rates = matmul_rates()
    for name, rate in rates.items():
        log(f"  {name}: {rate:.1f} GFLOP/s")
    tmp = tempfile.TemporaryDirectory(prefix="rerankd-bench-ce-")
    ckpt = Path(tmp.name) / "checkpoint" if args.ckpt_dir is None else args.ckpt_dir
    try:
        log(f"writing the random checkpoint to {ckpt} (jina-reranker-v2, standard HF names, fp32, "
            f"{', '.join(f'{k}={v}' for k, v in CHECKPOINT.items())})")  # fmt: skip
        make_tiny_checkpoint("jina-reranker-v2", ckpt, seed=args.seed, naming="hf", dtype=torch.float32, **CHECKPOINT)
        params = parameter_counts(ckpt)
        params["per_token_matmul"] = n_layers * (4 * h * h + 2 * h * inter)
        real_total = params["without_word_embeddings"] + REAL_VOCAB * h
        log(f"parameters: {params['total'] / 1e6:.1f}M in all, {params['without_word_embeddings'] / 1e6:.1f}M without "
            f"the {params['word_embeddings'] // h}-token word embeddings (of which "
            f"{params['position_and_type_embeddings'] / 1e6:.2f}M position/type embeddings, "
            f"{params['per_token_matmul'] / 1e6:.1f}M in the layers' matmuls); the real model's "
            f"{real_total / 1e6:.0f}M are mostly its {REAL_VOCAB}x{h} = {REAL_VOCAB * h / 1e6:.0f}M embedding table, "
            f"a lookup that costs no FLOPs")  # fmt: skip

        log(f"making {args.pairs} pairs, documents {args.min_tokens}..{args.max_tokens} tokens, shuffled")
        pairs, doc_lengths = make_pairs(ckpt / "tokenizer.json", args.pairs, args.min_tokens, args.max_tokens, args.seed,
                                        special_tokens=False)  # fmt: skip
        log(f"document tokens: min {min(doc_lengths)}, max {max(doc_lengths)}, total {sum(doc_lengths)}, "
            f"first ten in order {doc_lengths[:10]}")  # fmt: skip

        log("loading rerankd (fp32)")
        ours = Reranker.from_pretrained(ckpt, show_progress=False, max_batch_tokens=args.max_batch_tokens)
        budget = ours.options.max_batch_tokens
        lengths_opt = LengthOptions(MAX_LENGTH, None)
        seq_lengths = []
        for i, (q, d) in enumerate(pairs):
            seqs = ours.backend.prepare(TextItem(q), TextItem(d), lengths_opt, Where.for_pair(i))
            seq_lengths += [s.length for s in seqs]
        flops = useful_flops(seq_lengths, h, inter, n_layers)
        pad_ref = padded_tokens(seq_lengths, REFERENCE_BATCH, sort=False)
        pad_st = padded_tokens(seq_lengths, ST_BATCH, sort=True)
        log(f"prepared sequences: {len(seq_lengths)}, {sum(seq_lengths)} tokens (min {min(seq_lengths)}, max "
            f"{max(seq_lengths)}); useful work {flops / 1e9:.1f} GFLOP; padded batches run {pad_ref} tokens "
            f"(reference, {pad_ref / sum(seq_lengths):.2f}x), {pad_st} (CrossEncoder, length-sorted, "
            f"{pad_st / sum(seq_lengths):.2f}x)")  # fmt: skip

        log(f"rerankd's fp32 linear layers run on {ours.options.cpu_gemm!r} (cpu_gemm='auto')")
        log("loading rerankd int8")
        ours_int8 = Reranker.from_pretrained(ckpt, show_progress=False, quantize="int8",
                                             max_batch_tokens=args.max_batch_tokens)  # fmt: skip
        engines = {
            "rerankd": lambda p: ours.compute_score(p, max_length=MAX_LENGTH),
            "rerankd int8": lambda p: ours_int8.compute_score(p, max_length=MAX_LENGTH),
        }
        if not args.no_bf16:
            log("loading rerankd bf16")
            ours_bf16 = Reranker.from_pretrained(ckpt, show_progress=False, dtype="bfloat16",
                                                 max_batch_tokens=args.max_batch_tokens)  # fmt: skip
            engines["rerankd bf16"] = lambda p: ours_bf16.compute_score(p, max_length=MAX_LENGTH)
        if ours.options.cpu_gemm != "torch":
            log("loading rerankd with torch's default linear kernel (cpu_gemm='torch')")
            ours_torch = Reranker.from_pretrained(ckpt, show_progress=False, cpu_gemm="torch",
                                                  max_batch_tokens=args.max_batch_tokens)  # fmt: skip
            engines["rerankd torch-gemm"] = lambda p: ours_torch.compute_score(p, max_length=MAX_LENGTH)
        if ours.options.attention != "sdpa":
            log(f"rerankd's attention runs on {ours.options.attention!r}; loading it with the SDPA loop as well")
            ours_loop = Reranker.from_pretrained(ckpt, show_progress=False, attention="sdpa",
                                                 max_batch_tokens=args.max_batch_tokens)  # fmt: skip
            engines["rerankd sdpa-loop"] = lambda p: ours_loop.compute_score(p, max_length=MAX_LENGTH)
        if ours.options.cpu_elementwise != "torch":
            log(f"rerankd's element-wise work runs on {ours.options.cpu_elementwise!r}; loading it with torch's ops "
                "as well")
            ours_ops = Reranker.from_pretrained(ckpt, show_progress=False, cpu_elementwise="torch",
                                                max_batch_tokens=args.max_batch_tokens)  # fmt: skip
            engines["rerankd torch-elementwise"] = lambda p: ours_ops.compute_score(p, max_length=MAX_LENGTH)
        for impl in ("eager", "sdpa"):
            log(f"loading the reference ({impl})")
            ref = ReferenceCrossEncoder(ckpt, attn_implementation=impl)
            engines[f"reference {impl}"] = (
                lambda p, ref=ref: ref.compute_score(p, max_length=MAX_LENGTH, batch_size=REFERENCE_BATCH)
            )
        log("loading sentence-transformers CrossEncoder")
        st_dir = sentence_transformers_view(ckpt, Path(tmp.name) / "sentence-transformers")
        ce = CrossEncoder(str(st_dir), max_length=MAX_LENGTH, device="cpu")
        ce_sigmoid = isinstance(ce.activation_fn, torch.nn.Sigmoid)
        ce_attn = getattr(ce.model.config, "_attn_implementation", "?")
        ce_max = getattr(ce, "max_seq_length", None) or ce.tokenizer.model_max_length
        log(f"CrossEncoder: activation {type(ce.activation_fn).__name__}, attention {ce_attn}, max length {ce_max}")

        def run_ce(p):
            out = torch.as_tensor(ce.predict(p, batch_size=ST_BATCH, show_progress_bar=False)).float().view(-1)
            return (out if ce_sigmoid else torch.sigmoid(out)).tolist()  # scores, not logits, to compare

        engines["CrossEncoder"] = run_ce

        warm = pairs[: min(len(pairs), WARMUP_PAIRS)]
        for name, fn in engines.items():
            t, _ = timed(fn, warm)
            log(f"warm-up {name}: {len(warm)} pairs in {t:.2f}s")

        best: dict[str, float] = {}
        scores: dict[str, list[float]] = {}
        for r in range(args.repeats):
            for name, fn in engines.items():
                t, s = timed(fn, pairs)
                log(f"round {r + 1}/{args.repeats} {name}: {t:.3f}s ({len(pairs) / t:.2f} pairs/s)")
                best[name] = min(best.get(name, float("inf")), t)
                scores.setdefault(name, s)

        log("measuring this CPU's fp32 matmul rate again (best of 5; the better of the two is kept)")
        rates = {name: max(rate, rates[name]) for name, rate in matmul_rates().items()}
        for name, rate in rates.items():
            log(f"  {name}: {rate:.1f} GFLOP/s")
    finally:
        tmp.cleanup()

    diffs = {
        name: max(abs(a - b) for a, b in zip(scores["rerankd"], s)) for name, s in scores.items() if name != "rerankd"
    }
    held = {name: d for name, d in diffs.items() if name not in ("rerankd int8", "rerankd bf16")}
    pps = {name: len(pairs) / t for name, t in best.items()}
    ours_variants = ("rerankd", "rerankd int8", "rerankd bf16", "rerankd torch-gemm", "rerankd sdpa-loop",
                     "rerankd torch-elementwise")
    speedup = {name: pps["rerankd"] / v for name, v in pps.items() if name not in ours_variants}
    int8_speedup = pps["rerankd int8"] / pps["rerankd"]
    max_diff = max(held.values())
    ok = max_diff <= args.tolerance
    useful_rate = flops / best["rerankd"] / 1e9
    peak = max(rates.values())
    share = useful_rate / peak
    shares = {name: useful_rate / rate for name, rate in rates.items()}

    machine = f"{cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "checkpoint": CHECKPOINT | {"vocab_size": params["word_embeddings"] // h, "dtype": "float32"},
        "parameters": params | {"real_model_total": real_total},
        "pairs": len(pairs),
        "doc_tokens": {"min": min(doc_lengths), "max": max(doc_lengths), "total": sum(doc_lengths)},
        "sequence_tokens": {"min": min(seq_lengths), "max": max(seq_lengths), "total": sum(seq_lengths)},
        "padded_tokens": {"reference": pad_ref, "crossencoder": pad_st},
        "max_length": MAX_LENGTH,
        "reference_batch_size": REFERENCE_BATCH,
        "crossencoder_batch_size": ST_BATCH,
        "crossencoder_attention": ce_attn,
        "crossencoder_activation": type(ce.activation_fn).__name__,
        "max_batch_tokens": budget,
        "cpu_gemm": ours.options.cpu_gemm,
        "torch_gemm_pairs_per_second": pps.get("rerankd torch-gemm"),
        "attention": ours.options.attention,
        "sdpa_loop_pairs_per_second": pps.get("rerankd sdpa-loop"),
        "cpu_elementwise": ours.options.cpu_elementwise,
        "torch_elementwise_pairs_per_second": pps.get("rerankd torch-elementwise"),
        "repeats": args.repeats,
        "best_seconds": best,
        "pairs_per_second": pps,
        "speedup": speedup,
        "bf16": None if "rerankd bf16" not in pps else {
            "pairs_per_second": pps["rerankd bf16"],
            "speedup_vs_fp32": pps["rerankd bf16"] / pps["rerankd"],
            "max_abs_score_diff_vs_fp32": diffs["rerankd bf16"],
        },
        "int8": {
            "pairs_per_second": pps["rerankd int8"],
            "speedup_vs_fp32": int8_speedup,
            "max_abs_score_diff_vs_fp32": diffs["rerankd int8"],
        },
        "useful_gflop": flops / 1e9,
        "useful_gflops_per_second": useful_rate,
        "matmul_gflops_per_second": rates,
        "useful_flop_share": share,
        "useful_flop_share_by_shape": shares,
        "targets": {
            "speedup_vs_reference": TARGETS["reference"],
            "speedup_vs_crossencoder": TARGETS["crossencoder"],
            "useful_flop_share": TARGETS["flop_share"],
        },
        "max_abs_score_diff": diffs,
        "tolerance": args.tolerance,
        "scores_match": ok,
    }

    print()
    for name in best:
        if name == "rerankd":
            extra = (f" (linear layers: {ours.options.cpu_gemm}, attention: {ours.options.attention}, element-wise: "
                     f"{ours.options.cpu_elementwise})")  # fmt: skip
        elif name in ("rerankd torch-gemm", "rerankd sdpa-loop", "rerankd torch-elementwise"):
            extra = f", rerankd is {pps['rerankd'] / pps[name]:.2f}x this, max |diff| {diffs[name]:.2e}"
        elif name in ("rerankd int8", "rerankd bf16"):
            extra = (f", {pps[name] / pps['rerankd']:.2f}x fp32 rerankd, max |diff| vs fp32 {diffs[name]:.2e} "
                     "(not held to tolerance)")  # fmt: skip
        else:
            target = TARGETS["crossencoder" if name == "CrossEncoder" else "reference"]
            extra = (f", rerankd is {speedup[name]:.2f}x faster (target >= {target}x: {mark(speedup[name] >= target)})"
                     f", max |diff| {diffs[name]:.2e}")  # fmt: skip
        print(f"{name:>25}: {pps[name]:7.2f} pairs/s (best {best[name]:.3f}s of {args.repeats}){extra}")
    print(f"{'useful FLOP rate':>18}: {useful_rate:.1f} GFLOP/s of rerankd ({flops / 1e9:.1f} GFLOP) = {share:.1%} of "
          f"the best measured fp32 matmul rate {peak:.1f} GFLOP/s (target >= {TARGETS['flop_share']:.0%}: "
          f"{mark(share >= TARGETS['flop_share'])}); "
          + ", ".join(f"{v:.1%} of {k} ({rates[k]:.1f})" for k, v in shares.items()))  # fmt: skip
    print()
    head = ["date", "machine", "torch", "rerankd pairs/s", "reference eager pairs/s", "reference sdpa pairs/s",
            "CrossEncoder pairs/s", "vs eager", "vs sdpa", "vs CrossEncoder", "int8 pairs/s", "int8 vs fp32",
            "int8 max \\|diff\\|", "useful GFLOP/s", "matmul GFLOP/s", "FLOP share", "max \\|score diff\\|"]  # fmt: skip
    row = [
        results["date"], machine, torch.__version__, f"{pps['rerankd']:.2f}", f"{pps['reference eager']:.2f}",
        f"{pps['reference sdpa']:.2f}", f"{pps['CrossEncoder']:.2f}", f"{speedup['reference eager']:.2f}x",
        f"{speedup['reference sdpa']:.2f}x", f"{speedup['CrossEncoder']:.2f}x", f"{pps['rerankd int8']:.2f}",
        f"{int8_speedup:.2f}x", f"{diffs['rerankd int8']:.1e}", f"{useful_rate:.1f}", f"{peak:.1f}", f"{share:.0%}",
        f"{max_diff:.1e}",
    ]  # fmt: skip
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
