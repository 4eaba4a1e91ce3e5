"""Evaluation data: a BEIR-layout dataset (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), TREC qrels and TREC
run files. Every malformed line is an EvalDataError naming the file, the line and the field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import RerankdError


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
    qrels = read_qrels(path)
    for qid, docs in qrels.items():
        if qid not in queries:
            raise EvalDataError(f"{path}: query id {qid!r} is not in {folder / 'queries.jsonl'}")
        missing = [d for d in docs if d not in corpus]
        if missing:
            raise EvalDataError(f"{path}: corpus id {missing[0]!r} (query {qid!r}) is not in {folder / 'corpus.jsonl'}")
    return Dataset(corpus, queries, qrels, folder.name)


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


def read_qrels(path: str | Path) -> Qrels:
    """BEIR's tsv (`query-id<TAB>corpus-id<TAB>score`, with that header) or TREC qrels (`qid 0 docid rel`)."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such qrels file")
    qrels: Qrels = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts or (n == 1 and parts[:2] == ["query-id", "corpus-id"]):
                continue
            where = f"{path}:{n}"
            if len(parts) == 3:
                qid, docid, rel = parts
            elif len(parts) == 4:
                qid, _, docid, rel = parts
            else:
                raise EvalDataError(f"{where}: expected 'query-id corpus-id score' (BEIR) or 'qid 0 docid rel' (TREC), "
                                    f"got {len(parts)} fields")  # fmt: skip
            try:
                value = int(rel)
            except ValueError:
                raise EvalDataError(f"{where}: score: {rel!r} is not an integer relevance") from None
            qrels.setdefault(qid, {})[docid] = value
    if not qrels:
        raise EvalDataError(f"{path}: no judgements")
    return qrels


def read_run(path: str | Path) -> Run:
    """A TREC run file: `qid Q0 docid rank score tag` a line."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such run file")
    run: Run = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            where = f"{path}:{n}"
            if len(parts) != 6:
                raise EvalDataError(f"{where}: expected 'qid Q0 docid rank score tag', got {len(parts)} fields")
            qid, _, docid, rank, score, _ = parts
            try:
                int(rank)
            except ValueError:
                raise EvalDataError(f"{where}: rank: {rank!r} is not an integer") from None
            try:
                run.setdefault(qid, {})[docid] = float(score)
            except ValueError:
                raise EvalDataError(f"{where}: score: {score!r} is not a number") from None
    if not run:
        raise EvalDataError(f"{path}: empty run")
    return run


def write_run(run: Run, path: str | Path, tag: str) -> None:
    """A TREC run file, each query's documents best first (ties by id)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for qid, docs in run.items():
            ranked = sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))
            for rank, (docid, score) in enumerate(ranked, 1):
                f.write(f"{qid} Q0 {docid} {rank} {score:.8g} {tag}\n")


def top_k(run: Run, k: int) -> dict[str, list[str]]:
    """Each query's k best documents of a run, best first (ties by id)."""
    return {qid: [d for d, _ in sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))[:k]] for qid, docs in run.items()}
