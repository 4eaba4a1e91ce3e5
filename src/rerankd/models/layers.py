"""Building blocks shared by the model files: norms, rotary embeddings, THE attention function, the fp32 CPU
kernel of the linear layers, where the element-wise work runs (cpu_elementwise), and how a bf16 model computes on
the CPU.

Attention is always variable-length over packed sequences: tokens of all sequences of a batch lie in one
[tokens, heads, head_dim] tensor and `cu_seqlens` ([n + 1], int32) marks where each starts. No padding token
ever reaches a matmul. The kernel is chosen once per (device, dtype) (attention_backend): on CUDA in fp16/bf16
flash-attn's varlen kernel when the package is installed, else torch's own varlen flash attention, else
FlexAttention with a document mask; on the CPU rerankd's own packed kernel (cpu_kernels, AVX-512, fp32; a bf16
model's q/k/v widened for it); otherwise PyTorch SDPA called once per sequence. A forward's `Packing` holds
the offsets and what the kernel needs on the device, made once before the layers.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels

log = logging.getLogger("rerankd")


class RMSNorm(nn.Module):
    """Root-mean-square norm as Qwen2 computes it: statistics in fp32, weight applied in the input dtype."""

    elementwise = "torch"  # 'avx512': rerankd's CPU kernel (use_cpu_elementwise sets it at load)

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.elementwise == "avx512":
            return cpu_kernels.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def add(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)) for [rows, dim] tensors, a residual sum and its norm (one pass on the CPU
        kernel); delta None: (x, norm(x))."""
        if delta is None:
            return x, self(x)
        if self.elementwise == "avx512":
            return cpu_kernels.rms_norm(x, self.weight, self.eps, add=delta)
        x = x + delta
        return x, self(x)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (the same parameters) with RMSNorm's `add`: a pre-norm block's residual sum and its norm."""

    elementwise = "torch"  # 'avx512': `add` on rerankd's CPU kernel (use_cpu_elementwise sets it at load)

    def add(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)) for [rows, dim] tensors (one pass on the CPU kernel); delta None: (x,
        norm(x))."""
        if self.elementwise != "avx512":
            x = x if delta is None else x + delta
            return x, self(x)
        if delta is None:
            return x, cpu_kernels.layer_norm(x, self)
        return cpu_kernels.layer_norm(delta, self, residual=x, keep_sum=True)


# Rows per step of row-wise work on the CPU. The [rows, intermediate] activations of a whole batch (16K tokens x
# 8960 on the real m0) do not stay in cache, which makes element-wise work (activation functions, products, norms,
# residual adds) memory-bound; blocks of 1024 rows keep them cached at no cost to the matmuls (measured on m0:
# -30% decoder time at 16K tokens per batch).
CPU_ROWS_PER_STEP = 1024


def rowwise(fn, *xs: torch.Tensor) -> torch.Tensor:
    """fn(*xs) for a function that treats every row (token) on its own, run in blocks of rows on the CPU. The
    bf16-stored weights its linear layers widen (cpu_bf16='upcast') are widened once for all the blocks."""
    n = xs[0].shape[0]
    if xs[0].device.type != "cpu" or n <= CPU_ROWS_PER_STEP:
        return fn(*xs)
    _widened.weights = {}
    try:
        first = fn(*(x[:CPU_ROWS_PER_STEP] for x in xs))
        out = first.new_empty((n, *first.shape[1:]))
        out[:CPU_ROWS_PER_STEP] = first
        for start in range(CPU_ROWS_PER_STEP, n, CPU_ROWS_PER_STEP):
            out[start : start + CPU_ROWS_PER_STEP] = fn(*(x[start : start + CPU_ROWS_PER_STEP] for x in xs))
    finally:
        _widened.weights = None
    return out


