"""Evaluation data: a BEIR-layout dataset (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), TREC qrels and TREC
run files. Every malformed line is an EvalDataError naming the file, the line and the field."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

from ..errors import RerankdError

log = logging.getLogger("rerankd.eval")


class EvalDataError(RerankdError):
    """A dataset, qrels or run file that cannot be read: says which file, which line and what is wrong there."""


@dataclass(frozen=True)
class Entry:
    """A corpus document or a query: its text (a BEIR document's title and text joined), or an image (a path,
    resolved against the dataset's folder, or a URL)."""

    text: str | None = None
    image: str | None = None

    def item(self) -> str | dict:
        """What a reranker is given: the text, or {"image": ...}."""
        return self.text if self.image is None else {"image": self.image}


Qrels = dict[str, dict[str, int]]  # query id -> document id -> relevance
Run = dict[str, dict[str, float]]  # query id -> document id -> score


@dataclass(frozen=True)
class Dataset:
    corpus: dict[str, Entry]
    queries: dict[str, Entry]
    qrels: Qrels
    name: str
    folder: Path = Path(".")
    split: str | None = None  # qrels/<split>.tsv, or None when a qrels file was given
    qrels_file: str = ""

    def judged_queries(self) -> list[str]:
        """The queries with at least one relevance judgement, in the order of queries.jsonl."""
        return [q for q in self.queries if q in self.qrels]


def read_beir(folder: str | Path, split: str = "test", qrels_file: str | Path | None = None) -> Dataset:
    """A dataset in the BEIR layout; `qrels_file` (BEIR tsv or TREC qrels) instead of qrels/<split>.tsv."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalDataError(f"{folder}: no such folder; give a dataset in the BEIR layout (corpus.jsonl, "
                            "queries.jsonl, qrels/<split>.tsv)")  # fmt: skip
    corpus = _read_entries(folder / "corpus.jsonl", folder, title=True)
    queries = _read_entries(folder / "queries.jsonl", folder, title=False)
    path = Path(qrels_file) if qrels_file is not None else folder / "qrels" / f"{split}.tsv"
    known = {"query-id": (queries, folder / "queries.jsonl"), "corpus-id": (corpus, folder / "corpus.jsonl")}
    qrels = read_qrels(path, known)
    return Dataset(corpus, queries, qrels, folder.name, folder, split if qrels_file is None else None, str(path))


def _read_entries(path: Path, folder: Path, title: bool) -> dict[str, Entry]:
    if not path.is_file():
        raise EvalDataError(f"{path}: missing (the BEIR layout has corpus.jsonl and queries.jsonl)")
    out: dict[str, Entry] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{where}: not a JSON object ({e.msg})") from None
            if not isinstance(obj, dict):
                raise EvalDataError(f"{where}: not a JSON object")
            _id = obj.get("_id")
            if not isinstance(_id, (str, int)) or isinstance(_id, bool) or str(_id) == "":
                raise EvalDataError(f"{where}: _id: missing or not a string")
            _id = str(_id)
            if _id in out:
                raise EvalDataError(f"{where}: _id: {_id!r} appears twice")
            for field in ("text", "title", "image"):
                if obj.get(field) is not None and not isinstance(obj[field], str):
                    raise EvalDataError(f"{where}: {field}: not a string")
            image = obj.get("image") or None
            text = obj.get("text") or ""
            if title and obj.get("title"):
                text = f"{obj['title']} {text}".strip()
            if image is None and not text:
                raise EvalDataError(f"{where}: has neither text{' nor title' if title else ''} nor image")
            if image is not None and not image.startswith(("http://", "https://", "data:")):
                image = str((folder / image).resolve()) if not Path(image).is_absolute() else image
            out[_id] = Entry(text if image is None else None, image)
    if not out:
        raise EvalDataError(f"{path}: empty")
    return out


def _fields(path: str | Path, what: str):
    """(where, fields) for each non-empty line of a whitespace-separated file; `where` is 'file:line'."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such {what} file")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if parts := line.split():
                yield f"{path}:{n}", parts


def _number(value: str, kind: type, where: str, field: str, what: str):
    try:
        return kind(value)
    except ValueError:
        raise EvalDataError(f"{where}: {field}: {value!r} is not {what}") from None


Known = dict[str, tuple[Collection[str], Path]]  # a field -> the ids it may hold, and the file that holds them


