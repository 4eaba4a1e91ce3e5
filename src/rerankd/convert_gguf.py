"""`rerankd convert-gguf`: a jina-reranker-m0 checkpoint -> a GGUF decoder for llama.cpp, and mlp_weights.npz.

The GGUF holds the Qwen2-VL decoder in the tensor names and metadata of llama.cpp's `qwen2` architecture
(text only: with text alone, M-RoPE's three position axes are equal and it is the ordinary NEOX-style RoPE that
`qwen2` applies), and the tokenizer as a byte-level BPE ("gpt2" model, "qwen2" pre-tokenizer). The score head
goes beside it as `mlp_weights.npz` (W1, b1, W2, b2, logit_bias; score =
sigmoid((relu(h @ W1 + b1) @ W2 + b2) - logit_bias)), the layout of Jina's published GGUF files.

The score token: the reference appends token id 100 to every prompt, which no text spells reliably (100 is a
byte-level piece that merges with its neighbours). GGUF prompts for llama.cpp's own tools end with the special
token `<|box_end|>` instead, and the converter makes that token stand for token 100 by giving it token 100's
embedding row. Token 100 itself keeps its embedding, so documents whose bytes tokenize to it score as in the
reference (swapping the two tokens' strings would break exactly those). The original `<|box_end|>` row goes to
a spare padding row, named by the `rerankd.box_end_row` key, so that rerankd (which appends token 100 by id)
can still give the text `<|box_end|>` inside a document its own embedding, exactly as the reference does.

Tensors are converted and written one at a time, so memory stays near the largest tensor.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ModelLoadError
from .models.gguf import HEAD_FILE
from .models.gguf import SCORE_TOKEN as GGUF_SCORE_TOKEN  # ends GGUF prompts; gets token 100's embedding
from .models.jina_m0 import LOGIT_BIAS, SCORE_TOKEN_ID, WEIGHT_RENAMES
from .weights import Renames, open_weights, rename, weight_files

OUTTYPES = ("f32", "f16", "q8_0")

# module names (after jina_m0.WEIGHT_RENAMES) -> llama.cpp qwen2 tensor names; None: not part of the GGUF
GGUF_NAMES: Renames = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("model.layers.{n}.input_layernorm.weight", "blk.{n}.attn_norm.weight"),
    ("model.layers.{n}.self_attn.q_proj.", "blk.{n}.attn_q."),
    ("model.layers.{n}.self_attn.k_proj.", "blk.{n}.attn_k."),
    ("model.layers.{n}.self_attn.v_proj.", "blk.{n}.attn_v."),
    ("model.layers.{n}.self_attn.o_proj.weight", "blk.{n}.attn_output.weight"),
    ("model.layers.{n}.post_attention_layernorm.weight", "blk.{n}.ffn_norm.weight"),
    ("model.layers.{n}.mlp.gate_proj.weight", "blk.{n}.ffn_gate.weight"),
    ("model.layers.{n}.mlp.up_proj.weight", "blk.{n}.ffn_up.weight"),
    ("model.layers.{n}.mlp.down_proj.weight", "blk.{n}.ffn_down.weight"),
    ("visual.", None),  # the vision tower: the GGUF path is text only
    ("score.", None),  # the head: written to mlp_weights.npz
]
HEAD_NAMES = {"score.0.weight": "W1", "score.0.bias": "b1", "score.2.weight": "W2", "score.2.bias": "b2"}


@dataclass(frozen=True)
class _Tensor:
    source: str  # checkpoint name
    file: Path
    name: str  # GGUF name
    shape: tuple[int, ...]


def _gguf_tensors(directory: Path, layers: int) -> tuple[list[_Tensor], dict[str, tuple[Path, str]]]:
    """The decoder tensors to write and the head tensors (module name -> file, checkpoint name)."""
    tensors: list[_Tensor] = []
    head: dict[str, tuple[Path, str]] = {}
    unknown: list[str] = []
    for path in weight_files(directory):
        with open_weights(path) as f:
            for key in f.keys():
                module = rename(key, WEIGHT_RENAMES)
                if module is None:
                    continue  # lm_head: tied to the embeddings, and a reranker never reads it
                assert isinstance(module, str)
                if module in HEAD_NAMES:
                    head[module] = (path, key)
                    continue
                target = rename(module, GGUF_NAMES)
                if target is None:
                    continue
                if target == module:  # no rule matched
                    unknown.append(key)
                    continue
                tensors.append(_Tensor(key, path, str(target), tuple(f.get_slice(key).get_shape())))
    if unknown:
        raise ModelLoadError(f"{directory}: tensors that are not part of jina-reranker-m0's decoder: {unknown[:8]}")
    missing_head = sorted(set(HEAD_NAMES) - set(head))
    if missing_head:
        raise ModelLoadError(f"{directory}: the score head is incomplete; missing {missing_head}")
    names = {t.name for t in tensors}
    expected = {"token_embd.weight", "output_norm.weight"}
    for i in range(layers):
        expected |= {f"blk.{i}.{n}" for n in ("attn_norm.weight", "attn_q.weight", "attn_q.bias", "attn_k.weight",
                     "attn_k.bias", "attn_v.weight", "attn_v.bias", "attn_output.weight", "ffn_norm.weight",
                     "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")}  # fmt: skip
    if expected - names:
        raise ModelLoadError(f"{directory}: the checkpoint lacks decoder tensors: {sorted(expected - names)[:8]}")
    order = {n: i for i, n in enumerate(["token_embd.weight", "output_norm.weight"])}
    tensors.sort(key=lambda t: (order.get(t.name, 2), _block(t.name), t.name))
    return tensors, head


def _block(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _vocab(directory: Path, n_vocab: int) -> tuple[list[str], list[int], list[str], dict[str, int]]:
    """tokens, token types, merges and the special tokens by content, from tokenizer.json, padded to n_vocab."""
    import gguf

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{directory}: tokenizer.json is missing")
    spec = json.loads(path.read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ModelLoadError(f"{path}: expected a byte-level BPE tokenizer (Qwen2's), got {model.get('type')!r}")
    tokens: list[str | None] = [None] * n_vocab
    types = [int(gguf.TokenType.NORMAL)] * n_vocab
    for text, i in model["vocab"].items():
        if i >= n_vocab:
            raise ModelLoadError(f"{path}: token id {i} is beyond the embedding's {n_vocab} rows")
        tokens[i] = text
    special: dict[str, int] = {}
    for added in spec.get("added_tokens", []):
        i = added["id"]
        if i >= n_vocab:
            raise ModelLoadError(f"{path}: token id {i} is beyond the embedding's {n_vocab} rows")
        tokens[i] = added["content"]
        types[i] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
        special[added["content"]] = i
    for i, t in enumerate(tokens):
        if t is None:  # the embedding is padded past the tokenizer (151936 rows for 151665 tokens)
            tokens[i] = f"[PAD{i}]"
            types[i] = int(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges, special  # type: ignore[return-value]


def _convert(array: np.ndarray, outtype: str) -> tuple[np.ndarray, "object | None"]:
    """The array as written, and its GGML type when that is not implied by the numpy dtype."""
    import gguf

    if array.ndim == 1 or outtype == "f32":  # norms and biases stay f32, as llama.cpp's own converter keeps them
        return array.astype(np.float32), None
    if outtype == "f16":
        return array.astype(np.float16), None
    if array.shape[-1] % 32:
        return array.astype(np.float16), None  # q8_0 blocks are 32 wide; llama.cpp's converter falls back too
    return gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def _written_info(shape: tuple[int, ...], outtype: str) -> tuple[tuple[int, ...], type, int, "object | None"]:
    """(shape to declare, numpy dtype, bytes, raw GGML type) of a tensor of `shape` once converted."""
    import gguf

    n = int(np.prod(shape))
    if len(shape) == 1 or outtype == "f32":
        return shape, np.float32, 4 * n, None
    if outtype == "f16" or shape[-1] % 32:
        return shape, np.float16, 2 * n, None
    q = gguf.GGMLQuantizationType.Q8_0
    byte_shape = gguf.quant_shape_to_byte_shape(shape, q)
    return byte_shape, np.uint8, int(np.prod(byte_shape)), q


def _write_tensors(w, tensors: list[_Tensor], score_token: int, spare: int | None, outtype: str, total: int,
                   name: str, show_progress: bool) -> None:
    """Read, convert and write the tensors one at a time, in the order their infos were declared."""
    with tqdm(total=total, unit="param", unit_scale=True, desc=f"writing {name}", disable=not show_progress) as bar:
        for t in tensors:
            with open_weights(t.file) as f:
                array = f.get_tensor(t.source).to(torch.float32).numpy()
            if t.name == "token_embd.weight":
                array = array.copy()
                if spare is not None:
                    array[spare] = array[score_token]  # the text <|box_end|>, for rerankd (module docstring)
                array[score_token] = array[SCORE_TOKEN_ID]  # <|box_end|> stands for the score token
            data, _ = _convert(array, outtype)
            w.write_tensor_data(data)
            bar.update(int(np.prod(t.shape)))


def convert_gguf(
    checkpoint: str | Path, out_dir: str | Path, outtype: str = "f16", name: str | None = None, show_progress: bool = True
) -> Path:
    """Write OUT_DIR/<name>-<outtype>.gguf and OUT_DIR/mlp_weights.npz from a jina-reranker-m0 checkpoint.

    `checkpoint`: a local directory or a Hugging Face repo id. Returns the path of the .gguf file.
    """
    try:
        import gguf
    except ImportError:
        raise ModelLoadError("convert-gguf needs the gguf package: pip install 'rerankd[gguf]'") from None
    from .hub import resolve_model_dir
    from .models.decoder import TextConfig
    from .models.registry import read_config

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    directory = resolve_model_dir(checkpoint)
    top = read_config(directory)
    config = {**top, **top.get("text_config", {})}  # newer transformers nest the decoder's fields
    if "JinaVLForRanking" not in (config.get("architectures") or []):
        raise ModelLoadError(
            f"{directory}/config.json: architecture {config.get('architectures')} is not jina-reranker-m0's "
            "(JinaVLForRanking); convert-gguf converts jina-reranker-m0 checkpoints only"
        )
    if config.get("use_sliding_window"):
        raise ModelLoadError(f"{directory}: sliding-window attention is not supported by this converter")
    try:  # the decoder's sizes as the torch backend reads them (any transformers version's config form)
        text = TextConfig.from_dict(top)
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"{directory}/config.json: not a usable jina-reranker-m0 config ({e})") from None
    layers = text.num_hidden_layers
    tensors, head = _gguf_tensors(directory, layers)
    n_vocab = next(t.shape[0] for t in tensors if t.name == "token_embd.weight")
    tokens, types, merges, special = _vocab(directory, n_vocab)
    if GGUF_SCORE_TOKEN not in special:
        raise ModelLoadError(f"{directory}/tokenizer.json has no {GGUF_SCORE_TOKEN} token; not a Qwen2-VL tokenizer")
    score_token = special[GGUF_SCORE_TOKEN]
    spare = next((i for i, t in enumerate(types) if t == int(gguf.TokenType.UNUSED)), None)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or directory.resolve().name
    path = out / f"{name}-{outtype}.gguf"
    partial = path.with_name(path.name + ".part")  # renamed when complete: a failed run leaves no .gguf behind
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]  # fmt: skip

    w = gguf.GGUFWriter(partial, "qwen2")
    w.add_name(name)
    w.add_file_type(int(file_type))
    w.add_context_length(int(text.max_position_embeddings))
    w.add_embedding_length(int(text.hidden_size))
    w.add_block_count(layers)
    w.add_feed_forward_length(int(text.intermediate_size))
    w.add_head_count(int(text.num_attention_heads))
    w.add_head_count_kv(int(text.num_key_value_heads))
    w.add_rope_freq_base(float(text.rope_theta))
    w.add_layer_norm_rms_eps(float(text.rms_norm_eps))
    w.add_pooling_type(gguf.PoolingType.LAST)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        if isinstance(config.get(key), int):
            add(config[key])
    if "<|endoftext|>" in special:
        w.add_pad_token_id(special["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_string("rerankd.score_token", GGUF_SCORE_TOKEN)
    w.add_float32("rerankd.logit_bias", LOGIT_BIAS)
    if spare is not None:
        w.add_uint32("rerankd.box_end_row", spare)

    for t in tensors:
        shape, dtype, nbytes, raw = _written_info(t.shape, outtype)
        w.add_tensor_info(t.name, shape, np.dtype(dtype), nbytes, raw_dtype=raw)  # type: ignore[arg-type]
    total = sum(int(np.prod(t.shape)) for t in tensors)
    try:
        w.write_header_to_file(partial)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        _write_tensors(w, tensors, score_token, spare, outtype, total, path.name, show_progress)
    except BaseException:
        w.close()
        partial.unlink(missing_ok=True)
        raise
    w.close()
    partial.replace(path)

    arrays = {}
    for module, (file, key) in head.items():
        with open_weights(file) as f:
            arrays[module] = f.get_tensor(key).to(torch.float32).numpy()
    np.savez(
        out / HEAD_FILE,
        W1=arrays["score.0.weight"].T.copy(),  # [hidden, hidden]: h @ W1
        b1=arrays["score.0.bias"],
        W2=arrays["score.2.weight"].T.copy(),  # [hidden, 1]
        b2=arrays["score.2.bias"],
        logit_bias=np.array([LOGIT_BIAS], dtype=np.float32),  # shape [1], as Jina's file (its README reads [0])
    )
    return path
