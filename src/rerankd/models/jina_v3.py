"""jina-reranker-v3 (jinaai/jina-reranker-v3): listwise, on Qwen3-0.6B ("last but not late" interaction).

Reproduces `JinaForRanking.rerank` (Jina's modeling.py): the query is cut to 512 tokens and each document to 2048
(each tokenized alone; a text that reaches its limit is replaced by the decoding of its cut ids); documents go in
blocks of at most 125, a block closing when it is full or when what is left of its capacity (max_length - 2 x query
tokens, minus each document's tokens) is <= 2048; each block is ONE prompt (SYSTEM, the passages with an
`<|embed_token|>` after each, the query with a `<|rerank_token|>`), the special strings removed from the query and
the documents first. The final-norm hidden states at those tokens go through the projector (Linear, ReLU,
Linear); a block's documents score the cosine with its query vector. With several blocks, the query vector is the
average of the blocks' query vectors weighted by each block's max((1 + cosine) / 2), and every document's score
is its cosine with that vector. Scores lie in [-1, 1]; no sigmoid.

Attention is causal, so a document's vector depends on the documents before it in its block: the caller's order
is kept. rerankd differs from the reference in one way only: with long_documents="chunk" (rerank's default) a
document longer than max_doc_length is scored as several windows, each a passage of its own in the blocks, and
keeps its best score (README); long_documents="truncate" (compute_score's default) cuts it as the reference does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoadOptions
from ..errors import InputError
from ..inputs import Item
from ..inputs.images import ImagePolicy
from ..weights import Renames
from .base import LengthOptions, PreparedSequence, Where, Window, between_layers, cut_text, token_id
from .decoder import TextConfig, TextModel
from .layers import Packing, use_cpu_gemm
from .qwen3_reranker import Qwen3Backend
from .windows import document_spans, document_to_tokenize

SYSTEM = (
    "<|im_start|>system\nYou are a search relevance expert who can determine a ranking of the passages based on how "
    "relevant they are to the query. If the query is a question, how relevant a passage is depends on how well it "
    "answers the question. If not, try to analyze the intent of the query and assess how well each passage "
    "satisfies the intent. If an instruction is provided, you should follow the instruction when determining the "
    "ranking.<|im_end|>\n<|im_start|>user\n"
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DOC_TOKEN = "<|embed_token|>"  # after each passage: its vector (151670 in the real vocabulary)
QUERY_TOKEN = "<|rerank_token|>"  # after the query: its vector (151671)
MAX_QUERY_LENGTH = 512  # the reference's cuts
MAX_DOC_LENGTH = 2048
BLOCK_SIZE = 125  # documents per block at most
DEFAULT_MAX_LENGTH = 131072  # the real tokenizer's model_max_length, when tokenizer_config.json does not say

WEIGHT_RENAMES: Renames = [("lm_head.", None)]  # the reference replaces the LM head by Identity; never used


def prompt(query: str, passages: list[str], instruction: str | None) -> str:
    """One block's prompt, exactly as the reference builds it (the special strings already removed)."""
    text = (f"I will provide you with {len(passages)} passages, each indicated by a numerical identifier. "
            f"Rank the passages based on their relevance to query: {query}\n")  # fmt: skip
    if instruction:
        text += f"<instruct>\n{instruction}\n</instruct>\n"
    text += "\n".join(f'<passage id="{i}">\n{p}{DOC_TOKEN}\n</passage>' for i, p in enumerate(passages)) + "\n"
    text += f"<query>\n{query}{QUERY_TOKEN}\n</query>"
    return SYSTEM + text + SUFFIX


RESERVED = (QUERY_TOKEN, DOC_TOKEN)  # removed from the query and documents, in the reference's order
RESERVED_MESSAGE = f"contains the reserved token {DOC_TOKEN} or {QUERY_TOKEN}; remove it"


def holds_reserved(text: str) -> bool:
    return any(token in text for token in RESERVED)


def sanitize(text: str, param: str, subject: str = "") -> str:
    """The text with the special strings removed, as the reference does (one pass each); InputError naming `param`
    (and `subject` in the message) if that leaves one: a string built around another, which the reference would
    mis-score."""
    for token in RESERVED:
        text = text.replace(token, "")
    if holds_reserved(text):
        raise InputError(f"{subject} {RESERVED_MESSAGE}".lstrip(), param)
    return text


