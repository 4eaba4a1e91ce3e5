"""Text cross-encoders: XLM-RoBERTa (jina-reranker-v2, bge-reranker) and BERT (ms-marco MiniLM) rerankers.

Reproduces transformers' `XLMRobertaForSequenceClassification` and `BertForSequenceClassification` with one
label: a post-norm Transformer encoder over `<s> query </s></s> document </s>` (BERT: `[CLS] q [SEP] d [SEP]`
with token types 0 / 1), and a head on the first token, dense -> tanh -> out_proj (BERT calls the first layer
its pooler). The relevance logit is that output; scores are sigmoid(logit).

The module uses the names of Jina's flash-attention implementation (fused `mixer.Wqkv`, `norm1`, `mlp.fc1`, ...);
standard Hugging Face names are mapped onto them by the rename tables below, q, k and v concatenated into Wqkv.
Sequences are packed without padding; the last layer computes only the first token of each sequence, which is
all the head reads.
"""

from __future__ import annotations

import functools
import json
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from ..config import LoadOptions
from ..errors import InputError, ModelLoadError
from ..inputs import Item
from ..inputs.images import ImagePolicy
from ..weights import Part, Renames, tensor_names
from .base import (PREFIX_CHARS_PER_TOKEN, LengthOptions, PreparedSequence, ReleasingTokenizer, TorchTextBackend, Where,
                   between_layers, build_module, check_positions, load_tokenizer, packed, text_prefix)
from . import cpu_kernels
from .layers import (Packing, linear, product, row_attention, rowwise, to_device, use_cpu_gemm,
                     varlen_attention)
from .windows import document_spans, document_to_tokenize

DEFAULT_MAX_LENGTH = 1024
TRUNCATING_TOKENIZERS = 4  # tokenizer copies kept, one per recent max_length of compute_score calls
ACTIVATIONS = {
    "gelu": functools.partial(F.gelu, approximate="none"),
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


BERT_SPECIAL_NAMES = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                      "mask_token": "[MASK]"}  # BertTokenizer's defaults  # fmt: skip


def wordpiece_tokenizer(vocab: dict[str, int], settings: dict | None = None) -> Tokenizer:
    """BERT's fast tokenizer from its WordPiece vocabulary, as transformers converts the slow one (BertConverter):
    BERT's normalizer (lowercase, accents and CJK spacing as `settings`, a tokenizer_config.json, says, with
    BertTokenizer's defaults), its pre-tokenizer, `[CLS] A [SEP] B [SEP]` with token types 0 / 1, the special tokens
    kept whole."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    settings = settings or {}
    special = {k: _token_text(settings.get(k, default)) for k, default in BERT_SPECIAL_NAMES.items()}
    lowercase = settings.get("do_lower_case", True)
    tok = Tokenizer(models.WordPiece(vocab, unk_token=special["unk_token"], continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))  # fmt: skip
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=lowercase,
                                                handle_chinese_chars=settings.get("tokenize_chinese_chars", True),
                                                strip_accents=settings.get("strip_accents"))  # fmt: skip
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    extra = [_token_text(t) for t in settings.get("additional_special_tokens") or []]
    tok.add_special_tokens([t for t in [*special.values(), *extra] if t in vocab])
    cls, sep = special["cls_token"], special["sep_token"]
    missing = [t for t in (cls, sep) if t not in vocab]
    if missing:
        raise ModelLoadError(f"the WordPiece vocabulary has no {missing}: not a BERT tokenizer")
    tok.post_processor = processors.TemplateProcessing(single=f"{cls}:0 $A:0 {sep}:0",
                                                       pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
                                                       special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])  # fmt: skip
    return tok


def _token_text(token) -> str:
    """A special token as tokenizer_config.json holds it: a string, or an AddedToken's fields."""
    return token["content"] if isinstance(token, dict) else str(token)