# The weights widened within one rowwise call on this thread, by (layer, rows); None outside one. Widening a layer's
# weights again for each block of rows cost 3-4% of a v2 forward (4 blocks a 4096-token batch; docs/benchmarks.md).
_widened = threading.local()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., 2 x n] (fp32) of the rotary angles `freqs` [..., n] (fp32, each frequency once; the two halves
    of a head share them), computed in float64 and rounded: on the CPU by numpy, single-threaded. torch's fp32 cos
    on the CPU was seen to return errors of 1.5e-4 for one OpenMP thread's share of a call (torch 2.13, the first
    forward in a new worker thread, now and then), which moved a tiny jina-reranker-v3's scores by 4e-5 between two
    runs of the same request. Rounded float64 values are the fp32 cos/sin of the same fp32 angles that the
    references compute, to the last bit or one ulp off their own fp32 results."""
    if freqs.device.type == "cpu":
        angles = freqs.double().numpy()
        cos, sin = torch.from_numpy(np.cos(angles)).float(), torch.from_numpy(np.sin(angles)).float()
    else:
        cos, sin = freqs.double().cos().float(), freqs.double().sin().float()
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos, sin: [tokens, head_dim] (broadcast over heads)."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


ATTENTION_KERNELS = ("auto", "flash-attn", "varlen", "flex", "avx512", "sdpa")
HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _flash_attn_varlen():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:  # installed, but built for another torch or CUDA (undefined symbols): as if it were not there
        from flash_attn import flash_attn_varlen_func
    except (ImportError, OSError) as e:
        log.warning("flash-attn is installed but does not import (%s: %s); using torch's kernels", type(e).__name__, e)
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen():
    """torch's own variable-length flash attention (torch >= 2.10; CUDA kernels only) and its keyword names."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@functools.cache
def _flex():
    """FlexAttention, compiled once for dynamic shapes (batches of new token counts reuse the kernel), and its
    block-mask builder."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention, dynamic=True), create_block_mask


def _unavailable(kernel: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `kernel` cannot run attention on (device, dtype) here, or None when it can."""
    runs = f"{str(dtype).removeprefix('torch.')} on {device.type}"
    if kernel in ("flash-attn", "varlen"):
        if device.type != "cuda" or dtype not in HALF:
            return f"it runs on CUDA in float16/bfloat16 only, and this model runs {runs}"
        if kernel == "flash-attn" and _flash_attn_varlen() is None:
            return "the flash-attn package is not installed (pip install flash-attn)"
        if kernel == "varlen" and _torch_varlen() is None:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.10 has)"
    if kernel == "avx512":
        if device.type != "cpu" or dtype not in (torch.float32, *HALF):
            return f"it runs on the CPU in float32 (or bfloat16/float16, widened) only, and this model runs {runs}"
        return cpu_kernels.unavailable()
    if kernel == "flex":
        if device.type != "cuda":
            return ("it is offered on CUDA only: on the CPU it was 1.2-4x slower than the SDPA loop "
                    "(benchmarks/bench_cpu_attention.py) and inductor failed to compile some head sizes (torch 2.13)")
        if _flex() is None:
            return f"torch {torch.__version__} has no FlexAttention"
    return None


def attention_backend(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> str:
    """The attention kernel of a model on (device, dtype), chosen once at load: the one `requested`, or for 'auto':
    on CUDA in fp16/bf16 flash-attn's varlen kernel when the package is installed, else torch's own varlen flash
    attention, else FlexAttention with a document mask; on the CPU rerankd's own packed kernel ('avx512', where it
    builds; it computes in fp32, a bf16 model's q/k/v widened for it); everywhere else (fp32 on CUDA, a CPU without
    AVX-512) PyTorch SDPA called once per sequence.
    FlexAttention over the packed batch was 1.2-4x slower than that loop on the CPU, rerankd's kernel 1.5-3x faster
    on short sequences (benchmarks/bench_cpu_attention.py); fp32 on CUDA is the parity mode, which the flash
    kernels do not run.

    Every kernel but the loop is first run on a test batch and compared with the loop (`_disagrees`): one that
    fails or differs beyond the dtype's rounding is passed over with a warning ('auto') or refused (requested)."""
    if requested not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_KERNELS)}; got {requested!r}")
    if requested != "auto":
        why = _unavailable(requested, device, dtype) or _disagrees(requested, device, dtype)
        if why is not None:
            raise ValueError(f"attention={requested!r} cannot run here: {why}; use 'auto' or 'sdpa'")
        return requested
    for kernel in _candidates(device, dtype):
        if _unavailable(kernel, device, dtype) is not None:
            continue
        why = _disagrees(kernel, device, dtype)
        if why is None:
            return kernel
        log.warning("attention: passing over %r on %s in %s: %s", kernel, device, dtype, why)
    return "sdpa"


def _candidates(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """The kernels 'auto' tries before the SDPA loop, best first."""
    if device.type == "cpu" and dtype in (torch.float32, *HALF):
        return ("avx512",)
    return ("flash-attn", "varlen", "flex") if device.type == "cuda" and dtype in HALF else ()


KERNEL_PROBE_LENGTHS = (5, 130, 33, 1)  # short, one past a 128-token block, a one-token sequence
# |kernel - SDPA loop in fp32| allowed on the probe's inputs (rounded to the dtype first): the kernel's own rounding
KERNEL_PROBE_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}


