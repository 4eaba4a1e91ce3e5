"""Qwen3-Reranker scores equal the model card's usage on transformers' own Qwen3 modules (fp32 <= 1e-5), for the
causal checkpoints (tied embeddings as 0.6B, an lm_head of their own as 4B / 8B) and the converted seq-cls ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rerankd import PairErrors, Reranker
from rerankd.errors import ModelLoadError
from rerankd.inputs import TextItem
from rerankd.models.base import LengthOptions, Where
from rerankd.models.layers import prefix_units
from rerankd.models.qwen3_reranker import DEFAULT_INSTRUCTION, PREFIX, SUFFIX
from rerankd.tiny import make_tiny_checkpoint

from ..conftest import ELEMENTWISE, assert_close, loaded_with_elementwise

TOL = 1e-5
WORDS = "markdown model web content extraction gold rush Paris France capital 数据 提取 Beiträge 🙂 yes no".split()


def text_of(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words))


DOCS = [text_of(n, i) for i, n in enumerate([0, 1, 3, 10, 40, 120, 7])] + [
    "During the California Gold Rush, some merchants made more money.\n\nSecond paragraph!",
    "数据提取么?为什么不用正则啊?", "12 monkeys <think> and </think> tokens <|im_end|> inside",
]  # fmt: skip
PAIRS = [["slm markdown", d] for d in DOCS] + [["What is the capital of France?", d] for d in DOCS[:5]]

VARIANTS = {
    "tied": ("qwen3-reranker", {}),  # Qwen3-Reranker-0.6B
    "untied": ("qwen3-reranker", {"tie_word_embeddings": False}),  # 4B, 8B
    "seq-cls": ("qwen3-reranker-seq-cls", {}),  # the converted checkpoints
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    pytest.importorskip("transformers")
    from ..references import ReferenceQwen3Reranker

    kind, extra = VARIANTS[request.param]
    path = make_tiny_checkpoint(kind, tmp_path_factory.mktemp(request.param), seed=1, **extra)
    return Reranker.from_pretrained(path, show_progress=False), ReferenceQwen3Reranker(path), path


def test_scores_equal_the_model_card_usage(variant):
    rr, ref, _ = variant
    ours = rr.compute_score(PAIRS)
    assert_close(ours, ref.compute_score(PAIRS, batch_size=len(PAIRS)), TOL)  # one left-padded batch
    assert np.std(ours) > 0.02, ours  # the scores depend on the pair
    assert_close(rr.compute_score(PAIRS, activation=None), ref.compute_score(PAIRS, raw=True), 1e-4)


@pytest.mark.parametrize("elementwise", ELEMENTWISE)
def test_both_elementwise_kernels_equal_the_model_card_usage(variant, elementwise):
    _, ref, path = variant
    rr = loaded_with_elementwise(path, elementwise)  # Qwen3's per-head q/k norms included
    assert_close(rr.compute_score(PAIRS), ref.compute_score(PAIRS, batch_size=len(PAIRS)), TOL)


def test_instruction_and_truncation_follow_the_reference(variant):
    rr, ref, _ = variant
    custom = rr.compute_score(PAIRS, instruction="Find the document that is written in German")
    assert_close(custom, ref.compute_score(PAIRS, instruction="Find the document that is written in German"), TOL)
    assert np.max(np.abs(np.array(custom) - rr.compute_score(PAIRS))) > 1e-3  # the instruction reaches the model
    # an empty instruction is empty, not the default (the model card tests `instruction is None`)
    assert_close(rr.compute_score(PAIRS, instruction=""), ref.compute_score(PAIRS, instruction=""), TOL)
    # a short max_length cuts the body from its end, the query too when the document is shorter than the cut
    template = len(rr.backend.prefix) + len(rr.backend.suffix)
    for max_length in (template + 30, template + 8):
        assert_close(rr.compute_score(PAIRS, max_length=max_length), ref.compute_score(PAIRS, max_length=max_length), TOL)


def test_the_head_is_two_rows_of_the_lm_head(variant):
    rr, _, path = variant
    cfg = json.loads((path / "config.json").read_text())
    head = rr.backend.model.head
    assert head.shape == (1 if "SequenceClassification" in cfg["architectures"][0] else 2, cfg["hidden_size"])
    if cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["tie_word_embeddings"]:
        tok = rr.backend.tokenizer
        emb = rr.backend.model.model.embed_tokens.weight
        assert torch.equal(head, emb[[tok.token_to_id("yes"), tok.token_to_id("no")]])


def test_prompt_is_the_official_one(variant):
    rr, ref, _ = variant
    be = rr.backend
    [seq] = be.prepare(TextItem("q?"), TextItem("a doc"), LengthOptions(8192, None), Where.for_pair(0))
    want = ref.tokenizer.encode(PREFIX, add_special_tokens=False)
    want += ref.tokenizer.encode(f"<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: q?\n<Document>: a doc", add_special_tokens=False)
    want += ref.tokenizer.encode(SUFFIX, add_special_tokens=False)
    assert seq.input_ids.tolist() == want


def test_long_documents_are_windowed_and_the_first_window_is_the_truncated_pair(variant):
    rr, ref, _ = variant
    doc = text_of(400, 5)
    template = len(rr.backend.prefix) + len(rr.backend.suffix)
    max_length = template + 60
    [hit] = rr.rerank("slm markdown", [doc], max_length=max_length, overlap=10, max_query_length=None)
    w = hit["window"]
    assert w["count"] > 3 and 0 <= w["start"] < w["end"] <= len(doc)
    # every window fits max_length; the first is what truncation keeps, which is the reference's cut
    seqs = rr.backend.prepare(TextItem("slm markdown"), TextItem(doc),
                              LengthOptions(max_length, None, None, "chunk", 10), Where.for_pair(0))  # fmt: skip
    assert len(seqs) == w["count"] and all(s.length <= max_length for s in seqs)
    first = rr.compute_score([["slm markdown", doc]], max_length=max_length)[0]  # truncate: the reference's cut
    assert_close([first], ref.compute_score([["slm markdown", doc]], max_length=max_length), TOL)
    truncated = rr.rerank("slm markdown", [doc], max_length=max_length, long_documents="truncate", max_query_length=None)
    assert_close([truncated[0]["relevance_score"]], [first], TOL)
    assert hit["relevance_score"] >= first - TOL


def test_batch_invariance_and_errors(variant):
    rr, _, path = variant
    docs = DOCS + [text_of(300, 9)]
    alone = [rr.compute_score([["slm markdown", d]])[0] for d in docs]
    small = Reranker.from_pretrained(path, show_progress=False, max_batch_tokens=200)
    assert_close(small.compute_score([["slm markdown", d] for d in docs]), alone, TOL)
    assert_close(rr.compute_score([["slm markdown", d] for d in docs], batch_size=3), alone, TOL)
    with pytest.raises(PairErrors, match=r"pairs\[1\].document: this model \(Qwen3For\w+\) is text only"):
        rr.compute_score([["q", "d"], ["q", {"image": "data:image/png;base64,AAAA"}]])
    with pytest.raises(ValueError, match="max_length: 50000 is more than this model's 40960 positions"):
        rr.compute_score([["q", "d"]], max_length=50000)


def test_shared_prefixes_score_as_each_sequence_computed_whole(variant):
    """share_prefixes (on by default on the avx512 kernel): what sequences of a batch begin with alike is computed
    once: the system prompt and instruction for every query, the query too for the documents of one query. The
    scores are the model card's, and those of every sequence computed whole."""
    rr, ref, path = variant
    if not rr.backend.share_prefixes:
        pytest.skip(f"prefixes are shared on the CPU's attention kernels; this model runs {rr.options.attention}")
    long_query = text_of(30, 21)  # a unit of its own below the one every sequence shares
    pairs = [[long_query, d] for d in DOCS] + [["slm markdown", d] for d in DOCS[:4]] + [[long_query, DOCS[3]]]
    lengths = LengthOptions(8192, None)
    batch = [s for i, (q, d) in enumerate(pairs)
             for s in rr.backend.prepare(TextItem(q), TextItem(d), lengths, Where.for_pair(i))]  # fmt: skip
    units = prefix_units([s.input_ids.tolist() for s in batch])
    assert any(u.seq is None and u.parent is not None for u in units)  # the long query's, under the common one
    assert sum(len(u.ids) for u in units) < 0.6 * sum(s.length for s in batch)
    whole = Reranker.from_pretrained(path, show_progress=False, share_prefixes=False)
    assert not whole.backend.share_prefixes
    ours = rr.compute_score(pairs)
    assert_close(ours, whole.compute_score(pairs), 1e-6)
    assert_close(ours, ref.compute_score(pairs, batch_size=len(pairs)), TOL)
    loop = Reranker.from_pretrained(path, show_progress=False, attention="sdpa")  # the SDPA loop shares them too
    assert loop.backend.share_prefixes
    assert_close(loop.compute_score(pairs), ours, 1e-6)