def vocab_txt_tokenizer(directory: Path) -> Tokenizer | None:
    """For a BERT checkpoint that has no tokenizer.json (older repos carry only the slow tokenizer's vocab.txt):
    the fast tokenizer transformers would make of it; None without vocab.txt."""
    path = directory / "vocab.txt"
    if not path.is_file():
        return None
    vocab: dict[str, int] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        vocab[line] = i  # as transformers' load_vocab: the line number, a later duplicate winning
    settings = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter's settings win, as in transformers
        if (directory / name).is_file():
            settings |= json.loads((directory / name).read_text())
    return wordpiece_tokenizer(vocab, settings)


def _hf_layer(prefix: str) -> Renames:
    """Standard Hugging Face encoder names under `prefix` (roberta. or bert.) <-> this module's names."""
    layer, out = prefix + "encoder.layer.{n}.", "encoder.layers.{n}."
    return [
        (layer + "attention.self.query.", Part(out + "mixer.Wqkv.", 0, 3)),
        (layer + "attention.self.key.", Part(out + "mixer.Wqkv.", 1, 3)),
        (layer + "attention.self.value.", Part(out + "mixer.Wqkv.", 2, 3)),
        (layer + "attention.output.dense.", out + "mixer.out_proj."),
        (layer + "attention.output.LayerNorm.", out + "norm1."),
        (layer + "intermediate.dense.", out + "mlp.fc1."),
        (layer + "output.dense.", out + "mlp.fc2."),
        (layer + "output.LayerNorm.", out + "norm2."),
        (f"{prefix}embeddings.LayerNorm.", "emb_ln."),
        (f"{prefix}embeddings.position_ids", None),  # buffers older checkpoints carry
        (f"{prefix}embeddings.token_type_ids", None),
        (f"{prefix}embeddings.", "embeddings."),
    ]


# checkpoint name template -> module name template (None: dropped on purpose), read both ways; see rerankd.weights
WEIGHT_RENAMES: dict[str, Renames] = {
    "jina": [  # Jina's flash implementation (jina-reranker-v2): already this module's names under roberta.
        ("classifier.", "classifier."),  # the head is outside roberta.
        ("roberta.", ""),
    ],
    "xlm-roberta": [
        *_hf_layer("roberta."),
        ("roberta.pooler.", None),  # present in some checkpoints, unused by the classification head
    ],
    "bert": [
        *_hf_layer("bert."),
        ("bert.pooler.dense.", "classifier.dense."),  # BERT's head: pooler dense + tanh, then classifier
        ("classifier.weight", "classifier.out_proj.weight"),
        ("classifier.bias", "classifier.out_proj.bias"),
    ],
}


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    position_offset: int  # RoBERTa: padding_idx + 1 (positions start after the pad id); BERT: 0

    @classmethod
    def from_dict(cls, d: dict, family: str) -> "EncoderConfig":
        if d.get("num_labels", len(d.get("id2label", {0: ""}))) != 1:
            raise ValueError(f"a reranker has one output label; this config has {d.get('num_labels', d.get('id2label'))}")
        if d.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (supported: {sorted(ACTIVATIONS)})")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {d['position_embedding_type']!r} is not supported")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            intermediate_size=d["intermediate_size"],
            hidden_act=d.get("hidden_act", "gelu"),
            max_position_embeddings=d["max_position_embeddings"],
            type_vocab_size=d.get("type_vocab_size", 2),
            layer_norm_eps=d.get("layer_norm_eps", 1e-12),
            position_offset=d.get("pad_token_id", 1) + 1 if family != "bert" else 0,
        )

    @property
    def max_tokens(self) -> int:
        """Longest sequence the position table allows."""
        return self.max_position_embeddings - self.position_offset


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(ids) + self.token_type_embeddings(types) + self.position_embeddings(positions)


