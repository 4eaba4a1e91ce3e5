"""The HTTP server: FastAPI app factory, routes, limits, auth, and errors as JSON.

Every error is `{"error": {"message", "type", "param"}}` with the status that fits: 400 bad input, 401 auth,
404 unknown model or route, 408 body not sent in time, 413 too large, 422 schema, 429 overloaded, 500 model failure, 503 not ready,
504 deadline. Messages name the field (`documents[3].image: ...`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import importlib.resources
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import RERANK_DEFAULTS, LoadOptions, ServeOptions
from ..engine import Overloaded, Scheduler, TooLarge, WorkerError
from ..errors import InputError
from ..inputs import ImageItem, Item, TextItem, parse_item
from ..inputs.items import valid_text
from ..inputs.images import ImagePolicy
from ..models.base import LengthOptions, Where
from ..reranker import Reranker
from ..results import (
    activate, cohere_response, describe_errors, jina_response, rerank_results, score_response, sglang_response,
)
from .errors import error_body, send_error
from .metrics import Metrics
from .schemas import (
    CohereRerankRequest,
    CohereResponse,
    ContentDocument,
    DocumentObject,
    ErrorResponse,
    ModelCard,
    ModelList,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
    TEIResult,
    VllmOrTeiRequest,
    content_parts,
    pair_up,
    score_inputs,
    truncated,
)

log = logging.getLogger("rerankd.server")

ROUTES = ("/v1/rerank", "/rerank", "/v2/rerank", "/score", "/v1/score", "/health", "/v1/models", "/metrics", "/docs",
          "/openapi.json", "/", "/playground")
OPEN_ROUTES = ("/health", "/", "/playground")  # never need the API key (the playground page holds no data; it sends
# the key the person types with its own calls)
DRAIN_LIMIT = 64 * 1024 * 1024  # bytes of a refused body read and dropped before answering 413
CLIENT_CLOSED = 499  # nginx's code for a client that went away; only ever seen in metrics


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


UNNAMED_MODEL = "default/not-specified"  # what Infinity's clients send when none is named: the served model


@dataclass
class ServerState:
    reranker: Reranker
    scheduler: Scheduler
    metrics: Metrics
    options: ServeOptions
    names: tuple[str, ...]  # the names clients may send; answers carry the first
    images: ImagePolicy  # what the clients may name as image sources
    source: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.names[0]

    def check_model(self, name: str | None) -> None:
        if name and name not in self.names and name != UNNAMED_MODEL:  # "" is the served model too, as vLLM reads it
            raise ApiError(404, f"model {name!r} is not served here; served: {list(self.names)!r}", "model")


def create_app(
    reranker: Reranker, options: ServeOptions, model_name: str | Sequence[str], metrics: Metrics | None = None,
    source: str | None = None, replica: str | None = None,
) -> FastAPI:
    """The app serving `reranker` as `model_name` (or several names, each answered as the model; responses carry
    the first); `source` (the hub id or directory it came from) is shown in /v1/models, so that clients such as
    `rerankd bench` can find its tokenizer; `replica` (one of several serving the same model, on Ray Serve) is sent
    as the `x-rerankd-replica` header of every answer."""
    names = (model_name,) if isinstance(model_name, str) else tuple(model_name)
    if not names:
        raise ValueError("create_app: give at least one model name")
    metrics = metrics or Metrics(replica)
    scheduler = Scheduler(
        reranker.backend,
        max_batch_tokens=reranker.max_batch_tokens,
        max_batch_wait=options.max_batch_wait_ms / 1000,
        max_queue_pairs=options.max_queue_pairs,
        prepare_workers=reranker.options.preprocess_workers,
        observer=metrics,
        max_request_tokens=options.max_request_tokens,
        max_queue_tokens=options.max_queue_tokens,
    )
    metrics.watch(scheduler)
    images = ImagePolicy(options.allow_private_urls, options.allowed_local_media_path)
    activation = reranker.backend.score_activation  # what makes an output a relevance_score (v3: none)
    state = ServerState(reranker, scheduler, metrics, options, names, images, source)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        scheduler.close(timeout=30)

    app = FastAPI(
        title="rerankd",
        description="Reranking server: Jina / vLLM `/v1/rerank`, Cohere `/v2/rerank`, vLLM `/score`.",
        version=_version(),
        lifespan=lifespan,
        responses={s: {"model": ErrorResponse} for s in (400, 401, 404, 408, 413, 422, 429, 500, 503, 504)},
    )
    app.state.rerankd = state
    _install_error_handlers(app)

    # exclude_unset: a result without a document or window leaves the key out, while a document's own null fields
    # are echoed as sent
    @app.post("/v1/rerank", response_model=RerankResponse, response_model_exclude_unset=True)
    async def rerank_v1(body: RerankRequest, request: Request) -> RerankResponse:
        """Rerank documents (text or images) against a query: Jina's and vLLM's request and response (Cohere v1's
        and SGLang's requests too; SGLang's response with --v1-rerank-response sglang)."""
        return await rerank(body, request, sglang=options.v1_rerank_response == "sglang")

    async def rerank(body: RerankRequest, request: Request, sglang: bool = False):
        state.check_model(body.model)
        documents = body.document_list()
        _check_count(len(documents), options)
        max_length, max_query_length, max_doc_length, long_documents = body.lengths()
        lengths = _lengths(reranker, options, max_length, max_query_length, max_doc_length, long_documents,
                           body.overlap, body.instruction)  # fmt: skip
        query = _item(body.query, "query", reranker)
        docs = [_item(d, f"documents[{i}]", reranker, body.rank_fields) for i, d in enumerate(documents)]
        scored, tokens = await _score(request, state, [(query, d) for d in docs], lengths)

        def echo(i: int) -> DocumentObject:  # the caller's document as sent (content parts: as vLLM echoes them)
            d = documents[i]
            parts = content_parts(d)
            if parts is not None and parts[0].type == "text":
                return DocumentObject(text=parts[0].text)
            if parts is not None:
                return DocumentObject(multi_modal=[p.model_dump(exclude_none=True) for p in parts])
            return DocumentObject(text=d) if isinstance(d, str) else d

        def echo_sglang(i: int) -> Any:  # SGLang echoes a document's text; other documents as sent
            d = documents[i]
            parts = content_parts(d)
            if parts is not None:
                return parts[0].text if len(parts) == 1 and parts[0].type == "text" else \
                    [p.model_dump(exclude_none=True) for p in parts]  # fmt: skip
            return d if isinstance(d, str) else d.model_dump(exclude_unset=True)

        scores = activate([s.logit for s in scored], None if body.raw else activation)
        results = rerank_results(scores, [s.window for s in scored], body.top_n or None,
                                 (echo_sglang if sglang else echo) if body.return_documents else None)  # fmt: skip
        if sglang:
            return JSONResponse(sglang_response(results))
        return RerankResponse.model_validate(jina_response(state.model_name, results, tokens))

    @app.post("/rerank", response_model=RerankResponse | list[TEIResult], response_model_exclude_unset=True)
    async def rerank_vllm_or_tei(body: VllmOrTeiRequest, request: Request):
        """vLLM's (and Jina's) request and response, as /v1/rerank; or text-embeddings-inference's: `texts`, a bare
        list of {"index", "score", "text"?} back, best first."""
        if isinstance(body, RerankRequest):
            return await rerank(body, request)
        _check_count(len(body.texts), options)
        lengths = _lengths(reranker, options, None, RERANK_DEFAULTS.max_query_length, None,
                           "truncate" if body.truncate else RERANK_DEFAULTS.long_documents, RERANK_DEFAULTS.overlap)  # fmt: skip
        query = _item(body.query, "query", reranker)
        texts = [(query, _item(t, f"texts[{i}]", reranker)) for i, t in enumerate(body.texts)]
        scored, _ = await _score(request, state, texts, lengths)
        scores = activate([s.logit for s in scored], None if body.raw_scores else activation)
        return [TEIResult(index=r["index"], score=r["relevance_score"],
                          **({"text": body.texts[r["index"]]} if body.return_text else {}))
                for r in rerank_results(scores, [None] * len(scores), None, None)]  # fmt: skip

    @app.post("/v2/rerank", response_model=CohereResponse, response_model_exclude_none=True)
    async def rerank_cohere(body: CohereRerankRequest, request: Request) -> CohereResponse:
        """Cohere's v2 rerank: string documents, each cut to max_tokens_per_doc tokens."""
        state.check_model(body.model)
        _check_count(len(body.documents), options)
        # Cohere's default cut (4096) stands in for the reference's own, except for a listwise model, whose cut
        # (v3: 2048) also sets its block sizes: there max_tokens_per_doc applies when the request gives it
        own_cut = reranker.backend.listwise and "max_tokens_per_doc" not in body.model_fields_set
        lengths = _lengths(reranker, options, None, RERANK_DEFAULTS.max_query_length, None if own_cut else body.max_tokens_per_doc,
                           "truncate", 0)  # fmt: skip
        query = _item(body.query, "query", reranker)
        scored, tokens = await _score(request, state, [(query, _item(d, f"documents[{i}]", reranker))
                                                       for i, d in enumerate(body.documents)], lengths)  # fmt: skip
        results = rerank_results(activate([s.logit for s in scored], activation), [None] * len(scored), body.top_n,
                                 (lambda i: {"text": body.documents[i]}) if body.return_documents else None)  # fmt: skip
        return CohereResponse.model_validate(cohere_response(state.model_name, results, tokens))

    @app.post("/score", response_model=ScoreResponse)
    @app.post("/v1/score", response_model=ScoreResponse)
    async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
        """vLLM's score API: a score for each (query, document) pair, queries and documents paired 1:1, 1:N or N:N,
        in the order given."""
        state.check_model(body.model)
        queries, documents = score_inputs(body.queries), score_inputs(body.documents)
        try:
            pairs = pair_up(len(queries), len(documents))
        except ValueError as e:
            raise ApiError(400, str(e), "documents") from None
        _check_count(len(pairs), options)
        max_length, long_documents = truncated(None, body.truncate_prompt_tokens, RERANK_DEFAULTS.long_documents)
        lengths = _lengths(reranker, options, max_length, RERANK_DEFAULTS.max_query_length, None, long_documents,
                           RERANK_DEFAULTS.overlap)  # fmt: skip
        query_items = [_item(q, f"queries[{i}]", reranker) for i, q in enumerate(queries)]
        doc_items = [_item(d, f"documents[{i}]", reranker) for i, d in enumerate(documents)]
        scored, tokens = await _score(request, state, [(query_items[q], doc_items[d]) for q, d in pairs], lengths)
        scores = activate([s.logit for s in scored], None if body.use_activation is False else activation)
        return ScoreResponse.model_validate(score_response(state.model_name, scores, tokens))

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 when the model is loaded and its worker runs, 503 otherwise."""
        if scheduler.alive:
            return JSONResponse({"status": "ok", "model": state.model_name})
        return JSONResponse(error_body(503, scheduler.down_reason), status_code=503)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=n, created=state.created, root=state.source) for n in state.names])

    playground = importlib.resources.files("rerankd.api").joinpath("playground.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    @app.get("/playground", include_in_schema=False)
    async def playground_page() -> HTMLResponse:
        """A page to try the server by hand: query (text or image), documents (lines, text files, images), top_n,
        the ranked results with score bars, tokens and latency, through this server's own /v1/rerank."""
        return HTMLResponse(playground)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # the last added runs first: metrics see everything, auth comes before reading a body
    app.add_middleware(BodyLimitMiddleware, options=options)
    app.add_middleware(AuthMiddleware, api_key=options.api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics, replica=replica)
    return app


