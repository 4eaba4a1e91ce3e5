"""Checkpoint loading: safetensors (or, where a checkpoint has none, its PyTorch pickles), declared rename tables,
and a strict completeness check.

A rename table is data: a list of (checkpoint template, module template), read in both directions. A template is
a literal name in which `{n}` stands for a number (a layer index). One that ends with "." (or is empty) names a
prefix, and the rest of the name is kept; any other names one whole tensor. The module template may instead be
None, to drop the checkpoint tensor on purpose (an unused lm_head), or a `Part` when the checkpoint stores one
module parameter as several tensors (separate q, k, v for a fused Wqkv): the parts are concatenated along dim 0
in their declared order.

Forward (`rename`, loading): the first rule whose checkpoint template matches a checkpoint name gives its module
name; a name no rule matches is kept. Loading fails if any parameter of the module is not found in the
checkpoint, or if the checkpoint holds a tensor that no rule maps or drops. Backward (`rename_back`, writing
checkpoints): the first rule whose module template matches a module name gives its checkpoint name, a Part target
is split into its parts, drop rules are skipped; every name it writes is checked to map forward to where it
came from.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from .errors import ModelLoadError

NUMBER = "{n}"  # in a template: a layer number


@dataclass(frozen=True)
class Part:
    """The checkpoint tensor is part `index` of `count` (stacked along dim 0) of the parameter `target` (a template)."""

    target: str
    index: int
    count: int


Renames = list[tuple[str, "str | Part | None"]]


SAFETENSORS, PICKLES = "*.safetensors", "pytorch_model*.bin"  # the weight files' names (hub.py fetches by them too)
# (index file, file pattern) of each weights format, in the order of preference
WEIGHT_FORMATS = [("model.safetensors.index.json", SAFETENSORS), ("pytorch_model.bin.index.json", PICKLES)]


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: its safetensors (through model.safetensors.index.json when it is sharded) or,
    in a checkpoint without any, its PyTorch pickles (pytorch_model.bin, or through pytorch_model.bin.index.json), as
    older checkpoints and many fine-tunes have them."""
    for index_name, pattern in WEIGHT_FORMATS:
        index = directory / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({directory / f for f in weight_map.values()})
        else:
            files = sorted(directory.glob(pattern))
        if files:
            break
    else:
        raise ModelLoadError(f"{directory}: no weights found: expected *.safetensors files (or pytorch_model*.bin) "
                             "beside config.json")  # fmt: skip
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{directory}: the weight index names files that are missing: {[f.name for f in missing]}")
    return files


@contextlib.contextmanager
def open_weights(path: Path):
    """One weights file, as safetensors' safe_open has it (keys, get_tensor, get_slice): safetensors read lazily, a
    PyTorch pickle memory-mapped and loaded as weights only (torch's safe unpickler: no code in it runs)."""
    if path.suffix == ".safetensors":
        try:
            f = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{path}: not a readable safetensors file ({e}): a partial download? Delete it and "
                                 "download the checkpoint again") from None  # fmt: skip
        with f:
            yield f
    else:
        yield _PickledWeights(path)


class _PickledWeights:
    def __init__(self, path: Path):
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (pre zip) format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"{path}: not a PyTorch weights file that loads as weights only ({type(e).__name__}: "
                                 f"{e}); convert the checkpoint to safetensors") from None  # fmt: skip
        if not isinstance(state, dict):
            raise ModelLoadError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
        self._state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def keys(self) -> list[str]:
        return list(self._state)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._state[key]

    def get_slice(self, key: str) -> "_Rows":
        return _Rows(self._state[key])


@dataclass(frozen=True)
class _Rows:
    tensor: torch.Tensor

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index) -> torch.Tensor:
        return self.tensor[index]


def modern_name(key: str) -> str:
    """A legacy LayerNorm parameter name (`gamma` / `beta`, early BERT checkpoints ported from TensorFlow) as
    transformers renames it on load."""
    for old, new in (("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias")):
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def tensor_names(directory: Path) -> list[str]:
    """Names of all tensors in a checkpoint directory (headers only; nothing is read into memory)."""
    names: list[str] = []
    for path in weight_files(directory):
        with open_weights(path) as f:
            names.extend(modern_name(k) for k in f.keys())
    return names


def rename(name: str, renames: Renames) -> str | Part | None:
    """Forward: the module name (or Part of one) that checkpoint tensor `name` fills; None if it is dropped on
    purpose; `name` itself if no rule matches."""
    for source, target in renames:
        hit = _match(source, name)
        if hit is None:
            continue
        numbers, rest = hit
        if target is None:
            return None
        if isinstance(target, Part):
            return Part(_fill(source, target.target, numbers) + rest, target.index, target.count)
        return _fill(source, target, numbers) + rest
    return name