@functools.cache
def _disagrees(kernel: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `kernel` is not to be trusted on (device, dtype), or None: run once, at load, on a small packed batch with
    grouped-query heads (full and causal attention, one query row per sequence), against the SDPA loop in fp32 on
    the same (rounded) inputs; it must not raise nor differ by more than KERNEL_PROBE_TOLERANCE[dtype]."""
    if kernel == "sdpa":
        return None
    g = torch.Generator().manual_seed(0)
    want_pack = packing(KERNEL_PROBE_LENGTHS, torch.device("cpu"), "sdpa")
    pack = packing(KERNEL_PROBE_LENGTHS, device, kernel)
    tokens = pack.offsets[-1]
    q = torch.randn(tokens, 4, 64, generator=g).to(dtype)
    k, v = (torch.randn(tokens, 2, 64, generator=g).to(dtype) for _ in range(2))
    last = [end - 1 for end in pack.offsets[1:]]
    qd, kd, vd = (to_device(t, device) for t in (q, k, v))
    diff = 0.0
    try:
        with torch.inference_mode():
            for causal in (False, True):
                want = varlen_attention(q.float(), k.float(), v.float(), want_pack, causal)
                got = varlen_attention(qd, kd, vd, pack, causal).float().cpu()
                diff = max(diff, (got - want).abs().max().item())
            want = row_attention(q[last].float(), k.float(), v.float(), want_pack)
            got = row_attention(qd[to_device(torch.tensor(last), device)], kd, vd, pack).float().cpu()
            diff = max(diff, (got - want).abs().max().item())
    except Exception as e:  # a kernel that does not run here is passed over, whatever broke
        return f"it failed on a test batch ({type(e).__name__}: {str(e)[:300]})"
    tolerance = KERNEL_PROBE_TOLERANCE.get(dtype, 1e-4)
    if not diff <= tolerance:
        return f"on a test batch it differs from the SDPA loop by {diff:.2e}, more than {dtype} rounding ({tolerance})"
    return None


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor on `device` (in `dtype`): to CUDA from pinned memory with a non-blocking copy, so that the host
    goes on queueing work while it travels instead of waiting for the GPU to drain."""
    if device.type != "cuda":
        return t.to(device, dtype) if dtype is not None else t.to(device)
    return t.pin_memory().to(device, dtype=dtype, non_blocking=True)


@dataclass
class Packing:
    """The packed sequences of one forward and the attention kernel that runs them: `offsets` (cu_seqlens, n + 1,
    a Python list) for the loops, and what the kernel needs on the device (int32 cu_seqlens; FlexAttention's
    document ids and block masks), made once per forward by `packing`: a tensor made inside a layer would stall
    the host until the GPU caught up, once per layer."""

    offsets: list[int]
    kernel: str
    max_len: int
    cu: torch.Tensor | None = None  # int32 [n + 1] on the device (varlen kernels)
    one_each: torch.Tensor | None = None  # int32 0..n on the device: one query row per sequence (row_attention)
    doc: torch.Tensor | None = None  # [tokens] sequence index of each token (FlexAttention)
    masks: dict = field(default_factory=dict)  # FlexAttention block masks by kind, built at first use
    cpu_full: torch.Tensor | None = None  # the avx512 kernel's spans: every sequence, whole
    cpu_rows: torch.Tensor | None = None  # ... and one query row per sequence (row_attention)
    keys: torch.Tensor | None = None  # shared prefixes (shared_packing): each unit's key rows, an index into the rows
    key_spans: list[tuple[int, int]] | None = None  # ... each unit's span of them
    heads: list[int] | None = None  # ... the row of each sequence's last token (None: each unit's last)
    head_units: list[int] | None = None  # ... and the unit it ends

    @property
    def n(self) -> int:
        return len(self.offsets) - 1

    def spans(self):
        return zip(self.offsets[:-1], self.offsets[1:])


def packing(lengths: Iterable[int], device: torch.device, kernel: str) -> Packing:
    """The Packing of sequences of these token counts, in order, for `kernel` (attention_backend's choice)."""
    lengths = list(lengths)
    pack = Packing(list(itertools.accumulate(lengths, initial=0)), kernel, max(lengths, default=0))
    if kernel in ("flash-attn", "varlen"):
        pack.cu = to_device(torch.tensor(pack.offsets, dtype=torch.int32), device)
        pack.one_each = to_device(torch.arange(pack.n + 1, dtype=torch.int32), device)
    elif kernel == "flex":
        pack.doc = to_device(torch.repeat_interleave(torch.arange(pack.n), torch.tensor(lengths)), device)
    elif kernel == "avx512":
        starts = pack.offsets[:-1]
        pack.cpu_full = cpu_kernels.spans_tensor(starts, lengths, starts, lengths, [0] * pack.n)
        pack.cpu_rows = cpu_kernels.spans_tensor(starts, lengths, range(pack.n), [1] * pack.n, [0] * pack.n)
    return pack


# A prompt prefix shorter than this is computed in each sequence rather than shared (sharing it costs a copy of its
# keys and values per sequence and layer, and a unit of attention work of its own).
MIN_SHARED_TOKENS = 16


@dataclass
class Unit:
    """Rows of one forward when sequences share prompt prefixes (prefix_units): the tokens `ids`, from position
    `start` on, of the sequences that share them (seq None), or the rest of sequence `seq` (its last unit, whose last
    token feeds its head); its queries see its ancestors' keys (parent, the parent's parent, ...) and its own."""

    ids: list[int]
    start: int  # position of its first token in its sequences
    parent: int | None  # index of the unit holding the tokens before `start`
    seq: int | None


def prefix_units(seqs: list[list[int]], min_shared: int = MIN_SHARED_TOKENS) -> list[Unit]:
    """The sequences (token ids) as a tree of units, parents first: every run of at least `min_shared` tokens that
    two or more of them begin with (after their common ancestors) is one unit, computed once; the rest of each
    sequence is a unit of its own, of at least its last token. In a causal decoder a token's states depend on the
    tokens before it only, so a shared unit's states are each sharing sequence's own."""
    units: list[Unit] = []
    todo = [(list(range(len(seqs))), 0, None)] if seqs else []  # (members, depth, parent): members share ids[:depth]
    while todo:
        members, depth, parent = todo.pop()
        if len(members) == 1:
            units.append(Unit(seqs[members[0]][depth:], depth, parent, members[0]))
            continue
        first, shortest = seqs[members[0]], min(len(seqs[m]) for m in members)
        common = depth  # where they first differ (or the shortest's end)
        while common < shortest and all(seqs[m][common] == first[common] for m in members):
            common += 1
        shared = min(common, shortest - 1) - depth  # every sequence keeps its last token
        if shared >= min_shared:
            units.append(Unit(first[depth : depth + shared], depth, parent, None))
            parent, depth = len(units) - 1, depth + shared
        if common >= shortest:  # the shortest end here (their last tokens, own units); the others go on
            units += [Unit(seqs[m][depth:], depth, parent, m) for m in members if len(seqs[m]) == shortest]
            longer = [m for m in members if len(seqs[m]) > shortest]
            todo += [(longer, depth, parent)] if longer else []
            continue
        groups: dict[int, list[int]] = {}
        for m in members:
            groups.setdefault(seqs[m][common], []).append(m)
        todo += [(group, depth, parent) for group in reversed(groups.values())]
    return units


SHARED_KERNELS = ("avx512", "sdpa")  # the attention kernels that take shared_packing's layout


def shared_packing(units: list[Unit], device: torch.device, kernel: str) -> Packing:
    """The Packing of prefix_units' units, in order, for `kernel` (one of SHARED_KERNELS): unit u's queries (its
    rows, at positions u.start ...) see its ancestors' keys and its own, laid out by the `keys` index
    (varlen_attention and row_attention gather them); each sequence's head reads its last unit's last row (`heads`,
    in the order of the sequences)."""
    if kernel not in SHARED_KERNELS:
        raise ValueError(f"shared prefixes run on the {' and '.join(SHARED_KERNELS)} attention kernels, not {kernel!r}")
    offsets = list(itertools.accumulate((len(u.ids) for u in units), initial=0))
    pack = Packing(offsets, kernel, max(len(u.ids) + u.start for u in units))
    rows, key_start, key_len, heads = [], [], [], {}
    for i, u in enumerate(units):
        chain, at = [], i
        while at is not None:
            chain.append(at)
            at = units[at].parent
        key_start.append(key_start[-1] + key_len[-1] if key_len else 0)
        key_len.append(u.start + len(u.ids))  # its ancestors' rows, then its own
        rows += [range(offsets[a], offsets[a + 1]) for a in reversed(chain)]
        if u.seq is not None:
            heads[u.seq] = (i, offsets[i + 1] - 1)
    pack.keys = to_device(torch.tensor([r for span in rows for r in span], dtype=torch.long), device)
    pack.key_spans = [(a, a + n) for a, n in zip(key_start, key_len)]
    last = [heads[s] for s in sorted(heads)]
    pack.heads, pack.head_units = [row for _, row in last], [i for i, _ in last]
    if kernel == "avx512":
        pack.cpu_full = cpu_kernels.spans_tensor(key_start, key_len, offsets[:-1], [len(u.ids) for u in units],
                                                 [u.start for u in units])  # fmt: skip
        pack.cpu_rows = cpu_kernels.spans_tensor([key_start[i] for i, _ in last], [key_len[i] for i, _ in last],
                                                 range(len(last)), [1] * len(last), [0] * len(last))  # fmt: skip
    return pack


def _shared_keys(k: torch.Tensor, v: torch.Tensor, pack: Packing) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v as the Packing's attention reads them: as they are, or each unit's keys gathered (shared_packing)."""
    if pack.keys is None:
        return k, v
    return k.index_select(0, pack.keys), v.index_select(0, pack.keys)


def _flex_mask(pack: Packing, kind: str, q_len: int, device: torch.device):
    """FlexAttention's block mask of `kind`: 'full' (within each sequence) or 'causal' (and not ahead)."""
    if kind not in pack.masks:
        doc = pack.doc
        if kind == "full":
            def mask(b, h, qi, ki):
                return doc[qi] == doc[ki]
        else:
            def mask(b, h, qi, ki):
                return (doc[qi] == doc[ki]) & (ki <= qi)
        tokens = pack.offsets[-1]
        # compiled: the eager builder materializes a [tokens, tokens] mask (4G elements at 65k tokens)
        pack.masks[kind] = _flex()[1](mask, None, None, q_len, tokens, device=device, _compile=True)
    return pack.masks[kind]


def _flex_attention(q, k, v, pack: Packing, kind: str) -> torch.Tensor:
    flex = _flex()[0]
    block_mask = _flex_mask(pack, kind, q.shape[0], q.device)
    q, k, v = (t.transpose(0, 1).contiguous()[None] for t in (q, k, v))  # [1, heads, tokens, head_dim]
    o = flex(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])
    return o[0].transpose(0, 1)


