"""Every option and its default, defined once: load-time options of a Reranker (LoadOptions), the per-call options
of a rerank (ScoreOptions, read by the library, the CLI and the HTTP schemas), and the server's (ServeOptions).
The CLI derives its flags from these fields and their docstrings, the HTTP schemas their defaults and descriptions.
"""

from __future__ import annotations

import ast
import inspect
import os
from dataclasses import dataclass, fields, replace
from typing import Literal

DEFAULT_MODEL = "jinaai/jina-reranker-m0"

LongDocuments = Literal["chunk", "truncate"]
REFERENCE_LONG_DOCUMENTS: LongDocuments = "truncate"
"""`compute_score` is the model card's call, and the references cut a document that does not fit."""
COHERE_MAX_TOKENS_PER_DOC = 4096
"""Cohere's default `max_tokens_per_doc` (/v2/rerank): documents are cut there."""
CPU_MAX_BATCH_TOKENS = 4096
CUDA_MAX_BATCH_TOKENS = 65536


def batch_tokens(max_batch_tokens: int | None, device_type: str) -> int:
    """The token budget of a forward batch: the one given, else the device's default."""
    budget = max_batch_tokens or (CUDA_MAX_BATCH_TOKENS if device_type == "cuda" else CPU_MAX_BATCH_TOKENS)
    if budget < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {budget}")
    return budget


@dataclass(frozen=True)
class ScoreOptions:
    """The per-call options of a rerank, with the defaults of `Reranker.rerank`, `rerankd rerank` and /v1/rerank."""

    max_length: int | None = None
    """Prompt token limit, special and image tokens included; None: the model's."""
    max_query_length: int | None = 512
    """Queries are cut to this many tokens."""
    max_doc_length: int | None = None
    """Text documents are cut to, or windowed by, this many tokens; None: what max_length leaves beside the query."""
    long_documents: LongDocuments = "chunk"
    """A text document that does not fit: 'chunk' scores overlapping token windows and keeps the best; 'truncate' cuts it."""
    overlap: int = 80
    """Tokens shared by adjacent windows."""
    instruction: str | None = None
    """Task instruction, for models that take one (Qwen3-Reranker, jina-reranker-v3); None: the model's default."""


RERANK_DEFAULTS = ScoreOptions()


