"""jina-reranker-m0 as GGUF: the decoder through llama.cpp (llama-cpp-python), the score head in NumPy.

Reproduces Jina's GGUF recipe: llama.cpp runs the Qwen2 decoder in embedding mode with last-token pooling and no
normalization over the prompt `**Document**:\\n{doc}\\n**Query**:\\n{query}<|box_end|>`, and the score is
sigmoid((relu(h @ W1 + b1) @ W2 + b2) - logit_bias) with the arrays of mlp_weights.npz. Prompts, cuts and
document windows are the torch backend's (jina_m0.M0Prompts), with llama.cpp's own tokenizer. Text only.

The score token: in a GGUF, <|box_end|> stands for the torch model's score token, id 100 (its embedding row is a
copy of row 100; see rerankd.convert_gguf). rerankd appends id 100 itself, which is right for every conversion
(whether <|box_end|> got row 100's embedding, or the two tokens' strings were swapped), and where the file keeps
the original <|box_end|> row (`rerankd.box_end_row`, written by rerankd convert-gguf), the text <|box_end|> inside
a query or document is fed through that row, so it means what it means to the reference.

Many sequences go through one llama_decode call (each its own sequence id), as a forward batch of the engine.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import threading
import unicodedata
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..config import LoadOptions
from ..errors import InputError, ModelLoadError
from ..inputs.images import ImagePolicy, PreparedImage
from .base import LengthOptions, PreparedSequence, TextOnly, Where
from .jina_m0 import DEFAULT_MAX_LENGTH, REFERENCE_MAX_QUERY_LENGTH, SCORE_TOKEN_ID, M0Prompts

HEAD_FILE = "mlp_weights.npz"
HEAD_ARRAYS = ("W1", "b1", "W2", "b2", "logit_bias")
SCORE_TOKEN = "<|box_end|>"  # in a GGUF, the text that stands for the score token (module docstring)
# Tokens per llama_decode call. In one call every token attends, masked, to every token of the call (llama.cpp's
# unified KV cache for multi-sequence embeddings), so attention costs (call tokens)^2 rather than the sum of the
# sequences' squares: calls of 4096 tokens ran 2x slower than calls of 512 on the mid-size benchmark model.
# A longer sequence goes alone, in several calls. Also llama.cpp's batch and micro-batch size: its compute buffers
# scale with this, not with the engine's batches.
CALL_TOKENS = 512
TEXT_ONLY = (
    "the GGUF (llama.cpp) path of jina-reranker-m0 is text only: it has no vision tower. Serve the Hugging Face "
    "checkpoint (jinaai/jina-reranker-m0) for image queries or documents"
)


class _Encoding:
    """What M0Prompts reads of a tokenizers.Encoding: ids, and (computed on first use: only document windows need
    them) each token's character span in the original text."""

    def __init__(self, ids: list[int], tokenizer: "LlamaTokenizer", data: bytes,
                 original_at: tuple[list[int], list[int]] | None):  # fmt: skip
        self.ids = ids
        self._tokenizer = tokenizer
        self._data = data
        self._original_at = original_at

    @functools.cached_property
    def offsets(self) -> list[tuple[int, int]]:
        data = self._data
        floor, ceil = _char_offsets(data)
        at = self._original_at
        out = []
        pos = 0
        for t in self.ids:  # the pieces concatenate to the text's bytes (byte-level BPE)
            end = min(pos + len(self._tokenizer.piece(t)), len(data))
            start, stop = floor[min(pos, len(data))], ceil[end]
            if at is not None:  # back to the text before NFC
                start, stop = (at[0][start] if start < len(at[0]) else at[1][-1]), at[1][stop]
            out.append((start, stop))
            pos = end
        return out