def _torch_varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal: bool) -> torch.Tensor:
    """torch's varlen_attn, whatever its keywords in this torch: causal as window_size (-1, 0) (2.11+) or is_causal
    (2.10); grouped-query heads through enable_gqa, or repeated where it is missing."""
    fn, params = _torch_varlen()
    kw: dict = {}
    if causal and "window_size" in params:
        kw["window_size"] = (-1, 0)
    elif causal:
        kw["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack: Packing, causal: bool) -> torch.Tensor:
    """Attention within each packed sequence, by the Packing's kernel.

    q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim] (kv_heads divides heads).
    Returns [tokens, heads, head_dim].
    """
    if pack.kernel == "flash-attn":
        return _flash_attn_varlen()(q, k, v, pack.cu, pack.cu, pack.max_len, pack.max_len, causal=causal)
    if pack.kernel == "varlen":
        return _torch_varlen_attention(q, k, v, pack.cu, pack.cu, pack.max_len, pack.max_len, causal)
    if pack.kernel == "flex":
        return _flex_attention(q, k, v, pack, "causal" if causal else "full")
    if pack.kernel == "avx512":
        return _cpu_kernel(q, *_shared_keys(k, v, pack), pack.cpu_full, causal)
    return _sdpa_loop(q, *_shared_keys(k, v, pack), pack.spans(), causal, torch.empty_like(q), pack.key_spans)


def _cpu_kernel(q, k, v, spans: torch.Tensor, causal: bool) -> torch.Tensor:
    """rerankd's CPU kernel, which computes in fp32: it widens a bf16 model's q, k and v as it reads them and rounds
    its output (an fp16 model's are widened for it here; in the model's dtype the SDPA loop ran 1.6-3x slower than
    the kernel on short sequences: docs/benchmarks.md)."""
    if q.dtype in cpu_kernels.DTYPES:
        return cpu_kernels.attention(q, k, v, spans, causal)
    return cpu_kernels.attention(q.float(), k.float(), v.float(), spans, causal).to(q.dtype)


def _sdpa_loop(q, k, v, spans, causal: bool, out: torch.Tensor, key_spans=None) -> torch.Tensor:
    """PyTorch SDPA called once per sequence (start, end) of `spans`, into those rows of `out`. Its keys are the
    same rows, or those of `key_spans` (shared_packing: a unit's ancestors' keys and its own, its queries the last of
    them, so that a causal mask is aligned to the keys' end)."""
    gqa = k.shape[1] != q.shape[1]
    for i, (start, end) in enumerate(spans):
        k0, k1 = (start, end) if key_spans is None else key_spans[i]
        mask = None
        if causal and key_spans is not None:  # query j of the unit stands at key position (k1 - k0) - (end - start) + j
            at = torch.arange(end - start)[:, None] + (k1 - k0) - (end - start)
            mask = to_device(torch.arange(k1 - k0)[None, :] <= at, q.device)  # [rows, keys]
        qs = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, heads, len, head_dim]
        ks = k[k0:k1].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, keys, head_dim]
        vs = v[k0:k1].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal and mask is None,
                                           enable_gqa=gqa)  # fmt: skip
        out[start:end] = o[0].transpose(0, 1)
    return out


