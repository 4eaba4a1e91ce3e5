from __future__ import annotations

import json
import subprocess
import sys

from rerankd import Reranker

# The CLI's scores are compared with the library's in this process: one fp32 kernel on both sides. cpu_gemm "auto"
# times oneDNN at load, and two processes on a busy machine can choose differently (scores then differ by ~1e-6).
ONE_KERNEL = ("--cpu-gemm", "onednn")


def run(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "rerankd", *args], capture_output=True, text=True, timeout=timeout)


def test_make_tiny_model_then_rerank(tmp_path):
    d = tmp_path / "m0"
    out = run("make-tiny-model", "jina-reranker-m0", str(d), "--seed", "1")
    assert out.returncode == 0, out.stderr
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    written = (d / "model.safetensors").read_bytes()
    out = run("make-tiny-model", "jina-reranker-v2", str(d))  # over a checkpoint: refused, nothing written
    assert out.returncode == 2 and f"{d} is not empty" in out.stderr and "--force" in out.stderr, out.stderr
    assert (d / "model.safetensors").read_bytes() == written and "JinaVLForRanking" in (d / "config.json").read_text()
    out = run("make-tiny-model", "jina-reranker-m0", str(d), "--seed", "1", "--force")
    assert out.returncode == 0, out.stderr
    assert (d / "model.safetensors").read_bytes() == written  # the same seed writes the same weights
    docs_file = tmp_path / "docs.jsonl"
    docs_file.write_text('"from the file"\n{"text": "an object"}\n')
    # documents before and after options, as people type them
    out = run("rerank", "--model", str(d), "--query", "slm markdown", "first doc", "--documents-file", str(docs_file),
              "second doc", "--top-n", "3", "--no-show-progress", *ONE_KERNEL)  # fmt: skip
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)["results"]
    assert len(res) == 3
    expected = Reranker.from_pretrained(d, show_progress=False, cpu_gemm="onednn").rerank(
        "slm markdown", ["first doc", "second doc", "from the file", {"text": "an object"}], top_n=3
    )
    assert [r["index"] for r in res] == [r["index"] for r in expected]
    assert all(abs(a["relevance_score"] - b["relevance_score"]) < 1e-6 for a, b in zip(res, expected))


def test_cli_errors(tmp_path, m0_dir):
    out = run("rerank", "--model", str(tmp_path / "missing"), "--query", "q", "d")
    assert out.returncode == 2 and "neither an existing directory" in out.stderr
    out = run("rerank", "--model", str(m0_dir), "--query", "q", "--doc-type", "image", "not-an-image", "--no-show-progress")
    assert out.returncode == 2 and "documents[0].image" in out.stderr
    out = run("rerank", "--model", str(m0_dir), "--query", "q")
    assert out.returncode == 2 and "rerankd: error: no documents" in out.stderr
    out = run("rerank", "--model", str(m0_dir), "--query", "q", "--documents-file", str(tmp_path / "nope.jsonl"))
    assert out.returncode == 2 and "--documents-file" in out.stderr and "No such file" in out.stderr, out.stderr
    out = run("rerank", "--model", str(m0_dir), "--query", "q", "d", "--device", "gpu")
    assert out.returncode == 2 and "device 'gpu' is not a device name" in out.stderr
    out = run("rerank", "--model", str(m0_dir), "--query", "q", "d", "--max-batch-tokens", "0")
    assert out.returncode == 2 and "max_batch_tokens must be a positive integer" in out.stderr
    out = run("serve", "--model", str(m0_dir), "--log-level", "loud")
    assert out.returncode == 2 and "invalid choice: 'loud'" in out.stderr
    out = run("serve", "--model", str(m0_dir), "--max-batch-wait-ms", "-1")  # before the model loads
    assert out.returncode == 2 and "rerankd: error: --max-batch-wait-ms must be >= 0, got -1.0" in out.stderr
    out = run("make-tiny-model", "bert-cross-encoder", "/proc/rerankd-no-such-dir")
    assert out.returncode == 2 and "cannot write /proc/rerankd-no-such-dir" in out.stderr
    out = run("rerank", "--model", str(m0_dir), "--query", "q", "d", "--cpu-gemm", "mkl")
    assert out.returncode == 2 and "cpu_gemm must be one of auto, onednn, torch; got 'mkl'" in out.stderr