def load_app(model: str, names: Sequence[str], load: LoadOptions, options: ServeOptions,
             replica: str | None = None) -> FastAPI:  # fmt: skip
    """Load `model`, run one warm-up forward (unless options.skip_warmup) and build its app: what `rerankd serve`
    serves, and each replica of `rerankd serve --ray`."""
    log = logging.getLogger("rerankd.serve")
    log.info("loading %s", model)
    start = time.monotonic()
    rr = Reranker.from_pretrained(model, **dataclasses.asdict(load))
    bf16 = "" if rr.options.cpu_bf16 == "none" else f" (cpu_bf16 {rr.options.cpu_bf16})"
    log.info("loaded %s (%s) on %s, %s%s, fp32 CPU linear kernel %s, attention %s, element-wise %s, in %.1fs", model,
             rr.backend.architecture, rr.options.device, rr.options.dtype, bf16, rr.options.cpu_gemm,
             rr.options.attention, rr.options.cpu_elementwise, time.monotonic() - start)  # fmt: skip
    if not options.skip_warmup:
        start = time.monotonic()
        rr.compute_score([["warm-up query", "warm-up document"]])
        log.info("warm-up forward done in %.2fs", time.monotonic() - start)
    return create_app(rr, options, names, source=str(model), replica=replica)