class SelfAttention(nn.Module):
    """Named `mixer`. Bidirectional attention within each packed sequence."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.Wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, pack: Packing, first: torch.Tensor | None) -> torch.Tensor:
        """The attention mix [tokens or sequences, hidden], before out_proj (applied with the row-wise rest)."""
        n, h = x.shape
        if first is None or not isinstance(self.Wqkv, nn.Linear):  # (an int8 Wqkv is not split)
            qkv = self.Wqkv(x).view(n, 3, self.heads, self.head_dim)  # [tokens, 3, heads, head_dim]
            q, k, v = qkv.unbind(1)  # each [tokens, heads, head_dim]
            if first is None:
                o = varlen_attention(q, k, v, pack, causal=False)  # [tokens, heads, head_dim]
            else:
                o = row_attention(q[first], k, v, pack)  # [sequences, heads, head_dim]
        else:  # only the first token of each sequence is needed: its query, every token's key and value
            q = linear(x[first], self.Wqkv, slice(None, h)).view(-1, self.heads, self.head_dim)  # [sequences, ...]
            kv = linear(x, self.Wqkv, slice(h, None)).view(n, 2, self.heads, self.head_dim)  # [tokens, 2, heads, head_dim]
            o = row_attention(q, kv[:, 0], kv[:, 1], pack)  # [sequences, heads, head_dim]
        return o.reshape(o.shape[0], -1)


class MLP(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.hidden_act = cfg.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    """Post-norm: x = norm1(x + attn(x)); x = norm2(x + mlp(x))."""

    elementwise = "torch"  # 'avx512': GELU and the add + LayerNorm on rerankd's CPU kernels (use_cpu_elementwise)

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.mixer = SelfAttention(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, pack: Packing, first: torch.Tensor | None = None) -> torch.Tensor:
        o = self.mixer(x, pack, first)
        return rowwise(self._rowwise, x if first is None else x[first], o)

    def _rowwise(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Everything after attention treats each token on its own. On the CPU kernels each product's bias is added
        in the one pass after it: GELU's, or the residual add and LayerNorm's."""
        if self.elementwise != "avx512" or self.mlp.hidden_act != "gelu":  # (the kernel has the exact GELU only)
            x = self.norm1(x + self.mixer.out_proj(o))
            return self.norm2(x + self.mlp(x))
        h, b = product(o, self.mixer.out_proj)
        x = cpu_kernels.layer_norm(h, self.norm1, b, residual=x)
        h, b = product(x, self.mlp.fc1)
        h, b = product(cpu_kernels.bias_gelu_(h, b), self.mlp.fc2)
        return cpu_kernels.layer_norm(h, self.norm2, b, residual=x)


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.num_hidden_layers)])


class ClassificationHead(nn.Module):
    """dense -> tanh -> out_proj on the first token (RoBERTa's classifier; BERT's pooler + classifier)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(x)))


class CrossEncoder(nn.Module):
    """Attribute names match Jina's flash implementation (after its `roberta.` prefix)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.emb_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = Encoder(cfg)
        self.classifier = ClassificationHead(cfg)

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, types: torch.Tensor, pack: Packing
    ) -> torch.Tensor:
        """Packed sequences ([tokens] each) -> one logit per sequence [sequences]."""
        x = self.emb_ln(self.embeddings(ids, positions, types))  # [tokens, hidden]
        first = to_device(torch.tensor(pack.offsets[:-1]), x.device)
        layers = self.encoder.layers
        for layer in layers[:-1]:
            between_layers()
            x = layer(x, pack)
        x = layers[-1](x, pack, first=first)  # [sequences, hidden]
        return self.classifier(x).squeeze(-1)


# ------------------------------------------------------------------------------------------------ backend


# architecture -> its family: the key of WEIGHT_RENAMES for its standard names, and what EncoderConfig reads
FAMILIES = {
    "XLMRobertaForSequenceClassification": "xlm-roberta",
    "RobertaForSequenceClassification": "xlm-roberta",
    "BertForSequenceClassification": "bert",
}


