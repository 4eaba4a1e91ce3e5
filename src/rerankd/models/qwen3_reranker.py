"""Qwen3-Reranker (Qwen/Qwen3-Reranker-0.6B, -4B, -8B): a Qwen3 decoder that answers "yes" or "no".

Reproduces the model card's transformers usage: the prompt is PREFIX + body + SUFFIX, each tokenized on its own,
the body `<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {doc}` truncated (from its end) to
max_length - len(PREFIX) - len(SUFFIX) tokens, and the score is exp(log_softmax([logit("no"), logit("yes")]))[1]
= sigmoid(logit("yes") - logit("no")) at the last position. Only the two LM-head rows of "yes" and "no" are read
from the checkpoint and used, never the whole vocabulary. The converted "seq-cls" checkpoints
(`Qwen3ForSequenceClassification`, whose one-row `score.weight` is lm_head[yes] - lm_head[no]) take the same
prompt, and their score is sigmoid(score(h_last)).

`Qwen3Backend` holds what this model and jina-reranker-v3 (rerankd.models.jina_v3) share: loading a Qwen3 decoder
checkpoint and running it over packed sequences.
"""

from __future__ import annotations

from collections.abc import Callable
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
from ..weights import Renames, read_rows
from .base import (
    LengthOptions,
    PreparedSequence,
    TorchTextBackend,
    Where,
    build_module,
    check_positions,
    cut_text,
    load_tokenizer,
    packed,
    token_id,
)
from .decoder import TextConfig, TextModel
from .layers import SHARED_KERNELS, Packing, prefix_units, shared_packing, to_device, use_cpu_gemm
from .windows import document_spans, document_to_tokenize

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
DEFAULT_MAX_LENGTH = 8192  # the model card's max_length
YES, NO = "yes", "no"  # the answer tokens, looked up by string (9693 and 2152 in the real vocabulary)

# The decoder under `model.`; the head's rows are read by name (read_rows), not loaded as module parameters.
WEIGHT_RENAMES: Renames = [
    ("lm_head.", None),  # the causal LM's head: only the rows of "yes" and "no" are read, by read_rows
    ("score.", None),  # the seq-cls head: read whole by read_rows
]


def body(instruction: str, query: str, doc: str) -> str:
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"


class Qwen3Ranker(nn.Module):
    """The Qwen3 decoder and a head of `rows` output rows on the last token. Attribute names match the checkpoint."""

    def __init__(self, cfg: TextConfig, rows: int):
        super().__init__()
        self.model = TextModel(cfg)
        # [rows, hidden]: not a state_dict entry; filled after loading from the checkpoint's rows (read_rows)
        self.register_buffer("head", torch.empty(rows, cfg.hidden_size), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, pack: Packing) -> torch.Tensor:
        h = self.model.hidden_at(self.model.embed_tokens(input_ids), positions, pack)  # [sequences, hidden]
        return F.linear(h, self.head).float()  # [sequences, rows]


class Qwen3Backend(TorchTextBackend):
    """Loading and packed forward of a Qwen3 decoder checkpoint; subclasses build the prompts and read the head."""

    architecture: str
    cfg: TextConfig
    supports_instruction: ClassVar[bool] = True

    @staticmethod
    def load_decoder(directory: Path, config: dict, make: Callable[[TextConfig], nn.Module], renames: Renames,
                     device: torch.device, dtype: torch.dtype, opts: LoadOptions) -> tuple[nn.Module, TextConfig, Tokenizer]:  # fmt: skip
        """The module `make(cfg)` (its decoder under `model`) with the checkpoint's weights, and the tokenizer."""
        arch = next(iter(config.get("architectures") or []), "?")
        if opts.quantize is not None:
            raise ModelLoadError(f"quantize={opts.quantize!r} is offered for text cross-encoders only, not for {arch}")
        try:
            cfg = TextConfig.from_qwen3(config)
        except (KeyError, ValueError) as e:
            raise ModelLoadError(f"{directory}/config.json: not a usable Qwen3 config ({e!r})") from None
        tokenizer = load_tokenizer(directory)
        model = build_module(lambda: make(cfg), directory, renames, device, dtype, opts)
        model.model.inv_freq = model.model.rope_inv_freq().to(device)
        return model, cfg, tokenizer

    def check(self, lengths: LengthOptions) -> None:
        check_positions(lengths, self.cfg.max_position_embeddings)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def packed_inputs(self, batch: list[PreparedSequence]) -> tuple[torch.Tensor, torch.Tensor, Packing]:
        """Token ids [tokens], RoPE positions [tokens] (0, 1, ... in each sequence), the Packing."""
        ids, pack = packed(batch, self.device, self.attn_backend)
        positions = to_device(torch.cat([torch.arange(s.length) for s in batch]), self.device)
        return ids, positions, pack