# ------------------------------------------------------------------------------------------------ helpers


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rerankd")
    except PackageNotFoundError:
        return "0"


def _check_count(n: int, options: ServeOptions) -> None:
    if n > options.max_documents:
        raise ApiError(413, f"{n} documents is more than the limit of {options.max_documents} per request; split the "
                       "request", "documents")  # fmt: skip
    if n > options.max_queue_pairs:  # could never be admitted, however idle the server
        raise ApiError(413, f"{n} documents is more than the server's queue of {options.max_queue_pairs} pairs "
                       "(--max-queue-pairs); split the request", "documents")  # fmt: skip


def _lengths(reranker: Reranker, options: ServeOptions, max_length, max_query_length, max_doc_length, long_documents,
             overlap, instruction: str | None = None) -> LengthOptions:  # fmt: skip
    """A request's LengthOptions, with the server's bound on windows per document; 400 naming a bad option."""
    try:
        lengths = reranker.length_options(max_length, max_query_length, max_doc_length, long_documents, overlap,
                                          instruction=instruction)  # fmt: skip
        return dataclasses.replace(lengths, max_windows=options.max_document_windows)
    except ValueError as e:
        raise ApiError(400, str(e), str(e).split(" ", 1)[0].rstrip(":")) from None


def _item(value, param: str, reranker: Reranker, rank_fields: list[str] | None = None) -> Item:
    """A request's query or document (a string, DocumentObject, or vLLM's / SGLang's content parts) as an Item;
    ApiError 400 naming `param` where it cannot be one or the model cannot score it."""
    try:
        parts = content_parts(value)
        if parts is not None:
            if len(parts) != 1:
                raise InputError(f"give one content part (a text or an image) an input, not {len(parts)}", param)
            value = parts[0].as_document(f"{param}.content[0]" if isinstance(value, ContentDocument) else f"{param}[0]")
        if isinstance(value, DocumentObject) and rank_fields is not None:
            text = value.fields_text(rank_fields)
            if text is None:
                raise InputError(f"has none of the rank_fields {rank_fields}", param)
            item = TextItem(valid_text(text, param))
        elif isinstance(value, DocumentObject) and value.text is None and value.image is None:
            raise InputError('an object document needs "text" or "image" (or rank_fields naming its fields to score)',
                             param)  # fmt: skip
        elif isinstance(value, DocumentObject):
            item = parse_item({"text": value.text} if value.text is not None else {"image": value.image}, "text", param)
        else:  # a string, or content parts' {"text"} / {"image"}
            item = parse_item(value, "text", param)
        reranker.check_supported(item, param)
    except InputError as e:
        raise ApiError(400, str(e), e.param) from None
    if isinstance(item, ImageItem) and not isinstance(item.source, str):
        raise ApiError(400, f"{param}.image: must be a URL, data URI or base64 string", f"{param}.image")
    return item