def row_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack: Packing, rows: list[int] | None = None
) -> torch.Tensor:
    """Attention of a few query rows per packed sequence over that sequence's keys: the final layer's, where only
    some tokens feed a head.

    k, v: [tokens, kv_heads, head_dim]. rows None: q is [n, heads, head_dim], ONE query per sequence that sees
    every key of its sequence, with no mask (a causal decoder's last token, a bidirectional encoder's [CLS]): one
    kernel call on the varlen kernels and on avx512 (sequences of any length there), one SDPA call per sequence on
    the others (inductor's CPU template for FlexAttention failed to compile a mask of one query row per sequence,
    torch 2.13).
    rows: the token indices (into the packed tokens, ascending) whose queries q holds, [len(rows), heads,
    head_dim]; causal: each sees the keys of its own sequence up to itself (jina-reranker-v3's special tokens), one
    SDPA call per sequence on every kernel (flash kernels align a causal mask to the sequence's end, not to
    arbitrary rows). Returns q's shape.
    """
    if rows is None and pack.kernel == "flash-attn":
        return _flash_attn_varlen()(q, k, v, pack.one_each, pack.cu, 1, pack.max_len, causal=False)
    if rows is None and pack.kernel == "varlen":
        return _torch_varlen_attention(q, k, v, pack.one_each, pack.cu, 1, pack.max_len, causal=False)
    if rows is None and pack.kernel == "avx512":
        return _cpu_kernel(q, *_shared_keys(k, v, pack), pack.cpu_rows, causal=False)
    gqa = k.shape[1] != q.shape[1]
    k, v = _shared_keys(k, v, pack)
    # each sequence's keys; shared prefixes (rows None only): the keys of the unit that ends each sequence
    spans = pack.spans() if pack.keys is None else [pack.key_spans[u] for u in pack.head_units]
    outs = []
    r = 0
    for i, (start, end) in enumerate(spans):
        if rows is None:
            lo, hi, mask = i, i + 1, None
        else:
            lo = hi = r
            while hi < len(rows) and rows[hi] < end:
                hi += 1
            r = hi
            if lo == hi:
                continue
            at = torch.tensor(rows[lo:hi]) - start
            mask = to_device(torch.arange(end - start)[None, :] <= at[:, None], q.device)  # [rows, len]
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
    """F.linear(x, weight, bias) through oneDNN's inner product (fp32 or bf16), the bias added in it."""
    if bias is not None:
        bias = bias.contiguous()  # the op reads a strided bias as if it were dense (wrong numbers, no error)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


