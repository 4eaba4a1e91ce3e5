"""Benchmark: rerankd on a GPU against the padded transformers reference and sentence-transformers (issue 14).

In one process, on the same random weights (realistic scale: about 1/sqrt(fan-in), 0.02-0.03 at these widths) and
the same inputs, bf16 on the device:

* jina-reranker-m0 at the real Qwen2-VL-2B sizes (decoder hidden 1536, 28 layers, 12 heads, 2 kv heads,
  intermediate 8960; vision tower 1280 wide, 32 blocks; only the vocabulary is the tiny test tokenizer's, which
  costs no FLOPs): --text-pairs text pairs of 16..2048 document tokens, and --image-pairs pairs whose document is a
  896 x 672 image (768 image tokens). rerankd's `compute_score` against tests/references.py's ReferenceM0 (the
  model card's call on transformers' Qwen2VLForConditionalGeneration, attention "sdpa", left-padded batches of 8).
  rerankd in fp32 scores the text pairs once more: the bf16 scores' distance from fp32 is the bound README states.
* jina-reranker-v2 at full size (XLM-RoBERTa base) against sentence-transformers' CrossEncoder (batch 32), both
  bf16, --v2-pairs pairs of 16..500 document tokens.
* The device's bf16 matmul rate (best of 5, 8192^3), and the share of it that rerankd's useful FLOPs reach on the m0
  text workload (decoder linear layers and causal attention at each pair's real token count; the last layer's
  K/V for every token and the rest for the last token only).

Each engine is warmed up, then timed in turn --repeats rounds; the best round counts. Prints one table last and
writes everything to --json-out. `--smoke` runs the same code at toy sizes, on any device (scripts/gpu-check.sh
--cpu), to check the script itself.

    python benchmarks/bench_gpu.py [--device cuda] [--smoke] [--json-out gpu.json]
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_cross_encoder import CHECKPOINT as V2_SIZES  # noqa: E402
from bench_cross_encoder import sentence_transformers_view, useful_flops  # noqa: E402
from bench_m0_engine import add_repo_root_to_path, log, make_pairs  # noqa: E402

M0_SIZES = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                num_key_value_heads=2, mrope_section=[16, 24, 24], vision_embed_dim=1280, vision_depth=32,
                vision_num_heads=16)  # fmt: skip
SMOKE_M0 = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, mrope_section=[4, 6, 6], vision_embed_dim=64, vision_depth=2,
                vision_num_heads=4)  # fmt: skip
SMOKE_V2 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
IMAGE_SIZE = (896, 672)  # 32 x 24 merged tokens of 28 x 28 pixels: 768 image tokens, m0's default max_pixels
TARGETS = {"m0 text vs reference": 3.0, "v2 vs CrossEncoder": 2.0, "flop share": 0.40}
REFERENCE_BATCH = 8
ST_BATCH = 32
MAX_LENGTH = 4096  # above every pair of the workload: no engine cuts anything


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn, rounds: int, device: torch.device) -> tuple[float, list[float]]:
    """fn() once to warm up, then `rounds` timed calls: the best time and the last result."""
    out = fn()
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def matmul_rate(device: torch.device, n: int) -> float:
    """bf16 [n, n] @ [n, n] FLOP/s on the device, best of 5."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds, _ = best_of(lambda: torch.mm(a, b), 5, device)
    return 2 * n**3 / seconds