class Qwen3RerankerBackend(Qwen3Backend):
    """`Qwen3ForCausalLM` (tied or untied embeddings) and `Qwen3ForSequenceClassification` (seq-cls) checkpoints."""

    default_max_length: ClassVar[int] = DEFAULT_MAX_LENGTH
    compute_score_max_query_length: ClassVar[int | None] = None  # the reference cuts the body as a whole
    share_prefixes = False  # set at load: LoadOptions.share_prefixes, on the CPU kernels that take it

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefix = self.encode(PREFIX, add_special_tokens=False)  # as the model card tokenizes them
        self.suffix = self.encode(SUFFIX, add_special_tokens=False)

    @classmethod
    def load(
        cls, directory: Path, config: dict, device: torch.device, dtype: torch.dtype, opts: LoadOptions
    ) -> "Qwen3RerankerBackend":
        arch = next(a for a in config["architectures"] if a in ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification"))
        seq_cls = arch == "Qwen3ForSequenceClassification"
        if seq_cls and config.get("num_labels", len(config.get("id2label", {0: ""}))) != 1:
            raise ModelLoadError(f"{directory}/config.json: a seq-cls reranker has one output label; this config has "
                                 f"{config.get('num_labels', config.get('id2label'))}")  # fmt: skip
        model, cfg, tokenizer = cls.load_decoder(directory, config, lambda c: Qwen3Ranker(c, 1 if seq_cls else 2),
                                                 WEIGHT_RENAMES, device, dtype, opts)  # fmt: skip
        if seq_cls:
            head = read_rows(directory, "score.weight", [0])
        else:
            rows = [token_id(tokenizer, directory, YES), token_id(tokenizer, directory, NO)]
            tied = config.get("tie_word_embeddings", False)
            head = model.model.embed_tokens.weight[rows] if tied else read_rows(directory, "lm_head.weight", rows)
        if head.shape[1] != cfg.hidden_size:
            raise ModelLoadError(f"{directory}: the head has width {head.shape[1]}, the decoder {cfg.hidden_size}")
        model.head = head.to(device, dtype)
        gemm = use_cpu_gemm(model, opts.cpu_gemm, device, dtype)
        backend = cls(model, cfg, tokenizer, device, dtype, arch, gemm, opts.attention)
        backend.share_prefixes = (opts.share_prefixes and backend.attn_backend in SHARED_KERNELS
                                  and backend.device.type == "cpu")  # on CUDA: not measured yet
        return backend

    # ------------------------------------------------------------------ preparation (thread-safe, no model compute)

    def prepare(
        self, query: Item, doc: Item, lengths: LengthOptions, where: Where, images: ImagePolicy | None = None
    ) -> list[PreparedSequence]:
        q_text, d_text = self.text(query, where.query), self.text(doc, where.document)
        instruction = DEFAULT_INSTRUCTION if lengths.instruction is None else lengths.instruction
        room = lengths.max_length - len(self.prefix) - len(self.suffix)  # body tokens
        if room < 1:
            raise InputError(f"max_length={lengths.max_length} leaves no room beside the prompt's "
                             f"{len(self.prefix) + len(self.suffix)} template tokens; raise it", where.pair)  # fmt: skip
        # the body's room bounds the document's tokens (+1: the seam with "<Document>: " may merge one)
        d_text = document_to_tokenize(self.tokenizer, d_text, min(room, lengths.max_doc_length or room), lengths,
                                      where.pair, seam=1)  # fmt: skip
        if lengths.long_documents == "truncate" and lengths.max_query_length is None and lengths.max_doc_length is None:
            # the reference: the body tokenized whole and cut from its end
            return [self._sequence(self.encode(body(instruction, q_text, d_text))[:room])]

        if lengths.max_query_length is not None:
            q_text = cut_text(self.tokenizer, q_text, lengths.max_query_length)[0]
        head = body(instruction, q_text, "")
        enc = self.tokenizer.encode(head + d_text, add_special_tokens=True)
        ids, offsets = enc.ids, enc.offsets  # each read once: an Encoding builds a new list on every read
        split = next((i for i, (_, end) in enumerate(offsets) if end > len(head)), len(ids))  # first document token
        doc_ids = ids[split:]
        doc_room = room - split
        if lengths.max_doc_length is not None:
            doc_room = min(doc_room, lengths.max_doc_length)
        spans = document_spans(
            len(doc_ids), doc_room, lengths,
            lambda: [(max(a - len(head), 0), b - len(head)) for a, b in offsets[split:]], where.pair,
            taken=f"the prompt template takes {len(self.prefix) + len(self.suffix)} tokens and the instruction and "
            f"query {split}",
            room_is=f"max_length - {split} instruction and query tokens - {len(self.prefix) + len(self.suffix)} "
            "template tokens",
        )  # fmt: skip
        out = []
        for span in spans:
            seq = self._sequence(ids[:split] + doc_ids[span.start : span.end])
            seq.window = span.window
            out.append(seq)
        return out

    def packed_inputs(self, batch: list[PreparedSequence]) -> tuple[torch.Tensor, torch.Tensor, Packing]:
        """As Qwen3Backend's, with the prompt prefixes that several sequences share computed once (share_prefixes):
        the rows of layers.prefix_units' units."""
        if not self.share_prefixes:
            return super().packed_inputs(batch)
        units = prefix_units([s.input_ids.tolist() for s in batch])
        ids = to_device(torch.tensor([t for u in units for t in u.ids], dtype=torch.long), self.device)
        positions = to_device(torch.cat([torch.arange(u.start, u.start + len(u.ids)) for u in units]), self.device)
        return ids, positions, shared_packing(units, self.device, self.attn_backend)

    def _sequence(self, body_ids: list[int]) -> PreparedSequence:
        return PreparedSequence(input_ids=torch.tensor(self.prefix + body_ids + self.suffix, dtype=torch.long))

    # ------------------------------------------------------------------ compute

    @torch.inference_mode()
    def forward(self, batch: list[PreparedSequence]) -> torch.Tensor:
        """Relevance logits [len(batch)]: logit(yes) - logit(no), or the seq-cls head's logit; fp32 on the device."""
        ids, positions, pack = self.packed_inputs(batch)
        out = self.model(ids, positions, pack)  # [sequences, 1 or 2]
        return out[:, 0] - out[:, 1] if out.shape[1] == 2 else out[:, 0]