async def _score(request: Request, state: ServerState, pairs: Sequence[tuple[Item, Item]], lengths: LengthOptions):
    """Score (query, doc) pairs through the scheduler, within the deadline, withdrawn if the client goes away."""
    loop = asyncio.get_running_loop()
    scheduler = state.scheduler
    if not scheduler.alive:
        raise ApiError(503, f"{scheduler.down_reason}; try later")

    async def work():
        prepared: dict[int, Item] = {}  # each image query decoded once for all its documents, off the event loop
        if any(isinstance(query, ImageItem) for query, _ in pairs):
            scheduler.check_admission(pairs, lengths)  # not decoded at all when the queue would refuse the request
        for query, _ in pairs:
            if isinstance(query, ImageItem) and id(query) not in prepared:
                prepared[id(query)] = await loop.run_in_executor(scheduler.pool, state.reranker.backend.prepare_query,
                                                                 query, "query", state.images)  # fmt: skip
        wheres = [Where.for_document(i) for i in range(len(pairs))]
        return await scheduler.score([(prepared.get(id(q), q), d) for q, d in pairs], lengths, wheres, state.images)

    task = asyncio.ensure_future(work())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=state.options.request_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    except asyncio.CancelledError:  # the request itself was cancelled (Ray Serve does so when its client goes away)
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task not in done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if gone in done and not gone.cancelled():
            raise ApiError(CLIENT_CLOSED, "the client went away")
        raise ApiError(504, f"the request took longer than the server's limit of {state.options.request_timeout:g}s")
    try:
        outcome = task.result()
    except InputError as e:
        raise ApiError(400, str(e), e.param) from None
    except Overloaded as e:
        raise ApiError(429, str(e), headers={"Retry-After": str(max(1, round(e.retry_after)))}) from None
    except TooLarge as e:
        raise ApiError(413, str(e), "documents") from None
    except WorkerError as e:
        raise ApiError(500 if scheduler.alive else 503, str(e)) from None
    errors = {i: r for i, r in enumerate(outcome.results) if isinstance(r, InputError)}
    if errors:
        raise ApiError(400, describe_errors(errors, len(pairs), "documents", 5, None), errors[min(errors)].param)
    state.metrics.pairs.inc(len(pairs))
    state.metrics.tokens.inc(outcome.tokens)
    request.state.scored = (len(pairs), outcome.tokens)  # for the access log line
    return outcome.results, outcome.tokens


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ------------------------------------------------------------------------------------------------ errors


