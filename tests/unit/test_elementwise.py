"""The element-wise CPU kernels (models/cpu_kernels.cpp: RMSNorm with its residual add, rotary embedding, SiLU-gated
product; bias + GELU or quick GELU, bias + residual add + LayerNorm) equal torch's ops they replace, in fp32 and in
bf16, and `cpu_elementwise` picks them where they run and says so."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rerankd.models import cpu_kernels, layers
from rerankd.models.layers import RMSNorm, apply_rotary, cpu_elementwise, rotary_cos_sin

needs_avx512 = pytest.mark.skipif(cpu_kernels.unavailable() is not None,
                                  reason=f"rerankd's CPU kernels cannot run here: {cpu_kernels.unavailable()}")
CPU = torch.device("cpu")
DIMS = [16, 24, 100, 512, 1536]  # one vector; partial vectors; the real m0 hidden size


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def torch_norm(dim: int, seed: int = 1) -> RMSNorm:
    norm = RMSNorm(dim, 1e-6)
    norm.weight.data = randn(dim, seed=seed)
    return norm


@needs_avx512
@pytest.mark.parametrize("dim", DIMS)
def test_rms_norm_equals_torchs(dim):
    norm = torch_norm(dim)
    wide = randn(37, dim + 8, scale=3.0)
    x = wide[:, 4 : 4 + dim]  # rows at a stride: a column slice, as a projection's output part
    delta = randn(37, dim, seed=2)
    want_sum = x + delta
    torch.testing.assert_close(cpu_kernels.rms_norm(x, norm.weight, norm.eps), norm(x), rtol=1e-6, atol=1e-6)
    got_sum, got = cpu_kernels.rms_norm(x, norm.weight, norm.eps, add=delta)
    assert torch.equal(got_sum, want_sum)  # the residual sum is the same add
    torch.testing.assert_close(got, norm(want_sum), rtol=1e-6, atol=1e-6)
    assert torch.equal(wide[:, 4 : 4 + dim], x)  # its input is left as it was


@needs_avx512
def test_the_rms_norm_module_runs_the_kernel_when_told(monkeypatch):
    norm = torch_norm(100)
    x, delta = randn(9, 100), randn(9, 100, seed=3)
    want_sum, want = norm.add(x, delta)
    heads = randn(9, 4, 100, seed=4)  # a per-head norm (Qwen3's q/k norms): [rows, heads, head_dim]
    want_heads = norm(heads)
    calls = []
    real = cpu_kernels.rms_norm
    monkeypatch.setattr(cpu_kernels, "rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    layers.use_cpu_elementwise(norm, "avx512")
    got_sum, got = norm.add(x, delta)
    assert torch.equal(got_sum, want_sum)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm(heads), want_heads, rtol=1e-6, atol=1e-6)
    assert norm.add(x, None)[0] is x
    assert len(calls) == 3


@needs_avx512
@pytest.mark.parametrize("heads, dim", [(8, 64), (2, 128), (3, 80), (1, 24)])
def test_rotary_equals_apply_rotary_bit_for_bit(heads, dim):
    rows = 53
    qkv = randn(rows, (heads + 2) * dim, scale=2.0)  # x is the first `heads` heads of a fused projection's rows
    before = qkv.clone()
    x = qkv[:, : heads * dim].view(rows, heads, dim)
    angles = torch.arange(rows, dtype=torch.float32)[:, None] * (1e4 ** (-torch.arange(dim // 2) / (dim // 2)))
    cos, sin = rotary_cos_sin(angles)
    want = apply_rotary(x, cos, sin)
    assert cpu_kernels.rotary_(x, cos, sin) is x
    assert torch.equal(x, want)  # products and sums round as torch's separate ops do (no FMA contraction)
    assert torch.equal(qkv[:, heads * dim :], before[:, heads * dim :])  # the other heads untouched


@needs_avx512
@pytest.mark.parametrize("dim", DIMS)
def test_silu_mul_equals_torchs(dim):
    gate, up = randn(29, dim, scale=4.0), randn(29, dim, seed=5)
    specials = torch.tensor([0.0, -0.0, 88.0, -88.0, 89.0, -89.0, 200.0, -200.0, float("inf"), float("-inf"),
                             float("nan"), 1e-30, -1e-30, 20.0, -20.0, 0.5])  # fmt: skip
    gate[0, : min(dim, 16)] = specials[: min(dim, 16)]
    want = F.silu(gate) * up
    got = cpu_kernels.silu_mul_(gate.clone(), up)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7, equal_nan=True)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())


@needs_avx512
@pytest.mark.parametrize("dim", DIMS)
def test_bias_gelu_equals_torchs(dim):
    x, bias = randn(31, dim + 3, scale=3.0)[:, :dim], randn(dim, seed=6)
    x[0, : min(dim, 8)] = torch.tensor([0.0, -0.0, 10.0, -10.0, 30.0, -30.0, 1e-20, -5.5])[: min(dim, 8)]
    want = F.gelu(x + bias)
    torch.testing.assert_close(cpu_kernels.bias_gelu_(x.clone(), bias), want, rtol=1e-6, atol=1e-6)
    got = x.clone()
    assert cpu_kernels.bias_gelu_(got, None) is got
    torch.testing.assert_close(got, F.gelu(x), rtol=1e-6, atol=1e-6)
    quick = (x + bias) * torch.sigmoid(1.702 * (x + bias))  # Qwen2-VL's vision MLP
    torch.testing.assert_close(cpu_kernels.bias_gelu_(x.clone(), bias, quick=True), quick, rtol=1e-6, atol=1e-6)


@needs_avx512
@pytest.mark.parametrize("dim", DIMS)
def test_layer_norm_equals_torchs(dim):
    norm = torch.nn.LayerNorm(dim, eps=1e-5)
    norm.weight.data, norm.bias.data = randn(dim, seed=7), randn(dim, seed=8)
    x, residual = randn(23, dim + 5, scale=2.0)[:, 2 : 2 + dim], randn(23, dim, seed=9, scale=4.0) + 3.0
    bias = randn(dim, seed=10)
    for b, r in ((None, None), (bias, None), (None, residual), (bias, residual)):
        s = x if b is None else x + b
        want = norm(s if r is None else r + s)
        torch.testing.assert_close(cpu_kernels.layer_norm(x, norm, b, r), want, rtol=2e-6, atol=2e-6)
    total, normed = cpu_kernels.layer_norm(x, norm, residual=residual, keep_sum=True)  # a pre-norm block's stream
    assert torch.equal(total, residual + x)
    torch.testing.assert_close(normed, norm(residual + x), rtol=2e-6, atol=2e-6)


def assert_bf16_ops(got: torch.Tensor, want: torch.Tensor, statistics: bool = False) -> None:
    """A kernel's bf16 result is the bf16 torch ops' own, bit for bit; statistics (a norm's, summed in another order
    than torch sums them): a value may round the other way, one bf16 step (at most 2^-7 of it) off, in 1 of 1,000."""
    assert got.dtype == want.dtype == torch.bfloat16
    if not statistics:
        assert torch.equal(got, want), f"{(got != want).sum().item()} of {got.numel()} differ"
        return
    off = got != want
    assert off.sum().item() <= got.numel() / 1000, f"{off.sum().item()} of {got.numel()} differ"
    torch.testing.assert_close(got[off].float(), want[off].float(), rtol=2**-7, atol=0)


@needs_avx512
@pytest.mark.parametrize("dim", [24, 512, 1536])
def test_bf16_kernels_equal_the_bf16_models_torch_ops(dim):
    """In a model computing in bf16 (cpu_bf16='native' on CPUs with bf16 instructions) each kernel rounds what the
    torch ops it replaces round: their results are the same bf16 values."""
    bf = torch.bfloat16
    x, delta = randn(37, dim + 8, scale=3.0).to(bf)[:, 4 : 4 + dim], randn(37, dim, seed=2).to(bf)
    norm = torch_norm(dim).to(bf)
    total, normed = cpu_kernels.rms_norm(x, norm.weight, norm.eps, add=delta)
    assert_bf16_ops(total, x + delta)
    assert_bf16_ops(normed, norm(x + delta), statistics=True)
    assert_bf16_ops(cpu_kernels.rms_norm(x, norm.weight, norm.eps), norm(x), statistics=True)

    heads = randn(37, 4, 64, seed=3, scale=2.0).to(bf)
    cos, sin = randn(37, 64, seed=4).to(bf), randn(37, 64, seed=5).to(bf)  # a bf16 decoder's, rounded once
    assert_bf16_ops(cpu_kernels.rotary_(heads.clone(), cos, sin), apply_rotary(heads, cos, sin))

    gate, up = randn(29, dim, seed=6, scale=4.0).to(bf), randn(29, dim, seed=7).to(bf)
    assert_bf16_ops(cpu_kernels.silu_mul_(gate.clone(), up), F.silu(gate) * up)

    h = randn(31, dim, seed=8, scale=1.5).clamp(min=-3.0).to(bf)  # where torch's float GELU is accurate (below)
    assert_bf16_ops(cpu_kernels.bias_gelu_(h.clone(), None), F.gelu(h))
    assert_bf16_ops(cpu_kernels.bias_gelu_(h.clone(), None, quick=True), h * torch.sigmoid(1.702 * h))

    ln = torch.nn.LayerNorm(dim, eps=1e-5).to(bf)
    ln.weight.data, ln.bias.data = randn(dim, seed=9).to(bf), randn(dim, seed=10).to(bf)
    residual = (randn(31, dim, seed=11, scale=4.0) + 3.0).to(bf)
    with torch.no_grad():
        want = ln(residual + h)
    assert_bf16_ops(cpu_kernels.layer_norm(h, ln, residual=residual), want, statistics=True)
    total, normed = cpu_kernels.layer_norm(h, ln, residual=residual, keep_sum=True)
    assert_bf16_ops(total, residual + h)
    assert_bf16_ops(normed, want, statistics=True)


@needs_avx512
def test_bf16_gelu_tail_and_specials():
    """Far below zero torch's bf16 GELU loses 1 + erf(z) to cancellation in float (gelu(-8) = 0); the kernel's stays
    within bf16's rounding of the exact value there. Zeros, NaN and infinities as torch's float64 GELU has them (its
    vectorized float GELU makes gelu(inf) NaN)."""
    x = torch.tensor([[-3.5, -5.0, -8.0, -12.0, 0.0, -0.0, 1e-20, float("inf"), float("-inf"), float("nan")]])
    got = cpu_kernels.bias_gelu_(x.bfloat16(), None)[0]
    x = x[0]
    exact = [v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in x[:4].bfloat16().double().tolist()]
    torch.testing.assert_close(got[:4].double(), torch.tensor(exact, dtype=torch.float64), rtol=8e-3, atol=0)
    torch.testing.assert_close(got[4:], F.gelu(x[4:].double()).bfloat16(), equal_nan=True)


@needs_avx512
def test_kernels_refuse_what_they_do_not_take():
    x = randn(4, 32)
    with pytest.raises(TypeError, match="rms_norm kernel takes float32 or bfloat16 CPU tensors, all of one dtype; got "
                                        "torch.float16 on cpu, torch.float16 on cpu"):  # fmt: skip
        cpu_kernels.rms_norm(x.half(), torch.ones(32).half(), 1e-6)
    with pytest.raises(TypeError, match="all of one dtype; got torch.bfloat16 on cpu, torch.float32 on cpu"):
        cpu_kernels.rms_norm(x.bfloat16(), torch.ones(32), 1e-6)  # a bf16 model's norm has a bf16 weight
    with pytest.raises(ValueError, match=r"weight must be a contiguous \[32\]"):
        cpu_kernels.rms_norm(x, torch.ones(16), 1e-6)
    with pytest.raises(ValueError, match="contiguous rows"):
        cpu_kernels.silu_mul_(x.t(), x.t())
    with pytest.raises(ValueError, match="cos and sin must be contiguous"):
        cpu_kernels.rotary_(x.view(4, 2, 16), torch.ones(4, 8), torch.ones(4, 8))
    with pytest.raises(ValueError, match=r"layer_norm's added bias must be a contiguous \[32\]; got \(8,\)"):
        cpu_kernels.layer_norm(x, torch.nn.LayerNorm(32), torch.ones(8))
    with pytest.raises(ValueError, match=r"residual \(2, 32\) must have x's shape \(4, 32\)"):
        cpu_kernels.layer_norm(x, torch.nn.LayerNorm(32), None, x[:2])
    with pytest.raises(RuntimeError, match="odd head_dim"):
        cpu_kernels.rotary_(randn(4, 2, 15), torch.ones(4, 15), torch.ones(4, 15))


def test_the_choice_is_made_once_and_named(monkeypatch):
    available = cpu_kernels.unavailable() is None
    assert cpu_elementwise(CPU, torch.float32, "auto") == ("avx512" if available else "torch")
    assert cpu_elementwise(CPU, torch.bfloat16, "auto") == ("avx512" if available else "torch")
    assert cpu_elementwise(CPU, torch.float16, "auto") == "torch"
    with pytest.raises(ValueError, match=r"cpu_elementwise='avx512' cannot run here: they compute in float32 or "
                                         r"bfloat16 on the CPU, and this model runs float16 on cpu"):  # fmt: skip
        cpu_elementwise(CPU, torch.float16, "avx512")
    assert cpu_elementwise(torch.device("cuda"), torch.float32, "auto") == "torch"
    assert cpu_elementwise(CPU, torch.float32, "torch") == "torch"
    with pytest.raises(ValueError, match="cpu_elementwise must be one of auto, avx512, torch; got 'fused'"):
        cpu_elementwise(CPU, torch.float32, "fused")
    monkeypatch.setattr(cpu_kernels, "_library", lambda: "no C++ compiler was found to build it (set $CXX, ...)")
    assert cpu_elementwise(CPU, torch.float32, "auto") == "torch"
    with pytest.raises(ValueError, match=r"cpu_elementwise='avx512' cannot run here: no C\+\+ compiler was found"):
        cpu_elementwise(CPU, torch.float32, "avx512")
