"""`rerankd eval`: metrics (ranx) against hand computation, the BEIR / TREC readers and their errors, BM25 as the
first stage, an end-to-end eval of a tiny checkpoint in fp32 and int8 and of a live server, and the resumable cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import ranx  # the eval extra (scripts/setup.sh installs it)

from rerankd.cli import main
from rerankd.evaluation.data import EvalDataError, read_beir, read_qrels, read_run, write_run
from rerankd.tiny import make_tiny_checkpoint


TOPICS = {
    "gold": ("gold rush merchants", ["gold rush merchants sold supplies to miners", "miners searched rivers for gold"]),
    "paris": ("capital of France", ["Paris is the capital of France", "France has many cities; Paris is its capital"]),
    "tea": ("green tea antioxidants", ["green tea is rich in antioxidants", "antioxidants in tea may help the heart"]),
    "coffee": ("coffee price", ["the price of coffee went up", "coffee prices rose in markets"]),
}
FILLER = ["markdown extraction from web content", "vector embedding of a search query", "Berlin is in Germany",
          "a compact language model for data extraction", "skincare for sensitive skin", "server latency and tokens"]  # fmt: skip


def write_dataset(folder: Path) -> Path:
    """A tiny BEIR-layout dataset: 4 queries, 2 relevant documents each (grade 2 and 1), 6 fillers."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus, queries, qrels = [], [], ["query-id\tcorpus-id\tscore"]
    for qid, (query, docs) in TOPICS.items():
        queries.append({"_id": qid, "text": query})
        for j, text in enumerate(docs):
            corpus.append({"_id": f"{qid}-{j}", "title": "", "text": text})
            qrels.append(f"{qid}\t{qid}-{j}\t{2 - j}")
    corpus += [{"_id": f"filler-{i}", "title": "note", "text": t} for i, t in enumerate(FILLER)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("beir") / "tiny")


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory):
    return make_tiny_checkpoint("jina-reranker-v2", tmp_path_factory.mktemp("v2-eval"), seed=4)


def test_ranx_metrics_equal_a_hand_computation():
    """q1: relevant d1 (grade 2) at rank 2, d2 (grade 1) at rank 3; q2: relevant d9 at rank 1."""
    qrels = ranx.Qrels({"q1": {"d1": 2, "d2": 1}, "q2": {"d9": 1}})
    run = ranx.Run({"q1": {"d0": 0.9, "d1": 0.8, "d2": 0.7, "d3": 0.1}, "q2": {"d9": 0.5, "d8": 0.4}})
    got = ranx.evaluate(qrels, run, ["ndcg@10", "mrr@10", "recall@2", "map@10"])
    # nDCG with linear gains (ranx's): DCG = sum rel / log2(rank + 1)
    dcg1 = 2 / math.log2(3) + 1 / math.log2(4)
    idcg1 = 2 / math.log2(2) + 1 / math.log2(3)
    assert got["ndcg@10"] == pytest.approx((dcg1 / idcg1 + 1.0) / 2, abs=1e-9)
    assert got["mrr@10"] == pytest.approx((1 / 2 + 1) / 2, abs=1e-9)
    assert got["recall@2"] == pytest.approx((1 / 2 + 1) / 2, abs=1e-9)
    assert got["map@10"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1) / 2, abs=1e-9)


def test_beir_and_trec_readers(dataset, tmp_path):
    data = read_beir(dataset)
    assert len(data.queries) == 4 and len(data.corpus) == 14 and data.qrels["gold"] == {"gold-0": 2, "gold-1": 1}
    assert data.corpus["filler-0"].text == "note markdown extraction from web content"  # title and text joined
    trec = tmp_path / "qrels.trec"
    trec.write_text("gold 0 gold-0 2\ngold 0 gold-1 1\n")
    assert read_qrels(trec) == {"gold": {"gold-0": 2, "gold-1": 1}}
    run = {"gold": {"gold-1": 0.5, "gold-0": 0.9, "filler-1": 0.1}}
    write_run(run, tmp_path / "run.trec", "tag")
    lines = (tmp_path / "run.trec").read_text().splitlines()
    assert lines[0] == "gold Q0 gold-0 1 0.9 tag" and len(lines) == 3
    assert read_run(tmp_path / "run.trec") == run


