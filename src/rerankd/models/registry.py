"""What serves a model: a config's `architectures` entry, or a model file's type -> its backend class.

Adding a model is one line here (see docs/architecture.md). Modules are imported only when their model is loaded.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from ..errors import ModelLoadError

# config.json architecture name -> "module:Class"
ARCHITECTURES: dict[str, str] = {
    "JinaVLForRanking": "rerankd.models.jina_m0:JinaM0Backend",
    "XLMRobertaForSequenceClassification": "rerankd.models.xlm_roberta:CrossEncoderBackend",
    "RobertaForSequenceClassification": "rerankd.models.xlm_roberta:CrossEncoderBackend",
    "BertForSequenceClassification": "rerankd.models.xlm_roberta:CrossEncoderBackend",
    "Qwen3ForCausalLM": "rerankd.models.qwen3_reranker:Qwen3RerankerBackend",  # Qwen3-Reranker
    "Qwen3ForSequenceClassification": "rerankd.models.qwen3_reranker:Qwen3RerankerBackend",  # its seq-cls conversion
    "JinaForRanking": "rerankd.models.jina_v3:JinaV3Backend",  # jina-reranker-v3
}
# model file suffix -> "module:Class" (a file that is the whole model, loaded without a config.json)
FILE_TYPES: dict[str, str] = {
    ".gguf": "rerankd.models.gguf:GGUFBackend",  # jina-reranker-m0 through llama.cpp
}


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{directory}: no config.json; is this a Hugging Face checkpoint directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None


def _import(target: str) -> type:
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def backend_class(config: dict, where: Path) -> type:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return _import(ARCHITECTURES[name])
    raise ModelLoadError(
        f"{where}/config.json: architecture {names or '(none given)'} is not supported; "
        f"supported architectures: {', '.join(sorted(ARCHITECTURES))}"
    )


def backend_for(path: Path) -> tuple[type, dict | None]:
    """The backend class that loads `path` (a checkpoint directory or a model file, see hub.resolve_model) and
    the config it is loaded with (None for a model file)."""
    if path.is_file():
        if path.suffix not in FILE_TYPES:
            raise ModelLoadError(f"{path}: a {path.suffix or 'suffix-less'} file is not a model rerankd loads; "
                                 f"model files: {', '.join(FILE_TYPES)}")  # fmt: skip
        return _import(FILE_TYPES[path.suffix]), None
    config = read_config(path)
    return backend_class(config, path), config
