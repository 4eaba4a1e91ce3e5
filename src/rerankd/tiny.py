"""Tiny random checkpoints in the real on-disk layouts (rerankd make-tiny-model; the tests and benchmarks).

`make_tiny_checkpoint("jina-reranker-m0", path)` writes what `jinaai/jina-reranker-m0` holds, at toy size:
the flat transformers-4.4x qwen2_vl config.json (`architectures: ["JinaVLForRanking"]`), bf16 safetensors with
the real tensor names (`model.layers.N...`, `visual.blocks.N...`, `score.0/2`), a byte-level BPE tokenizer.json
with Qwen2's pre-tokenizer and special tokens, tokenizer_config.json and preprocessor_config.json. Weight scales
are chosen so that scores spread over (0.05, 0.95) and depend on the whole prompt, not only the last token.
The cross-encoders' weights are drawn in the module's names and written through the backward direction of the
rename table that loads them (`rerankd.weights.rename_back`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .models.base import QWEN2_SPLIT
from .models.xlm_roberta import WEIGHT_RENAMES, wordpiece_tokenizer
from .weights import rename_back

MODEL_KINDS = ("jina-reranker-m0", "jina-reranker-v2", "bert-cross-encoder", "qwen3-reranker", "qwen3-reranker-seq-cls",
               "jina-reranker-v3")  # fmt: skip
QWEN3_KINDS = ("qwen3-reranker", "qwen3-reranker-seq-cls", "jina-reranker-v3")

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


def build_qwen2_tokenizer(vocab_size: int = 1000, corpus: list[str] = CORPUS):
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
    tok.train_from_iterator(corpus * 4, trainer)
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
    function builds the mid-size checkpoints of the benchmarks. jina-reranker-v2 also takes naming="jina" (the
    real checkpoint's flash-implementation names, the default) or "hf" (standard XLM-RoBERTa names);
    qwen3-reranker takes tie_word_embeddings=False (the 4B / 8B layout: an lm_head of its own; default True, the
    0.6B's); weight_std=0.02 draws every matrix at that scale (realistic, for full-size benchmarks).
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if kind in QWEN3_KINDS:
        return _make_tiny_qwen3(kind, path, seed, shards=shards, dtype=dtype, **overrides)
    if kind != "jina-reranker-m0":
        return _make_tiny_encoder(kind, path, seed, shards=shards, dtype=dtype, **overrides)
    if overrides.get("naming") is not None:
        raise ValueError("naming= applies to jina-reranker-v2 only")
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


# ------------------------------------------------------------------------------------ text cross-encoders

XLMR_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, as in XLM-RoBERTa; <mask> is the last id
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_xlmr_tokenizer(vocab_size: int = 600):
    """A Unigram `tokenizers.Tokenizer` shaped like XLM-RoBERTa's (jina-reranker-v2, bge-reranker): Metaspace
    pre-tokenizer, `<s> A </s></s> B </s>` pairs, <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    # the real one applies sentencepiece's precompiled NFKC map, then collapses runs of spaces
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    # every character of the corpus, then its most frequent words and word pieces, each scored by its log frequency
    counts = _piece_counts(normalizer, pre_tokenizer)
    chars = sorted(p for p in counts if len(p) == 1)
    longer = sorted((p for p in counts if len(p) > 1), key=lambda p: (-counts[p] * len(p), p))
    pieces = chars + longer[: max(0, vocab_size - len(XLMR_SPECIALS) - 1 - len(chars))]
    total = sum(counts[p] for p in pieces)
    vocab = [(t, 0.0) for t in XLMR_SPECIALS] + [(p, math.log(counts[p] / total)) for p in pieces]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.add_special_tokens([AddedToken(t, special=True) for t in XLMR_SPECIALS])
    tok.add_special_tokens([AddedToken("<mask>", special=True, lstrip=True, normalized=False)])
    # sep and cls positionally: tokenizers 0.23 no longer takes them by keyword
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=True)
    return tok