def m0_useful_flops(lengths: list[int], cfg: dict) -> float:
    """The decoder's FLOPs for text sequences of these token counts (2 per multiply-add): per token the q, k, v, o
    projections and the SwiGLU MLP; causal attention (QK^T and PV over the keys up to each query: 2 n^2 h); in the
    last layer K and V for all n tokens and everything else for the last token only."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    qo, kvp, mlp = 2 * 2 * h * h, 2 * 2 * h * kv, 2 * 3 * h * inter
    total = 0.0
    for n in lengths:
        total += (layers - 1) * (n * (qo + kvp + mlp) + 2 * n * n * h) + n * kvp + qo + mlp + 4 * n * h
    return total


def image_uri(seed: int, size: tuple[int, int]) -> str:
    add_repo_root_to_path()
    from tests.conftest import make_image

    buf = io.BytesIO()
    make_image(*size, seed=seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def row(name: str, pairs: int, tokens: int, seconds: float, **extra) -> dict:
    r = {"engine": name, "pairs": pairs, "tokens": tokens, "seconds": seconds, "pairs_per_s": pairs / seconds,
         "tokens_per_s": tokens / seconds} | extra  # fmt: skip
    log(f"{name}: {seconds:.2f}s, {r['pairs_per_s']:.1f} pairs/s, {r['tokens_per_s']:.0f} tokens/s")
    return r


def bench_m0(args, device: torch.device, ckpt_root: Path, rate: float) -> dict:
    from tokenizers import Tokenizer

    from rerankd import Reranker
    from rerankd.tiny import make_tiny_checkpoint
    from tests.references import ReferenceM0

    sizes = SMOKE_M0 if args.smoke else M0_SIZES
    log(f"writing a random jina-reranker-m0 checkpoint at {'toy' if args.smoke else 'Qwen2-VL-2B'} sizes")
    ckpt = make_tiny_checkpoint("jina-reranker-m0", ckpt_root / "m0", seed=0, **sizes)
    cfg = json.loads((ckpt / "config.json").read_text())
    pairs, _ = make_pairs(ckpt / "tokenizer.json", args.text_pairs, 16, args.max_text_tokens, seed=0)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    lengths = [len(tok.encode(ReferenceM0.prompt(q, d, "text", "text")).ids) + 1 for q, d in pairs]
    images = [["what does the chart show", image_uri(i, IMAGE_SIZE)] for i in range(args.image_pairs)]

    log("loading rerankd (bf16) and the reference (transformers, sdpa, bf16)")
    ours = Reranker.from_pretrained(ckpt, device=str(device), dtype="bfloat16", show_progress=False)
    ref = ReferenceM0(ckpt, attn_implementation="sdpa", device=str(device), dtype=torch.bfloat16)
    log(f"rerankd: attention {ours.options.attention}, token budget {ours.max_batch_tokens}")
    out: dict = {"attention": ours.options.attention, "max_batch_tokens": ours.max_batch_tokens,
                 "text_tokens": sum(lengths), "rows": []}  # fmt: skip
    t_ours, s_ours = best_of(lambda: ours.compute_score(pairs, max_length=MAX_LENGTH), args.repeats, device)
    t_ref, s_ref = best_of(lambda: ref.compute_score(pairs, max_length=MAX_LENGTH, batch_size=REFERENCE_BATCH),
                           args.repeats, device)  # fmt: skip
    flops = m0_useful_flops(lengths, cfg)
    out["rows"] += [row("m0 text rerankd bf16", len(pairs), sum(lengths), t_ours, tflops=flops / t_ours / 1e12,
                        flop_share=flops / t_ours / rate),
                    row("m0 text reference sdpa bf16", len(pairs), sum(lengths), t_ref)]  # fmt: skip
    out["text_speedup"] = t_ref / t_ours
    out["budgets"] = {}
    for budget in args.budgets:  # the token budget of a batch: what fills the device (config.CUDA_MAX_BATCH_TOKENS)
        swept = Reranker(ours.backend, ours.model_dir, replace(ours.options, max_batch_tokens=budget))
        t, _ = best_of(lambda: swept.compute_score(pairs, max_length=MAX_LENGTH), 1, device)
        out["budgets"][budget] = {"pairs_per_s": len(pairs) / t, "tokens_per_s": sum(lengths) / t}
        log(f"token budget {budget}: {len(pairs) / t:.1f} pairs/s")
    out["text_flop_share"] = flops / t_ours / rate
    out["text_bf16_vs_reference_bf16"] = max(abs(a - b) for a, b in zip(s_ours, s_ref))
    if images:
        i_ours, si_ours = best_of(lambda: ours.compute_score(images, doc_type="image"), args.repeats, device)
        i_ref, si_ref = best_of(lambda: ref.compute_score(images, doc_type="image", batch_size=REFERENCE_BATCH),
                                args.repeats, device)  # fmt: skip
        image_tokens = len(images) * 768
        out["rows"] += [row("m0 image rerankd bf16", len(images), image_tokens, i_ours),
                        row("m0 image reference sdpa bf16", len(images), image_tokens, i_ref)]  # fmt: skip
        out["image_speedup"] = i_ref / i_ours
        out["image_bf16_vs_reference_bf16"] = max(abs(a - b) for a, b in zip(si_ours, si_ref))
    log("rerankd fp32 on the text pairs (the bf16 bound)")
    fp32 = Reranker.from_pretrained(ckpt, device=str(device), dtype="float32", show_progress=False)
    t32, s32 = best_of(lambda: fp32.compute_score(pairs, max_length=MAX_LENGTH), 1, device)
    out["rows"].append(row("m0 text rerankd fp32", len(pairs), sum(lengths), t32))
    out["text_bf16_vs_fp32"] = max(abs(a - b) for a, b in zip(s_ours, s32))
    out["score_spread_fp32"] = [min(s32), max(s32)]
    return out


def bench_v2(args, device: torch.device, ckpt_root: Path) -> dict:
    from sentence_transformers import CrossEncoder
    from tokenizers import Tokenizer

    from rerankd import Reranker
    from rerankd.tiny import make_tiny_checkpoint

    sizes = SMOKE_V2 if args.smoke else V2_SIZES
    log("writing a random jina-reranker-v2 checkpoint (full size unless --smoke)")
    ckpt = make_tiny_checkpoint("jina-reranker-v2", ckpt_root / "v2", seed=0, naming="hf", **sizes)
    pairs, _ = make_pairs(ckpt / "tokenizer.json", args.v2_pairs, 16, 500, seed=1)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    lengths = [len(tok.encode(q, d).ids) for q, d in pairs]
    ours = Reranker.from_pretrained(ckpt, device=str(device), dtype="bfloat16", show_progress=False)
    ce = CrossEncoder(str(sentence_transformers_view(ckpt, ckpt_root / "v2-st")), max_length=1024, device=str(device))
    ce.model.to(torch.bfloat16)
    sigmoid = isinstance(ce.activation_fn, torch.nn.Sigmoid)

    def run_ce():
        logits = torch.as_tensor(ce.predict(pairs, batch_size=ST_BATCH, show_progress_bar=False)).float().view(-1)
        return (logits if sigmoid else torch.sigmoid(logits)).tolist()

    t_ours, s_ours = best_of(lambda: ours.compute_score(pairs, max_length=1024), args.repeats, device)
    t_ce, s_ce = best_of(run_ce, args.repeats, device)
    flops = useful_flops(lengths, sizes["hidden_size"], sizes["intermediate_size"], sizes["num_hidden_layers"])
    return {"attention": ours.options.attention, "tokens": sum(lengths), "speedup": t_ce / t_ours,
            "bf16_vs_crossencoder_bf16": max(abs(a - b) for a, b in zip(s_ours, s_ce)),
            "rows": [row("v2 rerankd bf16", len(pairs), sum(lengths), t_ours, tflops=flops / t_ours / 1e12),
                     row("v2 CrossEncoder bf16", len(pairs), sum(lengths), t_ce)]}  # fmt: skip


def table(result: dict) -> str:
    lines = [f"GPU check, {result['date']}: {result['device_name']}, torch {result['torch']}, bf16 matmul "
             f"{result['bf16_matmul_tflops']:.3g} TFLOP/s", "",
             "| engine | pairs/s | tokens/s | TFLOP/s |", "|---|---|---|---|"]  # fmt: skip
    for r in result["m0"]["rows"] + result["v2"]["rows"]:
        tf = f"{r['tflops']:.3g}" if "tflops" in r else ""
        lines.append(f"| {r['engine']} | {r['pairs_per_s']:.1f} | {r['tokens_per_s']:.0f} | {tf} |")
    m0, v2 = result["m0"], result["v2"]
    checks = [("m0 text vs reference", m0["text_speedup"]), ("v2 vs CrossEncoder", v2["speedup"]),
              ("flop share", m0["text_flop_share"])]  # fmt: skip
    lines.append("")
    for name, value in checks:
        verdict = "ok" if value >= TARGETS[name] else "MISSED"
        lines.append(f"{name}: {value:.2f} (target >= {TARGETS[name]:.2f}) {verdict}")
    if "image_speedup" in m0:
        lines.append(f"m0 image vs reference: {m0['image_speedup']:.2f}x")
    lines.append(f"max |bf16 - fp32| (m0 text): {m0['text_bf16_vs_fp32']:.2e}; rerankd vs reference, both bf16: "
                 f"text {m0['text_bf16_vs_reference_bf16']:.2e}, v2 {v2['bf16_vs_crossencoder_bf16']:.2e}")
    lines.append(f"attention kernel: m0 {m0['attention']}, v2 {v2['attention']}; "
                 f"m0 token budget {m0['max_batch_tokens']}")
    if m0["budgets"]:
        lines.append("m0 text pairs/s by token budget: " + ", ".join(f"{b}: {r['pairs_per_s']:.1f}"
                                                                   for b, r in m0["budgets"].items()))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="device to run on (default cuda)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes and few pairs: check the script on any device")
    ap.add_argument("--text-pairs", type=int, help="m0 text pairs (default 128; 8 with --smoke)")
    ap.add_argument("--max-text-tokens", type=int,
                    help="longest m0 document in tokens (default 2048; 256 with --smoke)")
    ap.add_argument("--image-pairs", type=int, help="m0 image pairs (default 32; 2 with --smoke)")
    ap.add_argument("--v2-pairs", type=int, help="v2 pairs (default 512; 8 with --smoke)")
    ap.add_argument("--budgets", type=int, nargs="*", help="m0 token budgets to sweep (default 16384 32768 65536 "
                    "131072; 512 1024 4096 with --smoke)")
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds of each engine; the best counts (default 2)")
    ap.add_argument("--ckpt-dir", type=Path, help="where to write the random checkpoints (default: a temp dir)")
    ap.add_argument("--json-out", type=Path, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    defaults = (("text_pairs", 128, 8), ("max_text_tokens", 2048, 256), ("image_pairs", 32, 2), ("v2_pairs", 512, 8),
                ("budgets", [16384, 32768, 65536, 131072], [512, 1024, 4096]))
    for name, full, smoke in defaults:
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if args.repeats < 1 or args.text_pairs < 1 or args.v2_pairs < 1 or args.image_pairs < 0:
        ap.error("need --repeats, --text-pairs and --v2-pairs >= 1, --image-pairs >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --smoke --device cpu to check the script)")
    add_repo_root_to_path()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rate = matmul_rate(device, 1024 if args.smoke else 8192)
    log(f"{name}: bf16 matmul {rate / 1e12:.1f} TFLOP/s")
    result = {"date": datetime.date.today().isoformat(), "device_name": name, "torch": torch.__version__,
              "smoke": args.smoke, "bf16_matmul_tflops": rate / 1e12}  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.ckpt_dir) as tmp:
        result["m0"] = bench_m0(args, device, Path(tmp), rate)
        if args.json_out:  # what is measured so far survives a time limit
            args.json_out.write_text(json.dumps(result, indent=2) + "\n")
        result["v2"] = bench_v2(args, device, Path(tmp))
    result["table"] = table(result)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
