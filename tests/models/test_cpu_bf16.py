"""bfloat16 models on the CPU (cpu_bf16): 'upcast' keeps the linear and embedding weights in bf16 and computes the
fp32 scores of those weights; 'native' computes in bf16, close to them; 'auto' takes whichever measures faster."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rerankd import Reranker
from rerankd.models import cpu_kernels, layers
from rerankd.models.layers import UpcastEmbedding, UpcastLinear, cpu_bf16
from rerankd.tiny import make_tiny_checkpoint

from ..conftest import assert_close, make_image

CPU = torch.device("cpu")
KINDS = ["jina-reranker-v2", "jina-reranker-m0", "qwen3-reranker", "jina-reranker-v3"]
PAIRS = [["what is a panda?", "The giant panda is a bear native to south central China."],
         ["what is a panda?", "Pandas is a Python library for data frames. " * 6],
         ["solar power", "Photovoltaic cells turn sunlight into electricity."]]  # fmt: skip
NATIVE_BOUND = 0.05  # bf16 arithmetic against fp32 on the same weights (docs/benchmarks.md: bf16 on the CPU)
KERNELS_BOUND = 0.01  # bf16 on the element-wise kernels against bf16 on torch's ops: a value rounded the other way


def load(path, **options) -> Reranker:
    return Reranker.from_pretrained(path, show_progress=False, **options)


@pytest.fixture(scope="module", params=KINDS)
def checkpoint(request, tmp_path_factory):
    """A tiny checkpoint stored in bf16 (as the real ones are) and its fp32 scores."""
    path = make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=3)
    return path, load(path, dtype="float32").compute_score(PAIRS)


def test_upcast_keeps_bf16_weights_and_gives_their_fp32_scores(checkpoint):
    path, fp32 = checkpoint
    rr = load(path, dtype="bfloat16", cpu_bf16="upcast")
    assert (rr.options.dtype, rr.options.cpu_bf16, rr.backend.dtype) == ("bfloat16", "upcast", torch.float32)
    assert rr.options.attention == load(path, dtype="float32").options.attention  # fp32 attention, the same kernel
    layers_ = [m for m in rr.backend.model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    assert layers_ and all(isinstance(m, (UpcastLinear, UpcastEmbedding)) or type(m).__name__ == "OneDNNLinear"
                           for m in layers_)  # fmt: skip
    stored = {p.dtype for m in layers_ for p in m.parameters(recurse=False) if p.dim() > 1}
    rest = {p.dtype for n, p in rr.backend.model.named_parameters() if p.dim() == 1}  # norms, biases
    assert stored == {torch.bfloat16} and rest == {torch.float32}
    # the weights are bf16 values already: fp32 arithmetic on them is the fp32 model's, to summation order
    assert_close(rr.compute_score(PAIRS), fp32, 1e-6)


def test_native_computes_in_bf16_within_the_bound(checkpoint):
    path, fp32 = checkpoint
    rr = load(path, dtype="bfloat16", cpu_bf16="native")
    assert (rr.options.dtype, rr.options.cpu_bf16, rr.backend.dtype) == ("bfloat16", "native", torch.bfloat16)
    assert rr.options.attention == load(path, dtype="float32").options.attention  # the kernel, on widened q/k/v
    got = rr.compute_score(PAIRS)
    assert_close(got, fp32, NATIVE_BOUND)
    assert got != fp32  # really bf16 arithmetic


def test_native_on_the_cpu_kernels_gives_the_torch_ops_scores(checkpoint):
    """bf16 arithmetic with the element-wise work on rerankd's CPU kernels (the default where they build) and on
    torch's ops: the kernels round what the ops round, so the scores differ by bf16's noise alone (a norm's sum taken
    in another order can round a value the other way); m0 with an image, for the vision tower's."""
    if cpu_kernels.unavailable() is not None:
        pytest.skip(f"rerankd's CPU kernels cannot run here: {cpu_kernels.unavailable()}")
    path, _ = checkpoint
    kernels = load(path, dtype="bfloat16", cpu_bf16="native")
    ops = load(path, dtype="bfloat16", cpu_bf16="native", cpu_elementwise="torch")
    assert (kernels.options.cpu_elementwise, ops.options.cpu_elementwise) == ("avx512", "torch")
    assert {m.elementwise for m in kernels.backend.model.modules() if hasattr(m, "elementwise")} == {"avx512"}
    pairs = PAIRS + ([["what is in the picture?", make_image(96, 64, seed=1)]] if "m0" in path.name else [])
    got, want = kernels.compute_score(pairs), ops.compute_score(pairs)
    assert_close(got, want, KERNELS_BOUND)