class JinaV3(nn.Module):
    """The Qwen3 decoder and the projector. Attribute names match the checkpoint."""

    def __init__(self, cfg: TextConfig, projector_dim: int = 512):
        super().__init__()
        self.model = TextModel(cfg)
        h = cfg.hidden_size
        self.projector = nn.Sequential(nn.Linear(h, h // 2, bias=False), nn.ReLU(), nn.Linear(h // 2, projector_dim, bias=False))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, pack: Packing, rows: list[int]):
        h = self.model.hidden_at(self.model.embed_tokens(input_ids), positions, pack, rows)  # [rows, hidden]
        return self.projector(h).float()  # [rows, projector_dim]


@dataclass
class Passage:
    slot: int  # the document's index in its list
    text: str
    tokens: int
    window: Window | None = None


@dataclass
class Block(PreparedSequence):
    """One block's prompt. `slots` are its passages' documents, in order; `windows` the passage windows; `rows` where
    each passage's <|embed_token|> lies, then the <|rerank_token|> (indices into input_ids); `index` the block's
    place in its list (the query vectors merge in that order)."""

    windows: tuple[Window | None, ...] = ()
    rows: tuple[int, ...] = ()
    index: int = 0


class JinaV3Backend(Qwen3Backend):
    architecture: ClassVar[str] = "JinaForRanking"
    listwise: ClassVar[bool] = True
    score_activation: ClassVar[str | None] = None  # the cosine is the score
    compute_score_max_query_length: ClassVar[int | None] = MAX_QUERY_LENGTH

    def __init__(self, *args, default_max_length: int, doc_token: int, query_token: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.default_max_length = default_max_length
        self.doc_token, self.query_token = doc_token, query_token

    @classmethod
    def load(cls, directory: Path, config: dict, device: torch.device, dtype: torch.dtype, opts: LoadOptions) -> "JinaV3Backend":
        model, cfg, tokenizer = cls.load_decoder(directory, config, JinaV3, WEIGHT_RENAMES, device, dtype, opts)
        gemm = use_cpu_gemm(model, opts.cpu_gemm, device, dtype)
        max_length = min(_model_max_length(directory) or DEFAULT_MAX_LENGTH, cfg.max_position_embeddings)
        return cls(model, cfg, tokenizer, device, dtype, cls.architecture, gemm, opts.attention,
                   default_max_length=max_length,
                   doc_token=token_id(tokenizer, directory, DOC_TOKEN),
                   query_token=token_id(tokenizer, directory, QUERY_TOKEN))  # fmt: skip

    def check(self, lengths: LengthOptions) -> None:
        super().check(lengths)
        if lengths.instruction is not None and holds_reserved(lengths.instruction):
            raise ValueError(f"instruction: {RESERVED_MESSAGE}")

    # ------------------------------------------------------------------ preparation (thread-safe, no model compute)

    def prepare(self, query: Item, doc: Item, lengths: LengthOptions, where: Where, images: ImagePolicy | None = None):
        raise TypeError("jina-reranker-v3 is listwise: the scheduler calls prepare_list")

    def prepare_list(
        self, query: Item, docs: list[Item], lengths: LengthOptions, wheres: list[Where], images: ImagePolicy | None
    ) -> tuple[list[PreparedSequence], dict[int, InputError]]:
        where = wheres[0]
        q_text = self.text(query, where.query)
        if lengths.max_query_length is not None:  # (cut_text tokenizes only a prefix of a long query)
            q_text, q_tokens = cut_text(self.tokenizer, q_text, lengths.max_query_length)
        else:
            q_tokens = len(self.encode(q_text))
        q_text = sanitize(q_text, where.query, "the query")
        max_doc = lengths.max_doc_length or MAX_DOC_LENGTH
        errors: dict[int, InputError] = {}
        passages: list[Passage] = []
        for i, (doc, w) in enumerate(zip(docs, wheres)):
            between_layers()  # a list of long documents takes seconds: it stops once nobody waits for it
            try:
                passages += self._passages(i, self.text(doc, w.document), max_doc, lengths, w)
            except InputError as e:
                errors[i] = e

        capacity = full = lengths.max_length - 2 * q_tokens  # the reference's rule, documents in the caller's order
        blocks: list[list[Passage]] = [[]]
        for p in passages:
            blocks[-1].append(p)
            capacity -= p.tokens
            if len(blocks[-1]) >= BLOCK_SIZE or capacity <= max_doc:
                blocks.append([])
                capacity = full
        return [self._block(q_text, b, lengths.instruction, k) for k, b in enumerate(blocks) if b], errors

    def _passages(self, slot: int, text: str, max_doc: int, lengths: LengthOptions, where: Where) -> list[Passage]:
        text = document_to_tokenize(self.tokenizer, text, max_doc, lengths, where.document)
        enc = self.tokenizer.encode(text, add_special_tokens=True)
        ids = enc.ids
        spans = document_spans(len(ids), max_doc, lengths, lambda: enc.offsets, where.document,
                               taken=f"max_doc_length={max_doc}", room_is="max_doc_length", grow="max_doc_length")  # fmt: skip
        if spans[0].window is None:  # one passage: the reference's cut
            passages = [Passage(slot, *cut_text(self.tokenizer, text, max_doc, ids))]
        else:
            passages = [Passage(slot, self.tokenizer.decode(ids[s.start : s.end], skip_special_tokens=False),
                                s.end - s.start, s.window) for s in spans]  # fmt: skip
        for p in passages:
            p.text = sanitize(p.text, where.document)
        return passages

    def _block(self, query: str, passages: list[Passage], instruction: str | None, index: int) -> Block:
        ids = self.encode(prompt(query, [p.text for p in passages], instruction))
        docs = [i for i, t in enumerate(ids) if t == self.doc_token]
        queries = [i for i, t in enumerate(ids) if t == self.query_token]
        if len(docs) != len(passages) or len(queries) != 1:
            raise RuntimeError(f"internal: a block of {len(passages)} passages tokenized to {len(docs)} passage tokens "
                               f"and {len(queries)} query tokens")  # fmt: skip
        return Block(input_ids=torch.tensor(ids, dtype=torch.long), slots=tuple(p.slot for p in passages),
                     windows=tuple(p.window for p in passages), rows=(*docs, queries[0]), index=index)  # fmt: skip

    # ------------------------------------------------------------------ compute

    @torch.inference_mode()
    def forward(self, batch: list[PreparedSequence]) -> list[torch.Tensor]:
        """Per block: its passages' projected vectors, then its query's: [passages + 1, projector_dim], fp32 CPU."""
        ids, positions, pack = self.packed_inputs(batch)
        rows = [start + r for start, b in zip(pack.offsets, batch) for r in b.rows]  # type: ignore[attr-defined]
        vectors = self.model(ids, positions, pack, rows).cpu()
        return list(vectors.split([len(b.rows) for b in batch]))  # type: ignore[attr-defined]

    def combine(self, outputs: list[tuple[PreparedSequence, torch.Tensor]]) -> list[tuple[int, float, Window | None]]:
        """Each passage's score: the cosine of its vector with the query vector merged over the list's blocks (one
        block: its own query vector)."""
        outputs = sorted(outputs, key=lambda o: o[0].index)  # type: ignore[attr-defined]
        queries, weights = [], []
        for _, out in outputs:
            docs, q = out[:-1], out[-1]
            cos = F.cosine_similarity(docs, q.expand_as(docs), dim=-1)
            queries.append(q)
            weights.append(((1.0 + cos) / 2.0).max())
        w = torch.stack(weights)
        merged = (torch.stack(queries) * w[:, None]).sum(0) / w.sum()  # np.average(queries, weights=w)
        scored = []
        for block, out in outputs:
            docs = out[:-1]
            scores = (docs @ merged) / (merged.norm() * docs.norm(dim=-1))
            scored += zip(block.slots, scores.tolist(), block.windows)  # type: ignore[attr-defined]
        return scored


def _model_max_length(directory: Path) -> int | None:
    """tokenizer_config.json's model_max_length (the reference's block capacity), if it gives one."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("model_max_length")
    return int(value) if isinstance(value, (int, float)) and value < 1e12 else None