def build_bert_tokenizer(vocab_size: int = 600):
    """A WordPiece `tokenizers.Tokenizer` shaped like BERT's uncased one (ms-marco MiniLM cross-encoders):
    `[CLS] A [SEP] B [SEP]` with token types 0 / 1, [PAD]=0; built as rerankd builds one from a vocab.txt."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                            lowercase=True)  # fmt: skip
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # every character of the corpus, as a word's start and as a ##continuation, then its most frequent words and
    # word pieces
    counts = _piece_counts(normalizer, pre_tokenizer, continuation="##")
    chars = sorted({p.removeprefix("##") for p in counts if len(p.removeprefix("##")) == 1})
    singles = chars + ["##" + c for c in chars]
    longer = sorted((p for p in counts if len(p.removeprefix("##")) > 1), key=lambda p: (-counts[p] * len(p), p))
    pieces = list(BERT_SPECIALS) + singles + longer[: max(0, vocab_size - len(BERT_SPECIALS) - len(singles))]
    return wordpiece_tokenizer({p: i for i, p in enumerate(pieces)})


def _piece_counts(normalizer, pre_tokenizer, continuation: str = "") -> dict[str, int]:
    """A deterministic "training" for the toy vocabularies (tokenizers' Unigram and WordPiece trainers are not:
    their ties follow a hash map's order, seeded per call, huggingface/tokenizers#1794): how often each piece of up
    to 8 characters occurs in the corpus's words, a whole word counting 4 times; with `continuation`, pieces that
    do not start a word carry that prefix (WordPiece's ##)."""
    counts: dict[str, int] = {}
    for text in CORPUS * 4:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            for n in range(1, min(len(word), 8) + 1):
                for i in range(len(word) - n + 1):
                    piece = word[i : i + n] if i == 0 or not continuation else continuation + word[i : i + n]
                    counts[piece] = counts.get(piece, 0) + (4 if n == len(word) else 1)
    return counts


def encoder_tiny_config(kind: str, vocab_size: int, **overrides: Any) -> dict:
    sizes = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128) | overrides
    common = dict(
        attention_probs_dropout_prob=0.1, classifier_dropout=None, hidden_act="gelu", hidden_dropout_prob=0.1,
        id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, initializer_range=0.02, position_embedding_type="absolute",
        use_cache=True, vocab_size=vocab_size, **sizes,
    )  # fmt: skip
    if kind == "bert-cross-encoder":  # cross-encoder/ms-marco-MiniLM-L-6-v2
        return {"architectures": ["BertForSequenceClassification"], "model_type": "bert", **common,
                "gradient_checkpointing": False, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
                "pad_token_id": 0, "type_vocab_size": 2, "torch_dtype": "float32",
                "transformers_version": "4.36.0", "sbert_ce_default_activation_function": "torch.nn.modules.linear.Identity"}  # fmt: skip
    return {  # jinaai/jina-reranker-v2-base-multilingual
        "architectures": ["XLMRobertaForSequenceClassification"],  # and no model_type, as the real one
        "auto_map": {
            "AutoConfig": "jinaai/jina-reranker-v2-base-multilingual--configuration_xlm_roberta.XLMRobertaFlashConfig",
            "AutoModel": "jinaai/jina-reranker-v2-base-multilingual--modeling_xlm_roberta.XLMRobertaModel",
            "AutoModelForSequenceClassification":
                "jinaai/jina-reranker-v2-base-multilingual--modeling_xlm_roberta.XLMRobertaForSequenceClassification",
        },
        **common, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 1026, "type_vocab_size": 1, "torch_dtype": "bfloat16", "emb_pooler": None,
        "transformers_version": "4.40.0", "use_flash_attn": True, "num_labels": 1,
    }  # fmt: skip


CHECKPOINT_NAMES = {"jina": "jina", "hf": "xlm-roberta", "bert": "bert"}  # naming -> key of WEIGHT_RENAMES


def encoder_random_weights(cfg: dict, seed: int, naming: str) -> dict[str, torch.Tensor]:
    """Weights in the names of `naming`: "jina" (flash implementation), "hf" (XLM-RoBERTa) or "bert"."""
    g = torch.Generator().manual_seed(seed)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    w: dict[str, torch.Tensor] = {
        "embeddings.word_embeddings.weight": _rand((cfg["vocab_size"], h), 1.0, g),
        "embeddings.position_embeddings.weight": _rand((cfg["max_position_embeddings"], h), 0.5, g),
        "embeddings.token_type_embeddings.weight": _rand((cfg["type_vocab_size"], h), 0.5, g),
    }
    w |= _norm("emb_ln", h, g, bias=True)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layers.{i}"
        w |= _linear(f"{p}.mixer.Wqkv", 3 * h, h, g, gain=2.0) | _linear(f"{p}.mixer.out_proj", h, h, g)
        w |= _norm(f"{p}.norm1", h, g, bias=True) | _norm(f"{p}.norm2", h, g, bias=True)
        w |= _linear(f"{p}.mlp.fc1", inter, h, g) | _linear(f"{p}.mlp.fc2", h, inter, g)
    w |= _linear("classifier.dense", h, h, g, gain=2.0) | _linear("classifier.out_proj", 1, h, g, gain=2.0)
    w["classifier.out_proj.bias"] = torch.zeros(1)  # scores centred on 0.5, spread by the pair
    checkpoint = rename_back(w, WEIGHT_RENAMES[CHECKPOINT_NAMES[naming]])
    if naming == "bert":  # older BERT checkpoints carry this buffer; a strict loader must drop it on purpose
        checkpoint["bert.embeddings.position_ids"] = torch.arange(cfg["max_position_embeddings"])[None]
    return checkpoint


def _make_tiny_encoder(kind: str, path: Path, seed: int, *, shards: int, dtype: torch.dtype, naming: str | None = None,
                       **overrides: Any) -> Path:  # fmt: skip
    if kind == "bert-cross-encoder":
        if naming not in (None, "hf"):
            raise ValueError("naming= applies to jina-reranker-v2 only")
        tok, naming = build_bert_tokenizer(), "bert"
    else:
        naming = naming or "jina"
        if naming not in ("jina", "hf"):
            raise ValueError(f"naming must be 'jina' or 'hf', got {naming!r}")
        tok = build_xlmr_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    cfg = encoder_tiny_config(kind, vocab, **overrides)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save(str(path / "tokenizer.json"))
    if naming == "bert":
        special = {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]",
                   "unk_token": "[UNK]"}  # fmt: skip
        tok_cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512, **special}
        vocab_txt = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        (path / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab_txt))
    else:
        special = {"bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "mask_token": "<mask>",
                   "pad_token": "<pad>", "sep_token": "</s>", "unk_token": "<unk>"}  # fmt: skip
        tok_cfg = {"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 1024, **special}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    _save_safetensors(encoder_random_weights(cfg, seed, naming), path, shards, dtype)
    return path


# ------------------------------------------------------------------------------------ Qwen3 decoders

# Qwen3's added tokens after Qwen2's (ids 151657.. in the real vocabulary): <think> and </think> are not special
QWEN3_EXTRA = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>")  # fmt: skip
JINA_V3_EXTRA = ("<|embed_token|>", "<|rerank_token|>")  # jina-reranker-v3's own special tokens
QWEN3_CORPUS = [  # the answers Qwen3-Reranker reads, and the words of its prompts, as whole tokens
    *["yes", "no"] * 16, "Judge whether the Document meets the requirements based on the Query and the Instruct provided.",
    "Given a web search query, retrieve relevant passages that answer the query",
    "You are a search relevance expert who can determine a ranking of the passages",
]  # fmt: skip


def build_qwen3_tokenizer(jina_v3: bool = False):
    """Qwen2's toy byte-level BPE with Qwen3's added tokens (and jina-reranker-v3's two), "yes" and "no" whole."""
    from tokenizers import AddedToken

    tok = build_qwen2_tokenizer(corpus=CORPUS + QWEN3_CORPUS)
    specials = {"<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"}
    tok.add_tokens([AddedToken(t, special=t not in specials, normalized=False) for t in QWEN3_EXTRA])
    if jina_v3:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in JINA_V3_EXTRA])
    for word in ("yes", "no"):
        if tok.token_to_id(word) is None:
            raise RuntimeError(f"internal: the toy Qwen3 vocabulary has no token {word!r}")
    return tok


