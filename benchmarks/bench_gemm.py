"""Benchmark: the fp32 linear layers of the rerankers through torch's default kernel and through oneDNN (CPU).

torch runs an fp32 `nn.Linear` on x86 through MKL; rerankd can run it through oneDNN instead (`cpu_gemm`, see
`rerankd.models.layers`). This times both on the real models' layer shapes, jina-reranker-v2 (XLM-RoBERTa base:
768 -> 2304 fused q/k/v, 768 -> 768, 768 -> 3072, 3072 -> 768) and jina-reranker-m0's Qwen2-VL-2B decoder (1536 ->
1536 q/o, 1536 -> 256 k/v, 1536 -> 8960 gate/up, 8960 -> 1536 down), at several row (token) counts, best of
--repeats each, and reports GFLOP/s, the ratio, and each kernel's largest error against a float64 product (relative
to the output's largest magnitude), so that the speed is seen to cost no accuracy. It also reports which kernel
rerankd's `cpu_gemm="auto"` picks here and the speed-up its load-time probe measured.

    .venv/bin/python benchmarks/bench_gemm.py [--rows 32,256,1024,4096] [--repeats 5] [--json-out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_m0_engine import best_time, cpu_name, log  # noqa: E402

SHAPES = {  # name -> (in_features, out_features)
    "v2 Wqkv": (768, 2304),
    "v2 out_proj": (768, 768),
    "v2 fc1": (768, 3072),
    "v2 fc2": (3072, 768),
    "m0 q/o_proj": (1536, 1536),
    "m0 k/v_proj": (1536, 256),
    "m0 gate/up_proj": (1536, 8960),
    "m0 down_proj": (8960, 1536),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="32,256,1024,4096", help="token counts (default 32,256,1024,4096)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each; the best is kept (default 5)")
    ap.add_argument("--json-out", type=Path, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        ap.error(f"--rows must be comma-separated integers, got {args.rows!r}")
    if args.repeats < 1 or min(rows) < 1:
        ap.error("need --repeats >= 1 and positive --rows")

    from rerankd.models.layers import onednn_available, onednn_linear, onednn_speedup, use_cpu_gemm

    if not onednn_available():
        print("this torch build has no oneDNN linear kernel: nothing to compare", file=sys.stderr)
        return 1
    probe = onednn_speedup()
    auto = use_cpu_gemm(torch.nn.Linear(8, 8), "auto", torch.device("cpu"), torch.float32)
    log(f"{cpu_name()}, {torch.get_num_threads()} torch threads; rerankd's probe: oneDNN {probe:.2f}x torch's "
        f"default kernel, so cpu_gemm='auto' picks {auto!r}")  # fmt: skip

    g = torch.Generator().manual_seed(0)
    results = []
    with torch.inference_mode():
        for name, (k, n) in SHAPES.items():
            w = torch.randn(n, k, generator=g) / k**0.5
            b = torch.randn(n, generator=g)
            for m in rows:
                x = torch.randn(m, k, generator=g)
                exact = F.linear(x.double(), w.double(), b.double())
                scale = exact.abs().max().item()
                err_torch = (F.linear(x, w, b).double() - exact).abs().max().item() / scale
                err_onednn = (onednn_linear(x, w, b).double() - exact).abs().max().item() / scale
                flop = 2 * m * k * n
                t_torch = best_time(lambda: F.linear(x, w, b), args.repeats)
                t_onednn = best_time(lambda: onednn_linear(x, w, b), args.repeats)
                r = {"layer": name, "rows": m, "in": k, "out": n,
                     "torch_gflops": flop / t_torch / 1e9, "onednn_gflops": flop / t_onednn / 1e9,
                     "ratio": t_torch / t_onednn, "torch_rel_err": err_torch, "onednn_rel_err": err_onednn}  # fmt: skip
                results.append(r)
                log(f"{name:>16} {m:5d} x {k} -> {n}: torch {r['torch_gflops']:6.1f}, oneDNN {r['onednn_gflops']:6.1f} "
                    f"GFLOP/s ({r['ratio']:.2f}x); rel. error {err_torch:.1e} / {err_onednn:.1e}")  # fmt: skip

    ratios = [r["ratio"] for r in results]
    summary = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "probe_speedup": probe,
        "auto_picks": auto,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "max_rel_err": {"torch": max(r["torch_rel_err"] for r in results),
                        "onednn": max(r["onednn_rel_err"] for r in results)},  # fmt: skip
        "results": results,
    }
    print()
    print(f"oneDNN / torch's default kernel: {min(ratios):.2f}x .. {max(ratios):.2f}x over {len(results)} shapes; "
          f"largest relative error vs float64: torch {summary['max_rel_err']['torch']:.1e}, "
          f"oneDNN {summary['max_rel_err']['onednn']:.1e}")  # fmt: skip
    print()
    print("| layer | rows x in -> out | torch GFLOP/s | oneDNN GFLOP/s | oneDNN / torch |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['layer']} | {r['rows']} x {r['in']} -> {r['out']} | {r['torch_gflops']:.0f} | "
              f"{r['onednn_gflops']:.0f} | {r['ratio']:.2f}x |")  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2) + "\n")
        log(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
