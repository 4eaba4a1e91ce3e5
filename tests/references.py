"""The reference implementations the parity tests and benchmarks compare against (they need the `dev` extra).

`ReferenceM0` is the model card's `compute_score` rebuilt on transformers' own `Qwen2VLForConditionalGeneration`
and `Qwen2VLProcessor` (left padding, token 100 appended, sigmoid(head(h_last) - 2.65)). `ReferenceCrossEncoder`
is transformers' XLMRobertaForSequenceClassification / BertForSequenceClassification on a checkpoint's weights.
"""

from __future__ import annotations

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
                 attn_implementation: str = "eager"):  # fmt: skip
        import transformers
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

        transformers.logging.set_verbosity_error()
        model_dir = Path(model_dir)
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(
            model_dir, torch_dtype=torch.float32, attn_implementation=attn_implementation
        ).eval()
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
            out = self.model.model(**batch, use_cache=False)
            logits = self.score(out.last_hidden_state[:, -1]).view(-1)
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
        self.model = cls(config).eval()
        state.pop("bert.embeddings.position_ids", None)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids") and "pooler" not in k or bert and "pooler" in k]
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
