"""What `rerankd eval` scores candidates with: a local model with its loading and scoring options, or a running
server of any API `rerankd bench` speaks (so that rerankd can be compared with another server on the same
candidates). Each target has a fingerprint of everything that changes its scores: the score cache's key."""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RerankdError


class TargetError(RerankdError):
    """A target that cannot score: a server that refuses or answers out of shape, a model that fails to load."""


Doc = str | dict


@dataclass
class LocalTarget:
    """A model loaded in this process: `load` are Reranker.from_pretrained's options, `score` rerank's."""

    name: str
    model: str
    load: dict[str, Any] = field(default_factory=dict)
    score_options: dict[str, Any] = field(default_factory=dict)
    show_progress: bool = True  # while loading weights (changes no score: not in the fingerprint)
    reranker: Any = None

    @functools.cached_property
    def fingerprint(self) -> str:
        """The options, and what identifies the weights (a local checkpoint's files, a hub repo's commit), the
        device the defaults pick (bf16 on CUDA, fp32 on the CPU) and rerankd's version: weights changed in place,
        an updated hub repo or a cache moved to another machine never reuse old scores."""
        import torch

        from .. import __version__
        from ..hub import checkpoint_identity

        device = self.load.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        return json.dumps({"model": self.model, "load": self.load, "score": self.score_options, "device": device,
                           "weights": checkpoint_identity(self.model, self.load.get("revision")),
                           "rerankd": __version__}, sort_keys=True)  # fmt: skip

    @property
    def description(self) -> str:
        opts = {**self.load, **self.score_options}
        return self.model + "".join(f" {k}={v}" for k, v in sorted(opts.items()))

    def open(self) -> None:
        if self.reranker is None:
            from ..reranker import Reranker

            self.reranker = Reranker.from_pretrained(self.model, **self.load, show_progress=self.show_progress)

    def score(self, query: Doc, docs: list[Doc]) -> list[float]:
        self.open()
        results = self.reranker.rerank(query, docs, return_documents=False, **self.score_options)
        scores = [0.0] * len(docs)
        for r in results:
            scores[r["index"]] = r["relevance_score"]
        return scores

    def close(self) -> None:
        if self.reranker is not None:
            self.reranker.close()
            self.reranker = None


@dataclass
class ServerTarget:
    """A running rerank server, driven through one of `rerankd bench`'s APIs."""

    name: str
    base_url: str
    api: str = "rerankd"
    model: str | None = None
    api_key: str | None = None
    timeout: float = 300.0
    client: Any = None

    @property
    def fingerprint(self) -> str:
        # the target's name too: a server's settings cannot be seen from here, so a server restarted with others
        # (int8, another max_length) must be evaluated under another name to be scored anew
        self.open()  # the model name asked of the server is part of it
        return json.dumps({"name": self.name, "base_url": self.base_url, "api": self.api, "model": self.model},
                          sort_keys=True)  # fmt: skip

    @property
    def description(self) -> str:
        return f"{self.base_url} ({self.api} API{', model ' + self.model if self.model else ''})"

    def open(self) -> None:
        if self.client is None:
            import httpx

            from ..bench.apis import APIS

            if self.api not in APIS:
                raise TargetError(f"target {self.name!r}: unknown --api {self.api!r}; choose one of {sorted(APIS)}")
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=self.timeout)
            if self.model is None:  # the model the server serves, as /v1/models names it (vLLM, rerankd, ...)
                self.model = self._served_model()

    def _served_model(self) -> str | None:
        import httpx

        try:
            resp = self.client.get("/v1/models")
            data = resp.json().get("data") if resp.status_code == 200 else None
            return data[0]["id"] if isinstance(data, list) and data and isinstance(data[0].get("id"), str) else None
        except (httpx.HTTPError, ValueError, AttributeError, KeyError):
            return None

    def score(self, query: Doc, docs: list[Doc]) -> list[float]:
        import httpx

        from ..bench.apis import APIS, BadResponse

        self.open()
        api = APIS[self.api]
        query, docs = _sendable(query), [_sendable(d) for d in docs]
        try:
            body = api.build(self.model, query, docs, None)
        except ValueError as e:
            raise TargetError(f"target {self.name!r}: {e}") from None
        try:
            resp = self.client.post(api.path, json=body)
        except httpx.HTTPError as e:
            raise TargetError(f"target {self.name!r}: {self.base_url}{api.path}: {type(e).__name__}: {e}") from None
        if resp.status_code // 100 != 2:
            raise TargetError(f"target {self.name!r}: {self.base_url}{api.path} answered {resp.status_code}: "
                              f"{resp.text[:300]}")  # fmt: skip
        try:
            pairs = api.scores(resp.json())
        except (ValueError, BadResponse) as e:
            raise TargetError(f"target {self.name!r}: {self.base_url}{api.path}: unexpected response: {e}") from None
        scores: list[float | None] = [None] * len(docs)
        for index, score in pairs:
            if 0 <= index < len(docs):
                scores[index] = score
        if any(s is None for s in scores):
            raise TargetError(f"target {self.name!r}: {self.base_url}{api.path} returned {len(pairs)} scores for "
                              f"{len(docs)} documents")  # fmt: skip
        return scores  # type: ignore[return-value]

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def _sendable(item: Doc) -> Doc:
    """A dataset's local image file as a data: URI (a server reads no client's files unless told to)."""
    if isinstance(item, dict) and isinstance(item.get("image"), str) and Path(item["image"]).is_absolute():
        path = Path(item["image"])
        kind = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".gif": "gif", ".bmp": "bmp"}.get(path.suffix.lower(), "png")
        return {"image": f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()}
    return item


Target = LocalTarget | ServerTarget
