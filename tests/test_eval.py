"""`rerankd eval`: metrics (ranx) against hand computation, the BEIR / TREC readers and their errors, the command
line's target groups, BM25 as the first stage, an end-to-end eval of a tiny checkpoint in fp32 and int8 and of a live
server, GGUF and truncation targets, and the resumable cache."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import ranx  # the eval extra (scripts/setup.sh installs it)

from rerankd.cli import main
from rerankd.evaluation import split_targets
from rerankd.evaluation.data import Dataset, Entry, EvalDataError, read_beir, read_qrels, read_run, top_k, write_run
from rerankd.evaluation.run import evaluate
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


class FixedTarget:
    """A target whose scores are given: what rerankd's evaluation makes of a known ranking."""

    def __init__(self, name: str, scores: dict[str, float]):
        self.name, self.scores, self.fingerprint, self.description = name, scores, name, "fixed scores"

    def open(self) -> None: ...

    def close(self) -> None: ...

    def score(self, query, docs):
        return [self.scores[d] for d in docs]


def test_metrics_equal_a_hand_computation():
    """q1: relevant d1 (grade 2) at rank 2, d2 (grade 1) at rank 3; q2: relevant d9 at rank 1. rerankd's evaluate()
    (first stage -> target -> ranx) gives the hand-computed values, and so does ranx called directly."""
    qrels = {"q1": {"d1": 2, "d2": 1}, "q2": {"d9": 1}}
    scores = {"d0": 0.9, "d1": 0.8, "d2": 0.7, "d3": 0.1, "d9": 0.5, "d8": 0.4}
    corpus = {d: Entry(text=d) for d in scores}  # each document's text is its id: FixedTarget scores by it
    data = Dataset(corpus, {"q1": Entry("one"), "q2": Entry("two")}, qrels, "hand")
    first = {"q1": {"d3": 4.0, "d2": 3.0, "d1": 2.0, "d0": 1.0}, "q2": {"d8": 2.0, "d9": 1.0}}  # the reverse order
    metrics = ["ndcg@10", "mrr@10", "recall@2", "map"]
    report = evaluate(data, first, "given", [FixedTarget("fixed", scores)], 4, metrics, progress=False)
    got = report["targets"][0]["metrics"]
    # nDCG with linear gains (ranx's): DCG = sum rel / log2(rank + 1)
    dcg1 = 2 / math.log2(3) + 1 / math.log2(4)
    idcg1 = 2 / math.log2(2) + 1 / math.log2(3)
    hand = {"ndcg@10": (dcg1 / idcg1 + 1.0) / 2, "mrr@10": (1 / 2 + 1) / 2, "recall@2": (1 / 2 + 1) / 2,
            "map": ((1 / 2 + 2 / 3) / 2 + 1) / 2}  # fmt: skip
    assert got == pytest.approx(hand, abs=1e-9)
    direct = ranx.evaluate(ranx.Qrels(qrels), ranx.Run({q: {d: scores[d] for d in first[q]} for q in first}), metrics)
    assert direct == pytest.approx(hand, abs=1e-9)
    assert report["first_stage"]["metrics"]["mrr@10"] == pytest.approx((1 / 2 + 1 / 2) / 2, abs=1e-9)  # d2, d9 2nd
    assert report["split"] is None and report["queries"] == 2


def test_equal_scores_are_measured_in_the_order_the_run_files_keep():
    """Equal scores keep the first stage's order (its ranks) in the run files, and the metrics follow that order
    (ranx alone sorts ties its own way)."""
    docs = [f"d{i}" for i in range(500)]
    data = Dataset({d: Entry(text=d) for d in docs}, {"q": Entry("q")}, {"q": {"d0": 1}}, "ties")
    first = {"q": {d: 1.0 for d in docs}}  # all tied, d0 first in the run's order
    report = evaluate(data, first, "given", [FixedTarget("flat", {d: 0.0 for d in docs})], 500,
                      ["mrr@10", "ndcg@10"], progress=False)  # fmt: skip
    assert report["first_stage"]["metrics"] == {"mrr@10": 1.0, "ndcg@10": 1.0}
    assert report["targets"][0]["metrics"] == {"mrr@10": 1.0, "ndcg@10": 1.0}
    assert next(iter(report["runs"]["flat"]["q"])) == "d0"


