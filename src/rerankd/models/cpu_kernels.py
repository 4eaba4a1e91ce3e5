"""rerankd's CPU kernels for x86 CPUs with AVX-512 (`cpu_kernels.cpp`):

* `attention` (fp32 arithmetic): every sequence and head of a packed batch in one call, where the SDPA loop calls
  torch's flash kernel once per sequence. On the short sequences that rerankers see it runs 1.5-3x the loop's speed
  (benchmarks/bench_cpu_attention.py); a sequence with more than KEY_BLOCK keys takes them a block at a time with an
  online softmax, as flash attention does, and stayed ahead of torch's kernel at every length measured (up to
  31,548 tokens).
* `rms_norm`, `rotary_`, `silu_mul_`: the element-wise work of a decoder layer, each one pass over its rows where torch
  takes three to five (RMSNorm with the residual add before it; the rotary embedding of queries and keys, in place;
  the SiLU-gated product of the MLP). On the mid-size m0 decoder they cut the forward by about 9%
  (docs/benchmarks.md).
* `bias_gelu_`, `layer_norm`: a cross-encoder layer's, with each product's bias added in the pass after it (GELU;
  the residual add and LayerNorm) instead of in a pass of its own; and the vision tower's (quick GELU; the residual
  add and the pre-norm LayerNorm, which keeps the sum). In bf16 they round each result that the bf16 model's torch
  ops round, so they return what those ops return, up to fp32 arithmetic.

Every kernel takes fp32 or bf16 tensors (DTYPES), widening bf16 as it reads and rounding as it writes.

The library is compiled once per machine with the system's C++ compiler ($CXX, else c++ or g++; OpenMP from the
same libgomp that torch loads) into $XDG_CACHE_HOME/rerankd (~/.cache/rerankd), named by a hash of the source,
flags and compiler, and loaded with ctypes. Where that cannot happen (no compiler, no AVX-512, not x86-64 Linux)
`unavailable()` says why, and attention stays on the SDPA loop and the element-wise work on torch's ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("rerankd")

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# -ffp-contract=off: a product and a sum written apart round apart, as torch's separate ops do
FLAGS = ("-O3", "-march=x86-64-v4", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
# A unit of work with more keys takes them in blocks of this many (a multiple of 32), with an online softmax; its
# keys and values then stay in cache. Measured at 8,192 tokens, causal (GFLOP/s, blocks of 512 / 1024 / 2048 / 4096):
# Qwen3 heads 241 / 239 / 212 / 172, m0 mid-size heads 222 / 240 / 240 / 228.
KEY_BLOCK = 1024
BUILD_TIMEOUT_S = 300
_ARGS = ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6 + [ctypes.c_void_p] * 5
         + [ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int])  # fmt: skip
_FAILURES = {1: "bad head counts, head_dim or key block", 2: "a causal query row past its sequence's keys",
             3: "out of memory for the per-thread buffers"}  # fmt: skip
_P, _I = ctypes.c_void_p, ctypes.c_int64
_C = ctypes.c_int
_ELEMENTWISE = {  # name: argument types, the last two (bf16, threads) (all return 0, or 1 for a bad size)
    "rerankd_rms_norm": [_P, _I, _P, _I, _P, _I, _P, _I, _P, _I, _I, ctypes.c_float, _C, _C],
    "rerankd_rotary": [_P, _I, _I, _I, _I, _P, _P, _I, _C, _C],
    "rerankd_silu_mul": [_P, _I, _P, _I, _P, _I, _I, _I, _C, _C],
    "rerankd_bias_gelu": [_P, _I, _P, _I, _I, _C, _C, _C],
    "rerankd_layer_norm": [_P, _I, _P, _P, _I, _P, _P, _P, _I, _P, _I, _I, _I, ctypes.c_float, _C, _C],
}
DTYPES = (torch.float32, torch.bfloat16)  # what every kernel takes: all its tensors of one of these


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rerankd" / "kernels"


def _file_name(compiler_version: str) -> str:
    """The built kernel's file name: a hash of the source, the flags and the compiler."""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, compiler_version]).encode()).hexdigest()[:16]
    return f"cpu_kernels-{key}.so"


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded kernel, or why there is none."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it is built for x86-64 Linux, and this is {sys.platform} on {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return f"this CPU has no AVX-512 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    cxx = _compiler()
    if cxx is None:
        return "no C++ compiler was found to build it (set $CXX, or install g++)"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"the C++ compiler {cxx!r} does not run ({e})"
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / "rerankd-kernels"):
        built = folder / _file_name(version)
        if not built.exists():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
                os.close(fd)
            except OSError:
                continue  # not writable: the next folder
            log.info("building rerankd's CPU kernels into %s (once per machine and compiler)", built)
            try:
                done = subprocess.run([cxx, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                      timeout=BUILD_TIMEOUT_S)  # fmt: skip
            except (OSError, subprocess.SubprocessError) as e:
                Path(tmp).unlink(missing_ok=True)
                return f"{cxx} did not finish building {SOURCE.name} ({e})"
            if done.returncode != 0:
                Path(tmp).unlink(missing_ok=True)
                return f"{cxx} failed to build {SOURCE.name}: {done.stderr.strip()[-500:]}"
            os.replace(tmp, built)  # atomic: a process building the same key at once loses nothing
        try:
            lib = ctypes.CDLL(str(built))
        except OSError as e:
            return f"the built kernel {built} does not load ({e}); delete it to rebuild"
        lib.rerankd_attention.argtypes = _ARGS
        lib.rerankd_attention.restype = ctypes.c_int
        for name, argtypes in _ELEMENTWISE.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = ctypes.c_int
        return lib
    return f"no writable folder to build it in ({_cache_dir()}, {tempfile.gettempdir()})"


def unavailable() -> str | None:
    """Why the kernels cannot run here, or None when they can (built and loaded at the first call)."""
    found = _library()
    return found if isinstance(found, str) else None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t ([rows, heads, head_dim], fp32) with heads and head_dim packed, as the kernel reads it."""
    return t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous()


def spans_tensor(key_start, key_len, q_start, q_len, q_pos) -> torch.Tensor:
    """The kernel's description of a batch: int64 [5, sequences] (keys' first row and count; query rows' first row,
    count and position of the first in its sequence)."""
    return torch.tensor([list(key_start), list(key_len), list(q_start), list(q_len), list(q_pos)], dtype=torch.int64)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v within each sequence of `spans` (spans_tensor), every head at once.

    q: [query rows, heads, head_dim]; k, v: [tokens, kv_heads, head_dim] (kv_heads divides heads); all fp32 or all
    bf16, on the CPU (bf16: widened as the kernel reads them, its fp32 result rounded as it writes it). Returns a new
    [query rows, heads, head_dim] tensor of q's dtype holding the rows the spans name (the others are left unset).
    """
    lib = _loaded("attention", q, k, v)
    q, k, v = _rows(q), _rows(k), _rows(v)
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    spans = spans.contiguous()
    n = spans.shape[1]
    rc = lib.rerankd_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), q.stride(0), k.stride(0),
                               v.stride(0), heads, kv_heads, head_dim, *(spans[i].data_ptr() for i in range(5)), n,
                               head_dim**-0.5, int(causal), torch.get_num_threads(), KEY_BLOCK, _bf16(q))  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"rerankd's CPU attention kernel refused the batch: {_FAILURES.get(rc, rc)}")
    return out