def _loc(loc: Sequence[Any]) -> str:
    """('body', 'documents', 3, 'image') -> 'documents[3].image'; union branch names are left out."""
    out = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part.islower() and part not in ("str", "int", "bool"):
            out += f".{part}" if out else part
    return out or "body"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.status, e.message, e.param), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        if any(err.get("type") == "json_invalid" for err in errs):
            return JSONResponse(error_body(400, "the request body is not valid JSON"), status_code=400)
        parts, seen = [], set()
        for err in errs:
            where = _loc(err.get("loc", ()))
            msg = f"{where}: {err.get('msg', 'invalid')}"
            if msg not in seen:
                seen.add(msg)
                parts.append(msg)
        param = _loc(errs[0].get("loc", ())) if errs else None
        return JSONResponse(error_body(422, "; ".join(parts[:8]), param), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
        return JSONResponse(error_body(e.status_code, message), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)


# ------------------------------------------------------------------------------------------------ middleware (ASGI)


class AuthMiddleware:
    """`Authorization: Bearer <key>` on every route but /health and the playground page, compared in constant
    time."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if self.expected is None or scope["type"] != "http" or scope["path"] in OPEN_ROUTES:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            what = "a wrong API key" if given else "no Authorization header"
            return await send_error(send, 401, f"{what}: send 'Authorization: Bearer <key>'", "Authorization",
                                     {"WWW-Authenticate": "Bearer"})  # fmt: skip
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Read a body before the app sees it, within bounds: at most max_request_bytes (413, by Content-Length or while
    reading), in full within body_timeout seconds (408, and the connection is closed), and at most max_json_values
    JSON values nested at most max_json_depth deep (413), counted before anything parses it (json_shape). Across
    requests, at most max_inflight_bytes of bodies are read or served at once (429 with Retry-After beyond), counted
    by Content-Length before reading, or while reading a body sent without one."""

    def __init__(self, app, options: ServeOptions):
        self.app = app
        self.options = options
        self.max_bytes = options.max_request_bytes
        self.inflight = 0  # bytes of the bodies being read or served (one event loop: no lock needed)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        held = [0]
        try:
            return await self._read_and_serve(scope, receive, send, held)
        finally:
            self.inflight -= held[0]

    def _hold(self, n: int, held: list[int]) -> tuple[int, str] | None:
        """Count n more bytes of this request against the server-wide budget, or say why not (status, message)."""
        budget = self.options.max_inflight_bytes
        if held[0] + n > budget:
            return 413, (f"the request body ({held[0] + n} bytes) is larger than the server's budget of {budget} bytes "
                         "for all requests in progress (--max-inflight-bytes); send a smaller request")  # fmt: skip
        if self.inflight + n > budget:
            return 429, (f"the server is busy: {self.inflight} bytes of requests in progress, this one adds {n}, its "
                         f"budget is {budget} (--max-inflight-bytes); retry later")  # fmt: skip
        self.inflight += n
        held[0] += n
        return None

    async def _refuse(self, send, receive, read: int, refusal: tuple[int, str]) -> None:
        await self._drain(receive, read)
        status, message = refusal
        await send_error(send, status, message, None, {"Retry-After": "1"} if status == 429 else None)

    async def _read_and_serve(self, scope, receive, send, held: list[int]):
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = f"the request body is over the limit of {self.max_bytes} bytes (--max-request-bytes)"
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._drain(receive)
            return await send_error(send, 413, too_big)
        counted = declared is not None and declared.isdigit()
        if counted and (refusal := self._hold(int(declared), held)):
            return await self._refuse(send, receive, 0, refusal)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.body_timeout
        chunks, total = [], 0
        while True:
            message = await _receive_by(receive, deadline)
            if message is None:
                return await send_error(send, 408, f"the request body did not arrive in full within "
                                         f"{self.options.body_timeout:g}s (--body-timeout)", None, {"Connection": "close"})  # fmt: skip
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._drain(receive, total)
                return await send_error(send, 413, too_big)
            if not counted and (refusal := self._hold(len(chunk), held)):
                return await self._refuse(send, receive, total, refusal)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        scan = functools.partial(json_shape, body, self.options.max_json_values, self.options.max_json_depth)
        # counted off the event loop when large (the scan lets other requests run between its matches)
        shape = scan() if len(body) < 65536 else await loop.run_in_executor(None, scan)
        if shape is not None:
            return await send_error(send, 413, shape)
        replay = {"type": "http.request", "body": body, "more_body": False}
        sent = False

        async def replaying_receive():
            nonlocal sent
            if not sent:
                sent = True
                return replay
            return await receive()

        return await self.app(scope, replaying_receive, send)

    async def _drain(self, receive, read: int = 0) -> None:
        """Read and drop the rest of a refused body (up to a bound, within --body-timeout), so that the client, still
        sending, gets the answer instead of a broken pipe; past either bound the connection is closed after it."""
        deadline = asyncio.get_running_loop().time() + self.options.body_timeout
        while read <= DRAIN_LIMIT:
            message = await _receive_by(receive, deadline)
            if message is None or message["type"] != "http.request" or not message.get("more_body", False):
                return
            read += len(message.get("body", b""))


async def _receive_by(receive, deadline: float) -> dict | None:
    """The next ASGI message, or None if it has not come by `deadline` (the event loop's clock)."""
    try:
        return await asyncio.wait_for(receive(), max(deadline - asyncio.get_running_loop().time(), 0))
    except TimeoutError:
        return None


# a string, a bracket or a comma; the closing quote is optional, so that an unclosed string ends the scan in one
# pass instead of being retried from every later quote (quadratic: 32 KB of \" took 2 s)
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[{]|[\]}]|,', re.S)


