"""The fp32 CPU kernel of the linear layers: oneDNN equals torch's default to fp32 rounding, and the choice works."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rerankd.models import layers
from rerankd.models.layers import OneDNNLinear, linear, onednn_available, onednn_linear, use_cpu_gemm

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear kernel")
CPU, FP32 = torch.device("cpu"), torch.float32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 32, bias=False), nn.LayerNorm(32)).eval()


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 64), (37, 64), (3, 5, 64)])
def test_onednn_linear_equals_f_linear(shape):
    torch.manual_seed(1)
    x, w, b = torch.randn(shape), torch.randn(48, 64), torch.randn(48)
    assert rel_err(onednn_linear(x, w, b), F.linear(x, w, b)) < 1e-6
    assert rel_err(onednn_linear(x, w, None), F.linear(x, w)) < 1e-6
    xt = torch.randn(64, 9).t()  # a non-contiguous input
    assert rel_err(onednn_linear(xt, w, b), F.linear(xt, w, b)) < 1e-6
    wide = torch.randn(96)  # strided and broadcast biases (the op itself would read them as dense)
    assert rel_err(onednn_linear(x, w, wide[::2]), F.linear(x, w, wide[::2])) < 1e-6
    assert rel_err(onednn_linear(x, w, wide[:1].expand(48)), F.linear(x, w, wide[:1].expand(48))) < 1e-6
    assert onednn_linear(torch.randn(0, 64), w, b).shape == (0, 48)  # an empty batch


@needs_onednn
def test_use_cpu_gemm_onednn_switches_every_linear_and_keeps_outputs():
    m, x = model(), torch.randn(20, 64)
    want, keys = m(x), list(m.state_dict())
    assert use_cpu_gemm(m, "onednn", CPU, FP32) == "onednn"
    assert [type(mod) for mod in m if isinstance(mod, nn.Linear)] == [OneDNNLinear, OneDNNLinear]
    assert list(m.state_dict()) == keys
    with torch.inference_mode():
        assert rel_err(m(x), want) < 1e-5
        with torch.profiler.profile() as prof:  # the switched layers really run on oneDNN, not torch's kernel
            m(x)
    ops = {e.key for e in prof.key_averages()}
    assert "mkldnn::_linear_pointwise" in ops and "aten::addmm" not in ops and "aten::mm" not in ops, ops
    # a slice of a layer's outputs goes through the layer's kernel, oneDNN or not
    plain = model()[0]
    assert rel_err(linear(x, m[0], slice(10, 30)), F.linear(x, plain.weight[10:30], plain.bias[10:30])) < 1e-6
    assert torch.equal(linear(x, plain, slice(10, 30)), F.linear(x, plain.weight[10:30], plain.bias[10:30]))


def test_use_cpu_gemm_keeps_torch_when_asked_or_off_cpu_fp32_and_bf16(caplog):
    for requested, device, dtype in [("torch", CPU, FP32), ("onednn", torch.device("cuda"), FP32),
                                     ("torch", CPU, torch.bfloat16), ("auto", CPU, torch.float16),
                                     ("onednn", CPU, torch.float16)]:  # fmt: skip
        m = model()
        with caplog.at_level(logging.WARNING, logger="rerankd"):
            caplog.clear()
            assert use_cpu_gemm(m, requested, device, dtype) == "torch"
        assert all(type(mod) is not OneDNNLinear for mod in m.modules())
        # an explicit 'onednn' that cannot apply says so
        assert ("applies to fp32 and bf16 linear layers on the CPU only" in caplog.text) == (requested == "onednn")
    no_linear = nn.Sequential(nn.LayerNorm(8))  # e.g. an int8 model: nothing to switch, nothing to measure
    assert use_cpu_gemm(no_linear, "auto", CPU, FP32) == "torch"
    with pytest.raises(ValueError, match="cpu_gemm must be one of auto, onednn, torch; got 'mkl'"):
        use_cpu_gemm(model(), "mkl", CPU, FP32)


@needs_onednn
def test_auto_takes_onednn_only_when_clearly_faster(monkeypatch):
    for speedup, expected in [(2.3, "onednn"), (1.05, "torch"), (0.0, "torch")]:
        monkeypatch.setattr(layers, "onednn_speedup", lambda s=speedup: s)
        m = model()
        assert use_cpu_gemm(m, "auto", CPU, FP32) == expected
        assert any(type(mod) is OneDNNLinear for mod in m.modules()) == (expected == "onednn")


@needs_onednn
def test_bf16_takes_onednn_with_the_bias_in_its_product(monkeypatch):
    """In bf16, torch's linear layer runs oneDNN's product and then adds the bias in a pass of its own: 'auto' takes
    oneDNN's op, which adds it in the product, without timing the two, and the values are the same bit for bit."""
    monkeypatch.setattr(layers, "onednn_speedup", lambda: pytest.fail("bf16 needs no timing"))
    m = model().bfloat16()
    x = torch.randn(50, m[0].in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
    want = m(x)
    assert use_cpu_gemm(m, "auto", CPU, torch.bfloat16) == "onednn"
    assert any(type(mod) is OneDNNLinear for mod in m.modules())
    with torch.profiler.profile() as prof:
        got = m(x)
    ops = {e.key for e in prof.key_averages()}
    assert "mkldnn::_linear_pointwise" in ops and "aten::addmm" not in ops, ops
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_speedup_probe_runs_once_even_when_loads_race(monkeypatch):
    calls = []

    def slow_probe():
        calls.append(1)
        threading.Event().wait(0.05)
        return 2.0

    measure = layers.functools.cache(slow_probe)
    monkeypatch.setattr(layers, "_measure_onednn_speedup", measure)
    results = []
    threads = [threading.Thread(target=lambda: results.append(layers.onednn_speedup())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [2.0] * 4 and len(calls) == 1


def test_speedup_probe_runs_here():
    s = layers.onednn_speedup()
    assert s == 0.0 if not onednn_available() else s > 0.0