def _check_known(known: Known | None, where: str, field: str, value: str) -> None:
    if known is not None and field in known and value not in known[field][0]:
        raise EvalDataError(f"{where}: {field}: {value!r} is not in {known[field][1]}")


def read_qrels(path: str | Path, known: Known | None = None) -> Qrels:
    """BEIR's tsv (`query-id<TAB>corpus-id<TAB>score`, with that header) or TREC qrels (`qid 0 docid rel`);
    `known` checks the query ids against the dataset's, line by line. A judged document missing from the corpus
    (ArguAna's qrels name a few) is kept, with a warning: relevant, and retrievable by no system, as BEIR counts it."""
    qrels: Qrels = {}
    missing: list[str] = []
    for where, parts in _fields(path, "qrels"):
        if parts[:2] == ["query-id", "corpus-id"] and where.endswith(":1"):
            continue
        if len(parts) not in (3, 4):
            raise EvalDataError(f"{where}: expected 'query-id corpus-id score' (BEIR) or 'qid 0 docid rel' (TREC), "
                                f"got {len(parts)} fields")  # fmt: skip
        qid, docid, rel = parts if len(parts) == 3 else (parts[0], parts[2], parts[3])
        _check_known(known, where, "query-id", qid)
        if known is not None and "corpus-id" in known and docid not in known["corpus-id"][0]:
            missing.append(docid)
        relevance = _number(rel, int, where, "score", "an integer relevance")
        docs = qrels.setdefault(qid, {})
        if docid in docs:
            raise EvalDataError(f"{where}: corpus-id: {docid!r} is judged twice for query {qid!r}")
        docs[docid] = relevance
    if not qrels:
        raise EvalDataError(f"{path}: no judgements")
    if missing:
        shown = ", ".join(map(repr, missing[:3])) + (", ..." if len(missing) > 3 else "")
        corpus = known["corpus-id"][1]  # type: ignore[index]
        log.warning("%s: %d judgements name documents that %s does not hold (%s): kept as relevant documents no "
                    "system can retrieve, as BEIR counts them", path, len(missing), corpus, shown)  # fmt: skip
    return qrels


def read_run(path: str | Path, dataset: Dataset | None = None) -> Run:
    """A TREC run file (`qid Q0 docid rank score tag` a line), each query's documents in rank order (the order that
    breaks ties of score); with `dataset`, every docid must be in its corpus."""
    known: Known | None = None
    if dataset is not None:
        known = {"docid": (dataset.corpus, dataset.folder / "corpus.jsonl")}
    ranks: dict[str, dict[str, int]] = {}
    run: Run = {}
    for where, parts in _fields(path, "run"):
        if len(parts) != 6:
            raise EvalDataError(f"{where}: expected 'qid Q0 docid rank score tag', got {len(parts)} fields")
        qid, _, docid, rank, score, _ = parts
        _check_known(known, where, "docid", docid)
        docs = run.setdefault(qid, {})
        if docid in docs:
            raise EvalDataError(f"{where}: docid: {docid!r} appears twice for query {qid!r}")
        ranks.setdefault(qid, {})[docid] = _number(rank, int, where, "rank", "an integer")
        docs[docid] = _number(score, float, where, "score", "a number")
    if not run:
        raise EvalDataError(f"{path}: empty run")
    return {q: {d: docs[d] for d in sorted(docs, key=ranks[q].__getitem__)} for q, docs in run.items()}


def ranked(docs: dict[str, float]) -> list[tuple[str, float]]:
    """One query's (document id, score), best first; ties keep the order given (a run file's ranks, a target's
    candidates in first-stage order)."""
    return sorted(docs.items(), key=lambda kv: -kv[1])


def write_run(run: Run, path: str | Path, tag: str) -> None:
    """A TREC run file, each query's documents best first (ties as `ranked` orders them)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for qid, docs in run.items():
            for rank, (docid, score) in enumerate(ranked(docs), 1):
                f.write(f"{qid} Q0 {docid} {rank} {score:.8g} {tag}\n")


def top_k(run: Run, k: int) -> dict[str, list[str]]:
    """Each query's k best documents of a run, best first (ties as `ranked` orders them)."""
    return {qid: [d for d, _ in ranked(docs)[:k]] for qid, docs in run.items()}
