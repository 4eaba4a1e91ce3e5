"""Scores to answers, in one place for the library, the CLI and every HTTP shape: activation, ranking (ties by
index), top_n, the echoed documents, the winning window, the response bodies of the Jina/vLLM and Cohere APIs,
and the list of pairs that could not be scored."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .errors import InputError
from .models.base import Window

ACTIVATIONS = ("sigmoid", None)


def check_activation(activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be 'sigmoid' or None (the raw logit), got {activation!r}")


def check_top_n(top_n: int | None) -> None:
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise ValueError(f"top_n must be a positive integer or None, got {top_n!r}")


def activate(logits: list[float], activation: str | None = "sigmoid") -> list[float]:
    """Relevance logits -> scores: sigmoid in fp32, as the references compute it, or the logits unchanged."""
    if activation is None:
        return list(logits)
    return torch.sigmoid(torch.tensor(logits, dtype=torch.float32)).tolist()


def ranked(scores: Sequence[float], top_n: int | None = None) -> list[int]:
    """Indices by score, best first, ties by index; the first top_n."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:top_n]


def window_json(w: Window) -> dict[str, int]:
    return {"index": w.index, "count": w.count, "start": w.start, "end": w.end}


def rerank_results(
    scores: Sequence[float],
    windows: Sequence[Window | None],
    top_n: int | None,
    document: Callable[[int], Any] | None,
) -> list[dict[str, Any]]:
    """The ranked results of a rerank: `{"index", "relevance_score", "document"?, "window"?}`, best first, ties
    by index, cut to top_n. `document(i)` is what to echo for document i (None: no documents echoed); "window" is
    there for a document scored in windows: the one that won, and its character span."""
    results = []
    for i in ranked(scores, top_n):
        r: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if document is not None:
            r["document"] = document(i)
        w = windows[i]
        if w is not None:
            r["window"] = window_json(w)
        results.append(r)
    return results


def describe_errors(errors: Mapping[int, InputError], total: int, noun: str, shown: int, label: str | None) -> str:
    """"3 of 16 documents could not be scored: <the first `shown` messages>; ... (and N more)". Each message is
    the error's own (it names its field), after `label` and the index where one is given ("pair 4: ...")."""
    items = sorted(errors.items())
    listed = "; ".join(f"{label} {i}: {e}" if label else str(e) for i, e in items[:shown])
    more = f" (and {len(items) - shown} more)" if len(items) > shown else ""
    return f"{len(items)} of {total} {noun} could not be scored: {listed}{more}"


def usage(tokens: int) -> dict[str, int]:
    """The `usage` of an answer, as Jina and vLLM count it: every token is a prompt token."""
    return {"total_tokens": tokens, "prompt_tokens": tokens}


def jina_response(model: str, results: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """Jina's and vLLM's /v1/rerank body (results from rerank_results)."""
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": model, "usage": usage(tokens), "results": results}


def sglang_response(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """SGLang's /v1/rerank body: a bare list of {"score", "document"?, "index"}, best first (results from
    rerank_results; a window is not part of its shape)."""
    return [{"score": r["relevance_score"], **({"document": r["document"]} if "document" in r else {}),
             "index": r["index"]} for r in results]  # fmt: skip


def cohere_response(model: str, results: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """Cohere v2's /v2/rerank body (results from rerank_results, documents echoed as {"text"} or not at all), with
    vLLM's `model` and `usage` (its /v2/rerank answers so)."""
    meta = {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}, "tokens": {"input_tokens": tokens}}
    return {"id": str(uuid.uuid4()), "results": results, "meta": meta, "model": model, "usage": usage(tokens)}


def score_response(model: str, scores: Sequence[float], tokens: int) -> dict[str, Any]:
    """vLLM's /score body: one score a pair, in the order of the pairs."""
    return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
            "data": [{"index": i, "object": "score", "score": x} for i, x in enumerate(scores)],
            "usage": usage(tokens)}  # fmt: skip
