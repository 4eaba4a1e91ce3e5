"""Finding a checkpoint: a local directory, or a Hugging Face repo id fetched into the hub cache."""

from __future__ import annotations

from pathlib import Path

from .errors import ModelLoadError

# what a reranker checkpoint needs; skips large files it never reads (other formats, onnx exports, images)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.npz"]


def resolve_model_dir(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint directory for `name_or_path`, downloading a hub repo into the cache when needed.

    Honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE (read by huggingface_hub).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is a file; pass the directory that holds config.json and the weights")
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(
            f"{name!r} is neither an existing directory nor a Hugging Face repo id of the form 'owner/name'"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"{name} is not in the local Hugging Face cache and cannot be downloaded (offline: HF_HUB_OFFLINE=1 or no "
            f"network). Download it on a machine with network access (`huggingface-cli download {name}`) into HF_HOME, "
            f"or pass the path of a local checkpoint directory instead."
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ModelLoadError(f"{name}: no such repository or revision on the Hugging Face hub ({e})") from None
    except OSError as e:
        raise ModelLoadError(
            f"{name}: download failed ({e}). Pass the path of a local checkpoint directory to run offline."
        ) from None
