"""`rerankd eval`: rerank a first stage's candidates with each target, measure ranking quality with ranx, compare.

    dataset (BEIR layout) + first stage (a TREC run file, or BM25 top-k by bm25s)
      -> each target scores each judged query's top-k candidates (cached per query, resumable), timed
      -> ranx: the first stage's and each target's metrics, paired significance tests against the first target
      -> a table, report.json, one TREC run file per target, metrics.png
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .cache import ScoreCache, digest
from .data import Dataset, EvalDataError, Run, ranked, top_k, write_run
from .targets import Target

log = logging.getLogger("rerankd.eval")

DEFAULT_METRICS = ("ndcg@10", "mrr@10", "recall@{k}", "map")  # map: over the reranked top k
SIGNIFICANCE = 0.05


@dataclass
class TargetResult:
    name: str
    description: str
    metrics: dict[str, float]
    pairs_scored: int  # pairs scored in this run (the cached ones not counted)
    seconds: float
    cached_pairs: int
    timed: tuple[int, float]  # pairs and seconds behind pairs/s: this run's, or all runs' into the cache
    p_values: dict[str, float | None] = field(default_factory=dict)  # metric -> paired test against the first target

    @property
    def pairs_per_s(self) -> float | None:
        pairs, seconds = self.timed
        return pairs / seconds if pairs and seconds > 0 else None


def metric_names(metrics: list[str] | tuple[str, ...], k: int) -> list[str]:
    """The metrics with {k} filled in; ValueError for a name ranx does not know (checked on a one-query toy before
    anything loads)."""
    from ranx import Qrels, Run as RanxRun, evaluate as ranx_evaluate

    names = [m.format(k=k) for m in metrics]
    for name in names:
        try:
            ranx_evaluate(Qrels({"q": {"d": 1}}), RanxRun({"q": {"d": 1.0}}), name)
        except Exception as e:
            raise ValueError(f"--metrics: {name!r} is not a ranx metric ({e}); e.g. ndcg@10, mrr@10, recall@100, "
                             "map@100, precision@5, hit_rate@10") from None  # fmt: skip
    return names


def bm25_run(dataset: Dataset, k: int) -> Run:
    """BM25 top-k over the corpus's text for every judged query (bm25s; English stop words, no stemming)."""
    import bm25s

    ids = [d for d, e in dataset.corpus.items() if e.text]
    if not ids:
        raise EvalDataError(f"{dataset.name}: BM25 needs text documents, the corpus has none; give --run instead")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([dataset.corpus[d].text for d in ids], stopwords="en", show_progress=False),
                    show_progress=False)  # fmt: skip
    qids = [q for q in dataset.judged_queries() if dataset.queries[q].text]
    if not qids:
        raise EvalDataError(f"{dataset.name}: BM25 needs text queries; give --run instead")
    found, scores = retriever.retrieve(bm25s.tokenize([dataset.queries[q].text for q in qids], stopwords="en",
                                                      show_progress=False), k=min(k, len(ids)), show_progress=False)  # fmt: skip
    run: Run = {}
    for qi, qid in enumerate(qids):
        run[qid] = {ids[int(j)]: float(s) for j, s in zip(found[qi], scores[qi]) if float(s) > 0}
    return run