def test_targets_that_would_share_a_run_file_are_named():
    data = Dataset({"d": Entry(text="d")}, {"q": Entry("q")}, {"q": {"d": 1}}, "clash")
    with pytest.raises(ValueError, match="targets named 'a b', 'a_b' would write the same run file"):
        evaluate(data, {"q": {"d": 1.0}}, "given", [FixedTarget("a b", {"d": 1.0}), FixedTarget("a_b", {"d": 1.0})],
                 1, ["mrr@10"], progress=False)  # fmt: skip


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
    assert read_run(tmp_path / "run.trec", data) == run
    # equal scores keep the run file's ranks, whatever the line order
    (tmp_path / "ties.trec").write_text("gold Q0 filler-0 3 1.0 t\ngold Q0 gold-1 1 1.0 t\ngold Q0 gold-0 2 1.0 t\n")
    assert top_k(read_run(tmp_path / "ties.trec"), 2) == {"gold": ["gold-1", "gold-0"]}


@pytest.mark.parametrize("file,content,message", [
    ("corpus.jsonl", '{"_id": "a", "text": "x"}\n{"_id": "b", "text": \n', "corpus.jsonl:2: not a JSON object"),
    ("corpus.jsonl", '{"_id": "a", "text": "x"}\n{"text": "y"}\n', "corpus.jsonl:2: _id: missing"),
    ("corpus.jsonl", '{"_id": "a", "text": 5}\n', "corpus.jsonl:1: text: not a string"),
    ("corpus.jsonl", '{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n', "corpus.jsonl:2: _id: 'a' appears twice"),
    ("queries.jsonl", '{"_id": "q"}\n', "queries.jsonl:1: has neither text nor image"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq\ta\n", "test.tsv:2: expected"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq\ta\thigh\n", "test.tsv:2: score: 'high' is not an integer"),
    ("qrels/test.tsv", "q\ta\t1\nghost\ta\t1\n", "test.tsv:2: query-id: 'ghost' is not in .*queries.jsonl"),
    ("qrels/test.tsv", "q\ta\t1\nq\ta\t0\n", "test.tsv:2: corpus-id: 'a' is judged twice for query 'q'"),
    ("qrels/test.tsv", "q 0 a 1\nq 0 a x\n", "test.tsv:2: score: 'x' is not an integer"),  # TREC qrels
    ("qrels/test.tsv", "q 0 a 1 extra\n", "test.tsv:1: expected .* got 5 fields"),
])  # fmt: skip
def test_malformed_files_name_file_line_and_field(tmp_path, file, content, message):
    folder = tmp_path / "d"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n')
    (folder / "queries.jsonl").write_text('{"_id": "q", "text": "x"}\n')
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\ta\t1\n")
    (folder / file).write_text(content)
    with pytest.raises(EvalDataError, match=message.replace("(", r"\(").replace("[", r"\[").replace(".*", "(.*)")):
        read_beir(folder)