def _loaded(kernel: str, *tensors: torch.Tensor) -> ctypes.CDLL:
    """The library, after checking that `tensors` are what its kernels take: CPU tensors of one of DTYPES, all of the
    same dtype."""
    lib = _library()
    if isinstance(lib, str):
        raise RuntimeError(f"rerankd's CPU kernels are not available: {lib}")
    for t in tensors:
        if t.dtype not in DTYPES or t.dtype != tensors[0].dtype or t.device.type != "cpu":
            kinds = " or ".join(str(d).removeprefix("torch.") for d in DTYPES)
            got = ", ".join(f"{x.dtype} on {x.device}" for x in tensors)
            raise TypeError(f"rerankd's CPU {kernel} kernel takes {kinds} CPU tensors, all of one dtype; got {got}")
    return lib


def _matrix(t: torch.Tensor, name: str, like: torch.Tensor | None = None, like_name: str = "x") -> None:
    """t must be [rows, features] with contiguous rows (of the shape of `like`, named like_name, when given)."""
    if t.dim() != 2 or (t.stride(1) != 1 and t.shape[1] > 1):
        raise ValueError(f"{name}: expected [rows, features] with contiguous rows; got shape {tuple(t.shape)} "
                         f"strides {t.stride()}")  # fmt: skip
    if like is not None and t.shape != like.shape:
        raise ValueError(f"{name} {tuple(t.shape)} must have {like_name}'s shape {tuple(like.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, add: torch.Tensor | None = None):
    """RMSNorm of the rows of x ([rows, dim], each row contiguous), as layers.RMSNorm computes it (in fp32 or bf16).

    add None: returns norm(x). add ([rows, dim]): returns (x + add, norm(x + add)), the residual sum and its norm
    from one pass.
    """
    lib = _loaded("rms_norm", x, weight, *(() if add is None else (add,)))
    _matrix(x, "rms_norm's x")
    rows, dim = x.shape
    _vector(weight, dim, "rms_norm's weight")
    out = torch.empty((rows, dim), dtype=x.dtype)
    total = None
    if add is not None:
        _matrix(add, "rms_norm's add", like=x)
        total = torch.empty_like(out)
    rc = lib.rerankd_rms_norm(x.data_ptr(), x.stride(0), None if add is None else add.data_ptr(),
                              0 if add is None else add.stride(0), None if total is None else total.data_ptr(), dim,
                              out.data_ptr(), dim, weight.data_ptr(), rows, dim, eps, _bf16(x),
                              torch.get_num_threads())  # fmt: skip
    _check(rc, "rms_norm")
    return out if total is None else (total, out)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of x ([rows, heads, head_dim], heads and head_dim packed; rows at any stride) in place:
    x * cos + rotate_half(x) * sin with cos, sin [rows, head_dim] broadcast over the heads. Returns x."""
    lib = _loaded("rotary", x, cos, sin)
    rows, heads, dim = x.shape
    if x.stride(2) != 1 or x.stride(1) != dim:
        raise ValueError(f"rotary_: x's heads and head_dim must be packed; got strides {x.stride()}")
    if cos.shape != (rows, dim) or sin.shape != cos.shape or cos.stride() != (dim, 1) or sin.stride() != (dim, 1):
        raise ValueError(f"rotary_: cos and sin must be contiguous [{rows}, {dim}]; got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")  # fmt: skip
    rc = lib.rerankd_rotary(x.data_ptr(), x.stride(0), rows, heads, dim, cos.data_ptr(), sin.data_ptr(), dim,
                            _bf16(x), torch.get_num_threads())  # fmt: skip
    _check(rc, "rotary_")
    return x


def silu_mul_(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate = silu(gate) * up in place, for [rows, dim] tensors (each row contiguous). Returns gate."""
    lib = _loaded("silu_mul", gate, up)
    _matrix(gate, "silu_mul_'s gate")
    _matrix(up, "silu_mul_'s up", like=gate, like_name="gate")
    rows, dim = gate.shape
    rc = lib.rerankd_silu_mul(gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), gate.data_ptr(),
                              gate.stride(0), rows, dim, _bf16(gate), torch.get_num_threads())  # fmt: skip
    _check(rc, "silu_mul_")
    return gate