class LlamaTokenizer:
    """llama.cpp's tokenizer of a loaded GGUF, with the two methods of tokenizers.Tokenizer that M0Prompts uses.

    Text is NFC-normalized first, as Qwen2's tokenizer.json does (llama.cpp does not); offsets refer to the
    original text. Special tokens written in the text are parsed as such (as the Hugging Face tokenizer does); no
    BOS is added (Qwen2 has none). Thread-safe: llama.cpp's vocabulary is read-only once loaded.
    """

    def __init__(self, vocab: object, owner: object = None):
        import llama_cpp

        self._lib = llama_cpp
        self._vocab = vocab
        self._owner = owner  # what keeps the vocabulary alive, when nothing else does
        self.piece = functools.lru_cache(maxsize=65536)(self._piece)

    def _tokenize(self, data: bytes) -> list[int]:
        n = max(16, len(data) + 8)  # byte-level BPE: never more tokens than bytes
        buf = (self._lib.llama_token * n)()
        count = self._lib.llama_tokenize(self._vocab, data, len(data), buf, n, False, True)
        if count < 0:  # pragma: no cover - the buffer is always large enough
            raise RuntimeError(f"llama.cpp could not tokenize a text of {len(data)} bytes ({count})")
        return list(buf[:count])

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    def encode(self, text: str, add_special_tokens: bool = True) -> _Encoding:
        normalized, original_at = nfc_with_map(text)
        data = normalized.encode("utf-8")
        return _Encoding(self._tokenize(data), self, data, original_at)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return b"".join(self.piece(t) for t in ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        ids = self._tokenize(token.encode("utf-8"))
        return ids[0] if len(ids) == 1 and self.piece(ids[0]) == token.encode("utf-8") else None


def load_vocab_tokenizer(path: Path) -> LlamaTokenizer:
    """The tokenizer of a .gguf file alone (llama.cpp loads its vocabulary, no weights)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return LlamaTokenizer(llama_cpp.llama_model_get_vocab(llm.model), owner=llm)


def nfc_with_map(text: str) -> tuple[str, tuple[list[int], list[int]] | None]:
    """NFC `text` and, when normalizing changed it, where its characters came from in `text`: for each normalized
    character the original position it starts at, and for each normalized boundary 0..len(normalized) the original
    position a span ending there ends at (None when the text is unchanged: the common case, checked fast).

    Composition happens within a cluster (a character of combining class 0 and the marks after it; Hangul vowel
    and final jamo join the syllable before), or across two of them (Tamil's and other Indic two-part vowels, whose
    parts both have class 0): clusters are normalized one by one, adjacent ones together where that composes them.
    Within a group, what normalizing left as it was at either end maps character by character, and what it changed
    maps as a whole: a span reaching into that covers all of it (as wide as Hugging Face's alignments, or wider, never
    cut short).
    """
    if unicodedata.is_normalized("NFC", text):
        return text, None
    starts = [i for i, c in enumerate(text)
              if i == 0 or (unicodedata.combining(c) == 0 and not 0x1160 <= ord(c) <= 0x11FF)]  # fmt: skip
    starts.append(len(text))
    groups: list[tuple[int, int, str]] = []  # (original start, original end, normalized)
    for a, b in zip(starts, starts[1:]):
        piece = unicodedata.normalize("NFC", text[a:b])
        if groups:
            pa, _, pn = groups[-1]
            joined = unicodedata.normalize("NFC", text[pa:b])
            if joined != pn + piece:  # the two compose: one group
                groups[-1] = (pa, b, joined)
                continue
        groups.append((a, b, piece))
    normalized = "".join(g[2] for g in groups)
    begins: list[int] = []
    ends = [0]
    for a, b, piece in groups:
        # what NFC left alone at either end of the group maps character by character; the middle it changed, whole
        orig = text[a:b]
        p = 0
        while p < min(len(piece), len(orig)) and piece[p] == orig[p]:
            p += 1
        q = 0
        while q < min(len(piece), len(orig)) - p and piece[-1 - q] == orig[-1 - q]:
            q += 1
        for k in range(len(piece)):
            if k < p or k >= len(piece) - q:
                j = k if k < p else len(orig) - (len(piece) - k)
                begins.append(a + j)
                ends.append(a + j + 1)
            else:
                begins.append(a + p)
                ends.append(b - q)
    ends[-1] = len(text)
    if normalized != unicodedata.normalize("NFC", text):  # not seen: spans proportional rather than wrong
        normalized = unicodedata.normalize("NFC", text)
        begins = [i * len(text) // max(len(normalized), 1) for i in range(len(normalized))]
        ends = [i * len(text) // max(len(normalized), 1) for i in range(len(normalized) + 1)]
    return normalized, (begins, ends)


def _char_offsets(data: bytes) -> tuple[list[int], list[int]]:
    """For each byte offset 0..len(data) of UTF-8 `data`, the character offset, rounded down (the character that
    holds the byte) and up (the end of that character): a token boundary can split a character, and a token's span
    then covers the whole character, as Hugging Face's byte-level offsets do."""
    floor = [0] * (len(data) + 1)
    ceil = [0] * (len(data) + 1)
    count = 0  # characters that start before offset i
    for i in range(len(data) + 1):
        inside = i < len(data) and data[i] & 0xC0 == 0x80  # a continuation byte
        floor[i] = count - 1 if inside else count
        ceil[i] = count
        if i < len(data) and not inside:
            count += 1
    return floor, ceil


class GGUFBackend(TextOnly, M0Prompts):
    architecture: ClassVar[str] = "jina-reranker-m0 GGUF (llama.cpp)"
    text_only_reason: ClassVar[str] = TEXT_ONLY  # type: ignore[assignment]
    default_max_length: ClassVar[int] = DEFAULT_MAX_LENGTH
    compute_score_max_query_length: ClassVar[int | None] = REFERENCE_MAX_QUERY_LENGTH
    cpu_gemm: ClassVar[str] = "none"  # llama.cpp runs the model, not torch's layers
    attn_backend: ClassVar[str] = "none"

    def __init__(self, llm: object, head: dict[str, np.ndarray], path: Path, n_ctx: int, box_end_row: int | None):
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llm
        self.path = path
        self.n_ctx = n_ctx
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.head = head
        vocab = llama_cpp.llama_model_get_vocab(llm.model)  # type: ignore[attr-defined]
        tokenizer = LlamaTokenizer(vocab)
        box_end = tokenizer.token_to_id(SCORE_TOKEN)
        if box_end is None:
            raise ModelLoadError(f"{path}: the GGUF's vocabulary has no {SCORE_TOKEN} token; not a jina-reranker-m0 GGUF")
        # text only: no vision tower; a literal <|image_pad|> in the text is still refused as the torch path does
        super().__init__(tokenizer, SCORE_TOKEN_ID, tokenizer.token_to_id("<|image_pad|>"), None)  # type: ignore[arg-type]
        # the text <|box_end|> -> the row that keeps its own embedding, when the file has one
        self._feed = {box_end: box_end_row} if box_end_row is not None else {}
        self.n_embd = int(llama_cpp.llama_model_n_embd(llm.model))  # type: ignore[attr-defined]
        self._lock = threading.Lock()  # one llama.cpp context: one forward at a time
        self._batch = llama_cpp.llama_batch_init(CALL_TOKENS, 0, 1)
        self.max_sequences = int(llama_cpp.llama_n_seq_max(llm.ctx))  # type: ignore[attr-defined]
        self.call_tokens = CALL_TOKENS

    def close(self) -> None:
        """Free llama.cpp's batch; the model and context go with the Llama object."""
        lock = getattr(self, "_lock", None)  # None: __init__ failed before making it, nothing to free
        if lock is None:
            return
        with lock:
            batch = getattr(self, "_batch", None)
            if batch is not None:
                self._lib.llama_batch_free(batch)
                self._batch = None

    def __del__(self) -> None:
        self.close()

    @classmethod
    def load(
        cls, path: Path, config: dict | None, device: torch.device, dtype: torch.dtype, opts: LoadOptions
    ) -> "GGUFBackend":
        """A .gguf file, its score head (HEAD_FILE) beside it. dtype does not apply: llama.cpp computes in the
        file's types with an f32 KV cache."""
        head_path = path.parent / HEAD_FILE
        try:
            import llama_cpp
        except ImportError:
            raise ModelLoadError(
                f"{path}: serving GGUF files needs llama-cpp-python; install it with pip install 'rerankd[gguf]'"
            ) from None
        if opts.quantize is not None:
            raise ModelLoadError(f"quantize={opts.quantize!r} does not apply to GGUF files: choose a quantized .gguf instead")
        head = load_head(head_path)
        meta = _check_gguf(path)
        # a call holds at most max(CALL_TOKENS, one sequence) tokens, so the context is sized for the longest
        # sequence (the model card's 10240), not for the engine's batch budget
        n_ctx = DEFAULT_MAX_LENGTH
        threads = opts.num_threads or (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        )
        try:
            llm = llama_cpp.Llama(
                model_path=str(path),
                embedding=True,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST,
                n_ctx=n_ctx,
                n_batch=CALL_TOKENS,  # tokens per llama_decode call (see hidden_states)
                n_ubatch=CALL_TOKENS,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=-1 if device.type == "cuda" else 0,
                type_k=llama_cpp.GGML_TYPE_F32,  # f32 keys and values: llama.cpp's default f16 cache costs accuracy
                type_v=llama_cpp.GGML_TYPE_F32,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as e:
            raise ModelLoadError(f"{path}: llama.cpp could not load this GGUF file ({e}); is it complete and a "
                                 "jina-reranker-m0 (qwen2) GGUF?") from None  # fmt: skip
        n_embd = int(llama_cpp.llama_model_n_embd(llm.model))
        if head["W1"].shape[0] != n_embd:
            raise ModelLoadError(
                f"{head_path}: W1 is {head['W1'].shape} but the GGUF's hidden size is {n_embd}; the npz and the .gguf "
                "are not from the same model"
            )
        return cls(llm, head, path, n_ctx, meta.get("rerankd.box_end_row"))

    # ------------------------------------------------------------------ preparation

    def prepare_image(self, source: object, param: str, images: ImagePolicy | None = None) -> PreparedImage:
        raise InputError(TEXT_ONLY, param)

    def prepare(
        self, query, doc, lengths: LengthOptions, where: Where, images: ImagePolicy | None = None
    ) -> list[PreparedSequence]:
        seqs = M0Prompts.prepare(self, query, doc, lengths, where, images)
        for s in seqs:
            if s.length > self.n_ctx:
                raise InputError(
                    f"the prompt has {s.length} tokens, more than the {self.n_ctx} tokens a sequence may have on the "
                    "GGUF (llama.cpp) path; lower max_length",
                    where.pair,
                )
        return seqs

    # ------------------------------------------------------------------ compute

    def hidden_states(self, batch: list[PreparedSequence]) -> np.ndarray:
        """The last token's final hidden state of each sequence [len(batch), hidden].

        Sequences go to llama.cpp in calls of up to CALL_TOKENS tokens (and its sequence slots), the KV cache
        cleared before each group; a longer sequence goes alone, in consecutive calls of CALL_TOKENS tokens that
        build up its KV cache (causal attention: the same result as one call, as llama.cpp's own micro-batches).
        """
        out = np.empty((len(batch), self.n_embd), dtype=np.float32)
        with self._lock:
            if self._batch is None:
                raise RuntimeError(f"{self.path}: this GGUF backend is closed; load the model again")
            start = 0
            while start < len(batch):
                stop, tokens = start + 1, batch[start].length
                while stop < len(batch) and stop - start < self.max_sequences and tokens + batch[stop].length <= self.call_tokens:
                    tokens += batch[stop].length
                    stop += 1
                self._clear()
                if stop == start + 1 and tokens > self.call_tokens:  # one long sequence, in chunks
                    if tokens > self.n_ctx:  # prepare() refuses such sequences; a hand-made batch must not overflow
                        raise ValueError(f"a sequence of {tokens} tokens does not fit the llama.cpp context of {self.n_ctx}")
                    ids = batch[start].input_ids.tolist()
                    for pos in range(0, len(ids), self.call_tokens):
                        self._decode([(0, pos, ids[pos : pos + self.call_tokens])])
                else:
                    self._decode([(i, 0, s.input_ids.tolist()) for i, s in enumerate(batch[start:stop])])
                for seq_id in range(stop - start):
                    ptr = self._lib.llama_get_embeddings_seq(self.llm.ctx, seq_id)  # type: ignore[attr-defined]
                    if not ptr:
                        raise RuntimeError("llama.cpp returned no pooled embedding; is pooling 'last' supported?")
                    out[start + seq_id] = np.ctypeslib.as_array(ptr, shape=(self.n_embd,))
                start = stop
        return out

    def _clear(self) -> None:
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self.llm.ctx), True)  # type: ignore[attr-defined]

    def _decode(self, parts: list[tuple[int, int, list[int]]]) -> None:
        """One llama_decode call over (sequence id, position of the first token, token ids) parts."""
        b, feed, n = self._batch, self._feed, 0
        for seq_id, first, ids in parts:
            for p, tok in enumerate(ids, first):
                b.token[n] = feed.get(tok, tok)
                b.pos[n] = p
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq_id
                b.logits[n] = True  # embedding mode: every token is an output
                n += 1
        b.n_tokens = n
        rc = self._lib.llama_decode(self.llm.ctx, b)  # type: ignore[attr-defined]
        if rc != 0:
            why = "no room in the KV cache" if rc == 1 else "see llama.cpp's log (load with verbose logging)"
            raise RuntimeError(f"llama_decode failed with code {rc} on a batch of {n} tokens: {why}")

    def forward(self, batch: list[PreparedSequence]) -> torch.Tensor:
        return torch.from_numpy(head_logits(self.hidden_states(batch), self.head))


