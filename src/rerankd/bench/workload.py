"""Workloads of `rerankd bench`: random documents of a given token length, a JSONL file, random images."""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

# a mixed, multilingual word list; random documents are drawn from it
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an had they "
    "you were their one all we can her has there been if more when will would who so no search retrieval document "
    "query model rerank score index vector embedding language data system server request response latency token "
    "Paris France capital Berlin Germany gold rush merchants supplies miners skincare organic sensitive green tea "
    "antioxidants coffee price markdown extraction web content compact parameter Beiträge Arbeit Datensynthese "
    "thé vert riche cerveau precio café aumentado 数据 提取 正则 绿茶 抗氧化剂 心脏病 风险"
).split()


@dataclass(frozen=True)
class Request:
    query: str | dict
    documents: list[str | dict]
    input_tokens: int  # estimated prompt tokens (query + documents), for input_tokens_per_s


class TokenCounter:
    """Counts tokens with the served model's tokenizer when it can be had, else estimates (1.3 tokens a word)."""

    def __init__(self, tokenizer: str | None):
        self.tokenizer = None
        self.source = "estimate (1.3 tokens a word)"
        if tokenizer:
            self.tokenizer = _load_tokenizer(tokenizer)
            self.source = tokenizer

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return max(1, round(len(text.split()) * 1.3))
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)


def _load_tokenizer(name: str):
    from tokenizers import Tokenizer

    path = Path(name)
    if path.suffix == ".gguf" and path.is_file():  # a GGUF served by rerankd: llama.cpp's tokenizer, vocabulary only
        from ..models.gguf import load_vocab_tokenizer

        return load_vocab_tokenizer(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    from huggingface_hub import hf_hub_download

    return Tokenizer.from_file(hf_hub_download(name, "tokenizer.json"))


def random_text(rng: random.Random, target_tokens: int, counter: TokenCounter) -> str:
    """Random words making exactly target_tokens tokens where the words allow it (else the nearest count above)."""
    words: list[str] = []
    while (n := counter.count(" ".join(words))) < target_tokens:  # grow by estimate
        words.extend(rng.choice(WORDS) for _ in range(max(1, (target_tokens - n) // 2)))
    while len(words) > 1 and counter.count(" ".join(words[:-1])) >= target_tokens:
        words.pop()
    if counter.count(" ".join(words)) == target_tokens or len(words) == 1:
        return " ".join(words)
    best = list(words)
    words.pop()  # now short of the target: fill it up with the shortest words that fit
    short = sorted(WORDS, key=lambda w: (counter.count(w), w))[:12]
    for _ in range(8 * target_tokens):
        if (n := counter.count(" ".join(words))) == target_tokens:
            return " ".join(words)
        candidate = rng.choice(short)
        if counter.count(" ".join([*words, candidate])) <= target_tokens:
            words.append(candidate)
        elif n < target_tokens and len(words) > 1 and rng.random() < 0.3:
            words.pop()  # step back and try another combination
    return " ".join(best)


def random_image(rng: random.Random, width: int, height: int) -> str:
    """A random PNG as a data URI."""
    from PIL import Image

    img = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def random_workload(
    num_prompts: int,
    docs_per_request: int,
    input_tokens: int,
    range_ratio: float,
    query_tokens: int,
    image_docs: int,
    image_size: tuple[int, int],
    counter: TokenCounter,
    seed: int,
) -> list[Request]:
    """Requests of docs_per_request documents, each of input_tokens x U[range_ratio, 1] tokens; the first image_docs
    documents of each request are random images instead."""
    if not 0 < range_ratio <= 1:
        raise ValueError(f"--random-range-ratio must be in (0, 1], got {range_ratio}")
    rng = random.Random(seed)
    images = [random_image(rng, *image_size) for _ in range(min(image_docs, 8))]  # a few, reused
    out = []
    for _ in range(num_prompts):
        query = random_text(rng, query_tokens, counter)
        docs: list[str | dict] = []
        tokens = counter.count(query) * docs_per_request
        for j in range(docs_per_request):
            if j < image_docs:
                docs.append({"image": images[j % len(images)]})
                continue
            n = max(1, round(input_tokens * rng.uniform(range_ratio, 1.0)))
            text = random_text(rng, n, counter)
            docs.append(text)
            tokens += counter.count(text)
        out.append(Request(query, docs, tokens))
    return out


def file_workload(path: Path, num_prompts: int | None, counter: TokenCounter) -> list[Request]:
    """One {"query", "documents"} a line; cycled or cut to num_prompts."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            query, docs = row["query"], row["documents"]
            if not isinstance(docs, list) or not docs:
                raise ValueError("documents must be a non-empty list")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{n}: need a JSON object with 'query' and 'documents' ({e})") from None
        text = lambda x: x if isinstance(x, str) else x.get("text", "")  # noqa: E731
        tokens = sum(counter.count(text(d)) for d in docs) + counter.count(text(query)) * len(docs)
        rows.append(Request(query, docs, tokens))
    if not rows:
        raise ValueError(f"{path}: no requests in the file")
    if num_prompts is None:
        return rows
    return [rows[i % len(rows)] for i in range(num_prompts)]