class CrossEncoderBackend(TorchTextBackend):
    """Serves the architectures of FAMILIES; the registry maps each name here."""

    compute_score_max_query_length: ClassVar[int | None] = None  # the reference truncates the pair longest-first

    def __init__(self, model: nn.Module, cfg: EncoderConfig, tokenizer: Tokenizer, device, dtype, arch: str,
                 cpu_gemm: str, attention: str = "auto"):  # fmt: skip
        super().__init__(model, cfg, tokenizer, device, dtype, arch, cpu_gemm, attention)
        self.default_max_length = min(DEFAULT_MAX_LENGTH, cfg.max_tokens)  # 1024, or 512 for BERT-size tables
        self.pair_specials = tokenizer.post_processor.num_special_tokens_to_add(True) if tokenizer.post_processor else 0
        self._truncating: dict[int, Tokenizer] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls, directory: Path, config: dict, device: torch.device, dtype: torch.dtype, opts: LoadOptions
    ) -> "CrossEncoderBackend":
        arch = next(a for a in config.get("architectures", []) if a in FAMILIES)
        family = FAMILIES[arch]
        try:
            cfg = EncoderConfig.from_dict(config, family)
        except (KeyError, ValueError) as e:
            raise ModelLoadError(f"{directory}/config.json: not a usable {arch} reranker config ({e})") from None
        tokenizer = load_tokenizer(directory, " (and no vocab.txt of a BERT checkpoint): save a fast tokenizer with "
                                   "transformers' AutoTokenizer.from_pretrained(...).save_pretrained(...)",
                                   fallback=vocab_txt_tokenizer if family == "bert" else None)  # fmt: skip
        renames = WEIGHT_RENAMES["jina"] if _jina_names(directory) else WEIGHT_RENAMES[family]
        model = build_module(lambda: CrossEncoder(cfg), directory, renames, device, dtype, opts)
        if opts.quantize is not None:
            model = quantize_model(model, opts.quantize, device)
        gemm = use_cpu_gemm(model, opts.cpu_gemm, device, dtype)
        return cls(model, cfg, tokenizer, device, dtype, arch, gemm, opts.attention)

    # ------------------------------------------------------------------ preparation (thread-safe, no model compute)

    def check(self, lengths: LengthOptions) -> None:
        check_positions(lengths, self.cfg.max_tokens)

    def _truncating_tokenizer(self, max_length: int) -> ReleasingTokenizer:
        """A copy of the tokenizer that truncates pairs longest-first to max_length, as transformers does.

        The tokenizers library's own truncation (its algorithm has changed between versions, so it is used rather
        than rewritten); copies, because changing the shared tokenizer's settings is not thread-safe. The few most
        recent max_length values are kept.
        """
        with self._lock:
            tok = self._truncating.pop(max_length, None)
            if tok is None:
                tok = ReleasingTokenizer(Tokenizer.from_str(self.tokenizer.to_str()))
                tok.no_padding()
                tok.enable_truncation(max_length, strategy="longest_first")
            self._truncating[max_length] = tok  # most recent last
            while len(self._truncating) > TRUNCATING_TOKENIZERS:
                self._truncating.pop(next(iter(self._truncating)))
            return tok

    def prepare(
        self, query: Item, doc: Item, lengths: LengthOptions, where: Where, images: ImagePolicy | None = None
    ) -> list[PreparedSequence]:
        q_text, d_text = self.text(query, where.query), self.text(doc, where.document)
        max_length = lengths.max_length  # within the positions (check)
        if max_length < self.pair_specials + 2:
            raise InputError(f"max_length={max_length} leaves no room for text; raise it", where.pair)
        if lengths.long_documents == "truncate" and lengths.max_query_length is None and lengths.max_doc_length is None:
            # longest-first keeps at most max_length document tokens, and which text is cut first depends only on
            # which is longer: a prefix of max_length + 1 tokens changes neither while the query is shorter
            if len(d_text) > (max_length + 1) * PREFIX_CHARS_PER_TOKEN and len(
                    self.tokenizer.encode(q_text, add_special_tokens=False).ids) < max_length:  # fmt: skip
                d_text = text_prefix(self.tokenizer, d_text, max_length + 1)
            enc = self._truncating_tokenizer(max_length).encode(q_text, d_text)
            return [self._sequence(enc.ids, enc.type_ids)]

        if lengths.max_query_length is not None:  # only its first max_query_length tokens are kept
            q_text = text_prefix(self.tokenizer, q_text, lengths.max_query_length + 1)
        q = self.tokenizer.encode(q_text, add_special_tokens=False)
        if lengths.max_query_length is not None and len(q.ids) > lengths.max_query_length:
            q.truncate(lengths.max_query_length)
        room = max_length - len(q.ids) - self.pair_specials  # document tokens per window
        if lengths.max_doc_length is not None:
            room = min(room, lengths.max_doc_length)
        d_text = document_to_tokenize(self.tokenizer, d_text, room, lengths, where.pair)
        d = self.tokenizer.encode(d_text, add_special_tokens=False)
        d_ids = d.ids
        spans = document_spans(
            len(d_ids), room, lengths, lambda: d.offsets, where.pair, taken=f"the query takes {len(q.ids)} tokens",
            room_is=f"max_length - query tokens - {self.pair_specials} special tokens",
        )  # fmt: skip
        if spans[0].end < len(d_ids):
            d.truncate(spans[0].end)
        first = self.tokenizer.post_process(q, d, add_special_tokens=True)  # the template around the first span
        if len(spans) == 1:
            return [self._sequence(first.ids, first.type_ids)]
        seg = first.sequence_ids
        lo = seg.index(1)
        hi = len(seg) - seg[::-1].index(1)  # the document's tokens are first.ids[lo:hi]
        out = []
        for span in spans:
            ids = first.ids[:lo] + d_ids[span.start : span.end] + first.ids[hi:]
            types = first.type_ids[:lo] + first.type_ids[lo : lo + 1] * (span.end - span.start) + first.type_ids[hi:]
            seq = self._sequence(ids, types)
            seq.window = span.window
            out.append(seq)
        return out

    def _sequence(self, ids: list[int], type_ids: list[int]) -> PreparedSequence:
        input_ids = torch.tensor(ids, dtype=torch.long)
        if self.cfg.position_offset:  # RoBERTa's create_position_ids_from_input_ids, as Jina's code also numbers them
            # a literal "<pad>" in the text is the pad id: it takes position padding_idx and later tokens count on
            # without it (a plain run shifted every later position by one: scores 0.01-0.14 off)
            real = input_ids.ne(self.cfg.position_offset - 1)
            positions = torch.cumsum(real, 0) * real + (self.cfg.position_offset - 1)
        else:
            positions = torch.arange(len(ids))
        types = torch.tensor(type_ids, dtype=torch.long) if self.cfg.type_vocab_size > 1 else None
        return PreparedSequence(input_ids=input_ids, positions=positions, token_types=types)

    # ------------------------------------------------------------------ compute

    @torch.inference_mode()
    def forward(self, batch: list[PreparedSequence]) -> torch.Tensor:
        """Relevance logits [len(batch)] in fp32, on the device (the scheduler reads them back)."""
        ids, pack = packed(batch, self.device, self.attn_backend)
        positions = to_device(torch.cat([s.positions for s in batch]), self.device)
        if self.cfg.type_vocab_size > 1:
            types = to_device(torch.cat([s.token_types for s in batch]), self.device)
        else:
            types = torch.zeros_like(ids)
        return self.model(ids, positions, types, pack).float()


def _jina_names(directory: Path) -> bool:
    """Whether the checkpoint uses Jina's flash-implementation names (looks for its fused Wqkv)."""
    return any(".mixer.Wqkv." in name for name in tensor_names(directory))


def quantize_model(model: CrossEncoder, mode: str, device: torch.device) -> CrossEncoder:
    """int8 dynamic quantization of the Linear layers (CPU): weights int8, activations quantized per batch."""
    if mode != "int8":
        raise ValueError(f"quantize={mode!r} is not supported; use 'int8' (CPU) or leave it unset")
    if device.type != "cpu":
        raise ValueError(f"quantize='int8' runs on the CPU only; this model is on {device}")
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao is deprecated in favour of torchao, but still the one built in
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