def head_logits(h: np.ndarray, head: dict[str, np.ndarray]) -> np.ndarray:
    """(relu(h @ W1 + b1) @ W2 + b2) - logit_bias: the relevance logit, score = sigmoid(logit). h: [n, hidden]."""
    x = np.maximum(h @ head["W1"] + head["b1"], 0.0)
    return ((x @ head["W2"] + head["b2"]).reshape(-1) - head["logit_bias"]).astype(np.float32)


def load_head(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing: a jina-reranker-m0 GGUF needs its score head, {HEAD_FILE}, in the same folder as "
            "the .gguf (download it from the same repository, or write both with `rerankd convert-gguf`)"
        )
    try:
        with np.load(path) as f:
            head = {k: np.asarray(f[k], dtype=np.float32) for k in f.files}
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not a readable .npz file ({e})") from None
    missing = [k for k in HEAD_ARRAYS if k not in head]
    if missing:
        raise ModelLoadError(f"{path}: missing arrays {missing}; expected {', '.join(HEAD_ARRAYS)}")
    w1, w2 = head["W1"], head["W2"]
    fits = (
        w1.ndim == 2 and w1.shape[0] == w1.shape[1] and w2.size == w1.shape[1] and w2.shape[0] == w1.shape[1]
        and head["b1"].shape == w1.shape[1:] and head["b2"].size == 1 and head["logit_bias"].size == 1
    )  # fmt: skip
    if not fits:
        raise ModelLoadError(
            f"{path}: head shapes W1 {w1.shape}, b1 {head['b1'].shape}, W2 {w2.shape}, b2 {head['b2'].shape}, "
            f"logit_bias {head['logit_bias'].shape} do not fit together (expected W1 [h, h], b1 [h], W2 [h, 1], "
            "b2 [1], logit_bias a scalar)"
        )
    head["W2"] = w2.reshape(w1.shape[1], 1)
    head["b2"] = head["b2"].reshape(1)
    head["logit_bias"] = head["logit_bias"].reshape(())
    return head


