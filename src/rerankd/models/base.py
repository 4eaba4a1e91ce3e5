"""What every model backend offers the engine, and the small typed objects passed between stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from ..inputs import Item
from ..inputs.images import PreparedImage


@dataclass(frozen=True)
class LengthOptions:
    """Token limits of one call (None = the model's default)."""

    max_length: int
    """Longest prompt, in tokens, including special tokens (and m0's score token and image tokens)."""
    max_query_length: int
    """Queries are cut to this many tokens."""
    max_doc_length: int | None = None
    """Text documents are cut to this many tokens (None: the model's rule, see each backend)."""


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


@dataclass
class PreparedSequence:
    """One (query, document) pair made ready for the model: token ids and what goes with them."""

    input_ids: torch.Tensor  # [tokens] int64
    positions: torch.Tensor | None = None  # [3, tokens] M-RoPE positions (m0) or None
    images: list[PreparedImage] = field(default_factory=list)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


class Backend(Protocol):
    """A loaded model: turns pairs into sequences (thread-safe, no model compute) and sequences into scores."""

    architecture: ClassVar[str]
    supports_images: ClassVar[bool]
    default_max_length: ClassVar[int]
    default_max_query_length: ClassVar[int]
    device: torch.device
    dtype: torch.dtype

    def prepare(self, query: Item, doc: Item, lengths: LengthOptions, where: Where) -> PreparedSequence: ...

    def prepare_query_image(self, query: Item, param: str) -> Item: ...

    def forward(self, batch: list[PreparedSequence]) -> torch.Tensor:
        """Raw logits [len(batch)] in fp32, on the CPU."""
        ...

    def activation(self, logits: torch.Tensor) -> torch.Tensor: ...
