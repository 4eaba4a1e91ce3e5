"""What every model backend offers the engine, and the small typed objects passed between stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

import torch

from ..inputs import Item
from ..inputs.images import PreparedImage


LongDocuments = Literal["chunk", "truncate"]


@dataclass(frozen=True)
class LengthOptions:
    """Token limits of one call, and what happens to a text document that does not fit."""

    max_length: int
    """Longest prompt, in tokens, including special tokens (and m0's score token and image tokens)."""
    max_query_length: int | None
    """Queries are cut to this many tokens (None: not cut on their own; the pair is truncated as a whole)."""
    max_doc_length: int | None = None
    """Text documents are cut to (or windowed by) this many tokens (None: the model's rule, see each backend)."""
    long_documents: LongDocuments = "truncate"
    """'truncate': a document that does not fit is cut. 'chunk': it is split into overlapping token windows,
    each scored as a pair; the document's score is the maximum over its windows."""
    overlap: int = 80
    """Tokens shared by adjacent windows in 'chunk' mode."""


@dataclass(frozen=True)
class Window:
    """Which part of a chunked document a sequence holds: window `index` of `count`, characters [start, end)."""

    index: int
    count: int
    start: int
    end: int


@dataclass(frozen=True)
class Where:
    """How errors name a pair and its parts (`pairs[3].document`, or `documents[3]` in a rerank call)."""

    pair: str
    query: str
    document: str

    @classmethod
    def for_pair(cls, i: int) -> "Where":
        return cls(f"pairs[{i}]", f"pairs[{i}].query", f"pairs[{i}].document")

    @classmethod
    def for_document(cls, i: int) -> "Where":
        return cls(f"documents[{i}]", "query", f"documents[{i}]")


def window_starts(tokens: int, size: int, overlap: int) -> list[int]:
    """Start offsets of the windows over a document of `tokens` tokens: the first at 0, each next one
    `size - overlap` later, until one reaches the end. Needs 0 <= overlap < size."""
    starts = [0]
    while starts[-1] + size < tokens:
        starts.append(starts[-1] + size - overlap)
    return starts


@dataclass
class PreparedSequence:
    """One (query, document) pair made ready for the model: token ids and what goes with them."""

    input_ids: torch.Tensor  # [tokens] int64
    positions: torch.Tensor | None = None  # [3, tokens] M-RoPE positions (m0), [tokens] (encoders)
    images: list[PreparedImage] = field(default_factory=list)
    token_types: torch.Tensor | None = None  # [tokens] segment ids (BERT), None where the model has one type
    window: Window | None = None  # set when the document was split into several windows

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def text_only_message(backend: "Backend") -> str:
    """Why a text-only backend refuses an image (a backend may say more through `text_only_reason`)."""
    reason = getattr(backend, "text_only_reason", None)
    return reason or f"this model ({backend.architecture}) is text only; images are not supported"


class Backend(Protocol):
    """A loaded model: turns pairs into sequences (thread-safe, no model compute) and sequences into scores."""

    architecture: str
    supports_images: ClassVar[bool]
    default_max_length: int  # max_length when a call gives none
    default_max_query_length: int
    compute_score_max_query_length: int | None  # compute_score's default: what the model's reference does
    device: torch.device
    dtype: torch.dtype

    def prepare(self, query: Item, doc: Item, lengths: LengthOptions, where: Where) -> list[PreparedSequence]:
        """The pair's sequences: one, or one per window of a chunked document (all scored, the maximum kept)."""
        ...

    def prepare_query_image(self, query: Item, param: str) -> Item: ...

    def forward(self, batch: list[PreparedSequence]) -> torch.Tensor:
        """Relevance logits [len(batch)] in fp32 on the CPU: the score is sigmoid(logit)."""
        ...
