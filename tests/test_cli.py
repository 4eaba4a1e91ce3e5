from __future__ import annotations

import json
import subprocess
import sys

from rerankd import Reranker


def run(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "rerankd", *args], capture_output=True, text=True, timeout=timeout)


def test_make_tiny_model_then_rerank(tmp_path):
    d = tmp_path / "m0"
    out = run("make-tiny-model", "jina-reranker-m0", str(d), "--seed", "1")
    assert out.returncode == 0, out.stderr
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    docs_file = tmp_path / "docs.jsonl"
    docs_file.write_text('"from the file"\n{"text": "an object"}\n')
    out = run("rerank", "--model", str(d), "--query", "slm markdown", "first doc", "second doc",
              "--documents-file", str(docs_file), "--top-n", "3", "--no-show-progress")  # fmt: skip
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)["results"]
    assert len(res) == 3
    expected = Reranker.from_pretrained(d, show_progress=False).rerank(
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
    assert out.returncode != 0 and "no documents" in out.stderr
