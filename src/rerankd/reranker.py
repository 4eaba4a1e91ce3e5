"""The public entry point: `Reranker.from_pretrained(...)`, `compute_score(...)`, `rerank(...)`."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import DEFAULT_MODEL, REFERENCE_LONG_DOCUMENTS, RERANK_DEFAULTS, LoadOptions, LongDocuments, batch_tokens
from .engine import Scheduler, WorkerError
from .errors import InputError, PairErrors
from .hub import resolve_model
from .inputs import ImageItem, Item, TextItem, parse_item
from .inputs.items import valid_text
from .inputs.items import ItemType
from .models.base import Backend, LengthOptions, Where, Window
from .models.layers import attention_backend, check_cpu_gemm, cpu_bf16, cpu_elementwise
from .models.registry import backend_for
from .results import activate, check_activation, check_top_n, rerank_results

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


# what a (query, document) pair may come as: also a row of a numpy array of pairs (sentence-transformers takes those)
PAIR_TYPES = (list, tuple, np.ndarray)


class _Default:
    """The default of an option whose default depends on the model (see compute_score)."""

    def __repr__(self) -> str:
        return "<model default>"


DEFAULT = _Default()


class Reranker:
    """Scores (query, document) pairs with a reranker checkpoint.

    >>> rr = Reranker.from_pretrained("jinaai/jina-reranker-m0")
    >>> rr.compute_score([["slm markdown", "We present ReaderLM-v2, ..."]], max_length=1024)
    >>> rr.rerank("slm markdown", ["text document", {"image": "https://.../page.png"}], top_n=1)

    `options` are the load options as resolved (device, dtype, max_batch_tokens, the CPU kernel that runs).
    Calls go through one rerankd.engine.Scheduler (made on first use), the same scheduler class the server runs.
    """

    def __init__(self, backend: Backend, model_dir: Path, options: LoadOptions):
        self.backend = backend
        self.model_dir = model_dir
        self.options = options
        self._scheduler: Scheduler | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = DEFAULT_MODEL,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        **options: Any,
    ) -> "Reranker":
        """Load a Hugging Face repo id (downloaded into the hub cache), a local checkpoint directory, or a GGUF.

        `options` are the fields of `rerankd.config.LoadOptions` (max_batch_tokens, max_pixels, ...).
        """
        try:
            opts = LoadOptions(**options)
        except TypeError as e:
            valid = ", ".join(LoadOptions.__dataclass_fields__)
            raise TypeError(f"from_pretrained: {e}; valid options: {valid}") from None
        dev = _device(device or opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(dtype, torch.dtype):
            dt = dtype
        else:
            name = dtype or opts.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
            if name not in _DTYPES:
                raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(set(_DTYPES))}")
            dt = _DTYPES[name]
        check_cpu_gemm(opts.cpu_gemm)  # before minutes of loading
        if opts.num_threads:
            torch.set_num_threads(opts.num_threads)
        bf16 = "none" if opts.quantize else cpu_bf16(dev, dt, opts.cpu_bf16)  # int8 weights: no bf16 arithmetic
        compute = torch.float32 if bf16 == "upcast" else dt
        attention_backend(dev, compute, opts.attention)
        elementwise = cpu_elementwise(dev, compute, opts.cpu_elementwise)
        path = resolve_model(name_or_path, opts.revision)
        backend_cls, config = backend_for(path)
        backend: Backend = backend_cls.load(path, config, dev, compute,
                                            replace(opts, cpu_bf16=bf16, cpu_elementwise=elementwise))  # fmt: skip
        if backend.cpu_gemm == "none":  # a GGUF: llama.cpp's own arithmetic
            bf16 = elementwise = "none"
        budget = batch_tokens(opts.max_batch_tokens, dev.type)
        weights = torch.bfloat16 if bf16 == "upcast" else backend.dtype
        resolved = replace(opts, device=str(backend.device), dtype=str(weights).removeprefix("torch."),
                           cpu_gemm=backend.cpu_gemm, cpu_bf16=bf16, attention=backend.attn_backend,
                           cpu_elementwise=elementwise, max_batch_tokens=budget)  # fmt: skip
        return cls(backend, path, resolved)

    @property
    def max_batch_tokens(self) -> int:
        return batch_tokens(self.options.max_batch_tokens, self.backend.device.type)

    @property
    def scheduler(self) -> Scheduler:
        """The library's scheduler: no queue limit, no waiting for company (the server makes its own). Made on
        first use, and made again if its worker died."""
        with self._lock:
            if self._scheduler is None or not self._scheduler.alive:
                if self._scheduler is not None:
                    self._scheduler.close(timeout=0)
                self._scheduler = Scheduler(self.backend, self.max_batch_tokens,
                                            prepare_workers=self.options.preprocess_workers)  # fmt: skip
            return self._scheduler

    def close(self) -> None:
        """Stop the library's scheduler and release the backend (a llama.cpp context). Idempotent."""
        with self._lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.close()
        self.backend.close()

    def __del__(self) -> None:
        # Joined, not just told to stop: no library call is in flight (a caller holds the Reranker), so the worker
        # is idle and ends at once; a worker thread that ran torch kernels and ends while the process exits can
        # abort it ("terminate called without an active exception", seen under load).
        scheduler = getattr(self, "_scheduler", None)
        if scheduler is not None:
            with contextlib.suppress(Exception):  # at interpreter exit, modules may be gone
                scheduler.close()

    # ------------------------------------------------------------------------------------------------ scoring

    def length_options(
        self,
        max_length: int | None,
        max_query_length: int | None | _Default,
        max_doc_length: int | None,
        long_documents: str,
        overlap: int,
        query_default: int | None = None,
        instruction: str | None = None,
    ) -> LengthOptions:
        """Validated LengthOptions of one call (ValueError names a bad option)."""
        ml = self.backend.default_max_length if max_length is None else max_length
        mq = query_default if isinstance(max_query_length, _Default) else max_query_length
        for name, v in (("max_length", ml), ("max_query_length", mq), ("max_doc_length", max_doc_length)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if long_documents not in ("chunk", "truncate"):
            raise ValueError(f"long_documents must be 'chunk' or 'truncate', got {long_documents!r}")
        if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
            raise ValueError(f"overlap must be a non-negative integer, got {overlap!r}")
        if instruction is not None:
            if not isinstance(instruction, str):
                raise ValueError(f"instruction must be a string, got {type(instruction).__name__}")
            try:
                valid_text(instruction, "instruction")
            except InputError as e:
                raise ValueError(str(e)) from None
            if not self.backend.supports_instruction:
                raise ValueError(f"instruction: this model ({self.backend.architecture}) takes no instruction; leave "
                                 "it out (Qwen3-Reranker and jina-reranker-v3 take one)")  # fmt: skip
        lengths = LengthOptions(ml, mq, max_doc_length, long_documents, overlap, instruction)  # type: ignore[arg-type]
        self.backend.check(lengths)
        return lengths

    def activation(self, activation: str | None | _Default) -> str | None:
        """A call's activation: the one given, or the model's (sigmoid of a logit; none for a score already)."""
        return self.backend.score_activation if isinstance(activation, _Default) else activation

    def check_supported(self, item: Item, param: str) -> Item:
        """The item, or InputError naming `param` if the model cannot take it (an image for a text-only model)."""
        if isinstance(item, ImageItem) and not self.backend.supports_images:
            raise InputError(self.backend.text_only_reason, param)
        return item

    def _score(
        self,
        items: list[tuple[Item, Item]],
        params: list[Where],
        early: dict[int, InputError],
        lengths: LengthOptions,
        activation: str | None | _Default,
        batch_size: int | None,
        show_progress: bool,
    ) -> tuple[list[float], list[Window | None]]:
        """Scores and winning windows of the pairs not already in `early` (failed before scoring).

        Raises PairErrors, with every computed score, if any pair failed. A model failure raises what the model
        raised.
        """
        activation = self.activation(activation)
        check_activation(activation)
        good = [i for i in range(len(items)) if i not in early]
        with tqdm(total=len(good), unit="pair", desc="scoring", disable=not show_progress) as bar:
            try:
                outcome = self.scheduler.score_sync([items[i] for i in good], lengths, [params[i] for i in good],
                                                    max_batch_pairs=batch_size, on_pair_done=bar.update)  # fmt: skip
            except WorkerError as e:
                cause = e.__cause__
                if cause is not None:  # the model's own exception, as a direct call would have raised it
                    raise cause from cause.__cause__
                raise
        scored = outcome.results
        values = activate([r.logit if not isinstance(r, InputError) else float("nan") for r in scored], activation)
        scores: list[float | None] = [None] * len(items)
        windows: list[Window | None] = [None] * len(items)
        errors = dict(early)
        for j, i in enumerate(good):
            r = scored[j]
            if isinstance(r, InputError):
                errors[i] = r
            else:
                scores[i], windows[i] = values[j], r.window
        if errors:
            raise PairErrors(errors, scores)
        return scores, windows  # type: ignore[return-value]

    def compute_score(
        self,
        pairs: Sequence[Sequence[Any]],
        max_length: int | None = None,
        max_query_length: int | None | _Default = DEFAULT,
        max_doc_length: int | None = None,
        query_type: ItemType = "text",
        doc_type: ItemType = "text",
        batch_size: int | None = None,
        show_progress: bool = False,
        activation: str | None | _Default = DEFAULT,
        long_documents: LongDocuments = REFERENCE_LONG_DOCUMENTS,
        overlap: int = RERANK_DEFAULTS.overlap,
        instruction: str | None = RERANK_DEFAULTS.instruction,
    ) -> list[float]:
        """Relevance scores for (query, document) pairs, in order: in [0, 1], or raw logits with activation=None
        (jina-reranker-v3: its cosine in [-1, 1] either way, unless activation="sigmoid" is asked for).

        A drop-in for the model card's call: by default every option means what it means there (max_length:
        m0 10240, text cross-encoders 1024; m0 cuts queries to max_query_length=512, cross-encoders truncate the
        pair longest-first as transformers does). long_documents="chunk" scores a document that does not fit as
        overlapping windows and keeps the best (see `rerank`).

        Strings are read as `query_type` / `doc_type` ('text' or 'image': a URL, path, data URI or base64);
        {"text": ...}, {"image": ...} and PIL images are taken as they are. `batch_size` caps pairs per forward
        batch (batches are otherwise cut by the token budget). If some pairs are unusable, the others are still
        scored and PairErrors is raised naming each bad pair, with every computed score in `.scores`.
        `instruction`: the task instruction of Qwen3-Reranker / jina-reranker-v3 (None: the model's default).
        A listwise model (jina-reranker-v3) scores the pairs of each distinct query together, as one list in
        input order.
        """
        if isinstance(pairs, PAIR_TYPES) and len(pairs) == 2 and not isinstance(pairs[0], PAIR_TYPES):
            pairs = [pairs]  # one pair, as the model cards', FlagEmbedding's and sentence-transformers' calls take it
        lengths = self.length_options(
            max_length, max_query_length, max_doc_length, long_documents, overlap,
            self.backend.compute_score_max_query_length, instruction,
        )  # fmt: skip
        items: list[tuple[Item, Item]] = []
        params = [Where.for_pair(i) for i in range(len(pairs))]
        early: dict[int, InputError] = {}
        for i, pair in enumerate(pairs):
            try:
                if not isinstance(pair, PAIR_TYPES) or len(pair) != 2:
                    raise InputError("a pair must be a (query, document) list, tuple or numpy row of two items",
                                     f"pairs[{i}]")  # fmt: skip
                q = parse_item(pair[0], query_type, f"pairs[{i}].query")
                d = parse_item(pair[1], doc_type, f"pairs[{i}].document")
                self.check_supported(q, f"pairs[{i}].query")
                self.check_supported(d, f"pairs[{i}].document")
            except InputError as e:
                early[i] = e
                q = d = TextItem("")
            items.append((q, d))
        return self._score(items, params, early, lengths, activation, batch_size, show_progress)[0]

    def rerank(
        self,
        query: Any,
        documents: Sequence[Any],
        top_n: int | None = None,
        return_documents: bool = True,
        max_length: int | None = RERANK_DEFAULTS.max_length,
        max_query_length: int | None = RERANK_DEFAULTS.max_query_length,
        max_doc_length: int | None = RERANK_DEFAULTS.max_doc_length,
        query_type: ItemType = "text",
        doc_type: ItemType = "text",
        batch_size: int | None = None,
        show_progress: bool = False,
        long_documents: LongDocuments = RERANK_DEFAULTS.long_documents,
        overlap: int = RERANK_DEFAULTS.overlap,
        activation: str | None | _Default = DEFAULT,
        instruction: str | None = RERANK_DEFAULTS.instruction,
    ) -> list[dict[str, Any]]:
        """Documents sorted by relevance to `query` (ties by index), cut to `top_n`.

        Each result: {"index", "relevance_score", "document"} where document is {"text": ...} or {"image": ...}
        (left out when return_documents is False). Documents may mix strings, {"text"} and {"image"} objects.

        Long text documents are never cut silently: with long_documents="chunk" (the default) the query is cut
        to max_query_length tokens, a document that does not fit beside it is split into token windows that
        fill the rest of max_length (or max_doc_length), adjacent ones sharing `overlap` tokens, every window is
        scored, and the document's score is the maximum. Such a result also has "window": {"index", "count",
        "start", "end"}, the winning window and its character span in the document text.
        long_documents="truncate" keeps only the first window. `instruction`: the task instruction of
        Qwen3-Reranker / jina-reranker-v3 (None: the model's default); other models refuse one.
        """
        check_top_n(top_n)
        if isinstance(documents, (str, bytes, bytearray, dict)):
            raise TypeError(f"rerank: documents must be a list of documents, got a {type(documents).__name__}; for one "
                            "document pass [document]")  # fmt: skip
        documents = list(documents)  # a generator or other iterable, read once (results echo from it)
        lengths = self.length_options(max_length, max_query_length, max_doc_length, long_documents, overlap, None,
                                      instruction)  # fmt: skip
        q = self.check_supported(parse_item(query, query_type, "query"), "query")
        q = self.backend.prepare_query(q, "query")  # once for all pairs
        items: list[tuple[Item, Item]] = []
        errors: dict[int, InputError] = {}
        for i, doc in enumerate(documents):
            try:
                d = self.check_supported(parse_item(doc, doc_type, f"documents[{i}]"), f"documents[{i}]")
            except InputError as e:
                errors[i] = e
                d = TextItem("")
            items.append((q, d))
        params = [Where.for_document(i) for i in range(len(items))]
        scores, windows = self._score(items, params, errors, lengths, activation, batch_size, show_progress)

        def echo(i: int) -> dict[str, Any]:
            d, raw = items[i][1], documents[i]
            return {"text": d.text} if isinstance(d, TextItem) else {"image": raw.get("image") if isinstance(raw, dict) else raw}

        return rerank_results(scores, windows, top_n, echo if return_documents else None)


def _device(name: str | torch.device) -> torch.device:
    """The torch device named; ValueError for a name torch does not know or a CUDA device this machine lacks (at
    load, not at the first forward)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available here (torch {torch.__version__}: "
                             f"{'no GPU found' if torch.version.cuda else 'a CPU-only build'}); use device 'cpu'")  # fmt: skip
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev
