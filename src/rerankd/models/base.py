"""The contract between the scoring pipeline and a model backend, and the small typed objects passed between stages.

A backend is one model family loaded for inference. The pipeline (rerankd.engine) hands it pairs to prepare, in a
thread pool (tokenize, cut, window, decode images: no model compute), and batches of prepared sequences to score,
on one worker thread. See docs/architecture.md.
"""

from __future__ import annotations

import json
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ..config import REFERENCE_LONG_DOCUMENTS, RERANK_DEFAULTS, LoadOptions, LongDocuments
from ..errors import InputError, ModelLoadError
from ..inputs import ImageItem, Item
from ..inputs.images import ImagePolicy, PreparedImage
from ..weights import Renames, load_weights
from .layers import (Packing, attention_backend, cpu_elementwise, packing, to_device, upcast_storage,
                     use_cpu_elementwise, use_upcast)


@dataclass(frozen=True)
class LengthOptions:
    """The options of one call that shape its prompts: token limits, what happens to a text document that does
    not fit, and the task instruction of instruction-following models."""

    max_length: int
    """Longest prompt, in tokens, including special tokens (and m0's score token and image tokens)."""
    max_query_length: int | None
    """Queries are cut to this many tokens (None: not cut on their own; the pair is truncated as a whole)."""
    max_doc_length: int | None = None
    """Text documents are cut to (or windowed by) this many tokens (None: the model's rule, see each backend)."""
    long_documents: LongDocuments = REFERENCE_LONG_DOCUMENTS
    """'truncate': a document that does not fit is cut. 'chunk': it is split into overlapping token windows,
    each scored as a pair; the document's score is the maximum over its windows (rerankd.models.windows)."""
    overlap: int = RERANK_DEFAULTS.overlap
    """Tokens shared by adjacent windows in 'chunk' mode."""
    instruction: str | None = None
    """The task instruction of a model that takes one (Qwen3-Reranker, jina-reranker-v3); None: the model's
    default. Backends without `supports_instruction` never see one (Reranker.length_options refuses it)."""
    max_windows: int | None = None
    """Windows one document may be split into at most (the server's --max-document-windows); None: no bound."""


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


@dataclass
class PreparedSequence:
    """One model input made ready: token ids and what goes with them.

    A sequence yields one output per entry of `slots`, in that order. A slot is a score the caller asked for,
    numbered within the unit of work the sequence was prepared from: for a pointwise model a (query, document)
    pair is one unit with one slot (0), and the windows of a chunked document are several sequences of the same
    slot, reduced to their maximum. A listwise model (jina-reranker-v3: one sequence holds a query and many
    documents) prepares a unit of several slots, every document of one query, and gives each sequence the slots
    of the documents it holds.
    """

    input_ids: torch.Tensor  # [tokens] int64
    positions: torch.Tensor | None = None  # [3, tokens] M-RoPE positions (m0), [tokens] (encoders)
    images: list[PreparedImage] = field(default_factory=list)
    token_types: torch.Tensor | None = None  # [tokens] segment ids (BERT), None where the model has one type
    window: Window | None = None  # set when the document was split into several windows
    slots: tuple[int, ...] = (0,)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