def test_upcast_rounds_an_fp32_checkpoint_to_bf16(tmp_path):
    """An fp32 checkpoint in 'upcast': the fp32 scores of its matrices rounded to bf16, norms and biases as stored."""
    fp32_dir = make_tiny_checkpoint("jina-reranker-v2", tmp_path / "fp32", seed=5, dtype=torch.float32)
    rounded = tmp_path / "rounded"
    shutil.copytree(fp32_dir, rounded)
    for f in rounded.glob("*.safetensors"):
        save_file({k: v.bfloat16().float() if v.dim() > 1 else v for k, v in load_file(f).items()}, f)
    want = load(rounded, dtype="float32").compute_score(PAIRS)
    assert_close(load(fp32_dir, dtype="bfloat16", cpu_bf16="upcast").compute_score(PAIRS), want, 1e-6)
    assert load(fp32_dir, dtype="float32").compute_score(PAIRS) != want  # the rounding is visible


def test_the_choice(monkeypatch, caplog):
    bf16, fp32 = torch.bfloat16, torch.float32
    assert cpu_bf16(CPU, fp32, "auto") == "none"
    assert cpu_bf16(torch.device("cuda"), bf16, "auto") == "none"
    with caplog.at_level(logging.WARNING, logger="rerankd"):
        assert cpu_bf16(CPU, fp32, "upcast") == "none"
    assert "applies to bfloat16 models on the CPU only" in caplog.text
    with pytest.raises(ValueError, match="cpu_bf16 must be one of auto, native, upcast; got 'fp16'"):
        cpu_bf16(CPU, bf16, "fp16")
    assert cpu_bf16(CPU, bf16, "native") == "native" and cpu_bf16(CPU, bf16, "upcast") == "upcast"
    for speedup, want in ((4.0, "native"), (1.09, "upcast"), (0.25, "upcast")):
        monkeypatch.setattr(layers, "native_bf16_speedup", lambda s=speedup: s)
        assert cpu_bf16(CPU, bf16, "auto") == want


def test_the_probe_runs_here():
    speedup = layers.native_bf16_speedup()
    assert speedup > 0 and speedup == layers.native_bf16_speedup()  # measured once


def test_a_bad_value_fails_before_loading(tmp_path):
    with pytest.raises(ValueError, match="cpu_bf16 must be one of"):
        load(tmp_path / "not-there", dtype="bfloat16", cpu_bf16="fast")


def test_int8_and_fp32_models_report_none(checkpoint):
    path, _ = checkpoint
    assert load(path, dtype="float32").options.cpu_bf16 == "none"
    if "v2" in path.name:
        assert load(path, dtype="bfloat16", quantize="int8").options.cpu_bf16 == "none"


def test_row_blocks_share_one_widened_weight(monkeypatch):
    """rowwise runs a layer's row blocks with its bf16 weights widened once (not once a block), and lets them go."""
    monkeypatch.setattr(layers, "CPU_ROWS_PER_STEP", 4)
    torch.manual_seed(0)
    layer = nn.Linear(8, 6).bfloat16().requires_grad_(False)
    layer.bias.data = layer.bias.float()
    layer.__class__ = UpcastLinear
    x = torch.randn(10, 8)
    seen = []

    def fn(rows):
        out = layer(rows)
        seen.append(next(iter(layers._widened.weights.values())))
        return out

    got = layers.rowwise(fn, x)
    assert len(seen) == 3 and all(w is seen[0] for w in seen) and seen[0].dtype == torch.float32
    assert layers._widened.weights is None
    assert_close(got, torch.nn.functional.linear(x, layer.weight.float(), layer.bias), 1e-6)