@pytest.mark.parametrize("file,content,message", [
    ("corpus.jsonl", '{"_id": "a", "text": "x"}\n{"_id": "b", "text": \n', "corpus.jsonl:2: not a JSON object"),
    ("corpus.jsonl", '{"_id": "a", "text": "x"}\n{"text": "y"}\n', "corpus.jsonl:2: _id: missing"),
    ("corpus.jsonl", '{"_id": "a", "text": 5}\n', "corpus.jsonl:1: text: not a string"),
    ("corpus.jsonl", '{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n', "corpus.jsonl:2: _id: 'a' appears twice"),
    ("queries.jsonl", '{"_id": "q"}\n', "queries.jsonl:1: has neither text nor image"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq\ta\n", "test.tsv:2: expected"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq\ta\thigh\n", "test.tsv:2: score: 'high' is not an integer"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq\tnope\t1\n", "corpus id 'nope'"),
])  # fmt: skip
def test_malformed_files_name_file_line_and_field(tmp_path, file, content, message):
    folder = tmp_path / "d"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n')
    (folder / "queries.jsonl").write_text('{"_id": "q", "text": "x"}\n')
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\ta\t1\n")
    (folder / file).write_text(content)
    with pytest.raises(EvalDataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_beir(folder)


def test_malformed_run_file(tmp_path):
    (tmp_path / "r").write_text("q Q0 a 1 0.5 t\nq Q0 b two 0.4 t\n")
    with pytest.raises(EvalDataError, match=r"r:2: rank: 'two'"):
        read_run(tmp_path / "r")
    (tmp_path / "r").write_text("q Q0 a 1 0.5\n")
    with pytest.raises(EvalDataError, match=r"r:1: expected 'qid Q0 docid rank score tag', got 5 fields"):
        read_run(tmp_path / "r")


def test_bm25_first_stage_finds_the_relevant_documents(dataset):
    from rerankd.evaluation.run import bm25_run

    run = bm25_run(read_beir(dataset), 3)
    assert set(run) == set(TOPICS)
    for qid in TOPICS:
        best = max(run[qid], key=run[qid].get)
        assert best.startswith(qid), (qid, run[qid])
        assert len(run[qid]) <= 3


def test_end_to_end_local_fp32_int8_and_a_live_server(dataset, v2_dir, tmp_path, capsys):
    from .server.conftest import Server

    server = Server(v2_dir)
    try:
        out = tmp_path / "out"
        argv = ["eval", "--data", str(dataset), "--top-k", "5", "--output-dir", str(out), "--no-progress",
                "--name", "fp32", "--model", str(v2_dir), "--no-show-progress",
                "--name", "int8", "--model", str(v2_dir), "--quantize", "int8", "--no-show-progress",
                "--name", "server", "--base-url", server.url, "--api", "cohere"]  # fmt: skip
        assert main(argv) == 0
    finally:
        assert server.stop() == 0
    table = capsys.readouterr().out
    assert "bm25 (first stage)" in table and "int8" in table and "ndcg@10" in table
    report = json.loads((out / "report.json").read_text())
    assert [t["name"] for t in report["targets"]] == ["fp32", "int8", "server"]
    assert report["queries"] == 4 and report["first_stage"]["name"] == "bm25"
    fp32, int8, srv = report["targets"]
    assert set(fp32["metrics"]) == {"ndcg@10", "mrr@10", "recall@5", "map@5"} and fp32["delta"] == {}
    candidates = len((out / "run.bm25.trec").read_text().splitlines())  # BM25 keeps documents sharing a term
    assert 8 <= candidates <= 20 and fp32["pairs_scored"] == candidates and fp32["pairs_per_s"] > 0
    assert set(int8["p_value"]) == set(int8["metrics"])
    # the server target is the same model: its scores are the local fp32 target's (Cohere's route, sigmoid scores)
    local = read_run(out / "run.fp32.trec")
    served = read_run(out / "run.server.trec")
    assert local.keys() == served.keys()
    for qid in local:
        assert max(abs(local[qid][d] - served[qid][d]) for d in local[qid]) < 1e-5
    assert srv["metrics"] == pytest.approx(fp32["metrics"], abs=1e-9)
    # metrics recomputed from the written run files agree with the report
    qrels = ranx.Qrels(read_qrels(dataset / "qrels" / "test.tsv"))
    again = ranx.evaluate(qrels, ranx.Run(read_run(out / "run.int8.trec")), "ndcg@10", make_comparable=True)
    assert again == pytest.approx(int8["metrics"]["ndcg@10"], abs=1e-4)
    assert (out / "metrics.png").stat().st_size > 1000 and (out / "run.bm25.trec").is_file()


class Stopped(Exception):
    """An eval interrupted (a kill, Ctrl-C, a crash) after some queries were scored."""


def test_the_cache_resumes_an_interrupted_eval(dataset, v2_dir, tmp_path, monkeypatch, capsys):
    from rerankd.evaluation import targets

    calls = []
    real = targets.LocalTarget.score
    stop = [True]

    def flaky(self, query, docs):
        calls.append(len(docs))
        if len(calls) == 3 and stop[0]:
            raise Stopped("stopped after two queries")
        return real(self, query, docs)

    monkeypatch.setattr(targets.LocalTarget, "score", flaky)
    first_stage = {q: {f"{q}-1": 0.9, "filler-0": 0.8, f"{q}-0": 0.7, "filler-1": 0.6, "filler-2": 0.5} for q in TOPICS}
    write_run(first_stage, tmp_path / "first.trec", "given")  # a given first stage, 5 candidates of which 4 are kept
    argv = ["eval", "--data", str(dataset), "--run", str(tmp_path / "first.trec"), "--top-k", "4",
            "--output-dir", str(tmp_path / "out"), "--no-progress",
            "--name", "fp32", "--model", str(v2_dir), "--no-show-progress"]  # fmt: skip
    with pytest.raises(Stopped):
        main(argv)
    assert calls == [4, 4, 4]
    calls.clear()
    stop[0] = False
    assert main(argv) == 0  # the two queries scored before the interruption come from the cache
    assert calls == [4, 4]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["first_stage"]["name"] == "first-stage" and report["top_k"] == 4
    assert report["targets"][0]["cached_pairs"] == 8 and report["targets"][0]["pairs_scored"] == 8
    calls.clear()
    assert main([*argv, "--max-length", "64"]) == 0  # other options, another fingerprint: nothing reused
    assert calls == [4, 4, 4, 4]
    edited = tmp_path / "edited"  # the same ids with one document's text changed: only its query is scored anew
    write_dataset(edited)
    corpus = (edited / "corpus.jsonl").read_text().replace("the price of coffee went up", "coffee is expensive")
    (edited / "corpus.jsonl").write_text(corpus)
    calls.clear()
    assert main([*argv[:2], str(edited), *argv[3:]]) == 0
    assert calls == [1]


def test_an_image_corpus_with_a_given_run(m0_dir, tmp_path):
    """A multimodal corpus (page images by relative path) ranked by m0 for text queries; BM25 cannot index images,
    so the candidates come from a run file."""
    from .conftest import make_image
    from .server.conftest import Server

    folder = tmp_path / "pages"
    (folder / "img").mkdir(parents=True)
    corpus = []
    for i in range(4):
        make_image(60 + 10 * i, 40, seed=i).save(folder / "img" / f"p{i}.png")
        corpus.append({"_id": f"p{i}", "image": f"img/p{i}.png"})
    (folder / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus))
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "a chart"}\n{"_id": "q2", "text": "a table"}\n')
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tp0\t1\nq2\tp3\t1\n")
    with pytest.raises(EvalDataError, match="BM25 needs text documents"):
        from rerankd.evaluation.run import bm25_run

        bm25_run(read_beir(folder), 4)
    write_run({q: {f"p{i}": 1.0 - i / 10 for i in range(4)} for q in ("q1", "q2")}, tmp_path / "all.trec", "all")
    out = tmp_path / "out"
    server = Server(m0_dir)  # no --allowed-local-media-path: the pages go to it as data: URIs
    try:
        assert main(["eval", "--data", str(folder), "--run", str(tmp_path / "all.trec"), "--top-k", "4",
                     "--output-dir", str(out), "--no-progress", "--name", "m0", "--model", str(m0_dir),
                     "--no-show-progress", "--name", "served", "--base-url", server.url]) == 0  # fmt: skip
    finally:
        assert server.stop() == 0
    report = json.loads((out / "report.json").read_text())
    assert report["targets"][0]["pairs_scored"] == 8
    scores, served = read_run(out / "run.m0.trec"), read_run(out / "run.served.trec")
    assert len({round(s, 6) for s in scores["q1"].values()}) == 4  # four different images, four different scores
    assert max(abs(scores[q][d] - served[q][d]) for q in scores for d in scores[q]) < 1e-5