def rename_back(state: Mapping[str, torch.Tensor], renames: Renames) -> dict[str, torch.Tensor]:
    """Backward: module tensors (a state_dict) -> the checkpoint tensors that `rename` maps onto them.

    A Part target is split into `count` equal pieces along dim 0, named by its sibling rules (same target);
    rules that drop a tensor have no backward; a name no rule matches is kept. Raises ValueError where the
    table cannot be inverted (the checkpoint name would not map forward to the module name it came from).
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        pieces = [(name, tensor, name)]  # (checkpoint name, tensor, what `rename` must give for it)
        for source, target in renames:
            if target is None:
                continue
            hit = _match(target.target if isinstance(target, Part) else target, name)
            if hit is None:
                continue
            numbers, rest = hit
            if isinstance(target, Part):
                sources = {t.index: s for s, t in renames if isinstance(t, Part) and t.target == target.target}
                if sorted(sources) != list(range(target.count)) or tensor.shape[0] % target.count:
                    raise ValueError(f"{name} {tuple(tensor.shape)}: cannot split into the parts {sources}")
                pieces = [
                    (_fill(target.target, sources[i], numbers) + rest, piece, Part(name, i, target.count))
                    for i, piece in enumerate(tensor.chunk(target.count))
                ]
            else:
                pieces = [(_fill(target, source, numbers) + rest, tensor, name)]
            break
        for key, piece, expected in pieces:
            if rename(key, renames) != expected:
                raise ValueError(f"the rename table is not invertible at {name}: {key} maps to {rename(key, renames)}")
            out[key] = piece
    return out


@functools.lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern[str]:
    """The regular expression of a template: {n} captures a number; a whole-tensor template matches to the end."""
    body = r"(\d+)".join(re.escape(piece) for piece in template.split(NUMBER))
    return re.compile(body if _is_prefix(template) else body + r"\Z")


def _is_prefix(template: str) -> bool:
    return template == "" or template.endswith(".")


def _match(template: str, name: str) -> tuple[tuple[str, ...], str] | None:
    """The numbers `template` captures from the start of `name`, and the rest of the name; None if no match."""
    m = _pattern(template).match(name)
    return None if m is None else (m.groups(), name[m.end() :])


def _fill(matched: str, template: str, numbers: tuple[str, ...]) -> str:
    """`template` with its {n} replaced by the numbers that the template `matched` captured, in order."""
    if template.count(NUMBER) != len(numbers) or _is_prefix(template) != _is_prefix(matched):
        raise ValueError(f"rename rule {matched!r} <-> {template!r}: both sides need the same {NUMBER}s and kind")
    for n in numbers:
        template = template.replace(NUMBER, n, 1)
    return template


def load_weights(
    model: nn.Module,
    directory: Path,
    renames: Renames,
    device: torch.device,
    dtype: torch.dtype,
    show_progress: bool = True,
    stored: dict[str, torch.dtype] | None = None,
) -> None:
    """Fill `model` (built on the meta device) from the weight files of `directory`, strictly, in `dtype`, or in
    `stored[name]` for the parameters it names."""
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    state: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    part_counts: dict[str, int] = {}
    unused: list[str] = []
    files = weight_files(directory)
    with tqdm(desc=f"loading {directory.name}", unit="tensor", disable=not show_progress, leave=False) as bar:
        for i, path in enumerate(files):
            with open_weights(path) as f:
                keys = list(f.keys())
                bar.total = (bar.total or 0) + len(keys)  # files are opened in turn: the total grows to the whole
                bar.set_postfix_str(f"file {i + 1}/{len(files)}" if len(files) > 1 else "", refresh=True)
                for key in keys:
                    bar.update()
                    target = rename(modern_name(key), renames)
                    if target is None:
                        continue
                    name = target.target if isinstance(target, Part) else target
                    if name not in expected:
                        unused.append(key)
                        continue
                    # with `stored`, every tensor is copied, also those already in their dtype: loading an fp32 v2
                    # checkpoint (86 M parameters) with bf16 matrices then grew the process by 311 MiB, not 644 (the
                    # small fp32 tensors kept as read held on to the memory of the large ones converted beside them)
                    want = (stored or {}).get(name, dtype)
                    tensor = f.get_tensor(key).to(device=device, dtype=want, copy=bool(stored))
                    if isinstance(target, Part):
                        parts.setdefault(name, {})[target.index] = tensor
                        part_counts[name] = target.count
                        continue
                    _check_shape(tensor, expected[name], key, path)
                    state[name] = tensor
    for name, pieces in parts.items():
        if len(pieces) == part_counts[name]:  # an incomplete set stays missing and is reported below
            state[name] = torch.cat([pieces[i] for i in range(part_counts[name])])
            _check_shape(state[name], expected[name], f"{name} (from {len(pieces)} parts)", directory)
    missing = sorted(set(expected) - set(state))
    if missing or unused:
        parts = []
        if missing:
            parts.append(f"{len(missing)} parameters missing from the checkpoint: {missing[:8]}")
        if unused:
            parts.append(f"{len(unused)} checkpoint tensors match no parameter: {sorted(unused)[:8]}")
        raise ModelLoadError(f"{directory}: " + "; ".join(parts) + " - is this the right model for its config.json?")
    model.load_state_dict(state, strict=True, assign=True)


def _check_shape(tensor: torch.Tensor, param: torch.Tensor, key: str, where: Path) -> None:
    if tuple(tensor.shape) != tuple(param.shape):
        raise ModelLoadError(
            f"{where.name}: tensor {key} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)} "
            f"(does config.json match the weights?)"
        )


def read_rows(directory: Path, key: str, rows: list[int]) -> torch.Tensor:
    """Rows `rows` of checkpoint tensor `key`, read without loading the rest of it (two rows of a 151k-row LM
    head); a ModelLoadError if the checkpoint has no such tensor."""
    for path in weight_files(directory):
        with open_weights(path) as f:
            if key not in f.keys():
                continue
            whole = f.get_slice(key)
            n = whole.get_shape()[0]
            bad = [r for r in rows if not 0 <= r < n]
            if bad:
                raise ModelLoadError(f"{path.name}: tensor {key} has {n} rows; rows {bad} do not exist")
            return torch.cat([whole[r : r + 1] for r in rows])
    raise ModelLoadError(f"{directory}: the checkpoint has no tensor {key}")
