"""Checkpoint loading: safetensors, declared rename tables, and a strict completeness check.

A rename table is data: a list of (pattern, target). The pattern is a regular expression matched at the start
of a checkpoint name; the first rule that matches wins, and the rest of the name is kept. The target is the
module name to put there (groups such as \\1 expand), None to drop the tensor on purpose (an unused lm_head),
or a `Part` when the checkpoint stores one module parameter as several tensors (separate q, k, v for a fused
Wqkv): the parts are concatenated along dim 0 in their declared order. Loading fails if any parameter of the
module is not found in the checkpoint, or if the checkpoint holds a tensor that no rule maps or drops.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from .errors import ModelLoadError



@dataclass(frozen=True)
class Part:
    """The checkpoint tensor is part `index` of `count` (stacked along dim 0) of the parameter named `target`."""

    target: str
    index: int
    count: int


Renames = list[tuple[str, "str | Part | None"]]


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({directory / f for f in weight_map.values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory}: no *.safetensors weights found (only safetensors checkpoints are supported)")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{directory}: the weight index names files that are missing: {[f.name for f in missing]}")
    return files


def tensor_names(directory: Path) -> list[str]:
    """Names of all tensors in a checkpoint directory (headers only; nothing is read into memory)."""
    names: list[str] = []
    for path in safetensors_files(directory):
        with safe_open(str(path), framework="pt") as f:
            names.extend(f.keys())
    return names


def rename(name: str, renames: Renames) -> str | Part | None:
    """The module name (or Part of one) that checkpoint tensor `name` fills; None if it is dropped on purpose."""
    for pattern, target in renames:
        m = re.match(pattern, name)
        if m is None:
            continue
        rest = name[m.end() :]
        if target is None:
            return None
        if isinstance(target, Part):
            return Part(m.expand(target.target) + rest, target.index, target.count)
        return m.expand(target) + rest
    return name


def load_weights(
    model: nn.Module,
    directory: Path,
    renames: Renames,
    device: torch.device,
    dtype: torch.dtype,
    show_progress: bool = True,
) -> None:
    """Fill `model` (built on the meta device) from the safetensors files of `directory`, strictly."""
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    state: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    part_counts: dict[str, int] = {}
    unused: list[str] = []
    files = safetensors_files(directory)
    with tqdm(desc=f"loading {directory.name}", unit="tensor", disable=not show_progress, leave=False) as bar:
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    bar.update()
                    target = rename(key, renames)
                    if target is None:
                        continue
                    name = target.target if isinstance(target, Part) else target
                    if name not in expected:
                        unused.append(key)
                        continue
                    tensor = f.get_tensor(key).to(device=device, dtype=dtype)
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