def qwen3_tiny_config(kind: str, vocab_size: int, first_special: int, **overrides: Any) -> dict:
    sizes = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=24, tie_word_embeddings=kind == "qwen3-reranker")  # fmt: skip
    sizes |= overrides
    cfg = {
        "architectures": [{"qwen3-reranker": "Qwen3ForCausalLM", "qwen3-reranker-seq-cls": "Qwen3ForSequenceClassification",
                           "jina-reranker-v3": "JinaForRanking"}[kind]],  # fmt: skip
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": first_special,
        "eos_token_id": first_special + 2, "hidden_act": "silu", "initializer_range": 0.02,
        "max_position_embeddings": 40960, "max_window_layers": sizes["num_hidden_layers"], "model_type": "qwen3",
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
        "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
        "vocab_size": vocab_size, **sizes,
    }  # fmt: skip
    if kind == "qwen3-reranker-seq-cls":
        cfg |= {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "pad_token_id": first_special}
    if kind == "jina-reranker-v3":
        cfg |= {"auto_map": {"AutoModel": "modeling.JinaForRanking"}, "max_position_embeddings": 131072,
                "tie_word_embeddings": True}  # fmt: skip
    return cfg


def qwen3_random_weights(kind: str, cfg: dict, seed: int, weight_std: float | None = None) -> dict[str, torch.Tensor]:
    """Weights in the checkpoint's names; `weight_std` draws every matrix at that scale instead of the toy gains."""
    g = torch.Generator().manual_seed(seed)
    h, inter, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def lin(name: str, out_f: int, in_f: int, gain: float = 1.0) -> dict:
        if weight_std is not None:
            return {f"{name}.weight": _rand((out_f, in_f), weight_std, g)}
        return _linear(name, out_f, in_f, g, bias=False, gain=gain)

    # toy scales: the last token (the same template token in every prompt) must carry the pair's content, so
    # values and outputs are amplified; the head rows (tied: the embedding's) spread the scores over (0.05, 0.95)
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": _rand((v, h), weight_std or 0.5, g)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        w |= lin(f"{p}.self_attn.q_proj", heads * hd, h, gain=2.0) | lin(f"{p}.self_attn.k_proj", kv * hd, h, gain=2.0)
        w |= lin(f"{p}.self_attn.v_proj", kv * hd, h, gain=2.0) | lin(f"{p}.self_attn.o_proj", h, heads * hd, gain=2.0)
        w |= _norm(f"{p}.self_attn.q_norm", hd, g) | _norm(f"{p}.self_attn.k_norm", hd, g)
        w |= lin(f"{p}.mlp.gate_proj", inter, h) | lin(f"{p}.mlp.up_proj", inter, h) | lin(f"{p}.mlp.down_proj", h, inter)
        w |= _norm(f"{p}.input_layernorm", h, g) | _norm(f"{p}.post_attention_layernorm", h, g)
    w |= _norm("model.norm", h, g)
    if kind == "qwen3-reranker" and not cfg["tie_word_embeddings"]:
        w |= {"lm_head.weight": _rand((v, h), weight_std or 0.15, g)}
    if kind == "qwen3-reranker-seq-cls":
        w |= {"score.weight": _rand((1, h), weight_std or 0.7, g)}
    if kind == "jina-reranker-v3":
        w |= lin("projector.0", h // 2, h, gain=2.0) | lin("projector.2", 512, h // 2)
    return w


def _make_tiny_qwen3(kind: str, path: Path, seed: int, *, shards: int, dtype: torch.dtype,
                     weight_std: float | None = None, **overrides: Any) -> Path:  # fmt: skip
    if overrides.get("naming") is not None:
        raise ValueError("naming= applies to jina-reranker-v2 only")
    tok = build_qwen3_tokenizer(jina_v3=kind == "jina-reranker-v3")
    first_special = tok.token_to_id(QWEN2_SPECIALS[0])
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    cfg = qwen3_tiny_config(kind, n_tokens, first_special, **overrides)  # vocab_size: the tokens, as the real 151669
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save(str(path / "tokenizer.json"))
    tok.model.save(str(path))  # vocab.json, merges.txt, as the real repos have them
    vocab = tok.get_vocab(with_added_tokens=True)
    added = {str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                             "special": t not in ("<think>", "</think>")}
             for t in QWEN2_SPECIALS + QWEN3_EXTRA + (JINA_V3_EXTRA if kind == "jina-reranker-v3" else ())}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added, "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }, indent=2))  # fmt: skip
    _save_safetensors(qwen3_random_weights(kind, cfg, seed, weight_std), path, shards, dtype)
    return path
