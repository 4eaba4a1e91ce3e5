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
from .hub import resolve_model_dir
from .inputs import ImageItem, Item, TextItem, parse_item
from .inputs.images import ImageLimits
from .inputs.items import ItemType
from .models.base import Backend, LengthOptions, Where
from .models.registry import backend_class, read_config

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


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
        if opts.num_threads:
            torch.set_num_threads(opts.num_threads)
        directory = resolve_model_dir(name_or_path, opts.revision)
        config = read_config(directory)
        limits = ImageLimits(
            max_image_bytes=opts.max_image_bytes,
            max_image_pixels=opts.max_image_pixels,
            fetch_timeout=opts.image_fetch_timeout,
        )
        backend = backend_class(config, directory).load(
            directory, config, dev, dt, limits, opts.min_pixels, opts.max_pixels, opts.show_progress
        )
        budget = opts.max_batch_tokens or (65536 if dev.type == "cuda" else 4096)
        engine = Engine(backend, budget, opts.preprocess_workers)
        return cls(backend, engine, directory, replace(opts, device=str(dev), dtype=str(dt).removeprefix("torch.")))

    # ------------------------------------------------------------------------------------------------ scoring

    def _lengths(self, max_length: int | None, max_query_length: int | None, max_doc_length: int | None) -> LengthOptions:
        ml = self.backend.default_max_length if max_length is None else max_length
        mq = self.backend.default_max_query_length if max_query_length is None else max_query_length
        for name, v in (("max_length", ml), ("max_query_length", mq), ("max_doc_length", max_doc_length)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        return LengthOptions(ml, mq, max_doc_length)

    def _check_supported(self, item: Item, param: str) -> None:
        if isinstance(item, ImageItem) and not self.backend.supports_images:
            raise InputError(f"this model ({self.backend.architecture}) is text only; images are not supported", param)

    def _score(
        self,
        items: list[tuple[Item, Item]],
        params: list[Where],
        early: dict[int, InputError],
        lengths: LengthOptions,
        batch_size: int | None,
        show_progress: bool,
    ) -> list[float]:
        """Score the pairs not already in `early` (failed before scoring); raise PairErrors if any failed."""
        good = [i for i in range(len(items)) if i not in early]
        scores_good, errors_good = self.engine.score(
            [items[i] for i in good], lengths, [params[i] for i in good], batch_size, show_progress
        )
        scores: list[float | None] = [None] * len(items)
        errors = dict(early)
        for j, i in enumerate(good):
            scores[i] = scores_good[j]
            if j in errors_good:
                errors[i] = errors_good[j]
        if errors:
            raise PairErrors(errors, scores)
        return scores  # type: ignore[return-value]

    def compute_score(
        self,
        pairs: Sequence[Sequence[Any]],
        max_length: int | None = None,
        max_query_length: int | None = None,
        max_doc_length: int | None = None,
        query_type: ItemType = "text",
        doc_type: ItemType = "text",
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> list[float]:
        """Relevance scores in [0, 1] for (query, document) pairs, in order.

        Strings are read as `query_type` / `doc_type` ('text' or 'image': a URL, path, data URI or base64);
        {"text": ...}, {"image": ...} and PIL images are taken as they are. `batch_size` caps pairs per forward
        batch (batches are otherwise cut by the token budget). If some pairs are unusable, the others are still
        scored and PairErrors is raised naming each bad pair, with every computed score in `.scores`.
        """
        if isinstance(pairs, tuple) and len(pairs) == 2 and not isinstance(pairs[0], (list, tuple)):
            pairs = [pairs]
        lengths = self._lengths(max_length, max_query_length, max_doc_length)
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
        return self._score(items, params, early, lengths, batch_size, show_progress)

    def rerank(
        self,
        query: Any,
        documents: Sequence[Any],
        top_n: int | None = None,
        return_documents: bool = True,
        max_length: int | None = None,
        max_query_length: int | None = None,
        max_doc_length: int | None = None,
        query_type: ItemType = "text",
        doc_type: ItemType = "text",
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> list[dict[str, Any]]:
        """Documents sorted by relevance to `query` (ties by index), cut to `top_n`.

        Each result: {"index", "relevance_score", "document"} where document is {"text": ...} or {"image": ...}
        (left out when return_documents is False). Documents may mix strings, {"text"} and {"image"} objects.
        """
        if top_n is not None and (not isinstance(top_n, int) or top_n < 1):
            raise ValueError(f"top_n must be a positive integer or None, got {top_n!r}")
        q = parse_item(query, query_type, "query")
        self._check_supported(q, "query")
        q = self.backend.prepare_query_image(q, "query")  # decoded once for all pairs
        lengths = self._lengths(max_length, max_query_length, max_doc_length)
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
        scores = self._score(items, params, errors, lengths, batch_size, show_progress)
        order = sorted(range(len(items)), key=lambda i: (-scores[i], i))  # type: ignore[operator]
        results = []
        for i in order[:top_n]:
            r: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if return_documents:
                d = items[i][1]
                raw = documents[i]
                image = raw.get("image") if isinstance(raw, dict) else raw
                r["document"] = {"text": d.text} if isinstance(d, TextItem) else {"image": image}
            results.append(r)
        return results