def score_target(target: Target, dataset: Dataset, candidates: dict[str, list[str]], cache: ScoreCache | None,
                 progress: bool = True) -> tuple[Run, int, float, int]:  # fmt: skip
    """The target's run over the candidates: each query's documents scored (or read from the cache), a progress bar
    over queries. Returns the run, pairs scored now, their seconds, and pairs read from the cache."""
    run: Run = {}
    scored = cached = 0
    seconds = 0.0
    target.open()  # loading a model or reaching a server is not scoring time
    bar = tqdm(candidates.items(), desc=f"scoring with {target.name}", unit="query", disable=not progress)
    for qid, docids in bar:
        query = dataset.queries[qid].item()
        digests, have = {}, {}
        if cache is not None:
            digests = {d: digest(query, dataset.corpus[d].item()) for d in docids}
            have = cache.get(target.fingerprint, qid, digests)
        todo = [d for d in docids if d not in have]
        if todo:
            start = time.perf_counter()
            scores = target.score(query, [dataset.corpus[d].item() for d in todo])
            took = time.perf_counter() - start
            seconds += took
            scored += len(todo)
            new = dict(zip(todo, (float(s) for s in scores)))
            if cache is not None:
                cache.put(target.fingerprint, qid, new, digests, took)
            have = {**have, **new}
        cached += len(docids) - len(todo)
        run[qid] = {d: have[d] for d in docids}
    return run, scored, seconds, cached


def evaluate(dataset: Dataset, first_stage: Run, first_stage_name: str, targets: list[Target], k: int,
             metrics: list[str] | tuple[str, ...] = DEFAULT_METRICS, cache: ScoreCache | None = None,
             progress: bool = True, keep_identical_ids: bool = False) -> dict[str, Any]:  # fmt: skip
    """The whole evaluation; returns the report (what report.json holds) with each target's run under "runs".
    Unless `keep_identical_ids`, a candidate whose id is its query's is dropped before the top k are taken, as BEIR
    retrieves and evaluates (ArguAna's and Quora's queries are documents of their corpus too)."""
    from ranx import Qrels, Run as RanxRun, compare

    names = metric_names(metrics, k)
    judged = dataset.judged_queries()
    identical = sum(q in docs for q, docs in first_stage.items())
    if not keep_identical_ids and identical:
        first_stage = {q: {d: s for d, s in docs.items() if d != q} for q, docs in first_stage.items()}
        log.info("dropped %d candidates whose id is their query's (BEIR's rule; --keep-identical-ids keeps them)",
                 identical)  # fmt: skip
    candidates = {q: docs for q, docs in top_k(first_stage, k).items() if q in dataset.qrels}
    if not any(candidates.values()):
        raise EvalDataError("the first stage has no candidates for any judged query (do its query ids match the "
                            "dataset's? BM25 finds none when no document shares a term with a query)")  # fmt: skip
    run_names = [first_stage_name, *(t.name for t in targets)]
    clashes = sorted({n for n in run_names if sum(_safe(m) == _safe(n) for m in run_names) > 1})
    if clashes:
        raise ValueError(f"targets named {', '.join(map(repr, clashes))} would write the same run file: give each "
                         "target its own --name (none named like the first stage, and names that differ in more than "
                         "punctuation)")  # fmt: skip
    runs: dict[str, Run] = {first_stage_name: {q: {d: first_stage[q][d] for d in docs} for q, docs in candidates.items()}}
    results: list[TargetResult] = []
    for target in targets:
        try:
            run, scored, seconds, cached = score_target(target, dataset, candidates, cache, progress)
        finally:
            target.close()
        runs[target.name] = run
        timed = cache.timing(target.fingerprint) if cache is not None else (scored, seconds)
        results.append(TargetResult(target.name, target.description, {}, scored, seconds, cached, timed))

    qrels = Qrels({q: dataset.qrels[q] for q in judged})
    ranx_runs = [RanxRun(_as_ranked(run, judged), name=name) for name, run in runs.items()]
    report = compare(qrels=qrels, runs=ranx_runs, metrics=names, max_p=SIGNIFICANCE, stat_test="student",
                     make_comparable=True)  # fmt: skip
    table = report.to_dict()
    first = targets[0].name if targets else None
    for r in results:
        r.metrics = {m: float(table[r.name]["scores"][m]) for m in names}
        if first is not None and r.name != first:
            # identical rankings have no t statistic (NaN): reported as null, i.e. no evidence of a difference
            r.p_values = {m: _finite(table[r.name]["comparisons"][first][m]) for m in names}
    return {
        "dataset": dataset.name,
        "split": dataset.split,
        "qrels": dataset.qrels_file,
        "queries": len(judged),
        "queries_with_candidates": len(candidates),
        "identical_ids_dropped": 0 if keep_identical_ids else identical,
        "top_k": k,
        "metrics": names,
        "significance": {"test": "paired Student's t (ranx)", "alpha": SIGNIFICANCE, "against": first},
        "first_stage": {"name": first_stage_name,
                        "metrics": {m: float(table[first_stage_name]["scores"][m]) for m in names}},  # fmt: skip
        "targets": [
            {"name": r.name, "description": r.description, "metrics": r.metrics,
             "vs_first_target": {m: _versus(r.metrics[m] - results[0].metrics[m], r.p_values[m]) for m in names}
             if r is not results[0] else {},
             "pairs_scored": r.pairs_scored, "cached_pairs": r.cached_pairs, "seconds": r.seconds,
             "pairs_per_s": r.pairs_per_s}
            for r in results
        ],  # fmt: skip
        "runs": runs,
    }