class Backend(Protocol):
    """A loaded model: turns pairs into sequences (thread-safe, no model compute) and sequences into logits.

    Registered in rerankd.models.registry by config architecture or file type; `load` is its only constructor the
    pipeline uses.
    """

    architecture: str
    """What was loaded, for logs and messages (the config's architecture, or the file type)."""
    supports_images: bool
    """Whether queries and documents may be images."""
    text_only_reason: str
    """Why images are refused, when they are: shown to the caller, field name in front."""
    default_max_length: int
    """max_length when a call gives none."""
    compute_score_max_query_length: int | None
    """compute_score's default query cut: what the model's reference does (None: the pair is truncated whole)."""
    supports_instruction: bool
    """Whether calls may give an `instruction` (LengthOptions.instruction)."""
    score_activation: str | None
    """What turns an output into the score by default: 'sigmoid' (a logit), or None (already a score: v3's cosine)."""
    listwise: bool
    """False: `prepare` makes each pair's sequences and `forward` gives one logit per slot. True: one sequence
    scores many documents of one query: `prepare_list` and `combine` below, and `forward` gives one tensor per
    sequence."""
    device: torch.device
    dtype: torch.dtype
    cpu_gemm: str
    """The kernel of the fp32 CPU linear layers that runs: 'onednn', 'torch', or 'none' (not torch's layers)."""
    attn_backend: str
    """The attention kernel that runs (layers.attention_backend), or 'none' (not torch's layers)."""

    @classmethod
    def load(cls, path: Path, config: dict | None, device: torch.device, dtype: torch.dtype, opts: LoadOptions) -> Any:
        """Load a checkpoint directory (config: its config.json) or a model file (config None)."""
        ...

    def prepare(
        self, query: Item, doc: Item, lengths: LengthOptions, where: Where, images: ImagePolicy | None = None
    ) -> list[PreparedSequence]:
        """The pair's sequences: one, or one per window of a chunked document. `images` is the caller's image
        source policy (None: the library's, every source allowed). Raises InputError naming `where`."""
        ...

    def prepare_query(self, query: Item, param: str, images: ImagePolicy | None = None) -> Item:
        """A query shared by many pairs, made ready once (an image query decoded): returns the item to pair."""
        ...

    def check(self, lengths: LengthOptions) -> None:
        """Refuse a call's options that this model cannot take (a max_length past its positions), before any work:
        ValueError whose message starts with the option's name."""
        ...

    def forward(self, batch: list[PreparedSequence]) -> torch.Tensor | list[torch.Tensor]:
        """Pointwise: relevance logits, one per slot of each sequence in order, fp32 on the backend's device (the
        score is sigmoid(logit)); on CUDA the forward is only queued on return, and the scheduler reads the logits
        back (the batch's one host sync). Listwise: one tensor per sequence, what `combine` reads."""
        ...

    def prepare_list(
        self, query: Item, docs: list[Item], lengths: LengthOptions, wheres: list[Where], images: ImagePolicy | None
    ) -> tuple[list[PreparedSequence], dict[int, InputError]]:
        """Listwise only: the sequences scoring `docs` against `query`, each naming in `slots` the documents (their
        indices in `docs`) it scores, and the documents that cannot be scored (index -> InputError naming its
        `wheres` entry; they are left out of the sequences). Raises InputError when the whole list fails."""
        ...

    def combine(self, outputs: list[tuple[PreparedSequence, torch.Tensor]]) -> list[tuple[int, float, Window | None]]:
        """Listwise only: from the forward outputs of all of one list's sequences (in any order), every scored
        (slot, logit, window); a slot scored several times (a windowed document) keeps its best (keep_best)."""
        ...

    def close(self) -> None:
        """Release what the backend holds outside Python's memory (a llama.cpp context); idempotent."""
        ...


class Pointwise:
    """The defaults of the Backend contract for a model that scores one (query, document) pair per sequence with a
    logit, and takes no instruction."""

    listwise: ClassVar[bool] = False
    supports_instruction: ClassVar[bool] = False
    score_activation: ClassVar[str | None] = "sigmoid"

    def check(self, lengths: LengthOptions) -> None:
        pass


class TextOnly(Pointwise):
    """The image half of the Backend contract for text-only models: images are refused, with the reason."""

    supports_images: ClassVar[bool] = False
    architecture: str

    @property
    def text_only_reason(self) -> str:
        return f"this model ({self.architecture}) is text only; images are not supported"

    def prepare_query(self, query: Item, param: str, images: ImagePolicy | None = None) -> Item:
        return query

    def text(self, item: Item, param: str) -> str:
        """The item's text, or InputError naming `param` for an image."""
        if isinstance(item, ImageItem):
            raise InputError(self.text_only_reason, param)
        return item.text  # type: ignore[union-attr]


def load_tokenizer(directory: Path, hint: str = "", fallback: Callable[[Path], Any] | None = None):
    """`directory`/tokenizer.json as a tokenizers.Tokenizer with truncation and padding off (the backends cut and
    pack themselves); without it, what `fallback` makes of the directory's other files; a clear error if neither
    gives one (`hint` says how to make one)."""
    from tokenizers import Tokenizer

    path = directory / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path)) if path.is_file() else fallback and fallback(directory)
    if tokenizer is None:
        raise ModelLoadError(f"{directory}: tokenizer.json is missing{hint}")
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return ReleasingTokenizer(tokenizer)