class OneDNNLinear(nn.Linear):
    """nn.Linear computed by oneDNN; same parameters, same state_dict. use_cpu_gemm turns a loaded model's
    nn.Linear layers into this class in place (a class swap, once, at load)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self)


class UpcastLinear(nn.Linear):
    """nn.Linear whose weight is kept in bf16 and widened to the input's dtype (fp32) for each product
    (cpu_bf16='upcast'); build_module turns a model's nn.Linear layers into this class at load."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self)


class UpcastEmbedding(nn.Embedding):
    """nn.Embedding whose table is kept in bf16; the rows it looks up come out in fp32 (cpu_bf16='upcast')."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


def linear(x: torch.Tensor, layer: nn.Linear, rows: slice = slice(None), bias: bool = True) -> torch.Tensor:
    """F.linear with the output features `rows` of `layer` only (bias False: without its bias), through the layer's
    own kernel, its weight in the input's dtype (a bf16-stored weight is widened for this product only)."""
    w = layer.weight[rows]
    if w.dtype != x.dtype:
        held = getattr(_widened, "weights", None)
        if held is None:
            w = w.to(x.dtype)
        else:
            key = (id(layer), rows.start, rows.stop)
            if key not in held:
                held[key] = w.to(x.dtype)
            w = held[key]
    b = None if layer.bias is None or not bias else layer.bias[rows]
    return onednn_linear(x, w, b) if isinstance(layer, OneDNNLinear) else F.linear(x, w, b)


