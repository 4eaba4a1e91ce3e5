"""Finding a checkpoint: a local directory, or a Hugging Face repo id fetched into the hub cache."""

from __future__ import annotations

from pathlib import Path

from .errors import ModelLoadError

# what a reranker checkpoint needs; skips large files it never reads (other formats, onnx exports, images)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.npz"]


def resolve_model(name_or_path: str | Path, revision: str | None = None) -> Path:
    """What `from_pretrained` loads: a checkpoint directory (with config.json), or a .gguf file.

    A .gguf is named by its path, by a directory that holds it (without config.json), by `DIR:TAG` or
    `owner/name:TAG` where TAG is the quantization in its file name (Q8_0, f16, ...), downloading only that file
    (and the small files beside it) from the hub.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    tag = None
    if not path.exists() and ":" in text:
        text, tag = text.rsplit(":", 1)
        path = Path(text).expanduser()
        if not tag or not text:
            raise ModelLoadError(f"{name_or_path!r}: expected NAME:TAG, a folder or hub repo and a quantization tag "
                                 "(for example jinaai/jina-reranker-m0-GGUF:Q8_0)")  # fmt: skip
    if path.is_file():
        if tag is not None:
            raise ModelLoadError(f"{name_or_path!r}: a .gguf file needs no tag; pass the path alone, or its folder:TAG")
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file; pass the directory that holds config.json and the weights, or a .gguf")
        return path
    directory = resolve_model_dir(text, revision, gguf_tag=tag)
    ggufs = sorted(directory.glob("*.gguf"))
    if tag is None and ((directory / "config.json").is_file() or not ggufs):
        from .models.gguf import HEAD_FILE

        if not (directory / "config.json").is_file() and (directory / HEAD_FILE).is_file():
            raise ModelLoadError(
                f"{text} holds GGUF files but none was named: add the quantization tag of the file to load, for "
                f"example {text}:Q8_0{_listing(text, revision)}"
            )
        return directory
    if tag is not None:
        from .models.gguf import gguf_tag_matches

        ggufs = [g for g in ggufs if gguf_tag_matches(g.name, tag)]
        if not ggufs:
            raise ModelLoadError(f"{text}: no .gguf file with the tag {tag!r}{_listing(text, revision)}")
    if len(ggufs) > 1:
        names = ", ".join(g.name for g in ggufs)
        raise ModelLoadError(f"{text}: several .gguf files match ({names}); name one by its path or its tag (DIR:TAG)")
    return ggufs[0]


def _listing(name: str, revision: str | None) -> str:
    """'; available: a.gguf, b.gguf' for a directory or hub repo, or '' if it cannot be listed (offline)."""
    path = Path(name).expanduser()
    try:
        if path.is_dir():
            files = [p.name for p in path.iterdir()]
        else:
            from huggingface_hub import list_repo_files

            files = list_repo_files(name, revision=revision)
    except Exception:  # offline, or no such repo: the listing is only a hint
        return ""
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    return f"; available: {', '.join(ggufs)}" if ggufs else ""


def gguf_tag_patterns(tag: str) -> list[str]:
    """Hub file patterns of the .gguf files that carry `tag` as a whole word (Q4_K: not Q4_K_M), as
    models.gguf.gguf_tag_matches decides it; hub patterns are case-sensitive, so the usual spellings of the tag."""
    out = []
    for t in sorted({tag, tag.upper(), tag.lower()}):
        out += [f"{t}.gguf", f"*[-_.]{t}.gguf", f"{t}[-.]*.gguf", f"*[-_.]{t}[-.]*.gguf"]
    return out


def resolve_model_dir(name_or_path: str | Path, revision: str | None = None, gguf_tag: str | None = None) -> Path:
    """A local checkpoint directory for `name_or_path`, downloading a hub repo into the cache when needed (with
    `gguf_tag`, only the .gguf files whose name carries it, besides the small files).

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

    from .weights import PICKLES, SAFETENSORS

    try:
        patterns = HUB_PATTERNS + (gguf_tag_patterns(gguf_tag) if gguf_tag is not None else [])
        directory = Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
        if gguf_tag is None and not any(directory.glob(SAFETENSORS)):  # an older checkpoint: PyTorch pickles
            directory = Path(snapshot_download(name, revision=revision, allow_patterns=[PICKLES]))
        return directory
    except LocalEntryNotFoundError:
        command = f"huggingface-cli download {name}" + (f" --revision {revision}" if revision else "")
        if gguf_tag is not None:
            command += f' --include "*{gguf_tag}*" "*.npz" "*.json"'
        raise ModelLoadError(
            f"{name} is not in the local Hugging Face cache and cannot be downloaded (offline: HF_HUB_OFFLINE=1 or no "
            f"network). Download it on a machine with network access (`{command}`) into HF_HOME, "
            f"or pass the path of a local checkpoint directory instead."
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ModelLoadError(f"{name}: no such repository or revision on the Hugging Face hub ({e})") from None
    except OSError as e:
        raise ModelLoadError(
            f"{name}: download failed ({e}). Pass the path of a local checkpoint directory to run offline."
        ) from None


def checkpoint_identity(name_or_path: str | Path, revision: str | None = None) -> str:
    """What identifies the weights `name_or_path` loads, without loading (or downloading) them: for a local
    directory or file, the names, sizes and modification times of the files beside it; for a hub repo, the commit
    its revision resolves to (asked of the hub, else read from the local cache), or "unresolved"."""
    import hashlib

    path = Path(str(name_or_path)).expanduser()
    if path.exists():
        folder = path if path.is_dir() else path.parent
        files = sorted(p for p in folder.iterdir() if p.is_file())
        stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return "files:" + hashlib.sha1(repr(stats).encode()).hexdigest()
    repo = str(name_or_path).rsplit(":", 1)[0]  # a GGUF repo's :TAG
    try:
        from huggingface_hub import HfApi

        return "commit:" + HfApi().model_info(repo, revision=revision).sha
    except Exception:  # offline, or no such repo
        try:
            from huggingface_hub import snapshot_download

            return "commit:" + Path(snapshot_download(repo, revision=revision, local_files_only=True)).name
        except Exception:
            return "unresolved"
