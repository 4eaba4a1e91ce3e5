"""The library's public behaviour: rerank results, bad inputs, loading errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from rerankd import ModelLoadError, PairErrors, Reranker
from rerankd.tiny import make_tiny_checkpoint

from .conftest import data_uri, encode, make_image, to_legacy_layout


def test_rerank_shape_order_top_n_and_documents(m0):
    docs = ["alpha", {"text": "beta gamma"}, {"image": data_uri(make_image(64, 64))}, "delta delta"]
    full = m0.rerank("query", docs)
    assert sorted(r["index"] for r in full) == [0, 1, 2, 3]
    assert [r["relevance_score"] for r in full] == sorted((r["relevance_score"] for r in full), reverse=True)
    assert full[[r["index"] for r in full].index(1)]["document"] == {"text": "beta gamma"}
    assert full[[r["index"] for r in full].index(2)]["document"] == {"image": docs[2]["image"]}
    top = m0.rerank("query", docs, top_n=2, return_documents=False)
    assert top == [{"index": r["index"], "relevance_score": r["relevance_score"]} for r in full[:2]]


def test_ties_are_broken_by_index(m0):
    from rerankd.results import ranked

    assert ranked([0.5, 0.7, 0.5, 0.7, 0.1]) == [1, 3, 0, 2, 4]
    assert ranked([0.5, 0.7, 0.5, 0.7, 0.1], top_n=3) == [1, 3, 0]
    # identical documents: equal scores up to the kernels' row order (multi-threaded matmuls may split rows
    # differently, ~1e-7), and the results stay sorted by score
    results = m0.rerank("q", ["same", "same", "same"])
    scores = [r["relevance_score"] for r in results]
    assert max(scores) - min(scores) <= 1e-5 and scores == sorted(scores, reverse=True)


def test_single_pair_tuple_and_empty_query(m0):
    assert len(m0.compute_score(("", "a document"))) == 1
    assert m0.compute_score([]) == []
    # one pair as a list of two (FlagEmbedding's and the model cards' compute_score take it so), numpy rows of pairs
    # (sentence-transformers takes them), documents from a generator
    pairs = [["capital", "Paris"], ["capital", "gold rush"]]
    want = m0.compute_score(pairs)
    assert m0.compute_score(pairs[0]) == [want[0]] and m0.compute_score(tuple(pairs[1])) == [want[1]]
    assert m0.compute_score(np.array(pairs)) == want and m0.compute_score(np.array(pairs[0])) == [want[0]]
    assert m0.rerank("capital", (p[1] for p in pairs)) == m0.rerank("capital", [p[1] for p in pairs])


def test_bad_pairs_are_named_and_the_others_still_scored(m0):
    good = ["q", "a fine document"]
    pairs = [good, ["q", {"image": "data:image/png;base64,aGVsbG8="}], ["q", 42], good, ["only one"],
             ["q", {"image": encode(make_image(10, 10))[:40]}]]  # fmt: skip
    with pytest.raises(PairErrors) as e:
        m0.compute_score(pairs)
    err = e.value
    assert sorted(err.errors) == [1, 2, 4, 5]
    assert "pairs[1].document.image" in str(err.errors[1]) and "not a PNG/JPEG" in str(err.errors[1])
    assert "pairs[2].document: unsupported type int" in str(err.errors[2])
    assert "pairs[4]" in str(err.errors[4])
    assert "does not decode" in str(err.errors[5]) or "not a PNG" in str(err.errors[5])
    alone = m0.compute_score([good])[0]
    assert abs(err.scores[0] - alone) <= 1e-5 and abs(err.scores[3] - alone) <= 1e-5
    assert err.scores[1] is None
    assert "4 of 6 pairs could not be scored" in str(err)


def test_rerank_errors_name_documents(m0):
    with pytest.raises(PairErrors, match=r"documents\[1\].image: 'nope' is not an http\(s\) URL"):
        m0.rerank("q", ["fine", {"image": "nope"}])
    with pytest.raises(ValueError, match="top_n must be a positive integer"):
        m0.rerank("q", ["a"], top_n=0)
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        m0.compute_score([["q", "d"]], max_length=0)


def test_unknown_option_and_dtype(m0_dir):
    with pytest.raises(TypeError, match="valid options: device, dtype"):
        Reranker.from_pretrained(m0_dir, max_batch_tokenz=5)
    with pytest.raises(ValueError, match="dtype 'float8' is not supported"):
        Reranker.from_pretrained(m0_dir, dtype="float8")


def test_loading_errors_are_clear(m0_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="neither an existing directory nor a Hugging Face repo id"):
        Reranker.from_pretrained(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    shutil.copytree(m0_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="not supported; supported architectures: BertForSequenceClassification, JinaForRanking, JinaVLForRanking, Qwen3ForCausalLM, "):
        Reranker.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    w = load_file(str(bad / "model.safetensors"))
    w.pop("score.2.bias")
    w["extra.tensor"] = w["score.0.bias"].clone()
    save_file(w, str(bad / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"1 parameters missing .*score\.2\.bias.*1 checkpoint tensors match no"):
        Reranker.from_pretrained(bad, show_progress=False)


def test_offline_hub_id_without_cache_says_to_pass_a_local_path(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    code = "from rerankd import Reranker; Reranker.from_pretrained('jinaai/jina-reranker-m0')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "ModelLoadError" in out.stderr and "pass the path of a local checkpoint directory" in out.stderr
    code = ("from rerankd import Reranker\n"
            "for name, kw in (('acme/m0-GGUF:Q8_0', {}), ('acme/m0', {'revision': 'v1'})):\n"
            "    try: Reranker.from_pretrained(name, **kw)\n"
            "    except Exception as e: print(e)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    # the download command to run where there is network: only the tagged file and the small ones; the revision
    assert 'huggingface-cli download acme/m0-GGUF --include "*Q8_0*" "*.npz" "*.json"' in out.stdout, out.stdout
    assert "huggingface-cli download acme/m0 --revision v1`" in out.stdout, out.stdout


@pytest.mark.parametrize("layout", ["m0", "legacy-bert"])
def test_hub_cache_is_used_offline(m0_dir, tmp_path, layout):
    """A repo id already in HF_HOME's cache loads with HF_HUB_OFFLINE=1 (the cache layout huggingface_hub uses),
    also an older one with PyTorch pickles instead of safetensors (fetched in a second pass) and vocab.txt only."""
    snap = tmp_path / "hf" / "hub" / "models--acme--tiny" / "snapshots" / ("0" * 40)
    if layout == "m0":
        shutil.copytree(m0_dir, snap)
    else:
        to_legacy_layout(make_tiny_checkpoint("bert-cross-encoder", snap, seed=3))
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    code = ("from rerankd import Reranker; r = Reranker.from_pretrained('acme/tiny', show_progress=False); "
            "print(r.compute_score([['q', 'd']])[0])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    score = float(out.stdout.strip())
    assert 0.0 < score < 1.0
    # within 1e-6: each process's load-time probe picks its own GEMM kernel
    assert abs(score - Reranker.from_pretrained(snap, show_progress=False).compute_score([["q", "d"]])[0]) < 1e-6


def test_wrong_arguments_are_clear_errors_at_once(m0):
    """Mistakes a caller makes are errors that say what to do, before any loading or scoring: one document passed
    as a string (not scored character by character), a device torch does not know or this machine lacks, budgets
    of zero."""
    with pytest.raises(TypeError, match=r"documents must be a list of documents, got a str; for one document pass"):
        m0.rerank("q", "abc")
    with pytest.raises(ValueError, match="device 'gpu' is not a device name"):
        Reranker.from_pretrained("/nonexistent", device="gpu")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': CUDA is not available here"):
            Reranker.from_pretrained("/nonexistent", device="cuda")
    for bad in ({"max_batch_tokens": 0}, {"num_threads": 0}, {"max_pixels": -1}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a positive integer"):
            Reranker.from_pretrained("/nonexistent", **bad)
    with pytest.raises(ValueError, match="min_pixels 5000 is more than max_pixels 10"):
        Reranker.from_pretrained("/nonexistent", min_pixels=5000, max_pixels=10)
