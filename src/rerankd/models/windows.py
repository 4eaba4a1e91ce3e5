"""Long text documents: which tokens of a document each scored sequence holds (README, "Long text documents").

The one rule for every backend: a document that fits the room beside the query is scored whole; in 'truncate'
mode one that does not is cut to the room; in 'chunk' mode it is split into windows of `room` tokens, the first at
token 0, each next one `room - overlap` tokens later, until one reaches the end. Every window is scored as a pair
and the document keeps the maximum (rerankd.engine.scheduler.keep_best). Each backend computes its room (what
max_length leaves beside its query and prompt template) and turns each span into a sequence its own way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import InputError
from ..inputs import Item, TextItem
from .base import LengthOptions, Window, text_prefix


@dataclass(frozen=True)
class Span:
    """Tokens [start, end) of a document, and the window they are (None: the document is scored as one piece)."""

    start: int
    end: int
    window: Window | None = None


def window_starts(tokens: int, size: int, overlap: int) -> list[int]:
    """Start offsets of the windows over a document of `tokens` tokens: the first at 0, each next one
    `size - overlap` later, until one reaches the end. Needs 0 <= overlap < size."""
    starts = [0]
    while starts[-1] + size < tokens:
        starts.append(starts[-1] + size - overlap)
    return starts


def document_spans(
    n_tokens: int,
    room: int,
    lengths: LengthOptions,
    offsets: Callable[[], Sequence[tuple[int, int]]],
    param: str,
    taken: str,
    room_is: str,
    grow: str = "max_length",
) -> list[Span]:
    """The spans of a document of `n_tokens` tokens to score, with `room` tokens per sequence.

    offsets: returns each token's character span in the document text (called once, only for windows).
    taken: what uses up max_length besides the document, for the message when nothing is left ("the query
    takes 12 tokens"); room_is: how the room is computed, for the message when overlap does not fit; grow: the
    option that widens the window, for the same message.
    """
    if room < 1:
        raise InputError(
            f"{taken} and leaves no room for the document within max_length={lengths.max_length}; lower "
            "max_query_length or raise max_length",
            param,
        )
    if n_tokens <= room or lengths.long_documents == "truncate":
        return [Span(0, min(n_tokens, room))]
    if lengths.overlap >= room:
        raise InputError(
            f"overlap={lengths.overlap} must be smaller than the document window of {room} tokens ({room_is}); "
            f"lower overlap or raise {grow}",
            param,
        )
    count = 1 + -(-(n_tokens - room) // (room - lengths.overlap))  # window_starts' count, before building them
    if lengths.max_windows is not None and count > lengths.max_windows:
        raise InputError(
            f"the document's {n_tokens} tokens would make {count} windows of {room} tokens (overlap "
            f"{lengths.overlap}), over the limit of {lengths.max_windows} windows a document; raise max_length (or "
            "max_doc_length where it sets the window), lower overlap, or send a shorter document",
            param,
        )
    at = offsets()
    starts = window_starts(n_tokens, room, lengths.overlap)
    spans = []
    for i, s in enumerate(starts):
        e = min(s + room, n_tokens)
        spans.append(Span(s, e, Window(i, len(starts), at[s][0], at[e - 1][1])))
    return spans


TEMPLATE_TOKENS = 128  # room for any model's prompt template and special tokens around a pair


def tokens_bound(query: Item, doc: Item, lengths: LengthOptions) -> int:
    """At most the tokens a pair puts through the model, known before it is prepared (the server's admission, issue
    18): a text has at most a token a UTF-8 byte (byte-level BPE; the other tokenizers have fewer), a sequence at
    most max_length tokens (an image included: one that does not fit is refused), and a text document windowed in
    'chunk' mode at most max_windows windows (without that bound, a window a byte) of max_length tokens."""

    def size(item: Item | str | None) -> int:
        if item is None:
            return 0
        if isinstance(item, (str, TextItem)):
            return len((item if isinstance(item, str) else item.text).encode("utf-8", "surrogatepass"))
        return lengths.max_length

    total = size(query) + size(doc) + size(lengths.instruction) + TEMPLATE_TOKENS
    if total <= lengths.max_length:
        return total
    if not isinstance(doc, TextItem) or lengths.long_documents == "truncate":
        return lengths.max_length
    windows = size(doc) if lengths.max_windows is None else min(lengths.max_windows, size(doc))
    return windows * lengths.max_length


def check_document_size(tokenizer, text: str, room: int, lengths: LengthOptions, param: str) -> None:
    """In 'chunk' mode, refuse before tokenizing all of it a document that must make more than max_windows windows
    of at most `room` tokens: one with more than max_windows x room tokens, found on a prefix (text_prefix) rather
    than on the whole text (a 5 MB document was tokenized whole, 4.8 s and 900 MB, only to be refused)."""
    if lengths.long_documents != "chunk" or lengths.max_windows is None:
        return
    limit = lengths.max_windows * max(room, 1)
    if text_prefix(tokenizer, text, limit + 1) is not text:
        raise InputError(
            f"the document has more than {limit} tokens: more than {lengths.max_windows} windows of {room} tokens, "
            f"over the limit of {lengths.max_windows} windows a document; raise max_length (or max_doc_length where "
            "it sets the window), or send a shorter document",
            param,
        )
