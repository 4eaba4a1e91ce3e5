"""The public entry point: `Reranker.from_pretrained(...)`, `compute_score(...)`, `rerank(...)`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .config import DEFAULT_MODEL, LoadOptions
from .engine import Engine
from .errors import InputError, PairErrors
from .hub import resolve_model
from .inputs import ImageItem, Item, TextItem, parse_item
from .inputs.items import ItemType
from .models.base import Backend, LengthOptions, LongDocuments, Where, Window, text_only_message
from .models.layers import check_cpu_gemm, use_cpu_gemm
from .models.registry import backend_class, read_config

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


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
    """

    def __init__(self, backend: Backend, engine: Engine, model_dir: Path, options: LoadOptions):
        self.backend = backend
        self.engine = engine
        self.model_dir = model_dir
        self.options = options

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = DEFAULT_MODEL,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        **options: Any,
    ) -> "Reranker":
        """Load a Hugging Face repo id (downloaded into the hub cache) or a local checkpoint directory.

        `options` are the fields of `rerankd.config.LoadOptions` (max_batch_tokens, max_pixels, ...).
        """
        try:
            opts = LoadOptions(**options)
        except TypeError as e:
            valid = ", ".join(LoadOptions.__dataclass_fields__)
            raise TypeError(f"from_pretrained: {e}; valid options: {valid}") from None
        dev = torch.device(device or opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(dtype, torch.dtype):
            dt = dtype
        else:
            name = dtype or opts.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
            if name not in _DTYPES:
                raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(set(_DTYPES))}")
            dt = _DTYPES[name]
        check_cpu_gemm(opts.cpu_gemm)
        if opts.num_threads:
            torch.set_num_threads(opts.num_threads)
        directory = resolve_model(name_or_path, opts.revision)
        budget = opts.max_batch_tokens or (65536 if dev.type == "cuda" else 4096)
        if directory.suffix == ".gguf":  # jina-reranker-m0 through llama.cpp; its score head is beside the file
            from .models.gguf import HEAD_FILE, GGUFBackend

            backend: Backend = GGUFBackend.load(directory, directory.parent / HEAD_FILE, dev, opts, budget)
            dev, dt = backend.device, backend.dtype
        else:
            config = read_config(directory)
            backend = backend_class(config, directory).load(directory, config, dev, dt, opts)
        model = getattr(backend, "model", None)  # the GGUF backend has none: llama.cpp runs it ("none")
        gemm = use_cpu_gemm(model, opts.cpu_gemm, dev, dt) if isinstance(model, torch.nn.Module) else "none"
        engine = Engine(backend, budget, opts.preprocess_workers)
        resolved = replace(opts, device=str(dev), dtype=str(dt).removeprefix("torch."), cpu_gemm=gemm)
        return cls(backend, engine, directory, resolved)

    def restrict_images(self, allow_private_urls: bool, local_media_root: str | None) -> None:
        """Image sources for untrusted callers (the server calls this once, before serving): URLs only to public
        addresses unless allow_private_urls; local files only beneath local_media_root, none if it is None."""
        limits = getattr(self.backend, "image_limits", None)
        if limits is not None:
            self.backend.image_limits = replace(  # type: ignore[attr-defined]
                limits,
                allow_private_urls=allow_private_urls,
                allow_local_files=local_media_root is not None,
                local_media_root=local_media_root,
            )

    # ------------------------------------------------------------------------------------------------ scoring

    def length_options(
        self,
        max_length: int | None,
        max_query_length: int | None | _Default,
        max_doc_length: int | None,
        long_documents: str,
        overlap: int,
        query_default: int | None = None,
    ) -> LengthOptions:
        ml = self.backend.default_max_length if max_length is None else max_length
        """Validated LengthOptions of one call (ValueError names a bad option)."""
        mq = query_default if isinstance(max_query_length, _Default) else max_query_length
        for name, v in (("max_length", ml), ("max_query_length", mq), ("max_doc_length", max_doc_length)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if long_documents not in ("chunk", "truncate"):
            raise ValueError(f"long_documents must be 'chunk' or 'truncate', got {long_documents!r}")
        if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
            raise ValueError(f"overlap must be a non-negative integer, got {overlap!r}")
        return LengthOptions(ml, mq, max_doc_length, long_documents, overlap)  # type: ignore[arg-type]

    def _check_supported(self, item: Item, param: str) -> None:
        if isinstance(item, ImageItem) and not self.backend.supports_images:
            raise InputError(text_only_message(self.backend), param)

    def _score(
        self,
        items: list[tuple[Item, Item]],
        params: list[Where],
        early: dict[int, InputError],
        lengths: LengthOptions,
        activation: str | None,
        batch_size: int | None,
        show_progress: bool,
    ) -> tuple[list[float], list[Window | None]]:
        """Scores and winning windows of the pairs not already in `early` (failed before scoring).

        Raises PairErrors, with every computed score, if any pair failed.
        """
        check_activation(activation)
        good = [i for i in range(len(items)) if i not in early]
        scored, errors_good = self.engine.score(
            [items[i] for i in good], lengths, [params[i] for i in good], batch_size, show_progress
        )
        values = activate([float("nan") if r is None else r.logit for r in scored], activation)
        scores: list[float | None] = [None] * len(items)
        windows: list[Window | None] = [None] * len(items)
        errors = dict(early)
        for j, i in enumerate(good):
            if j in errors_good:
                errors[i] = errors_good[j]
            else:
                scores[i], windows[i] = values[j], scored[j].window  # type: ignore[union-attr]
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
        activation: str | None = "sigmoid",
        long_documents: LongDocuments = "truncate",
        overlap: int = 80,
    ) -> list[float]:
        """Relevance scores for (query, document) pairs, in order: in [0, 1], or raw logits with activation=None.

        A drop-in for the model card's call: by default every option means what it means there (max_length:
        m0 10240, text cross-encoders 1024; m0 cuts queries to max_query_length=512, cross-encoders truncate the
        pair longest-first as transformers does). long_documents="chunk" scores a document that does not fit as
        overlapping windows and keeps the best (see `rerank`).

        Strings are read as `query_type` / `doc_type` ('text' or 'image': a URL, path, data URI or base64);
        {"text": ...}, {"image": ...} and PIL images are taken as they are. `batch_size` caps pairs per forward
        batch (batches are otherwise cut by the token budget). If some pairs are unusable, the others are still
        scored and PairErrors is raised naming each bad pair, with every computed score in `.scores`.
        """
        if isinstance(pairs, tuple) and len(pairs) == 2 and not isinstance(pairs[0], (list, tuple)):
            pairs = [pairs]
        lengths = self.length_options(
            max_length, max_query_length, max_doc_length, long_documents, overlap,
            self.backend.compute_score_max_query_length,
        )  # fmt: skip
        items: list[tuple[Item, Item]] = []
        params = [Where.for_pair(i) for i in range(len(pairs))]
        early: dict[int, InputError] = {}
        for i, pair in enumerate(pairs):
            try:
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise InputError("a pair must be a (query, document) list or tuple of two items", f"pairs[{i}]")
                q = parse_item(pair[0], query_type, f"pairs[{i}].query")
                d = parse_item(pair[1], doc_type, f"pairs[{i}].document")
                self._check_supported(q, f"pairs[{i}].query")
                self._check_supported(d, f"pairs[{i}].document")
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
        max_length: int | None = None,
        max_query_length: int | None = 512,
        max_doc_length: int | None = None,
        query_type: ItemType = "text",
        doc_type: ItemType = "text",
        batch_size: int | None = None,
        show_progress: bool = False,
        long_documents: LongDocuments = "chunk",
        overlap: int = 80,
        activation: str | None = "sigmoid",
    ) -> list[dict[str, Any]]:
        """Documents sorted by relevance to `query` (ties by index), cut to `top_n`.

        Each result: {"index", "relevance_score", "document"} where document is {"text": ...} or {"image": ...}
        (left out when return_documents is False). Documents may mix strings, {"text"} and {"image"} objects.

        Long text documents are never cut silently: with long_documents="chunk" (the default) the query is cut
        to max_query_length tokens, a document that does not fit beside it is split into token windows that
        fill the rest of max_length (or max_doc_length), adjacent ones sharing `overlap` tokens, every window is
        scored, and the document's score is the maximum. Such a result also has "window": {"index", "count",
        "start", "end"}, the winning window and its character span in the document text.
        long_documents="truncate" keeps only the first window.
        """
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
            raise ValueError(f"top_n must be a positive integer or None, got {top_n!r}")
        lengths = self.length_options(max_length, max_query_length, max_doc_length, long_documents, overlap, None)
        q = parse_item(query, query_type, "query")
        self._check_supported(q, "query")
        q = self.backend.prepare_query_image(q, "query")  # decoded once for all pairs
        items: list[tuple[Item, Item]] = []
        errors: dict[int, InputError] = {}
        for i, doc in enumerate(documents):
            try:
                d = parse_item(doc, doc_type, f"documents[{i}]")
                self._check_supported(d, f"documents[{i}]")
            except InputError as e:
                errors[i] = e
                d = TextItem("")
            items.append((q, d))
        params = [Where.for_document(i) for i in range(len(items))]
        scores, windows = self._score(items, params, errors, lengths, activation, batch_size, show_progress)
        results = []
        for i in ranked(scores, top_n):
            r: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if return_documents:
                d = items[i][1]
                raw = documents[i]
                image = raw.get("image") if isinstance(raw, dict) else raw
                r["document"] = {"text": d.text} if isinstance(d, TextItem) else {"image": image}
            w = windows[i]
            if w is not None:
                r["window"] = {"index": w.index, "count": w.count, "start": w.start, "end": w.end}
            results.append(r)
        return results



def check_activation(activation: str | None) -> None:
    if activation not in ("sigmoid", None):
        raise ValueError(f"activation must be 'sigmoid' or None (the raw logit), got {activation!r}")


def activate(logits: list[float], activation: str | None = "sigmoid") -> list[float]:
    """Relevance logits -> scores: sigmoid in fp32, as the references compute it, or the logits unchanged."""
    if activation is None:
        return list(logits)
    return torch.sigmoid(torch.tensor(logits, dtype=torch.float32)).tolist()


def ranked(scores: Sequence[float], top_n: int | None = None) -> list[int]:
    """Indices by score, best first, ties by index; the first top_n."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:top_n]
