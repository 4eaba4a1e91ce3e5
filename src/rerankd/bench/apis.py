"""The request and response schemas of the rerank servers `rerankd bench` can drive.

Each API turns (query, documents, top_n) into a path and a JSON body, and a response body into its (index, score)
results (so a server that answers 200 with something else is counted as a failure, not a success; `rerankd eval`
reads the scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


class BadResponse(Exception):
    """A 2xx answer that is not what the API promises."""


Doc = str | dict


def _jina_body(model: str | None, query: Doc, docs: list[Doc], top_n: int | None) -> dict:
    body: dict[str, Any] = {"query": query, "documents": docs, "return_documents": False}
    if model:
        body["model"] = model
    if top_n:
        body["top_n"] = top_n
    return body


Scores = list[tuple[int, float]]  # (document index, score), as the server ordered them


def _pairs(items: list, score: str) -> Scores:
    return [(int(r["index"]), float(r[score])) for r in items]


def _valid(r: Any, score: str) -> bool:
    return (isinstance(r, dict) and isinstance(r.get("index"), int) and not isinstance(r["index"], bool)
            and isinstance(r.get(score), (int, float)) and not isinstance(r[score], bool))  # fmt: skip


def _results_list(body: Any, key: str = "results", score: str = "relevance_score") -> Scores:
    items = body.get(key) if isinstance(body, dict) else None
    if not isinstance(items, list) or not all(_valid(r, score) for r in items):
        raise BadResponse(f"expected {{{key!r}: [{{'index', {score!r}}}, ...]}}")
    return _pairs(items, score)


def _bare_list(body: Any, score: str = "score") -> Scores:
    if not isinstance(body, list) or not all(_valid(r, score) for r in body):
        raise BadResponse(f"expected a list of {{'index', {score!r}}}")
    return _pairs(body, score)


def _bare_list_or_results(body: Any) -> Scores:
    """SGLang's bare list, or the Jina shape of a server in SGLang's place (rerankd answers SGLang's request so)."""
    return _results_list(body) if isinstance(body, dict) else _bare_list(body)


def _text(doc: Doc) -> str:
    if isinstance(doc, dict):
        if "text" not in doc:
            raise ValueError("this API takes text documents only; drop --image-docs")
        return doc["text"]
    return doc


@dataclass(frozen=True)
class Api:
    name: str
    path: str
    build: Callable[[str | None, Doc, list[Doc], int | None], dict]
    scores: Callable[[Any], Scores]  # a response body's results, or BadResponse
    images: bool  # whether image documents / queries can be sent
    description: str


def _cohere(model, query, docs, top_n):
    body: dict[str, Any] = {"model": model or "rerank", "query": _text(query), "documents": [_text(d) for d in docs]}
    if top_n:
        body["top_n"] = top_n
    return body


def _vllm(model, query, docs, top_n):
    body: dict[str, Any] = {"query": _text(query), "documents": [_text(d) for d in docs]}
    if model:
        body["model"] = model
    if top_n:
        body["top_n"] = top_n
    return body


def _tei(model, query, docs, top_n):
    return {"query": _text(query), "texts": [_text(d) for d in docs], "raw_scores": False, "return_text": False}


def _sglang(model, query, docs, top_n):
    return {"query": _text(query), "documents": [_text(d) for d in docs]}


def _infinity(model, query, docs, top_n):
    body: dict[str, Any] = {"query": _text(query), "documents": [_text(d) for d in docs], "return_documents": False}
    if model:
        body["model"] = model
    if top_n:
        body["top_n"] = top_n
    return body


APIS: dict[str, Api] = {
    "rerankd": Api("rerankd", "/v1/rerank", _jina_body, _results_list, True, "rerankd's own: Jina's shape"),
    "jina": Api("jina", "/v1/rerank", _jina_body, _results_list, True, "Jina's API: POST /v1/rerank"),
    "cohere": Api("cohere", "/v2/rerank", _cohere, _results_list, False, "Cohere v2: POST /v2/rerank"),
    "vllm": Api("vllm", "/rerank", _vllm, _results_list, False, "vLLM: POST /rerank"),
    "tei": Api("tei", "/rerank", _tei, _bare_list, False, "text-embeddings-inference: POST /rerank {query, texts}"),
    "sglang": Api("sglang", "/v1/rerank", _sglang, _bare_list_or_results, False,
                  "SGLang: POST /v1/rerank, a bare list back (or Jina's shape, from rerankd)"),
    "infinity": Api("infinity", "/rerank", _infinity, _results_list, False, "Infinity: POST /rerank"),
}