@dataclass(frozen=True)
class LoadOptions:
    device: str | None = None
    """Device to run on ('cpu', 'cuda', 'cuda:1', ...). Default: CUDA when available, else CPU."""
    dtype: str | None = None
    """Compute dtype ('float32', 'bfloat16', 'float16'). Default: bfloat16 on CUDA, float32 on CPU."""
    revision: str | None = None
    """Hugging Face revision (branch, tag or commit) of a hub model."""
    max_batch_tokens: int | None = None
    """Token budget of one forward batch, image tokens included. Default: 4096 on CPU (larger batches gain nothing there), 65536 on CUDA."""
    preprocess_workers: int | None = None
    """Threads that tokenize and decode/preprocess images ahead of the model. Default: cores, 2 to 8."""
    num_threads: int | None = None
    """CPU threads for torch's kernels. Default: torch's own choice (all physical cores)."""
    min_pixels: int | None = None
    """Smallest image area after resizing, in pixels (m0 default 3136 = 56x56)."""
    max_pixels: int | None = None
    """Largest image area after resizing, in pixels (m0 default 602112 = 768 image tokens)."""
    max_image_bytes: int = 20 * 1024 * 1024
    """Largest encoded image accepted, in bytes (counted while downloading)."""
    max_image_pixels: int = 100_000_000
    """Largest image accepted, in pixels, read from the header before decoding."""
    max_decoded_bytes: int = 1024 * 1024 * 1024
    """Bytes of decoded image pixels in memory at once, across all requests (an image's pixels in its own mode and
    their RGB copy); a decode waits for room, an image needing more than all of it is refused."""
    image_fetch_timeout: float = 10.0
    """Seconds allowed to fetch one image URL."""
    quantize: str | None = None
    """'int8': dynamic int8 quantization of a text cross-encoder's linear layers (CPU only; faster, scores move
    slightly, see docs/benchmarks.md)."""
    cpu_gemm: str = "auto"
    """Kernel of fp32 and bf16 linear layers on the CPU: 'auto' (fp32: time both at load, take oneDNN when >= 1.1x
    faster; bf16: oneDNN with the bias added in its product, where torch adds it in a pass of its own, the same
    values), 'onednn', or 'torch' (torch's default: MKL on x86 in fp32, which skips AVX-512 on AMD CPUs). A loaded
    Reranker's options say which one runs ('none' for a GGUF)."""
    cpu_bf16: str = "auto"
    """How a bfloat16 model computes on the CPU: 'auto' (time both at load, take bf16 arithmetic when it is >= 1.1x
    faster: CPUs with AVX512-BF16 or AMX), 'upcast' (weights stay bf16 in memory; each layer widens its weights to fp32
    for its product, activations and attention run in fp32: faster where the CPU has no bf16 instructions, and
    closer to fp32 scores), or 'native' (bf16 arithmetic throughout). A loaded Reranker's options say which one runs
    ('none' for other dtypes and devices, a GGUF, and int8)."""
    attention: str = "auto"
    """Attention kernel: 'auto' (on CUDA in fp16/bf16: flash-attn's varlen kernel when installed, else torch's own
    varlen flash attention, else FlexAttention; on the CPU: rerankd's own packed kernel for x86 CPUs with AVX-512,
    built at first use with the system's C++ compiler, computing in fp32 (a bf16 model's q/k/v widened for it);
    elsewhere one SDPA call per sequence), or one of 'flash-attn', 'varlen', 'flex' (these three on CUDA), 'avx512'
    (the CPU), 'sdpa' (an error where it cannot run). A loaded Reranker's options say which one runs ('none' for a
    GGUF)."""
    cpu_elementwise: str = "auto"
    """Element-wise work between the products: in the Qwen2 / Qwen3 decoders (m0, Qwen3-Reranker, v3) RMSNorm with
    its residual add, rotary embedding and the SiLU-gated product; in m0's vision tower the residual add + LayerNorm,
    rotary embedding and quick GELU; in the cross-encoders GELU and the residual add + LayerNorm, each product's bias
    added in them (in fp32). 'auto' (rerankd's AVX-512 CPU kernels, one pass each where torch's ops take two to five,
    where they run: fp32 or bf16 (either cpu_bf16) on an x86 CPU with AVX-512 and a C++ compiler; in bf16 arithmetic
    they round what the bf16 torch ops round; else torch's ops), 'avx512' (an error where they cannot run), or
    'torch'. A loaded Reranker's options say which one runs ('none' for a GGUF)."""
    share_prefixes: bool = True
    """Qwen3-Reranker on the CPU (the avx512 attention kernel or the SDPA loop): the prompt prefix that sequences of a
    batch begin with alike (the system prompt and instruction; with the query, for the documents of one query) is
    computed once per batch, not once per sequence. Exact: in a causal decoder a prefix's states do not depend on
    what follows it."""
    show_progress: bool = True
    """Show progress bars while loading weights (`rerankd serve`: only when its stderr is a terminal, not into a
    log, unless --show-progress)."""

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "preprocess_workers", "num_threads", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None (the default), got {value!r}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} is more than max_pixels {self.max_pixels}")


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 for all interfaces)."""
    port: int = 30000
    """Port to listen on."""
    served_model_name: tuple[str, ...] | None = None
    """The model names clients may send, one or several (each is answered as the model; responses carry the
    first). Default: the --model argument."""
    max_batch_wait_ms: float = 5.0
    """How long a batch waits for company from other requests before it runs, in milliseconds."""
    max_queue_pairs: int = 20000
    """Pairs (query, document) waiting or running at most; past it requests get 429 with Retry-After."""
    max_queue_tokens: int = 8 * 1024 * 1024
    """Tokens of work admitted and not yet answered, across all requests, windows and image tokens included: a
    request counts what it may need at most, known before it is prepared, then its real tokens as they are
    prepared; past it requests get 429 with Retry-After (a request is always admitted on an idle server)."""
    request_timeout: float = 60.0
    """Seconds a request may take from arrival to scores; then 504."""
    max_documents: int = 1000
    """Documents per request at most (413 beyond)."""
    max_request_bytes: int = 50 * 1024 * 1024
    """Largest request body, in bytes (413 beyond)."""
    max_document_windows: int = 256
    """Windows one long document may be split into at most (400 beyond, naming the document)."""
    max_request_tokens: int = 4 * 1024 * 1024
    """Tokens one request may put through the model at most, windows and image tokens included (413 beyond, as soon
    as its preparation passes it)."""
    max_inflight_bytes: int = 1024 * 1024 * 1024
    """Bytes of request bodies being read or served at once, across all requests: the server-wide budget on what
    requests hold in memory (429 with Retry-After beyond; 413 for one request larger than all of it)."""
    max_json_values: int = 200_000
    """JSON values (objects, arrays, strings, numbers) in a request body at most, counted before it is parsed (413
    beyond): bounds the memory a body may take once parsed."""
    max_json_depth: int = 32
    """Nesting of objects and arrays in a request body at most, checked before it is parsed (413 beyond)."""
    header_timeout: float = 10.0
    """Seconds a client has to send a request's head in full, from connecting or from the previous response; then the
    connection is closed."""
    body_timeout: float = 30.0
    """Seconds a client has to send a request's body in full, after its head; then 408 and the connection is closed."""
    keep_alive_timeout: float = 5.0
    """Seconds an idle keep-alive connection stays open after a response."""
    max_connections: int = 1000
    """Open connections at most (kept below the open files limit): past it the connection idle longest is closed,
    or when all are busy the new one gets 503."""
    allow_private_urls: bool = False
    """Fetch image URLs whose host resolves to loopback, private, link-local or other non-public addresses."""
    allowed_local_media_path: str | None = None
    """Folder beneath which clients may name local image files (default: none allowed)."""
    api_key: str | None = None
    """Require `Authorization: Bearer <key>` on every route but /health and the playground page (default: $RERANKD_API_KEY if set)."""
    v1_rerank_response: Literal["jina", "sglang"] = "jina"
    """What POST /v1/rerank answers: Jina's object (`results`, `usage`; vLLM's too), or SGLang's bare list of
    {"score", "document", "index"}, best first, for clients written against SGLang (one route cannot give both)."""
    skip_warmup: bool = False
    """Skip the warm-up forward pass at start-up."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """The server's and uvicorn's log level."""

    def __post_init__(self) -> None:
        """Every count, limit and timeout in range, checked before a model loads (the flag named as typed)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            low = 0 if f.name in ("max_batch_wait_ms", "port") else 1 if isinstance(value, int) else 0.001
            if not low <= value <= (65535 if f.name == "port" else float("inf")):
                raise ValueError(f"--{f.name.replace('_', '-')} must be >= {low}"
                                 f"{' and <= 65535' if f.name == 'port' else ''}, got {value}")  # fmt: skip

    @property
    def drain_seconds(self) -> float:
        """How long a stopping server lets requests in flight finish: a slow client's head, body and request."""
        return self.header_timeout + self.body_timeout + self.request_timeout + 5

    def with_environment(self) -> ServeOptions:
        """These options, the API key read from $RERANKD_API_KEY when none is given."""
        key = os.environ.get("RERANKD_API_KEY")
        return replace(self, api_key=key) if self.api_key is None and key else self


