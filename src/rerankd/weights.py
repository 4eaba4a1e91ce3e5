"""Checkpoint loading: safetensors, declared rename tables, and a strict completeness check.

A rename table is data: a list of (checkpoint prefix, module prefix or None). The first matching prefix wins;
None drops the tensor on purpose (for example an unused lm_head). Loading fails if any parameter of the module
is not found in the checkpoint, or if the checkpoint holds a tensor that no rule maps or drops.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from .errors import ModelLoadError

Renames = list[tuple[str, str | None]]


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


def rename(name: str, renames: Renames) -> str | None:
    for prefix, target in renames:
        if name.startswith(prefix):
            return None if target is None else target + name[len(prefix) :]
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
                    if target not in expected:
                        unused.append(key)
                        continue
                    tensor = f.get_tensor(key)
                    want = tuple(expected[target].shape)
                    if tuple(tensor.shape) != want:
                        raise ModelLoadError(
                            f"{path.name}: tensor {key} has shape {tuple(tensor.shape)}, the model expects {want} "
                            f"(does config.json match the weights?)"
                        )
                    state[target] = tensor.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    if missing or unused:
        parts = []
        if missing:
            parts.append(f"{len(missing)} parameters missing from the checkpoint: {missing[:8]}")
        if unused:
            parts.append(f"{len(unused)} checkpoint tensors match no parameter: {sorted(unused)[:8]}")
        raise ModelLoadError(f"{directory}: " + "; ".join(parts) + " - is this the right model for its config.json?")
    model.load_state_dict(state, strict=True, assign=True)
