"""Building blocks shared by the model files: norms, rotary embeddings, THE attention function, and the fp32 CPU
kernel of the linear layers.

Attention is always variable-length over packed sequences: tokens of all sequences of a batch lie in one
[tokens, heads, head_dim] tensor and `cu_seqlens` ([n + 1], int32) marks where each starts. No padding token
ever reaches a matmul. The backend is chosen once per (device, dtype): flash-attn's varlen kernel on CUDA in
fp16/bf16 when the package is installed, otherwise PyTorch SDPA called once per sequence.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("rerankd")


class RMSNorm(nn.Module):
    """Root-mean-square norm as Qwen2 computes it: statistics in fp32, weight applied in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


# Rows per step of row-wise work on the CPU. The [rows, intermediate] activations of a whole batch (16K tokens x
# 8960 on the real m0) do not stay in cache, which makes element-wise work (activation functions, products, norms,
# residual adds) memory-bound; blocks of 1024 rows keep them cached at no cost to the matmuls (measured on m0:
# -30% decoder time at 16K tokens per batch).
CPU_ROWS_PER_STEP = 1024


def rowwise(fn, *xs: torch.Tensor) -> torch.Tensor:
    """fn(*xs) for a function that treats every row (token) on its own, run in blocks of rows on the CPU."""
    n = xs[0].shape[0]
    if xs[0].device.type != "cpu" or n <= CPU_ROWS_PER_STEP:
        return fn(*xs)
    first = fn(*(x[:CPU_ROWS_PER_STEP] for x in xs))
    out = first.new_empty((n, *first.shape[1:]))
    out[:CPU_ROWS_PER_STEP] = first
    for start in range(CPU_ROWS_PER_STEP, n, CPU_ROWS_PER_STEP):
        out[start : start + CPU_ROWS_PER_STEP] = fn(*(x[start : start + CPU_ROWS_PER_STEP] for x in xs))
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos, sin: [tokens, head_dim] (broadcast over heads)."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


@functools.cache
def _flash_attn_varlen():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def attention_backend(device: torch.device, dtype: torch.dtype) -> str:
    """'flash-varlen' or 'sdpa', decided once per device and dtype."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _flash_attn_varlen() is not None:
        return "flash-varlen"
    return "sdpa"


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: list[int],
    causal: bool,
    backend: str,
) -> torch.Tensor:
    """Attention within each packed sequence.

    q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim] (kv_heads divides heads);
    cu_seqlens: python list of n + 1 offsets. Returns [tokens, heads, head_dim].
    """
    if backend == "flash-varlen":
        cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=q.device)
        max_len = max(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
        return _flash_attn_varlen()(q, k, v, cu, cu, max_len, max_len, causal=causal)
    gqa = k.shape[1] != q.shape[1]
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        qs = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, heads, len, head_dim]
        ks = k[start:end].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, len, head_dim]
        vs = v[start:end].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=gqa)
        out[start:end] = o[0].transpose(0, 1)
    return out


def row_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], rows: list[int] | None = None
) -> torch.Tensor:
    """Attention of a few query rows per packed sequence over that sequence's keys: the final layer's, where only
    some tokens feed a head.

    k, v: [tokens, kv_heads, head_dim]. rows None: q is [n, heads, head_dim], ONE query per sequence that sees
    every key of its sequence, with no mask (a causal decoder's last token, a bidirectional encoder's [CLS]).
    rows: the token indices (into the packed tokens, ascending) whose queries q holds, [len(rows), heads,
    head_dim]; causal: each sees the keys of its own sequence up to itself (jina-reranker-v3's special tokens).
    Returns q's shape.
    """
    gqa = k.shape[1] != q.shape[1]
    outs = []
    r = 0
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
        if rows is None:
            lo, hi, mask = i, i + 1, None
        else:
            lo = hi = r
            while hi < len(rows) and rows[hi] < end:
                hi += 1
            r = hi
            if lo == hi:
                continue
            at = torch.tensor(rows[lo:hi], device=q.device) - start
            mask = torch.arange(end - start, device=q.device)[None, :] <= at[:, None]  # [rows, len]
        qs = q[lo:hi].transpose(0, 1).unsqueeze(0)  # [1, heads, rows, head_dim]
        ks = k[start:end].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, len, head_dim]
        vs = v[start:end].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))  # [rows, heads, head_dim]
    return torch.cat(outs)


# ------------------------------------------------------------------------------------------------ CPU linear layers

# torch runs an fp32 nn.Linear on x86 through MKL, which takes its AVX-512 kernels on Intel CPUs only: on an AMD
# Zen 5 (AVX-512, 2 x 512-bit FMA a cycle) MKL's sgemm reaches 160-190 GFLOP/s on 2 cores where oneDNN, which
# torch also ships, reaches 380-410 on the same shapes (benchmarks: docs/benchmarks.md). Both are fp32 with fp32
# accumulation; they differ only in summation order (about 1e-6 relative). Which one is faster is measured once
# per process, on a model-shaped product, unless the user names one.
CPU_GEMMS = ("auto", "onednn", "torch")
ONEDNN_MIN_SPEEDUP = 1.1  # 'auto' takes oneDNN only when clearly faster, so that near-ties stay on torch's default
PROBE_SHAPE = (512, 768, 3072)  # tokens x in_features x out_features, a BERT-base MLP input block: 2.4 GFLOP
PROBE_TOLERANCE = 1e-4  # oneDNN's probe result must equal torch's to fp32 rounding (measured: ~1e-6)
_probe_lock = threading.Lock()


def onednn_available() -> bool:
    """Whether this torch build can run linear layers through oneDNN (x86 and ARM builds ship it)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:
        torch.ops.mkldnn._linear_pointwise  # noqa: B018 (an internal op: inductor's fused linear on the CPU)
    except (AttributeError, RuntimeError):
        return False
    return True


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) through oneDNN's fp32 inner product."""
    if bias is not None:
        bias = bias.contiguous()  # the op reads a strided bias as if it were dense (wrong numbers, no error)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


