"""rerankd's packed attention kernel for x86 CPUs with AVX-512, in fp32 (`cpu_attention.cpp`): every sequence and
head of a batch in one call, where the SDPA loop calls torch's flash kernel once per sequence. On the short
sequences that rerankers see it runs 1.5-3x the loop's speed (benchmarks/bench_cpu_attention.py); a sequence with
more than KEY_BLOCK keys takes them a block at a time with an online softmax, as flash attention does, and stayed
ahead of torch's kernel at every length measured (up to 31,548 tokens).

The kernel is compiled once per machine with the system's C++ compiler ($CXX, else c++ or g++; OpenMP from the
same libgomp that torch loads) into $XDG_CACHE_HOME/rerankd (~/.cache/rerankd), named by a hash of the source,
flags and compiler, and loaded with ctypes. Where that cannot happen (no compiler, no AVX-512, not x86-64 Linux)
`unavailable()` says why and attention stays on the SDPA loop.
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

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
FLAGS = ("-O3", "-march=x86-64-v4", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
# A unit of work with more keys takes them in blocks of this many (a multiple of 32), with an online softmax; its
# keys and values then stay in cache. Measured at 8,192 tokens, causal (GFLOP/s, blocks of 512 / 1024 / 2048 / 4096):
# Qwen3 heads 241 / 239 / 212 / 172, m0 mid-size heads 222 / 240 / 240 / 228.
KEY_BLOCK = 1024
BUILD_TIMEOUT_S = 300
_ARGS = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6 + [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_float,
                                                                                ctypes.c_int, ctypes.c_int,
                                                                                ctypes.c_int64]  # fmt: skip
_FAILURES = {1: "bad head counts, head_dim or key block", 2: "a causal query row past its sequence's keys",
             3: "out of memory for the per-thread buffers"}  # fmt: skip


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rerankd" / "kernels"


def _file_name(compiler_version: str) -> str:
    """The built kernel's file name: a hash of the source, the flags and the compiler."""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, compiler_version]).encode()).hexdigest()[:16]
    return f"cpu_attention-{key}.so"


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
            log.info("building rerankd's CPU attention kernel into %s (once per machine and compiler)", built)
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
        return lib
    return f"no writable folder to build it in ({_cache_dir()}, {tempfile.gettempdir()})"


def unavailable() -> str | None:
    """Why the kernel cannot run here, or None when it can (built and loaded at the first call)."""
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

    q: [query rows, heads, head_dim]; k, v: [tokens, kv_heads, head_dim] (kv_heads divides heads); fp32 on the CPU.
    Returns a new [query rows, heads, head_dim] tensor holding the rows the spans name (the others are left unset).
    """
    lib = _library()
    if isinstance(lib, str):
        raise RuntimeError(f"rerankd's CPU attention kernel is not available: {lib}")
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (q, k, v)):
        raise TypeError(f"rerankd's CPU attention kernel takes float32 CPU tensors; got {q.dtype} on {q.device}")
    q, k, v = _rows(q), _rows(k), _rows(v)
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    spans = spans.contiguous()
    n = spans.shape[1]
    rc = lib.rerankd_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), q.stride(0), k.stride(0),
                               v.stride(0), heads, kv_heads, head_dim, *(spans[i].data_ptr() for i in range(5)), n,
                               head_dim**-0.5, int(causal), torch.get_num_threads(), KEY_BLOCK)  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"rerankd's CPU attention kernel refused the batch: {_FAILURES.get(rc, rc)}")
    return out