def json_shape(body: bytes, max_values: int, max_depth: int) -> str | None:
    """Why a JSON body is too large to parse, or None: its values (strings, objects, arrays and the elements commas
    separate) counted, and its nesting measured, by a scan that builds nothing. A body that is not JSON passes (the
    parser says what is wrong with it)."""
    values = depth = 0
    for m in _JSON_TOKEN.finditer(body):
        c = body[m.start()]
        if c in b"]}":
            depth -= 1
            continue
        values += 1
        if values > max_values:
            return (f"the request body has more than {max_values} JSON values (--max-json-values); send fewer "
                    "documents or fields")  # fmt: skip
        if c in b"[{":
            depth += 1
            if depth > max_depth:
                return f"the request body nests objects and arrays more than {max_depth} deep (--max-json-depth)"
    return None


access_log = logging.getLogger("rerankd.access")
PROBE_ROUTES = ("/health", "/metrics")  # answered at DEBUG when fine: a probe every few seconds would flood INFO
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")  # a client's X-Request-Id echoed and logged: printable, no spaces


class MetricsMiddleware:
    """Each request's metrics (by route and status, and its time) and its access log line (rerankd.access: client,
    method, path, status, seconds, pairs and tokens scored, the client's X-Request-Id), the X-Request-Id echoed, and
    the replica that answered as a header, when there is one."""

    def __init__(self, app, metrics: Metrics, replica: str | None = None):
        self.app = app
        self.metrics = metrics
        self.replica = None if replica is None else (b"x-rerankd-replica", replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = [500]  # if no answer starts: a server error, unless the client went away first (499)
        start = time.monotonic()
        request_id = next((v for k, v in scope["headers"] if k == b"x-request-id" and _REQUEST_ID.fullmatch(v)), None)
        extra = [h for h in (self.replica, request_id and (b"x-request-id", request_id)) if h]

        answered = False

        async def recording_send(message):
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
                status[0] = message["status"]
                if extra:
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        async def watching_receive():  # a client that hangs up while sending its body is no server error
            message = await receive()
            if message["type"] == "http.disconnect" and not answered:
                status[0] = CLIENT_CLOSED
            return message

        try:
            await self.app(scope, watching_receive, recording_send)
        except asyncio.CancelledError:  # Ray Serve cancels a request whose client went away (no http.disconnect)
            if not answered:
                status[0] = CLIENT_CLOSED
            raise
        finally:
            seconds = time.monotonic() - start
            self.metrics.request(route, status[0], seconds)
            level = logging.DEBUG if route in PROBE_ROUTES and status[0] < 400 else logging.INFO
            if access_log.isEnabledFor(level):
                client = scope.get("client")
                scored = scope.get("state", {}).get("scored")  # (pairs, tokens), set by _score
                access_log.log(level, "%s \"%s %s\" %d %.3fs%s%s", f"{client[0]}:{client[1]}" if client else "-",
                               scope["method"], route if route != "other" else "(other)", status[0], seconds,
                               f" pairs={scored[0]} tokens={scored[1]}" if scored else "",
                               f" request_id={request_id.decode()}" if request_id else "")  # fmt: skip
