"""jina-reranker-v3 scores equal Jina's `JinaForRanking.rerank` rebuilt on transformers' own Qwen3 modules (fp32 <=
1e-5): the prompt, the 512 / 2048 cuts, the blocks (forced with a small max_length), the merged query vector."""

from __future__ import annotations

import numpy as np
import pytest

from rerankd import PairErrors, Reranker
from rerankd.inputs import TextItem
from rerankd.models.base import LengthOptions, Where
from rerankd.models.jina_v3 import prompt
from rerankd.tiny import make_tiny_checkpoint

from ..conftest import ELEMENTWISE, assert_close, loaded_with_elementwise

TOL = 1e-5
WORDS = "markdown model web content extraction gold rush Paris France capital 数据 提取 Beiträge 🙂".split()


def text_of(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words))


DOCS = [text_of(n, i) for i, n in enumerate([1, 3, 10, 40, 120, 7, 0, 25])] + [
    "During the California Gold Rush, some merchants made more money.\n\nSecond paragraph!",
    "a <|embed_token|> and a <|rerank_token|> are removed", "数据提取么?为什么不用正则啊?",
]  # fmt: skip
QUERY = "slm markdown <|rerank_token|>"


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory):
    return make_tiny_checkpoint("jina-reranker-v3", tmp_path_factory.mktemp("tiny-v3"), seed=2)


@pytest.fixture(scope="module")
def v3(v3_dir):
    return Reranker.from_pretrained(v3_dir, show_progress=False)


@pytest.fixture(scope="module")
def v3_ref(v3_dir):
    pytest.importorskip("transformers")
    from ..references import ReferenceJinaV3

    return ReferenceJinaV3(v3_dir)


def scores_of(results) -> list[float]:
    return [r["relevance_score"] for r in sorted(results, key=lambda r: r["index"])]


def test_one_block_equals_the_reference(v3, v3_ref):
    assert len(v3_ref.blocks(QUERY, DOCS, 131072)[1]) == 1
    ours = v3.compute_score([[QUERY, d] for d in DOCS])
    assert_close(ours, v3_ref.rerank(QUERY, DOCS), TOL)
    assert np.std(ours) > 0.01 and all(-1 <= s <= 1 for s in ours), ours  # cosines, spread by the document
    # rerank's default (chunk) cuts nothing here, so it is the same; relevance_score is the cosine, no sigmoid
    assert_close(scores_of(v3.rerank(QUERY, DOCS)), ours, TOL)
    assert_close(v3.compute_score([[QUERY, d] for d in DOCS], activation=None), ours, 0)


@pytest.mark.parametrize("elementwise", ELEMENTWISE)
def test_both_elementwise_kernels_equal_the_reference(v3_dir, v3_ref, elementwise):
    rr = loaded_with_elementwise(v3_dir, elementwise)
    assert_close(rr.compute_score([[QUERY, d] for d in DOCS]), v3_ref.rerank(QUERY, DOCS), TOL)


def test_the_prompt_is_the_reference_one(v3, v3_ref):
    assert prompt("q", ["a", "b"], None) == v3_ref.format_prompt("q", ["a", "b"])
    assert prompt("q", ["a"], "Rank German first") == v3_ref.format_prompt("q", ["a"], "Rank German first")
    assert_close(v3.compute_score([[QUERY, d] for d in DOCS], instruction="Rank German first"),
                 v3_ref.rerank(QUERY, DOCS, instruction="Rank German first"), TOL)  # fmt: skip


@pytest.mark.parametrize("max_length,max_doc_length", [(90, 20), (60, 8), (150, 30)])
def test_several_blocks_merge_their_query_vectors_as_the_reference(v3, v3_ref, max_length, max_doc_length):
    _, blocks = v3_ref.blocks(QUERY, DOCS, max_length, max_doc_length=max_doc_length)
    assert len(blocks) >= 2
    ours = v3.compute_score([[QUERY, d] for d in DOCS], max_length=max_length, max_doc_length=max_doc_length)
    assert_close(ours, v3_ref.rerank(QUERY, DOCS, max_length, max_doc_length=max_doc_length), TOL)
    seqs, errors = v3.backend.prepare_list(TextItem(QUERY), [TextItem(d) for d in DOCS],
                                           LengthOptions(max_length, 512, max_doc_length), [Where.for_pair(0)] * len(DOCS),
                                           None)  # fmt: skip
    assert not errors and [len(s.slots) for s in seqs] == [len(b) for b in blocks]