@dataclass(frozen=True)
class RayOptions:
    """`rerankd serve --ray`: the server's app on Ray Serve, each replica loading the model once and batching the
    requests it gets; every ServeOptions field keeps its meaning."""

    ray: bool = False
    """Serve through Ray Serve (pip install 'rerankd[ray]'): replicas behind Ray's proxy, on this machine or a cluster."""
    ray_address: str | None = None
    """Ray cluster to join ('auto', 'ray://head:10001', ...); default: start a local Ray instance."""
    num_replicas: int = 1
    """Replicas, each with its own copy of the model (a fixed count; --min-replicas/--max-replicas autoscale)."""
    min_replicas: int | None = None
    """Autoscaling: replicas at least (with --max-replicas)."""
    max_replicas: int | None = None
    """Autoscaling: replicas at most (with --min-replicas)."""
    target_ongoing_requests: float = 16.0
    """Autoscaling: requests in progress per replica that Ray aims for."""
    max_ongoing_requests: int = 256
    """Requests one replica takes at once (its own scheduler batches them); each Ray proxy queues the rest, up to 4x
    this times the replicas (--num-replicas or --max-replicas), then answers 503."""
    replica_cpus: float | None = None
    """CPUs Ray reserves for each replica, also a CPU replica's torch threads (default: --num-threads, else 1)."""
    replica_gpus: float | None = None
    """GPUs per replica (default: 1 with --device cuda, or with no --device on a cluster that has GPUs; else 0)."""
    ray_system_priority: Literal["auto", "idle", "normal"] = "auto"
    """CPU priority of the local Ray's own processes (GCS, dashboard, agents, Serve's controller and proxy; not the
    raylet, not the replicas) once the replicas are up: 'idle' (Linux SCHED_IDLE) runs them on the CPU time the
    replicas leave, instead of preempting the model's threads; 'auto' is 'idle' when the replicas' CPUs take every
    core of this machine, else 'normal' (as Ray starts them). Not with --ray-address: a cluster's are its own."""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field, read from the source (one place for the help texts)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    return {f.name: docs.get(f.name, "") for f in fields(cls)}