def test_judged_documents_missing_from_the_corpus_count_as_misses(caplog):
    """ArguAna's qrels name documents its corpus lacks: BEIR keeps them, relevant and retrievable by no system, so
    recall and nDCG count them as misses (the run is not refused, and not scored as if they were not judged)."""
    qrels = {"q": {"d1": 1, "gone": 1}}
    data = Dataset({"d1": Entry(text="d1"), "d2": Entry(text="d2")}, {"q": Entry("q")}, qrels, "missing")
    report = evaluate(data, {"q": {"d1": 2.0, "d2": 1.0}}, "given", [FixedTarget("t", {"d1": 1.0, "d2": 0.0})], 2,
                      ["recall@2", "ndcg@10"], progress=False)  # fmt: skip
    assert report["targets"][0]["metrics"]["recall@2"] == 0.5
    assert report["targets"][0]["metrics"]["ndcg@10"] == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_read_qrels_keeps_unknown_documents_with_a_warning(tmp_path, caplog):
    (tmp_path / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q", "text": "x"}\n')
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\ta\t1\nq\tgone\t1\n")
    with caplog.at_level("WARNING", logger="rerankd.eval"):
        data = read_beir(tmp_path)
    assert data.qrels == {"q": {"a": 1, "gone": 1}}
    assert "1 judgements name documents that" in caplog.text and "'gone'" in caplog.text


def test_a_candidate_that_is_its_own_query_is_dropped_as_beir_does():
    """ArguAna and Quora: each query is also a document of the corpus; BEIR drops it from the candidates before
    taking the top k (so k others remain) unless told to keep it."""
    corpus = {d: Entry(text=d) for d in ("q", "a", "b", "c")}
    data = Dataset(corpus, {"q": Entry("q")}, {"q": {"a": 1}}, "identical")
    first = {"q": {"q": 9.0, "b": 8.0, "a": 7.0, "c": 6.0}}
    target = FixedTarget("t", {"q": 1.0, "a": 0.5, "b": 0.4, "c": 0.0})  # the query itself would win
    report = evaluate(data, first, "given", [target], 2, ["mrr@10", "recall@2"], progress=False)
    assert report["identical_ids_dropped"] == 1 and set(report["runs"]["t"]["q"]) == {"a", "b"}
    assert report["targets"][0]["metrics"] == {"mrr@10": 1.0, "recall@2": 1.0}
    kept = evaluate(data, first, "given", [target], 2, ["mrr@10", "recall@2"], progress=False, keep_identical_ids=True)
    assert kept["identical_ids_dropped"] == 0 and kept["targets"][0]["metrics"] == {"mrr@10": 0.0, "recall@2": 0.0}


def test_malformed_run_file(tmp_path):
    (tmp_path / "r").write_text("q Q0 a 1 0.5 t\nq Q0 b two 0.4 t\n")
    with pytest.raises(EvalDataError, match=r"r:2: rank: 'two'"):
        read_run(tmp_path / "r")
    (tmp_path / "r").write_text("q Q0 a 1 0.5\n")
    with pytest.raises(EvalDataError, match=r"r:1: expected 'qid Q0 docid rank score tag', got 5 fields"):
        read_run(tmp_path / "r")
    (tmp_path / "r").write_text("q Q0 a 1 0.5 t\nq Q0 a 2 0.4 t\n")
    with pytest.raises(EvalDataError, match=r"r:2: docid: 'a' appears twice for query 'q'"):
        read_run(tmp_path / "r")


def test_a_run_naming_documents_outside_the_corpus_names_the_line(dataset, tmp_path):
    (tmp_path / "r").write_text("gold Q0 gold-0 1 0.5 t\ngold Q0 nosuchdoc 2 0.4 t\n")
    with pytest.raises(EvalDataError, match=r"r:2: docid: 'nosuchdoc' is not in .*tiny/corpus.jsonl"):
        read_run(tmp_path / "r", read_beir(dataset))


def test_the_command_line_groups_options_by_target(capsys):
    """A target starts at --model or --base-url; --name may follow its options; the evaluation's options may come
    anywhere, --output-dir after the last target too; unnamed targets are named by model and options."""
    from rerankd.evaluation import build_targets

    own, parsed = split_targets(["data", "--bm25", "--top-k", "5", "--model", "a/v2", "--name", "fp32",
                                 "--model", "a/v2/", "--quantize", "int8", "--max-length", "256",
                                 "--model", "m0-q8_0.gguf", "--long-documents", "truncate",
                                 "--base-url", "http://h:8000", "--api", "vllm", "--output-dir", "out"])  # fmt: skip
    assert own == ["data", "--bm25", "--top-k", "5", "--output-dir", "out"]
    names = [t.name for t in build_targets(parsed, progress=False)]
    assert names == ["fp32", "v2-int8-max_length256", "m0-q8_0-truncate", "vllm@h:8000"]
    _, parsed = split_targets(["data", "--model", "q3", "--instruction", "Rank / by  anything " * 30])
    assert build_targets(parsed, progress=False)[0].name.startswith("q3-instruction-")  # a digest, not the text
    for argv, message in [
        (["data", "--name", "first", "--model", "m"], "--name names the target before it"),
        (["data", "--run", "r.trec", "--bm25", "--model", "m"], "not allowed with argument"),
        (["data", "--top-k", "5"], "give at least one target"),
        (["data", "--model", "m", "--name", "a", "--name", "b"], "--name given 2 times"),
        (["--model", "m"], "the following arguments are required: DATASET"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            main(["eval", *argv])
        assert stop.value.code == 2 and message in capsys.readouterr().err, (argv, message)


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
        argv = ["eval", str(dataset), "--bm25", "--top-k", "5", "--no-progress",  # the interface
                "--model", str(v2_dir), "--name", "fp32",
                "--model", str(v2_dir), "--quantize", "int8", "--name", "int8",
                "--base-url", server.url, "--api", "cohere", "--name", "server", "--output-dir", str(out)]  # fmt: skip
        assert main(argv) == 0
    finally:
        assert server.stop() == 0
    table = capsys.readouterr().out
    assert "bm25 (first stage)" in table and "int8" in table and "ndcg@10" in table
    report = json.loads((out / "report.json").read_text())
    assert [t["name"] for t in report["targets"]] == ["fp32", "int8", "server"]
    assert report["queries"] == 4 and report["first_stage"]["name"] == "bm25" and report["split"] == "test"
    fp32, int8, srv = report["targets"]
    assert set(fp32["metrics"]) == {"ndcg@10", "mrr@10", "recall@5", "map"} and fp32["vs_first_target"] == {}
    assert set(report["first_stage"]["metrics"]) == set(fp32["metrics"])
    candidates = len((out / "bm25.run").read_text().splitlines())  # BM25 keeps documents sharing a term
    assert 8 <= candidates <= 20 and fp32["pairs_scored"] == candidates and fp32["pairs_per_s"] > 0
    assert set(int8["vs_first_target"]) == set(int8["metrics"])
    for m, versus in int8["vs_first_target"].items():
        assert versus["delta"] == pytest.approx(int8["metrics"][m] - fp32["metrics"][m], abs=1e-12)
        assert versus["p_value"] is None or 0 <= versus["p_value"] <= 1
        assert versus["significant"] == (versus["p_value"] is not None and versus["p_value"] < 0.05)
    # the server target is the same model: its scores are the local fp32 target's (Cohere's route, sigmoid scores)
    local = read_run(out / "fp32.run")
    served = read_run(out / "server.run")
    assert local.keys() == served.keys()
    for qid in local:
        assert max(abs(local[qid][d] - served[qid][d]) for d in local[qid]) < 1e-5
    assert srv["metrics"] == pytest.approx(fp32["metrics"], abs=1e-9)
    # metrics recomputed from the written run files agree with the report
    qrels = ranx.Qrels(read_qrels(dataset / "qrels" / "test.tsv"))
    again = ranx.evaluate(qrels, ranx.Run(read_run(out / "int8.run")), "ndcg@10", make_comparable=True)
    assert again == pytest.approx(int8["metrics"]["ndcg@10"], abs=1e-4)
    assert (out / "metrics.png").stat().st_size > 1000


def test_gguf_and_truncation_targets(m0_dir, tmp_path, capsys):
    """A .gguf file and a folder:TAG are targets like any model, scoring as the torch engine does within f16's
    bound (test_gguf.py); --long-documents truncate and --max-length reach the model (the run equals the library's scores)."""
    pytest.importorskip("llama_cpp", reason="GGUF targets need llama-cpp-python: pip install 'rerankd[gguf]'")
    from rerankd import Reranker
    from rerankd.convert_gguf import convert_gguf

    from .models.test_m0_parity import text_of

    folder = write_dataset(tmp_path / "long")
    with (folder / "corpus.jsonl").open("a") as f:
        f.write(json.dumps({"_id": "long", "text": "gold " + text_of(300, 3)}) + "\n")
    gguf = convert_gguf(m0_dir, tmp_path / "gguf", "f16", show_progress=False)
    out = tmp_path / "out"
    first = {q: {f"{q}-0": 3.0, f"{q}-1": 2.0, "long": 1.0, "filler-0": 0.5} for q in TOPICS}
    write_run(first, tmp_path / "first.trec", "given")
    assert main(["eval", str(folder), "--run", str(tmp_path / "first.trec"), "--top-k", "4", "--output-dir", str(out),
                 "--model", str(m0_dir), "--name", "m0", "--model", str(gguf), "--model", f"{gguf.parent}:F16",
                 "--model", str(m0_dir), "--long-documents", "truncate", "--max-length", "96"]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    names = [t["name"] for t in report["targets"]]
    assert names[0] == "m0" and names[1] == gguf.stem and names[3].endswith("-max_length96-truncate"), names
    runs = {n: read_run(out / f"{n.replace(':', '_')}.run") for n in names}
    for gguf_name in names[1:3]:
        assert max(abs(runs[gguf_name][q][d] - runs["m0"][q][d]) for q in first for d in first[q]) < 5e-3
    m0 = Reranker.from_pretrained(m0_dir)
    try:
        corpus = read_beir(folder).corpus
        for q, (query, _) in TOPICS.items():
            docs = list(first[q])
            expected = m0.compute_score([[query, corpus[d].text] for d in docs], long_documents="truncate",
                                        max_length=96)  # fmt: skip
            assert [runs[names[3]][q][d] for d in docs] == pytest.approx(expected, abs=1e-6)
    finally:
        m0.close()
    assert runs[names[3]]["gold"]["long"] != pytest.approx(runs["m0"]["gold"]["long"], abs=1e-4)  # windows differ
    assert "scoring with m0" in capsys.readouterr().err  # the progress bar over queries


def test_the_cache_resumes_an_interrupted_eval(dataset, v2_dir, tmp_path, monkeypatch, capsys):
    from rerankd.evaluation import targets

    calls = []
    real = targets.LocalTarget.score
    stop = [True]

    def flaky(self, query, docs):
        calls.append(len(docs))
        if len(calls) == 3 and stop[0]:
            raise KeyboardInterrupt  # Ctrl-C after two queries
        return real(self, query, docs)

    monkeypatch.setattr(targets.LocalTarget, "score", flaky)
    first_stage = {q: {f"{q}-1": 0.9, "filler-0": 0.8, f"{q}-0": 0.7, "filler-1": 0.6, "filler-2": 0.5} for q in TOPICS}
    write_run(first_stage, tmp_path / "first.trec", "given")  # a given first stage, 5 candidates of which 4 are kept
    argv = ["eval", str(dataset), "--run", str(tmp_path / "first.trec"), "--top-k", "4",
            "--output-dir", str(tmp_path / "out"), "--no-progress", "--model", str(v2_dir), "--name", "fp32"]  # fmt: skip
    assert main(argv) == 130
    assert "interrupted; the scores so far are kept in" in capsys.readouterr().err
    assert calls == [4, 4, 4]
    calls.clear()
    stop[0] = False
    assert main(argv) == 0  # the two queries scored before the interruption come from the cache
    assert calls == [4, 4]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["first_stage"]["name"] == "first-stage" and report["top_k"] == 4
    assert report["targets"][0]["cached_pairs"] == 8 and report["targets"][0]["pairs_scored"] == 8
    calls.clear()
    assert main(argv) == 0  # all from the cache: pairs/s is the cache's record of the time the scores took
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert calls == [] and report["targets"][0]["cached_pairs"] == 16 and report["targets"][0]["pairs_per_s"] > 0
    calls.clear()
    assert main([*argv, "--max-length", "64"]) == 0  # other options, another fingerprint: nothing reused
    assert calls == [4, 4, 4, 4]
    edited = tmp_path / "edited"  # the same ids with one document's text changed: only its query is scored anew
    write_dataset(edited)
    corpus = (edited / "corpus.jsonl").read_text().replace("the price of coffee went up", "coffee is expensive")
    (edited / "corpus.jsonl").write_text(corpus)
    calls.clear()
    assert main([argv[0], str(edited), *argv[2:]]) == 0
    assert calls == [1]
    swap = tmp_path / "swap"  # a checkpoint replaced in place (same folder, other weights): every pair scored anew
    shutil.copytree(v2_dir, swap)
    at_swap = [str(swap) if a == str(v2_dir) else a for a in argv]
    assert main(at_swap) == 0
    make_tiny_checkpoint("jina-reranker-v2", tmp_path / "other", seed=5)
    (swap / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    calls.clear()
    assert main(at_swap) == 0
    assert calls == [4, 4, 4, 4]


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
        assert main(["eval", str(folder), "--run", str(tmp_path / "all.trec"), "--top-k", "4", "--output-dir",
                     str(out), "--no-progress", "--model", str(m0_dir), "--name", "m0", "--base-url", server.url,
                     "--name", "served"]) == 0  # fmt: skip
    finally:
        assert server.stop() == 0
    report = json.loads((out / "report.json").read_text())
    assert report["targets"][0]["pairs_scored"] == 8
    scores, served = read_run(out / "m0.run"), read_run(out / "served.run")
    assert len({round(s, 6) for s in scores["q1"].values()}) == 4  # four different images, four different scores
    assert max(abs(scores[q][d] - served[q][d]) for q in scores for d in scores[q]) < 1e-5


def test_a_misspelt_metric_fails_before_anything_loads(dataset, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", str(dataset), "--model", "/nonexistent/model", "--metrics", "ndcg@10", "bogus@{k}"])
    assert e.value.code == 2
    assert "--metrics: 'bogus@100' is not a ranx metric" in capsys.readouterr().err