def _check_gguf(path: Path) -> dict[str, int]:
    """A clear error for a file that is not GGUF or is cut short, before llama.cpp sees it; rerankd's integer
    metadata keys."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e})") from None
    if magic != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        arch = reader.fields.get("general.architecture")
        name = bytes(arch.parts[arch.data[0]]).decode() if arch is not None else None
        meta = {k: int(f.parts[f.data[0]][0]) for k, f in reader.fields.items() if k == "rerankd.box_end_row"}
        size = path.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ModelLoadError(f"{path}: tensor {t.name} runs past the end of the file; the file is truncated")
    except ModelLoadError:
        raise
    except ImportError:
        return {}
    except Exception as e:  # gguf's reader raises assorted errors on damaged files
        raise ModelLoadError(f"{path}: a damaged GGUF file ({type(e).__name__}: {e}); download or convert it again") from None
    if name not in ("qwen2", "qwen2vl"):
        raise ModelLoadError(f"{path}: a GGUF of architecture {name!r}; rerankd serves jina-reranker-m0 (qwen2) GGUFs")
    return meta


def gguf_tag_matches(filename: str, tag: str) -> bool:
    """Does a .gguf file name carry the quantization tag (Q8_0, f16, ...), case-insensitively, as a whole word?
    (Tags contain underscores, so Q4_K does not match Q4_K_M.)"""
    return re.search(rf"(^|[-_.]){re.escape(tag)}([-.]|$)", filename.removesuffix(".gguf"), re.IGNORECASE) is not None