def product(x: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x W^T, b) of a linear layer, for a CPU kernel that adds the bias in the pass it makes over the product anyway
    (torch's addmm writes the bias into the output first, a pass of its own); (layer(x), None) where the bias stays
    in the product: a layer that is not a float nn.Linear (int8), or bf16 arithmetic, where the bf16 model's addmm
    rounds the product and its bias once and the kernel would round twice."""
    if isinstance(layer, nn.Linear) and x.dtype == torch.float32:
        return linear(x, layer, bias=False), layer.bias
    return layer(x), None


def onednn_speedup() -> float:
    """torch's default kernel's time over oneDNN's for one fp32 linear layer on this CPU (_time_ratio), measured
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
        return _time_ratio(lambda: F.linear(x, w, b), lambda: onednn_linear(x, w, b))


def _time_ratio(a: Callable[[], torch.Tensor], b: Callable[[], torch.Tensor], rounds: int = 9) -> float:
    """a's best time over b's: both warmed up, then timed in turn `rounds` times each (A B A B ...), so that a
    passing slowdown of the machine falls on both. Best of 3 each, one after the other, gave oneDNN 0.99x to 1.17x of
    torch's kernel on one CPU in four processes in a row, flipping a 1.1x choice; in turn, best of 9: 0.96x to 1.01x
    in six (the Intel Xeon of docs/benchmarks.md)."""
    a()
    b()
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, fn in enumerate((a, b)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0] / best[1]


def check_cpu_gemm(requested: str) -> None:
    if requested not in CPU_GEMMS:
        raise ValueError(f"cpu_gemm must be one of {', '.join(CPU_GEMMS)}; got {requested!r}")


def use_cpu_gemm(model: nn.Module, requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Pick the kernel of `model`'s fp32 or bf16 linear layers on the CPU and switch them to it; returns 'onednn' or
    'torch'.

    requested: 'auto' (fp32: oneDNN when it measures >= ONEDNN_MIN_SPEEDUP x torch's default here; bf16: oneDNN
    wherever this torch has it), 'onednn' or 'torch'. In bf16 torch's own linear layer runs oneDNN's product too, but
    adds the bias in a pass of its own; oneDNN's op adds it in the product, bit for bit the same values, 1.00-1.05x
    (docs/benchmarks.md). Switched: every plain nn.Linear, bf16-stored ones (UpcastLinear) included, to
    OneDNNLinear, and every module that computes a product of its own and declares a `uses_onednn` attribute (set to
    True). Other devices and dtypes, and a model with no float linear layer left (int8), keep torch's kernels:
    'torch', with a warning if 'onednn' was asked for.
    """
    check_cpu_gemm(requested)
    if requested == "torch":
        return "torch"
    targets = [m for m in model.modules() if type(m) in (nn.Linear, UpcastLinear) or hasattr(m, "uses_onednn")]
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not targets:
        if requested == "onednn":
            why = "no float linear layer is left" if not targets else f"this model runs {dtype} on {device}"
            log.warning("cpu_gemm='onednn' applies to fp32 and bf16 linear layers on the CPU only; %s: ignored", why)
        return "torch"
    if requested == "onednn" or dtype == torch.bfloat16:
        if not onednn_available():
            if requested == "onednn":
                raise ValueError("cpu_gemm='onednn': this torch build has no oneDNN linear kernel; use 'auto' or "
                                 "'torch'")  # fmt: skip
            return "torch"
        if requested == "auto":
            log.info("CPU linear layers: oneDNN, the bias in the product (bf16)")
    else:
        speedup = onednn_speedup()
        if speedup < ONEDNN_MIN_SPEEDUP:
            log.info("CPU linear layers: torch's default kernel (oneDNN %s)",
                     f"{speedup:.2f}x" if speedup else "not usable")  # fmt: skip
            return "torch"
        log.info("CPU linear layers: oneDNN (%.2fx torch's default kernel on this CPU)", speedup)
    for module in targets:
        if isinstance(module, nn.Linear):
            module.__class__ = OneDNNLinear
        else:
            module.uses_onednn = True
    return "onednn"


# ------------------------------------------------------------------------------------------------ CPU element-wise

# The element-wise work between the products (norms, residual adds, rotary embeddings, activations) on rerankd's CPU
# kernels (cpu_kernels: one pass where torch's ops take two to five) or on torch's ops. A module that has such work
# declares an `elementwise` attribute ('torch' by default), which use_cpu_elementwise sets once at load.
CPU_ELEMENTWISE = ("auto", "avx512", "torch")


def cpu_elementwise(device: torch.device, dtype: torch.dtype, requested: str) -> str:
    """Where a model computing in `dtype` on `device` runs its element-wise work: 'avx512' (rerankd's CPU kernels:
    fp32 or bf16 on a CPU where they build) or 'torch'. requested: 'auto' (avx512 where it can run), 'avx512' (a
    ValueError where it cannot) or 'torch'."""
    if requested not in CPU_ELEMENTWISE:
        raise ValueError(f"cpu_elementwise must be one of {', '.join(CPU_ELEMENTWISE)}; got {requested!r}")
    if requested == "torch":
        return "torch"
    if device.type != "cpu" or dtype not in cpu_kernels.DTYPES:
        why = (f"they compute in float32 or bfloat16 on the CPU, and this model runs "
               f"{str(dtype).removeprefix('torch.')} on {device}")  # fmt: skip
    else:
        why = cpu_kernels.unavailable()
    if why is None:
        return "avx512"
    if requested == "avx512":
        raise ValueError(f"cpu_elementwise='avx512' cannot run here: {why}; use 'auto' or 'torch'")
    return "torch"


def use_cpu_elementwise(model: nn.Module, kernel: str) -> None:
    """Set `kernel` (cpu_elementwise's choice) on every module of `model` that declares an `elementwise` attribute."""
    for m in model.modules():
        if hasattr(m, "elementwise"):
            m.elementwise = kernel


# ------------------------------------------------------------------------------------------------ bf16 on the CPU

# A CPU without bf16 instructions (AVX512-BF16, AMX) runs torch's bf16 products through conversions: on the Intel
# Xeon of docs/benchmarks.md (AVX-512, no BF16) a bf16 linear layer does 54 GFLOP/s where fp32 does 240-300. There a
# bf16 model keeps its weights in bf16 (the memory a user picks bf16 for) and computes in fp32, widening each layer's
# weight for its product: faster, and closer to the fp32 scores. Which one is faster is measured once per process.
CPU_BF16 = ("auto", "native", "upcast")
NATIVE_BF16_MIN_SPEEDUP = 1.1  # 'auto' takes bf16 arithmetic only when clearly faster than fp32 on bf16 weights


def check_cpu_bf16(requested: str) -> None:
    if requested not in CPU_BF16:
        raise ValueError(f"cpu_bf16 must be one of {', '.join(CPU_BF16)}; got {requested!r}")


def cpu_bf16(device: torch.device, dtype: torch.dtype, requested: str) -> str:
    """How a model of `dtype` computes on `device`: 'upcast' (bf16 weights, fp32 arithmetic), 'native' (bf16
    arithmetic), or 'none' where the choice does not apply (not bf16 on the CPU; a warning if one was asked for).

    requested: 'auto' ('native' when it measures >= NATIVE_BF16_MIN_SPEEDUP x 'upcast' here), 'native' or 'upcast'.
    """
    check_cpu_bf16(requested)
    if device.type != "cpu" or dtype != torch.bfloat16:
        if requested != "auto":
            log.warning("cpu_bf16=%r applies to bfloat16 models on the CPU only; this model runs %s on %s: ignored",
                        requested, str(dtype).removeprefix("torch."), device)  # fmt: skip
        return "none"
    if requested != "auto":
        return requested
    speedup = native_bf16_speedup()
    choice = "native" if speedup >= NATIVE_BF16_MIN_SPEEDUP else "upcast"
    log.info("bf16 on this CPU: %s (bf16 arithmetic %.2fx fp32 arithmetic on bf16 weights)", choice, speedup)
    return choice


def native_bf16_speedup() -> float:
    """The time of one linear layer in fp32 arithmetic on bf16 weights (widened per call) over its time in bf16
    arithmetic on this CPU (_time_ratio), measured once per process; concurrent loads wait for the one
    measurement."""
    with _probe_lock:
        return _measure_native_bf16_speedup()


@functools.cache
def _measure_native_bf16_speedup() -> float:
    m, k, n = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    w = (torch.randn(n, k, generator=gen) / k**0.5).bfloat16()
    xb = x.bfloat16()
    with torch.inference_mode():
        return _time_ratio(lambda: F.linear(x, w.float()), lambda: F.linear(xb, w))


def upcast_storage(model: nn.Module) -> dict[str, torch.dtype]:
    """The parameters that cpu_bf16='upcast' keeps in bf16: the weights of `model`'s nn.Linear and nn.Embedding
    layers (the bulk of its memory); by state_dict name."""
    return {f"{name}.weight" if name else "weight": torch.bfloat16 for name, m in model.named_modules()
            if type(m) in (nn.Linear, nn.Embedding)}  # fmt: skip


def use_upcast(model: nn.Module) -> None:
    """Switch the layers whose weights upcast_storage kept in bf16 to the classes that widen them as they compute."""
    for m in model.modules():
        if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16:
            m.__class__ = UpcastLinear
        elif type(m) is nn.Embedding and m.weight.dtype == torch.bfloat16:
            m.__class__ = UpcastEmbedding
