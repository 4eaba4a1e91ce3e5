"""Tiny random checkpoints in the real on-disk layouts, and the reference implementations tests compare against.

`make_tiny_checkpoint("jina-reranker-m0", path)` writes what `jinaai/jina-reranker-m0` holds, at toy size:
the flat transformers-4.4x qwen2_vl config.json (`architectures: ["JinaVLForRanking"]`), bf16 safetensors with
the real tensor names (`model.layers.N...`, `visual.blocks.N...`, `score.0/2`), a byte-level BPE tokenizer.json
with Qwen2's pre-tokenizer and special tokens, tokenizer_config.json and preprocessor_config.json. Weight scales
are chosen so that scores spread over (0.05, 0.95) and depend on the whole prompt, not only the last token.

`ReferenceM0` is the model card's `compute_score` rebuilt on transformers' own `Qwen2VLForConditionalGeneration`
and `Qwen2VLProcessor` (left padding, token 100 appended, sigmoid(head(h_last) - 2.65)); it needs the `dev` extra.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

MODEL_KINDS = ("jina-reranker-m0",)

# Qwen2's pre-tokenizer split pattern (tokenizer.json of Qwen2 / Qwen2-VL)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's special tokens, in their real order (ids 151643.. in the real vocabulary; right after the BPE vocab here)
QWEN2_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
CORPUS = [
    "**Document**:\n", "\n**Query**:\n", "slm markdown", "Organic skincare products for sensitive skin",
    "We present ReaderLM-v2, a compact 1.5 billion parameter language model designed for efficient web content "
    "extraction. Our model processes documents up to 512K tokens, transforming messy HTML into clean Markdown.",
    "During the California Gold Rush, some merchants made more money selling supplies to miners than the miners "
    "made finding gold.",
    "Die wichtigsten Beiträge unserer Arbeit sind zweifach: Erstens führen wir eine neuartige Datensynthese ein.",
    "数据提取么?为什么不用正则啊,你用正则不就全解决了么?", "绿茶富含儿茶素等抗氧化剂，可以降低心脏病风险。",
    "Le thé vert est riche en antioxydants et peut améliorer la fonction cérébrale.",
    "El precio del café ha aumentado un 20% este año.", "def rerank(query, documents):\n    return sorted(docs)\n",
    "Paris is the capital and most populous city of France. Berlin is the capital of Germany. 🙂🚀",
    "What is the capital of France? The quick brown fox jumps over the lazy dog 0123456789.",
]  # fmt: skip


def build_qwen2_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE `tokenizers.Tokenizer` shaped like Qwen2's, trained on a small built-in corpus."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers

    tok = Tokenizer(models.BPE(ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIALS])
    return tok


def _rand(shape: tuple[int, ...], std: float, g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g) * std


def _linear(name: str, out_f: int, in_f: int, g: torch.Generator, bias: bool = True, gain: float = 1.0) -> dict:
    t = {f"{name}.weight": _rand((out_f, in_f), gain / math.sqrt(in_f), g)}
    if bias:
        t[f"{name}.bias"] = _rand((out_f,), 0.1, g)
    return t


def _norm(name: str, dim: int, g: torch.Generator, bias: bool = False) -> dict:
    t = {f"{name}.weight": 1.0 + _rand((dim,), 0.1, g)}
    if bias:
        t[f"{name}.bias"] = _rand((dim,), 0.05, g)
    return t


def m0_tiny_config(vocab_size: int, first_special: int, **overrides: Any) -> dict:
    special = {t: first_special + i for i, t in enumerate(QWEN2_SPECIALS)}
    text = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, mrope_section=[2, 3, 3])  # fmt: skip
    vision = dict(depth=2, embed_dim=32, num_heads=2)
    for k, v in overrides.items():
        (vision if k.startswith("vision_") else text)[k.removeprefix("vision_")] = v
    section = text.pop("mrope_section")
    return {
        "architectures": ["JinaVLForRanking"],
        "model_type": "qwen2_vl",
        "attention_dropout": 0.0,
        "bos_token_id": special["<|endoftext|>"],
        "eos_token_id": special["<|im_end|>"],
        "vision_start_token_id": special["<|vision_start|>"],
        "vision_end_token_id": special["<|vision_end|>"],
        "vision_token_id": special["<|vision_pad|>"],
        "image_token_id": special["<|image_pad|>"],
        "video_token_id": special["<|video_pad|>"],
        "hidden_act": "silu",
        **text,
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "max_window_layers": text["num_hidden_layers"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.47.0",
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
        "vision_config": {
            "depth": vision["depth"],
            "embed_dim": vision["embed_dim"],
            "mlp_ratio": 4,
            "num_heads": vision["num_heads"],
            "in_chans": 3,
            "hidden_size": text["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": section},
    }


def m0_random_weights(cfg: dict, seed: int, include_lm_head: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // heads
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": _rand((v, h), 1.0, g)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        w |= _linear(f"{p}.self_attn.q_proj", heads * hd, h, g, gain=2.0)
        w |= _linear(f"{p}.self_attn.k_proj", kv * hd, h, g, gain=2.0)
        w |= _linear(f"{p}.self_attn.v_proj", kv * hd, h, g)
        w |= _linear(f"{p}.self_attn.o_proj", h, heads * hd, g, bias=False)
        w |= _linear(f"{p}.mlp.gate_proj", inter, h, g, bias=False)
        w |= _linear(f"{p}.mlp.up_proj", inter, h, g, bias=False)
        w |= _linear(f"{p}.mlp.down_proj", h, inter, g, bias=False)
        w |= _norm(f"{p}.input_layernorm", h, g) | _norm(f"{p}.post_attention_layernorm", h, g)
    w |= _norm("model.norm", h, g)
    vc = cfg["vision_config"]
    e, out = vc["embed_dim"], vc["hidden_size"]
    w["visual.patch_embed.proj.weight"] = _rand((e, 3, vc["temporal_patch_size"], 14, 14), 1 / math.sqrt(1176), g)
    for i in range(vc["depth"]):
        p = f"visual.blocks.{i}"
        w |= _norm(f"{p}.norm1", e, g, bias=True) | _norm(f"{p}.norm2", e, g, bias=True)
        w |= _linear(f"{p}.attn.qkv", 3 * e, e, g, gain=2.0) | _linear(f"{p}.attn.proj", e, e, g)
        w |= _linear(f"{p}.mlp.fc1", e * vc["mlp_ratio"], e, g) | _linear(f"{p}.mlp.fc2", e, e * vc["mlp_ratio"], g)
    w |= _norm("visual.merger.ln_q", e, g, bias=True)
    w |= _linear("visual.merger.mlp.0", 4 * e, 4 * e, g) | _linear("visual.merger.mlp.2", out, 4 * e, g, gain=3.0)
    w |= _linear("score.0", h, h, g, gain=1.5)
    w |= _linear("score.2", 1, h, g, gain=2.0)
    w["score.2.bias"] = torch.tensor([2.65])
    if include_lm_head:
        w["lm_head.weight"] = _rand((v, h), 0.02, g)
    return w


def _save_safetensors(weights: dict[str, torch.Tensor], path: Path, shards: int, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    names = sorted(weights)
    tensors = {k: weights[k].to(dtype).contiguous() for k in names}
    if shards <= 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, per = {}, math.ceil(len(names) / shards)
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s * per : (s + 1) * per]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map |= {k: fname for k in part}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def make_tiny_checkpoint(
    kind: str,
    path: str | Path,
    seed: int = 0,
    *,
    shards: int = 1,
    include_lm_head: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    **overrides: Any,
) -> Path:
    """Write a random checkpoint of `kind` in the real on-disk layout; returns its directory.

    `overrides` change config sizes (hidden_size=512, num_hidden_layers=8, vision_depth=4, ...), so the same
    function builds the mid-size checkpoints of the benchmarks.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_qwen2_tokenizer()
    first_special = tok.token_to_id(QWEN2_SPECIALS[0])
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    vocab_size = math.ceil(n_tokens / 128) * 128  # padded, as the real 151936 > 151665
    cfg = m0_tiny_config(vocab_size, first_special, **overrides)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save(str(path / "tokenizer.json"))
    tok.model.save(str(path))  # vocab.json, merges.txt, as the real repo has them
    added = {
        str(first_special + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False, "special": True}
        for i, t in enumerate(QWEN2_SPECIALS)
    }  # fmt: skip
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_prefix_space": False,
                "added_tokens_decoder": added,
                "bos_token": None,
                "clean_up_tokenization_spaces": False,
                "eos_token": "<|im_end|>",
                "errors": "replace",
                "model_max_length": 32768,
                "pad_token": "<|endoftext|>",
                "split_special_tokens": False,
                "tokenizer_class": "Qwen2Tokenizer",
                "unk_token": None,
            },
            indent=2,
        )
    )
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "min_pixels": 3136,
                "max_pixels": 12845056,
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2VLProcessor",
            },
            indent=2,
        )
    )
    _save_safetensors(m0_random_weights(cfg, seed, include_lm_head), path, shards, dtype)
    return path


# --------------------------------------------------------------------------------------------- references


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