# Qwen2's pre-tokenizer split pattern (tokenizer.json of Qwen2 / Qwen2-VL / Qwen3)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class ReleasingTokenizer:
    """A tokenizers.Tokenizer whose `encode` lets other threads run meanwhile: it goes through `encode_batch`,
    which releases Python's lock (GIL), where `encode` holds it for the whole call (a 3 MB text: 8 s in which no
    other thread of the server, its event loop included, ran; measured 0.4 s at most through encode_batch). The
    encodings are the same; every other attribute is the wrapped tokenizer's. `cut_pattern`: where text_prefix may
    cut its texts."""

    def __init__(self, tokenizer: Any):
        self.inner = tokenizer
        self.cut_pattern = cut_pattern(tokenizer)

    def encode(self, sequence: str, pair: str | None = None, add_special_tokens: bool = True) -> Any:
        item = sequence if pair is None else (sequence, pair)
        return self.inner.encode_batch([item], add_special_tokens=add_special_tokens)[0]

    def __getattr__(self, name: str) -> Any:
        if name == "inner" or name.startswith("__"):  # not set yet (copy, pickle): no recursion through inner
            raise AttributeError(name)
        return getattr(self.inner, name)


class TorchTextBackend(TextOnly):
    """What a text-only backend of torch modules holds (the cross-encoders, the Qwen3 rerankers): its module, config,
    tokenizer, device, dtype, architecture name, the fp32 CPU kernel its linear layers run on, and its attention
    backend, chosen once."""

    def __init__(self, model: nn.Module, cfg: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype,
                 arch: str, cpu_gemm: str, attention: str = "auto"):  # fmt: skip
        self.model = model
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.architecture = arch
        self.cpu_gemm = cpu_gemm
        self.attn_backend = attention_backend(device, dtype, attention)

    def close(self) -> None:
        pass


def token_id(tokenizer, directory: Path, token: str, config: dict | None = None, key: str | None = None) -> int:
    """The id of `token` in the tokenizer, looked up by its string (never hard-coded); a ModelLoadError if it is
    missing, or if config.json's `key` names another id."""
    tid = tokenizer.token_to_id(token)
    if tid is None:
        raise ModelLoadError(f"{directory}/tokenizer.json has no {token} token; is this the model's own tokenizer?")
    if config is not None and key in config and config[key] != tid:
        raise ModelLoadError(f"{directory}: config.json {key}={config[key]} but tokenizer.json maps {token} to {tid}")
    return tid


def check_positions(lengths: LengthOptions, positions: int) -> None:
    """Backend.check's rule for a model with a position table: max_length may not pass it."""
    if lengths.max_length > positions:
        raise ValueError(f"max_length: {lengths.max_length} is more than this model's {positions} positions; lower it")


def cut_text(tokenizer, text: str, max_tokens: int, ids: list[int] | None = None) -> tuple[str, int]:
    """The Jina references' cut (m0, v3): tokenize the text alone, and if it reaches max_tokens, replace it by the
    decoding of its first max_tokens tokens. Returns the text and its token count (at most max_tokens). `ids`: the
    text's token ids when the caller has them already; without them only a prefix of a long text is tokenized
    (text_prefix)."""
    if ids is None:
        ids = tokenizer.encode(text_prefix(tokenizer, text, max_tokens + 1), add_special_tokens=True).ids
    if len(ids) >= max_tokens:
        return tokenizer.decode(ids[:max_tokens], skip_special_tokens=False), max_tokens
    return text, len(ids)


class Interrupted(Exception):
    """A forward stopped between two layers because nobody waits for its batch any more (interruptible)."""


_interrupt = threading.local()


@contextmanager
def interruptible(stop: Callable[[], bool]):
    """Within it, on this thread, the models' layer loops call `stop()` between layers (between_layers) and raise
    Interrupted when it says so: a batch whose every request is past its deadline or cancelled stops within one
    layer rather than running to the end (a 32k-token m0 sequence ran 12 s past its request's 504, issue 18)."""
    _interrupt.stop = stop
    try:
        yield
    finally:
        _interrupt.stop = None


def between_layers() -> None:
    """What a layer loop calls between layers, and a long preparation between documents (a listwise model's list):
    raises Interrupted when the work it is in is no longer wanted."""
    stop = getattr(_interrupt, "stop", None)
    if stop is not None and stop():
        raise Interrupted