def _versus(delta: float, p_value: float | None) -> dict[str, Any]:
    return {"delta": delta, "p_value": p_value, "significant": p_value is not None and p_value < SIGNIFICANCE}


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _as_ranked(run: Run, judged: list[str]) -> Run:
    """What ranx is given: every judged query present (an empty ranking for one without candidates counts as zero,
    not as absent), each document scored by its place in `ranked` order, which the run files keep. ranx orders equal
    scores its own way, so equal scores (a given run's, or a quantized target's) would otherwise be measured in
    another order than the files hold: 500 equal scores with the relevant document ranked first measured MRR 0.003."""
    out: Run = {}
    for q in judged:
        docs = ranked(run.get(q) or {})
        out[q] = {d: float(len(docs) - i) for i, (d, _) in enumerate(docs)}
    return out


def format_table(report: dict[str, Any]) -> str:
    names = report["metrics"]
    rows = [["", *names, "pairs/s"]]
    rows.append([f"{report['first_stage']['name']} (first stage)",
                 *(f"{report['first_stage']['metrics'][m]:.4f}" for m in names), ""])  # fmt: skip
    for t in report["targets"]:
        cells = []
        for m in names:
            cell = f"{t['metrics'][m]:.4f}"
            if versus := t["vs_first_target"].get(m):
                cell += f" ({versus['delta']:+.4f}{'*' if versus['significant'] else ''})"
            cells.append(cell)
        rate = f"{t['pairs_per_s']:.1f}" if t["pairs_per_s"] else ""
        rows.append([t["name"], *cells, rate])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    first = report["significance"]["against"]
    lines.append(f"{report['queries']} judged queries, top {report['top_k']} candidates; (delta vs {first}, "
                 f"* p < {report['significance']['alpha']}, paired t-test)")  # fmt: skip
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], folder: str | Path) -> list[Path]:
    """report.json, a TREC run file <name>.run per target (and the first stage's candidates), metrics.png."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, run in report["runs"].items():
        path = folder / f"{_safe(name)}.run"
        write_run(run, path, _safe(name))
        written.append(path)
    body = {k: v for k, v in report.items() if k != "runs"}
    (folder / "report.json").write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    written.append(folder / "report.json")
    written.append(plot(report, folder / "metrics.png"))
    return written


def plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["metrics"]
    systems = [(report["first_stage"]["name"], report["first_stage"]["metrics"])]
    systems += [(t["name"], t["metrics"]) for t in report["targets"]]
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names) * len(systems) / 2), 4))
    for i, (name, values) in enumerate(systems):
        ax.bar([j + i * width for j in range(len(names))], [values[m] for m in names], width, label=name)
    ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylim(0, 1.15)
    ax.set_title(f"{report['dataset']}: {report['queries']} queries, top {report['top_k']}")
    ax.legend(loc="upper center", ncol=len(systems), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
