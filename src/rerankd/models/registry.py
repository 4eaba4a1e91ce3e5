"""config.json `architectures` -> the backend class that serves it."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from ..errors import ModelLoadError

# architecture name -> "module:Class"; modules are imported only when that architecture is loaded
ARCHITECTURES: dict[str, str] = {
    "JinaVLForRanking": "rerankd.models.jina_m0:JinaM0Backend",
    "XLMRobertaForSequenceClassification": "rerankd.models.xlm_roberta:CrossEncoderBackend",
    "RobertaForSequenceClassification": "rerankd.models.xlm_roberta:CrossEncoderBackend",
    "BertForSequenceClassification": "rerankd.models.xlm_roberta:CrossEncoderBackend",
}


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{directory}: no config.json; is this a Hugging Face checkpoint directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None


def backend_class(config: dict, where: Path) -> type:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            module, cls = ARCHITECTURES[name].split(":")
            return getattr(importlib.import_module(module), cls)
    raise ModelLoadError(
        f"{where}/config.json: architecture {names or '(none given)'} is not supported; "
        f"supported architectures: {', '.join(sorted(ARCHITECTURES))}"
    )