def test_cross_encoder_from_the_cli_with_windows(tmp_path):
    d = tmp_path / "v2"
    out = run("make-tiny-model", "jina-reranker-v2", str(d), "--naming", "hf")
    assert out.returncode == 0, out.stderr
    assert "roberta.encoder.layer.0.attention.self.query.weight" in __import__("safetensors").safe_open(
        str(d / "model.safetensors"), "pt").keys()  # fmt: skip
    long_doc = " ".join(["Paris is the capital and most populous city of France."] * 40)
    args = ("rerank", "--model", str(d), "--query", "capital of France", "short one", long_doc,
            "--max-length", "64", "--overlap", "8", "--no-show-progress", *ONE_KERNEL)  # fmt: skip
    out = run(*args)
    assert out.returncode == 0, out.stderr
    res = {r["index"]: r for r in json.loads(out.stdout)["results"]}
    assert res[1]["window"]["count"] > 1 and "window" not in res[0]
    expected = Reranker.from_pretrained(d, show_progress=False, cpu_gemm="onednn").rerank(
        "capital of France", ["short one", long_doc], max_length=64, overlap=8
    )
    assert all(abs(res[r["index"]]["relevance_score"] - r["relevance_score"]) < 1e-6 for r in expected)
    raw = json.loads(run(*args, "--raw-scores", "--long-documents", "truncate").stdout)["results"]
    assert all("window" not in r for r in raw)
    truncated = Reranker.from_pretrained(d, show_progress=False, cpu_gemm="onednn").rerank(
        "capital of France", ["short one", long_doc], max_length=64, long_documents="truncate", activation=None
    )
    assert [round(r["relevance_score"], 5) for r in raw] == [round(r["relevance_score"], 5) for r in truncated]
    out = run("make-tiny-model", "jina-reranker-m0", str(tmp_path / "x"), "--naming", "hf")
    assert out.returncode == 2 and "naming= applies to jina-reranker-v2 only" in out.stderr


def test_decoder_rerankers_from_the_cli_with_an_instruction(tmp_path):
    for kind in ("qwen3-reranker", "jina-reranker-v3"):
        d = tmp_path / kind
        out = run("make-tiny-model", kind, str(d))
        assert out.returncode == 0, out.stderr
        args = ("rerank", "--model", str(d), "--query", "slm markdown", "first doc", "second document here",
                "--instruction", "Rank German first", "--no-show-progress", *ONE_KERNEL)  # fmt: skip
        out = run(*args)
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout)["results"]
        expected = Reranker.from_pretrained(d, show_progress=False, cpu_gemm="onednn").rerank(
            "slm markdown", ["first doc", "second document here"], instruction="Rank German first"
        )
        assert [r["index"] for r in res] == [r["index"] for r in expected]
        assert all(abs(a["relevance_score"] - b["relevance_score"]) < 1e-6 for a, b in zip(res, expected))
    out = run("rerank", "--model", str(tmp_path / "jina-reranker-v3"), "--query", "q", "d", "--raw-scores",
              "--no-show-progress")  # fmt: skip
    assert out.returncode == 0 and -1 <= json.loads(out.stdout)["results"][0]["relevance_score"] <= 1


def test_serve_draws_no_loading_bar_into_a_log(m0_dir):
    """stderr not a terminal (a supervisor's log): no progress bar redrawn with carriage returns. The port is taken,
    so the server stops right after loading."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        quiet = run("serve", "--model", str(m0_dir), "--port", port, "--skip-warmup")
        drawn = run("serve", "--model", str(m0_dir), "--port", port, "--skip-warmup", "--show-progress")
    assert quiet.returncode != 0 and "address already in use" in quiet.stderr.lower(), quiet.stderr
    bar = f"loading {m0_dir.name}:"  # tqdm's description (the log's own line names the whole path)
    assert bar not in quiet.stderr and "\r" not in quiet.stderr, quiet.stderr
    assert bar in drawn.stderr, drawn.stderr
