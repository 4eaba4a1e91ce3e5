"""Benchmark: packed attention on the CPU, the kernels of `rerankd.models.layers.varlen_attention` (issue 19).

The loop: one torch SDPA call a sequence (torch's flash CPU kernel). Against it: rerankd's own packed kernel
(`attention="avx512"`, models/cpu_kernels.cpp, where it builds; it computes in fp32, and in bf16 it is given
q/k/v widened, its output rounded back), one call over the whole batch with FlexAttention and a document mask
(`attention="flex"`, compiled by inductor), and, for bf16, the same loop run in fp32 (q/k/v upcast, the output cast
back). Batches of the
jina-reranker-v2 workload's lengths (query and document: 35..270 tokens) and of fixed lengths; 12 heads of 64
(XLM-RoBERTa base), 8 of 64 with 2 key/value heads, causal (the mid-size m0 of bench_m0_engine.py), or 16 of 128
with 8 key/value heads, causal (Qwen3-0.6B). Reports ms, GFLOP/s of the useful work
(4 x len^2 x head_dim a head, half that causal) and each kernel's largest difference from the loop in fp32.

    .venv/bin/python benchmarks/bench_cpu_attention.py [--repeats 10] [--json-out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_m0_engine import best_time, cpu_name, log  # noqa: E402

SHAPES = {"v2 (12 x 64)": (12, 12, 64, False), "m0 mid causal (8/2 x 64)": (8, 2, 64, True),
          "qwen3 causal (16/8 x 128)": (16, 8, 128, True)}


def batches() -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(0)
    return {
        "16 pairs of 35..270": [int(x) for x in torch.randint(35, 270, (16,), generator=g)],
        "16 x 128": [128] * 16,
        "4 x 512": [512] * 4,
        "1 x 2048": [2048],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10, help="timed runs of each; the best is kept (default 10)")
    ap.add_argument("--json-out", type=Path, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("need --repeats >= 1")

    from rerankd.models import cpu_kernels
    from rerankd.models.layers import packing, varlen_attention

    own = cpu_kernels.unavailable()
    if own is not None:
        log(f"rerankd's avx512 kernel is left out: {own}")

    cpu = torch.device("cpu")
    rows = []
    log(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for shape, (heads, kv_heads, dim, causal) in SHAPES.items():
        for batch, lens in batches().items():
            loop, flex = packing(lens, cpu, "sdpa"), packing(lens, cpu, "flex")
            tokens = loop.offsets[-1]
            flops = sum(4 * n * n * dim * heads for n in lens) / (2 if causal else 1)
            g = torch.Generator().manual_seed(1)
            q32 = torch.randn(tokens, heads, dim, generator=g)
            k32, v32 = (torch.randn(tokens, kv_heads, dim, generator=g) for _ in range(2))
            ref = varlen_attention(q32, k32, v32, loop, causal)
            for dtype in (torch.float32, torch.bfloat16):
                q, k, v = (t.to(dtype) for t in (q32, k32, v32))
                kinds = {
                    "loop": lambda: varlen_attention(q, k, v, loop, causal),
                    "flex": lambda: varlen_attention(q, k, v, flex, causal),
                }
                if own is None:
                    packed = packing(lens, cpu, "avx512")
                    kinds["avx512"] = lambda: varlen_attention(q, k, v, packed, causal)
                if dtype != torch.float32:
                    kinds["loop in fp32"] = lambda: varlen_attention(q.float(), k.float(), v.float(), loop,
                                                                     causal).to(dtype)  # fmt: skip
                for kind, fn in kinds.items():
                    seconds = best_time(fn, args.repeats)
                    diff = (fn().float() - ref).abs().max().item()
                    rows.append({"shape": shape, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
                                 "kernel": kind, "ms": seconds * 1e3, "gflops": flops / seconds / 1e9,
                                 "max_diff": diff})  # fmt: skip
                    log(f"{shape:26s} {batch:20s} {rows[-1]['dtype']:8s} {kind:12s} {seconds * 1e3:8.2f} ms "
                        f"{rows[-1]['gflops']:6.0f} GFLOP/s  diff {diff:.1e}")  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps({"date": datetime.date.today().isoformat(), "cpu": cpu_name(),
                                             "threads": torch.get_num_threads(), "torch": torch.__version__,
                                             "rows": rows}, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