def test_query_and_documents_are_cut_as_the_reference_cuts(v3, v3_ref):
    long_query = text_of(80, 11)
    docs = DOCS[:4] + [text_of(500, 12)]
    ours = v3.compute_score([[long_query, d] for d in docs], max_query_length=20, max_doc_length=64)
    assert_close(ours, v3_ref.rerank(long_query, docs, max_query_length=20, max_doc_length=64), TOL)


def test_order_matters_and_is_the_callers(v3, v3_ref):
    ours = v3.compute_score([[QUERY, d] for d in DOCS[::-1]])[::-1]
    assert_close(ours, v3_ref.rerank(QUERY, DOCS[::-1])[::-1], TOL)
    assert np.max(np.abs(np.array(ours) - v3.compute_score([[QUERY, d] for d in DOCS]))) > 1e-4  # causal


def test_compute_score_groups_pairs_by_query(v3, v3_ref):
    q2 = "What is the capital of France?"
    pairs = [[QUERY, DOCS[0]], [q2, DOCS[1]], [QUERY, DOCS[2]], [q2, DOCS[3]], [QUERY, DOCS[4]]]
    ours = v3.compute_score(pairs)
    first = v3_ref.rerank(QUERY, [DOCS[0], DOCS[2], DOCS[4]])
    second = v3_ref.rerank(q2, [DOCS[1], DOCS[3]])
    assert_close(ours, [first[0], second[0], first[1], second[1], first[2]], TOL)


def test_long_documents_chunked_score_their_best_window(v3):
    doc = text_of(300, 13)
    [hit] = v3.rerank(QUERY, [doc], max_doc_length=40, overlap=8)
    w = hit["window"]
    assert w["count"] > 3 and 0 <= w["start"] < w["end"] <= len(doc)
    [cut] = v3.rerank(QUERY, [doc], max_doc_length=40, long_documents="truncate")
    assert "window" not in cut and abs(cut["relevance_score"] - hit["relevance_score"]) > 1e-6


def test_batch_invariance_across_lists_and_budgets(v3_dir, v3):
    lists = [(QUERY, DOCS), ("What is the capital of France?", DOCS[3:8]), ("gold", DOCS[:2])]
    alone = [v3.compute_score([[q, d] for d in docs]) for q, docs in lists]
    together = v3.compute_score([[q, d] for q, docs in lists for d in docs])
    assert_close(together, [s for scores in alone for s in scores], TOL)
    small = Reranker.from_pretrained(v3_dir, show_progress=False, max_batch_tokens=64)
    assert_close(small.compute_score([[q, d] for q, docs in lists for d in docs]), together, TOL)


def test_errors(v3):
    with pytest.raises(PairErrors, match=r"documents\[1\]: this model \(JinaForRanking\) is text only") as e:
        v3.rerank("q", ["a", {"image": "data:image/png;base64,AAAA"}, "c"])
    assert e.value.scores[0] is not None and e.value.scores[2] is not None
    with pytest.raises(PairErrors, match=r"reserved token") as e:
        v3.rerank("q", ["fine", "<|embed<|embed_token|>_token|>"])
    assert list(e.value.errors) == [1] and e.value.scores[0] is not None
    with pytest.raises(PairErrors, match=r"pairs\[0\].query: the query contains the reserved token") as e:
        v3.compute_score([["<|embed<|embed_token|>_token|>", "a"], ["<|embed<|embed_token|>_token|>", "b"], ["q", "c"]])
    assert sorted(e.value.errors) == [0, 1] and str(e.value.errors[1]).startswith("pairs[1].query")
    with pytest.raises(ValueError, match=r"instruction: contains the reserved token"):
        v3.rerank("q", ["a"], instruction="rank <|embed_token|> first")


def test_models_without_an_instruction_refuse_one(m0):
    with pytest.raises(ValueError, match=r"instruction: this model \(JinaVLForRanking\) takes no instruction"):
        m0.rerank("q", ["d"], instruction="Rank German first")