def bias_gelu_(x: torch.Tensor, bias: torch.Tensor | None, quick: bool = False) -> torch.Tensor:
    """x = gelu(x + bias) in place for [rows, dim] x (each row contiguous); bias [dim] or None (already added).
    quick False: torch's exact (erf) GELU; True: Qwen2-VL's quick_gelu, a * sigmoid(1.702 a). Returns x."""
    lib = _loaded("bias_gelu", x, *(() if bias is None else (bias,)))
    _matrix(x, "bias_gelu_'s x")
    _vector(bias, x.shape[1], "bias_gelu_'s bias")
    rc = lib.rerankd_bias_gelu(x.data_ptr(), x.stride(0), None if bias is None else bias.data_ptr(), x.shape[0],
                               x.shape[1], int(quick), _bf16(x), torch.get_num_threads())  # fmt: skip
    _check(rc, "bias_gelu_")
    return x


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None, keep_sum: bool = False):  # fmt: skip
    """norm(residual + (x + bias)) for [rows, dim] tensors (each row contiguous), into a new tensor: a post-norm
    block's end, its product's bias added here. bias, residual: None when there is none. keep_sum: returns
    (residual + (x + bias), its norm), a pre-norm block's residual stream and the next input."""
    lib = _loaded("layer_norm", x, norm.weight, norm.bias, *(t for t in (bias, residual) if t is not None))
    _matrix(x, "layer_norm's x")
    rows, dim = x.shape
    if norm.normalized_shape != (dim,):
        raise ValueError(f"layer_norm: the norm is over {norm.normalized_shape}, and x's rows have {dim} features")
    for name, t in (("weight", norm.weight), ("bias", norm.bias), ("added bias", bias)):
        _vector(t, dim, f"layer_norm's {name}")
    if residual is not None:
        _matrix(residual, "layer_norm's residual", like=x)
    out = torch.empty((rows, dim), dtype=x.dtype)
    total = torch.empty_like(out) if keep_sum else None
    rc = lib.rerankd_layer_norm(x.data_ptr(), x.stride(0), None if bias is None else bias.data_ptr(),
                                None if residual is None else residual.data_ptr(),
                                0 if residual is None else residual.stride(0), norm.weight.data_ptr(),
                                norm.bias.data_ptr(), None if total is None else total.data_ptr(), dim, out.data_ptr(),
                                dim, rows, dim, norm.eps, _bf16(x), torch.get_num_threads())  # fmt: skip
    _check(rc, "layer_norm")
    return out if total is None else (total, out)


def _bf16(t: torch.Tensor) -> int:
    """A kernel's dtype argument: 1 for bf16 tensors, 0 for fp32."""
    return int(t.dtype == torch.bfloat16)


def _vector(t: torch.Tensor | None, dim: int, name: str) -> None:
    if t is not None and (t.shape != (dim,) or not t.is_contiguous()):
        raise ValueError(f"{name} must be a contiguous [{dim}]; got {tuple(t.shape)}")


def _check(rc: int, kernel: str) -> None:
    if rc != 0:
        raise RuntimeError(f"rerankd's CPU {kernel} kernel refused its input (code {rc}: a size of 0 or an odd "
                           "head_dim)")
