from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from rerankd import Reranker
from rerankd.tiny import make_tiny_checkpoint


@pytest.fixture(scope="session")
def m0_dir(tmp_path_factory):
    return make_tiny_checkpoint("jina-reranker-m0", tmp_path_factory.mktemp("tiny-m0"), seed=0)


@pytest.fixture(scope="session")
def m0(m0_dir):
    return Reranker.from_pretrained(m0_dir, show_progress=False)


@pytest.fixture(scope="session")
def m0_ref(m0_dir):
    pytest.importorskip("transformers")
    from .references import ReferenceM0

    return ReferenceM0(m0_dir)


def make_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth gradient with noise, so resizing and patching matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) * 127 / max(width + height, 1)], -1)
    arr = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def data_uri(img: Image.Image, fmt: str = "PNG") -> str:
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(encode(img, fmt)).decode()


def assert_close(a, b, tol):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    assert diff <= tol, f"max |diff| {diff:.3g} > {tol:g}\n ours: {a}\n  ref: {b}"


ELEMENTWISE = ["torch", "avx512"]  # the values of cpu_elementwise that name a kernel


def loaded_with_elementwise(path, kernel: str) -> Reranker:
    """The model at `path` loaded with cpu_elementwise=`kernel`, after checking that every module with element-wise
    work runs it (skips 'avx512' where rerankd's CPU kernels cannot run)."""
    from rerankd.models import cpu_kernels

    if kernel == "avx512" and cpu_kernels.unavailable() is not None:
        pytest.skip(f"rerankd's CPU kernels cannot run here: {cpu_kernels.unavailable()}")
    rr = Reranker.from_pretrained(path, show_progress=False, cpu_elementwise=kernel)
    assert rr.options.cpu_elementwise == kernel
    assert {m.elementwise for m in rr.backend.model.modules() if hasattr(m, "elementwise")} == {kernel}
    return rr


def to_legacy_layout(path) -> None:
    """A BERT checkpoint as older repos and many fine-tunes have it: the slow tokenizer's vocab.txt without
    tokenizer.json (here keeping accents, a non-default setting), the weights in pytorch_model.bin, with the
    LayerNorm names of checkpoints ported from TensorFlow (gamma, beta)."""
    (path / "tokenizer.json").unlink()
    settings = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**settings, "strip_accents": False}))
    weights = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in weights.items()}  # fmt: skip
    assert legacy != weights
    torch.save(legacy, path / "pytorch_model.bin")
