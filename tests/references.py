"""The reference implementations the parity tests and benchmarks compare against (they need the `dev` extra).

`ReferenceM0` is the model card's `compute_score` rebuilt on transformers' own `Qwen2VLForConditionalGeneration`
and `Qwen2VLProcessor` (left padding, token 100 appended, sigmoid(head(h_last) - 2.65)). `ReferenceCrossEncoder`
is transformers' XLMRobertaForSequenceClassification / BertForSequenceClassification on a checkpoint's weights.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from rerankd.models.xlm_roberta import WEIGHT_RENAMES
from rerankd.weights import rename, rename_back


class ReferenceM0:
    """The model card's `compute_score`, on transformers' own Qwen2-VL modules (the `dev` extra)."""

    SCORE_TOKEN_ID = 100
    LOGIT_BIAS = 2.65

    def __init__(self, model_dir: str | Path, min_pixels: int = 3136, max_pixels: int = 602112,
                 attn_implementation: str = "eager", device: str = "cpu", dtype: torch.dtype = torch.float32):  # fmt: skip
        import transformers
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

        transformers.logging.set_verbosity_error()
        model_dir = Path(model_dir)
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(
            model_dir, torch_dtype=dtype, attn_implementation=attn_implementation
        ).eval().to(device)
        self.device, self.dtype = device, dtype
        self.wants_mm_token_types = "mm_token_type_ids" in inspect.signature(self.model.model.forward).parameters
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        self.image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
        files = sorted(model_dir.glob("*.safetensors"))
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state |= {k: v for k, v in load_file(str(f)).items() if k.startswith("score.")}
        h = self.model.config.text_config.hidden_size if hasattr(self.model.config, "text_config") else \
            self.model.config.hidden_size  # fmt: skip
        self.score = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 1))
        self.score.load_state_dict({k.removeprefix("score."): v.float() for k, v in state.items()})
        self.score.to(device, dtype)

    @staticmethod
    def prompt(query: str, doc: str, query_type: str, doc_type: str) -> str:
        image = "<|vision_start|><|image_pad|><|vision_end|>"
        d = image if doc_type == "image" else doc
        q = image if query_type == "image" else query
        return f"**Document**:\n{d}\n**Query**:\n{q}"

    def process(self, texts: list[str], images: Any, max_length: int) -> dict[str, torch.Tensor]:
        """What `Qwen2VLProcessor.__call__` does for images (transformers 4.57): each <|image_pad|> becomes
        grid.prod() / merge**2 pads, then the texts are tokenized together (left padding, truncation)."""
        batch: dict[str, torch.Tensor] = {}
        texts = list(texts)
        if images is not None:
            image_inputs = self.image_processor(images=images, return_tensors="pt")
            batch |= dict(image_inputs)
            grids, index = image_inputs["image_grid_thw"], 0
            for i, text in enumerate(texts):
                while "<|image_pad|>" in text:
                    n = int(grids[index].prod()) // self.image_processor.merge_size**2
                    text = text.replace("<|image_pad|>", "<|placeholder|>" * n, 1)
                    index += 1
                texts[i] = text.replace("<|placeholder|>", "<|image_pad|>")
        batch |= dict(self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        return batch

    @torch.inference_mode()
    def compute_score(self, pairs, max_length: int = 10240, query_type: str = "text", doc_type: str = "text",
                      batch_size: int = 8, max_query_length: int = 512) -> list[float]:  # fmt: skip
        from transformers.image_utils import load_image

        tok = self.tokenizer
        max_doc_length = max(max_length - max_query_length, max_query_length)
        scores: list[float] = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            texts = []
            for q, d in chunk:
                if doc_type == "text":
                    ids = tok(d, truncation=True, max_length=max_doc_length)["input_ids"]
                    if len(ids) >= max_doc_length:
                        d = tok.decode(ids)
                texts.append(self.prompt(q, d, query_type, doc_type))
            doc_images = [load_image(d) for _, d in chunk] if doc_type == "image" else []
            query_images = [load_image(q) for q, _ in chunk] if query_type == "image" else []
            if doc_images and query_images:
                images: Any = [[d, q] for d, q in zip(doc_images, query_images)]
            else:
                images = doc_images or query_images or None
            batch = self.process(texts, images, max_length - 1)
            n = batch["input_ids"].shape[0]
            batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((n, 1), self.SCORE_TOKEN_ID)], dim=1)
            batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones((n, 1), dtype=torch.long)], 1)
            if "image_grid_thw" in batch and self.wants_mm_token_types:  # transformers >= 5.x: image tokens marked 1
                pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
                batch["mm_token_type_ids"] = (batch["input_ids"] == pad).long()
            batch = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                     for k, v in batch.items()}  # fmt: skip
            out = self.model.model(**batch, use_cache=False)
            logits = self.score(out.last_hidden_state[:, -1]).view(-1).float()
            scores += torch.sigmoid(logits - self.LOGIT_BIAS).tolist()
        return scores


class ReferenceCrossEncoder:
    """transformers' XLMRobertaForSequenceClassification / BertForSequenceClassification on the same weights,
    scoring as jina-reranker-v2's `compute_score` does: padded batches, longest-first truncation, sigmoid."""

    def __init__(self, model_dir: str | Path, attn_implementation: str = "eager"):
        import transformers
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, XLMRobertaConfig
        from transformers import XLMRobertaForSequenceClassification

        transformers.logging.set_verbosity_error()
        model_dir = Path(model_dir)
        cfg = json.loads((model_dir / "config.json").read_text())
        state: dict[str, torch.Tensor] = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            state |= {k: v.float() for k, v in load_file(str(f)).items()}
        bert = cfg["architectures"][0].startswith("Bert")
        keep = {k: v for k, v in cfg.items() if k not in ("architectures", "auto_map", "model_type")}
        if bert:
            config = BertConfig(**keep, num_labels=1)
            cls: Any = BertForSequenceClassification
        else:
            config = XLMRobertaConfig(**keep | {"num_labels": 1})
            cls = XLMRobertaForSequenceClassification
            if any(".mixer.Wqkv." in k for k in state):  # Jina's names -> the module's -> the standard ones
                jina = WEIGHT_RENAMES["jina"]  # only renames (no Part, no drop rule)
                state = rename_back({rename(k, jina): v for k, v in state.items()}, WEIGHT_RENAMES["xlm-roberta"])
        config._attn_implementation = attn_implementation
        if not state:  # an older layout (pytorch_model.bin, legacy names): transformers' own loading reads it
            self.model = cls.from_pretrained(model_dir, config=config).float().eval()
        else:
            self.model = cls(config).eval()
            state.pop("bert.embeddings.position_ids", None)
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            missing = [k for k in missing
                       if not k.endswith("position_ids") and "pooler" not in k or bert and "pooler" in k]  # fmt: skip
            if missing or unexpected:
                raise RuntimeError(f"reference: missing {missing}, unexpected {unexpected}")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    @torch.inference_mode()
    def compute_score(self, pairs, max_length: int = 1024, batch_size: int = 16, activation: bool = True) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(pairs), batch_size):
            chunk = [list(p) for p in pairs[start : start + batch_size]]
            batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            logits = self.model(**batch).logits.view(-1).float()
            scores += (torch.sigmoid(logits) if activation else logits).tolist()
        return scores


