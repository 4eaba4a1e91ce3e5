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


def item_tokens(item: Item | str | None, image_tokens: int) -> int:
    """At most the tokens an item puts through the model: a text a token a UTF-8 byte (byte-level BPE; the other
    tokenizers make fewer), an image `image_tokens` (what its model's max_pixels allows)."""
    if item is None:
        return 0
    if isinstance(item, (str, TextItem)):
        return len((item if isinstance(item, str) else item.text).encode("utf-8", "surrogatepass"))
    return image_tokens


def tokens_bound(query_tokens: int, doc: Item, lengths: LengthOptions, image_tokens: int) -> int:
    """At most the tokens a pair puts through the model, known before it is prepared (the server's admission, issue
    18), for a query of at most `query_tokens` (item_tokens): a sequence holds at most max_length tokens; a text
    document windowed in 'chunk' mode makes at most the windows that a room of max_length less the query, the
    instruction and the template (or max_doc_length, if smaller) gives, and at most max_windows of them."""
    if lengths.max_query_length is not None:
        query_tokens = min(query_tokens, lengths.max_query_length)
    fixed = query_tokens + item_tokens(lengths.instruction, image_tokens) + TEMPLATE_TOKENS
    size = item_tokens(doc, image_tokens)
    if fixed + size <= lengths.max_length:
        return fixed + size
    if not isinstance(doc, TextItem) or lengths.long_documents == "truncate":
        return lengths.max_length
    room = max(min(lengths.max_length - fixed, lengths.max_doc_length or lengths.max_length), lengths.overlap + 1)
    windows = 1 + -(-max(size - room, 0) // (room - lengths.overlap))  # document_spans' count
    if lengths.max_windows is not None:
        windows = min(windows, lengths.max_windows)
    return windows * lengths.max_length


def document_to_tokenize(tokenizer, text: str, room: int, lengths: LengthOptions, param: str, seam: int = 0) -> str:
    """What of a text document to tokenize, whose windows hold at most `room` tokens: in 'truncate' mode a prefix
    with its first room + `seam` tokens (text_prefix; `seam`: tokens a backend's template may merge with its start),
    in 'chunk' mode the whole text, once check_document_size has found it within the window limit."""
    if lengths.long_documents == "truncate":
        return text_prefix(tokenizer, text, max(room, 0) + 1 + seam)
    check_document_size(tokenizer, text, room, lengths, param)
    return text


def check_document_size(tokenizer, text: str, room: int, lengths: LengthOptions, param: str) -> None:
    """In 'chunk' mode, refuse before tokenizing all of it a document that must make more than max_windows windows
    of at most `room` tokens (document_spans' count: more than room + (max_windows - 1) x (room - overlap) tokens),
    found on a prefix (text_prefix) rather than on the whole text (a 5 MB document was tokenized whole, 4.8 s and
    900 MB, only to be refused). A room too small for any window is left to document_spans, which says why."""
    if lengths.long_documents != "chunk" or lengths.max_windows is None or room <= lengths.overlap:
        return
    limit = room + (lengths.max_windows - 1) * (room - lengths.overlap)
    if text_prefix(tokenizer, text, limit + 1) is not text:
        raise InputError(
            f"the document has more than {limit} tokens, which makes more than {lengths.max_windows} windows of "
            f"{room} tokens (overlap {lengths.overlap}), over the limit of {lengths.max_windows} windows a document; "
            "raise max_length (or max_doc_length where it sets the window), lower overlap, or send a shorter document",
            param,
        )
