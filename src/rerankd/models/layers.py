"""Building blocks shared by the model files: norms, rotary embeddings and THE attention function.

Attention is always variable-length over packed sequences: tokens of all sequences of a batch lie in one
[tokens, heads, head_dim] tensor and `cu_seqlens` ([n + 1], int32) marks where each starts. No padding token
ever reaches a matmul. The backend is chosen once per (device, dtype): flash-attn's varlen kernel on CUDA in
fp16/bf16 when the package is installed, otherwise PyTorch SDPA called once per sequence.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn


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


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
    """Attention of ONE query per sequence over all of that sequence's keys, with no mask.

    q: [n, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]. Returns [n, heads, head_dim]. Used by the final
    layer, where only one token feeds the head: the last (a causal decoder's last token sees every key) or the
    first (a bidirectional encoder's [CLS]).
    """
    gqa = k.shape[1] != q.shape[1]
    outs = []
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
        qs = q[i : i + 1].transpose(0, 1).unsqueeze(0)  # [1, heads, 1, head_dim]
        ks = k[start:end].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, len, head_dim]
        vs = v[start:end].transpose(0, 1).unsqueeze(0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=gqa)[0, :, 0])  # [heads, head_dim]
    return torch.stack(outs)