def _load_float(model_dir: Path, cls: Any, attn_implementation: str) -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    return cls.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation=attn_implementation).eval()


class ReferenceQwen3Reranker:
    """Qwen3-Reranker's model card usage, verbatim in substance, on transformers' own Qwen3ForCausalLM (or, for a
    converted seq-cls checkpoint, Qwen3ForSequenceClassification with sigmoid): prefix + body + suffix, the body
    truncated to max_length - len(prefix) - len(suffix), LEFT-padded batches, softmax over the "no"/"yes" logits."""

    PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
              "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
    SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    TASK = "Given a web search query, retrieve relevant passages that answer the query"

    def __init__(self, model_dir: str | Path, attn_implementation: str = "eager"):
        from transformers import AutoTokenizer, Qwen3ForCausalLM, Qwen3ForSequenceClassification

        model_dir = Path(model_dir)
        arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
        self.seq_cls = arch == "Qwen3ForSequenceClassification"
        cls = Qwen3ForSequenceClassification if self.seq_cls else Qwen3ForCausalLM
        self.model = _load_float(model_dir, cls, attn_implementation)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        self.yes = self.tokenizer.convert_tokens_to_ids("yes")
        self.no = self.tokenizer.convert_tokens_to_ids("no")
        self.prefix_tokens = self.tokenizer.encode(self.PREFIX, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(self.SUFFIX, add_special_tokens=False)

    def format_instruction(self, instruction: str | None, query: str, doc: str) -> str:
        # the model card's rule: only a missing instruction is the default ("" is an empty one)
        return f"<Instruct>: {self.TASK if instruction is None else instruction}\n<Query>: {query}\n<Document>: {doc}"

    @torch.inference_mode()
    def compute_score(self, pairs, instruction: str | None = None, max_length: int = 8192, batch_size: int = 16,
                      raw: bool = False) -> list[float]:  # fmt: skip
        scores: list[float] = []
        for start in range(0, len(pairs), batch_size):
            texts = [self.format_instruction(instruction, q, d) for q, d in pairs[start : start + batch_size]]
            inputs = self.tokenizer(texts, padding=False, truncation="longest_first", return_attention_mask=False,
                                    max_length=max_length - len(self.prefix_tokens) - len(self.suffix_tokens))
            for i, ids in enumerate(inputs["input_ids"]):
                inputs["input_ids"][i] = self.prefix_tokens + ids + self.suffix_tokens
            inputs = self.tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
            if self.seq_cls:
                logits = self.model(**inputs).logits[:, 0].float()
                scores += (logits if raw else torch.sigmoid(logits)).tolist()
                continue
            last = self.model(**inputs).logits[:, -1, :]
            pair = torch.stack([last[:, self.no], last[:, self.yes]], dim=1)
            if raw:
                scores += (pair[:, 1] - pair[:, 0]).tolist()
            else:
                scores += torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp().tolist()
        return scores


class ReferenceJinaV3:
    """jina-reranker-v3's `JinaForRanking.rerank` (Jina's modeling.py), rebuilt on transformers' own
    Qwen3ForCausalLM with the checkpoint's projector: the 512 / 2048 cuts with their decode round trip, the block
    capacity rule, one prompt per block (several blocks LEFT-padded into one batch, as its `_compute_multi_batch`
    does), final hidden states at the special tokens, projector, cosine, and the weighted query merge in numpy."""

    SPECIAL = {"query_embed_token": "<|rerank_token|>", "doc_embed_token": "<|embed_token|>"}

    def __init__(self, model_dir: str | Path, attn_implementation: str = "eager"):
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        model_dir = Path(model_dir)
        self.model = _load_float(model_dir, Qwen3ForCausalLM, attn_implementation)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        state: dict[str, torch.Tensor] = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            state |= {k: v.float() for k, v in load_file(str(f)).items() if k.startswith("projector.")}
        h = self.model.config.hidden_size
        self.projector = torch.nn.Sequential(torch.nn.Linear(h, h // 2, bias=False), torch.nn.ReLU(),
                                             torch.nn.Linear(h // 2, 512, bias=False))  # fmt: skip
        self.projector.load_state_dict({k.removeprefix("projector."): v for k, v in state.items()})
        self.doc_id = self.tokenizer.convert_tokens_to_ids("<|embed_token|>")
        self.query_id = self.tokenizer.convert_tokens_to_ids("<|rerank_token|>")

    def format_prompt(self, query: str, docs: list[str], instruction: str | None = None) -> str:
        for token in self.SPECIAL.values():
            query = query.replace(token, "")
            docs = [d.replace(token, "") for d in docs]
        prefix = ("<|im_start|>system\nYou are a search relevance expert who can determine a ranking of the passages "
                  "based on how relevant they are to the query. If the query is a question, how relevant a passage is "
                  "depends on how well it answers the question. If not, try to analyze the intent of the query and "
                  "assess how well each passage satisfies the intent. If an instruction is provided, you should "
                  "follow the instruction when determining the ranking.<|im_end|>\n<|im_start|>user\n")  # fmt: skip
        suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        prompt = (f"I will provide you with {len(docs)} passages, each indicated by a numerical identifier. "
                  f"Rank the passages based on their relevance to query: {query}\n")  # fmt: skip
        if instruction:
            prompt += f"<instruct>\n{instruction}\n</instruct>\n"
        prompt += "\n".join(f'<passage id="{i}">\n{d}<|embed_token|>\n</passage>' for i, d in enumerate(docs)) + "\n"
        prompt += f"<query>\n{query}<|rerank_token|>\n</query>"
        return prefix + prompt + suffix

    def truncate(self, query: str, documents: list[str], max_query_length: int, max_doc_length: int):
        docs, doc_lengths = [], []
        for doc in documents:
            ids = self.tokenizer(doc, truncation=True, max_length=max_doc_length)["input_ids"]
            if len(ids) >= max_doc_length:
                doc = self.tokenizer.decode(ids)
            doc_lengths.append(len(ids))
            docs.append(doc)
        q_ids = self.tokenizer(query, truncation=True, max_length=max_query_length)["input_ids"]
        if len(q_ids) >= max_query_length:
            query = self.tokenizer.decode(q_ids)
        return query, docs, doc_lengths, len(q_ids)

    def blocks(self, query: str, documents: list[str], max_length: int, max_query_length: int = 512,
               max_doc_length: int = 2048, block_size: int = 125) -> tuple[str, list[list[str]]]:  # fmt: skip
        query, docs, doc_lengths, query_length = self.truncate(query, documents, max_query_length, max_doc_length)
        capacity = max_length - 2 * query_length
        blocks, block = [], []
        for length, doc in zip(doc_lengths, docs):
            block.append(doc)
            capacity -= length
            if len(block) >= block_size or capacity <= max_doc_length:
                blocks.append(block)
                block = []
                capacity = max_length - 2 * query_length
        if block:
            blocks.append(block)
        return query, blocks

    @torch.inference_mode()
    def forward(self, prompts: list[str]):
        """Left-padded batch -> per prompt (doc vectors [n, 512], query vector [1, 512], cosine scores [n])."""
        batch = self.tokenizer(text=prompts, padding=True, padding_side="left", return_tensors="pt")
        # JinaForRanking's hidden_states[-1] with its lm_head = Identity: the decoder's final-norm output
        hidden = self.model.model(**batch, use_cache=False).last_hidden_state
        out = []
        for ids, h in zip(batch["input_ids"], hidden):
            d = self.projector(h[ids == self.doc_id])
            q = self.projector(h[ids == self.query_id])
            out.append((d, q, torch.nn.functional.cosine_similarity(d, q.expand_as(d), dim=-1)))
        return out

    def rerank(self, query: str, documents: list[str], max_length: int = 131072, instruction: str | None = None,
               **limits: int) -> list[float]:  # fmt: skip
        """Each document's relevance_score, in input order."""
        import numpy as np

        query, blocks = self.blocks(query, documents, max_length, **limits)
        outs = self.forward([self.format_prompt(query, b, instruction) for b in blocks])
        doc_embeds, query_embeds, weights = [], [], []
        for d, q, s in outs:
            doc_embeds.extend(d.float().numpy())
            query_embeds.append(q[0].float().numpy())
            weights.append(((1.0 + s.float().numpy()) / 2.0).max())
        merged = np.average(np.array(query_embeds), axis=0, weights=weights)
        doc_embeds = np.array(doc_embeds)
        scores = np.dot(merged, doc_embeds.T) / (np.linalg.norm(merged) * np.linalg.norm(doc_embeds, axis=1))
        return [float(x) for x in scores]