class OneDNNLinear(nn.Linear):
    """nn.Linear computed by oneDNN; same parameters, same state_dict. use_cpu_gemm turns a loaded model's
    nn.Linear layers into this class in place (a class swap, once, at load)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, layer: nn.Linear, rows: slice = slice(None)) -> torch.Tensor:
    """F.linear with the output features `rows` of `layer` only, through the layer's own kernel."""
    w = layer.weight[rows]
    b = None if layer.bias is None else layer.bias[rows]
    return onednn_linear(x, w, b) if isinstance(layer, OneDNNLinear) else F.linear(x, w, b)


def onednn_speedup() -> float:
    """torch's default kernel's time over oneDNN's for one fp32 linear layer on this CPU (best of 3 each), measured
    once per process; concurrent loads wait for the one measurement (about 0.3 s on 2 cores).

    0.0 when oneDNN is missing or its result disagrees with torch's beyond fp32 rounding.
    """
    with _probe_lock:
        return _measure_onednn_speedup()


@functools.cache
def _measure_onednn_speedup() -> float:
    if not onednn_available():
        return 0.0
    m, k, n = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen)

    def best(fn: Callable[[], torch.Tensor]) -> float:
        fn()  # warm-up: first-call kernel generation
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.inference_mode():
        want = F.linear(x, w, b)
        try:
            got = onednn_linear(x, w, b)
        except RuntimeError as e:
            log.warning("oneDNN linear failed on this CPU (%s); using torch's default kernel", e)
            return 0.0
        if not torch.allclose(got, want, rtol=PROBE_TOLERANCE, atol=PROBE_TOLERANCE):
            log.warning("oneDNN linear disagrees with torch's by %.2e; using torch's default kernel",
                        (got - want).abs().max().item())  # fmt: skip
            return 0.0
        return best(lambda: F.linear(x, w, b)) / best(lambda: onednn_linear(x, w, b))


def check_cpu_gemm(requested: str) -> None:
    if requested not in CPU_GEMMS:
        raise ValueError(f"cpu_gemm must be one of {', '.join(CPU_GEMMS)}; got {requested!r}")


def use_cpu_gemm(model: nn.Module, requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Pick the kernel of `model`'s fp32 linear layers on the CPU and switch them to it; returns 'onednn' or 'torch'.

    requested: 'auto' (oneDNN when it measures >= ONEDNN_MIN_SPEEDUP x torch's default here), 'onednn' or 'torch'.
    Switched: every plain nn.Linear (to OneDNNLinear) and every module that computes a product of its own and
    declares a `uses_onednn` attribute (set to True). Other devices and dtypes, and a model with no float linear
    layer left (int8), keep torch's kernels: 'torch', with a warning if 'onednn' was asked for.
    """
    check_cpu_gemm(requested)
    if requested == "torch":
        return "torch"
    targets = [m for m in model.modules() if type(m) is nn.Linear or hasattr(m, "uses_onednn")]
    if device.type != "cpu" or dtype != torch.float32 or not targets:
        if requested == "onednn":
            why = "no float linear layer is left" if not targets else f"this model runs {dtype} on {device}"
            log.warning("cpu_gemm='onednn' applies to fp32 linear layers on the CPU only; %s: ignored", why)
        return "torch"
    if requested == "onednn":
        if not onednn_available():
            raise ValueError("cpu_gemm='onednn': this torch build has no oneDNN linear kernel; use 'auto' or 'torch'")
    else:
        speedup = onednn_speedup()
        if speedup < ONEDNN_MIN_SPEEDUP:
            log.info("CPU linear layers: torch's default kernel (oneDNN %s)",
                     f"{speedup:.2f}x" if speedup else "not usable")  # fmt: skip
            return "torch"
        log.info("CPU linear layers: oneDNN (%.2fx torch's default kernel on this CPU)", speedup)
    for module in targets:
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
        else:
            module.uses_onednn = True
    return "onednn"