PREFIX_CHARS_PER_TOKEN = 8  # text_prefix's first try: this many characters for each token needed, doubled after
_WORD_END = re.compile(r"(?<=\S) ")  # a space after a non-space: where a text can be cut without changing the tokens
# and before punctuation that follows a letter, for tokenizers whose pre-tokenizer splits them there (Qwen2's regex,
# BERT's) under a normalizer that cannot join them (NFC, BERT's): unspaced CJK text has such places
_WORD_OR_PUNCTUATION_END = re.compile(r"(?<=\S) |(?<=[^\W\d_])(?=[，。、；：？！,.;:?!])")


def cut_pattern(tokenizer: Any) -> re.Pattern:
    """Where text_prefix may cut a text for this tokenizers.Tokenizer: before a space after a non-space, and for
    Qwen2's and BERT's pre-tokenizers also before punctuation after a letter."""

    def state(part: Any) -> dict:
        return json.loads(part.__getstate__()) if part is not None else {}

    try:
        pre, norm = state(tokenizer.pre_tokenizer), state(tokenizer.normalizer)
    except (AttributeError, TypeError, ValueError):
        return _WORD_END
    parts = pre.get("pretokenizers", [pre])
    qwen2 = any(p.get("type") == "Split" and p.get("pattern", {}).get("Regex") == QWEN2_SPLIT for p in parts)
    bert = pre.get("type") == "BertPreTokenizer"
    if (qwen2 and norm.get("type") in (None, "NFC")) or (bert and norm.get("type") == "BertNormalizer"):
        return _WORD_OR_PUNCTUATION_END
    return _WORD_END


def text_prefix(tokenizer, text: str, tokens: int) -> str:
    """A prefix of `text` that tokenizes to the same first `tokens` tokens as the whole text (special tokens aside),
    or `text` itself when it has fewer or no such prefix is found; only the prefix is tokenized.

    The prefix ends before a space that follows a non-space (or where the tokenizer's `cut_pattern` says: before
    punctuation after a letter, for Qwen2's and BERT's pre-tokenizers). Every tokenizer rerankd loads splits words
    there before its model sees them (Qwen2's byte-level BPE regex, XLM-R's Metaspace, BERT's whitespace split,
    llama.cpp's Qwen2 rules), and no split of the text before that point looks past it, so the tokens before it are
    those of the whole text, but for the last one: sentencepiece's nmt_nfkc normalizer (XLM-R's) turns a few
    characters Python does not call a space (U+200B, U+FEFF, U+FFFD, ...) into one, and a cut just after such a
    character changes the token before it, so the prefix holds one token more than asked. Tried at about
    PREFIX_CHARS_PER_TOKEN characters a token needed, doubled while too few: a 30 MB document cut to 512 tokens costs
    a few kilobytes of tokenizing, not 40 s and 8 GB (issue 18). A text with no place to cut (a run of CJK characters
    without punctuation, say) is tokenized whole, as before."""
    size = tokens * PREFIX_CHARS_PER_TOKEN
    pattern = getattr(tokenizer, "cut_pattern", _WORD_END)
    while size < len(text):
        found = pattern.search(text, size)
        if found is None:
            return text
        cut = found.start()
        if len(tokenizer.encode(text[:cut], add_special_tokens=False).ids) > tokens:
            return text[:cut]
        size = 2 * cut
    return text


def build_module(make: Callable[[], nn.Module], directory: Path, renames: Renames, device: torch.device,
                 dtype: torch.dtype, opts: LoadOptions) -> nn.Module:  # fmt: skip
    """`make()` built without memory (meta device), its weights read from `directory` through `renames`, in eval
    mode without gradients. With opts.cpu_bf16 'upcast' (as from_pretrained resolves it, `dtype` then float32) its
    linear and embedding weights stay in bf16 and are widened as they compute; its element-wise work runs where
    opts.cpu_elementwise says (layers.cpu_elementwise)."""
    with torch.device("meta"):
        model = make()
    stored = upcast_storage(model) if opts.cpu_bf16 == "upcast" else None
    load_weights(model, directory, renames, device, dtype, opts.show_progress, stored)
    if stored:
        use_upcast(model)
    use_cpu_elementwise(model, cpu_elementwise(device, dtype, opts.cpu_elementwise))
    return model.eval().requires_grad_(False)


def packed(batch: list[PreparedSequence], device: torch.device, kernel: str) -> tuple[torch.Tensor, Packing]:
    """The token ids of a batch, concatenated on `device`, and its Packing for the attention `kernel`."""
    ids = to_device(torch.cat([s.input_ids for s in batch]), device)
    return ids, packing((s.length for s in batch), device, kernel)