def test_sliding_window_layers_are_refused(tmp_path):
    path = make_tiny_checkpoint("qwen3-reranker", tmp_path / "q")
    cfg = json.loads((path / "config.json").read_text())
    cfg["layer_types"] = ["full_attention", "sliding_attention", "full_attention"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"layer_types \['sliding_attention'\] are not supported"):
        Reranker.from_pretrained(path, show_progress=False)


def test_transformers_5_config_reads_rope_parameters(tmp_path):
    """transformers 5 writes rope_theta inside rope_parameters (with rope_type "default"); a theta there must score
    as the same theta at the top level (4.x), and other rope types are refused."""
    path = make_tiny_checkpoint("qwen3-reranker", tmp_path / "q", seed=1)
    cfg = json.loads((path / "config.json").read_text())
    pairs = PAIRS[:6]

    def scores(config: dict) -> list[float]:
        (path / "config.json").write_text(json.dumps(config))
        return Reranker.from_pretrained(path, show_progress=False).compute_score(pairs)

    v4 = scores({**cfg, "rope_theta": 10000.0})
    v5 = scores({**{k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling")},
                 "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}})  # fmt: skip
    assert v5 == v4
    assert max(abs(a - b) for a, b in zip(v4, scores(cfg))) > 1e-4  # the theta matters
    (path / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn"}}))
    with pytest.raises(ModelLoadError, match="rope_parameters .* are not supported"):
        Reranker.from_pretrained(path, show_progress=False)
