"""The attention kernels (rerankd.models.layers): each one equals the per-sequence SDPA loop, the choice is made once
and named, torch's varlen call is built right for every version of its keywords, and rerankd's own CPU kernel
(models/cpu_kernels.cpp) is built, loaded, exact and batch-invariant."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rerankd.models import cpu_kernels, layers
from rerankd.models.layers import attention_backend, packing, row_attention, varlen_attention

from ..conftest import assert_close

CPU = torch.device("cpu")
LENGTHS = [7, 1, 33, 130, 16]  # a one-token sequence, one past flex's 128-token block
SHAPES = {"mha": (4, 4, 16), "gqa": (4, 2, 32)}  # heads, kv heads, head_dim


def qkv(heads: int, kv_heads: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = sum(LENGTHS)
    return (torch.randn(tokens, heads, dim, generator=g), torch.randn(tokens, kv_heads, dim, generator=g),
            torch.randn(tokens, kv_heads, dim, generator=g))  # fmt: skip


def offsets(lengths: list[int]) -> list[int]:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


def loop_reference(q, k, v, cu, causal):
    """Each sequence alone through SDPA, with its key/value heads repeated: the definition."""
    group = q.shape[1] // k.shape[1]
    out = []
    for a, b in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1))
    return torch.cat(out)


def fake_varlen(keywords: str):
    """torch's varlen_attn as its documentation defines it, on the CPU (the real one runs on CUDA only), in the
    keywords of torch 2.12+ ('window_size', 'enable_gqa'; 2.11 has window_size without enable_gqa) or of 2.10
    ('is_causal', no grouped-query heads)."""
    calls = []

    def call(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), is_causal=False, enable_gqa=False):
        assert cu_q.dtype == cu_k.dtype == torch.int32
        lq, lk = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
        assert (max_q, max_k) == (max(lq), max(lk)), "max_q / max_k are the longest sequences"
        assert k.shape[1] == q.shape[1] or enable_gqa, "grouped-query heads need enable_gqa"
        causal = is_causal or tuple(window_size) == (-1, 0)
        calls.append(causal)
        out = []
        for i in range(len(lq)):
            qs = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)
            ks, vs = (t[cu_k[i] : cu_k[i + 1]].transpose(0, 1) for t in (k, v))
            mask = None
            if causal:  # flash's convention: aligned to the end of the keys
                mask = torch.ones(lq[i], lk[i], dtype=torch.bool).tril(lk[i] - lq[i])
            out.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=enable_gqa)
                       .transpose(0, 1))  # fmt: skip
        return torch.cat(out)

    if keywords == "2.10":
        def fn(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, return_aux=None):
            return call(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=is_causal)
    else:
        def fn(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
               enable_gqa=False):  # fmt: skip
            return call(q, k, v, cu_q, cu_k, max_q, max_k, window_size=window_size, enable_gqa=enable_gqa)
    return fn, calls


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_the_sdpa_and_flex_kernels_equal_the_loop(kernel, shape):
    """FlexAttention runs models on CUDA only (tests/gpu); its masks and head grouping are checked here, on the CPU."""
    q, k, v = qkv(*SHAPES[shape])
    cu = offsets(LENGTHS)
    pack = packing(LENGTHS, CPU, kernel)
    assert pack.offsets == cu
    for causal in (False, True):
        assert_close(varlen_attention(q, k, v, pack, causal), loop_reference(q, k, v, cu, causal), 1e-5)
    last = torch.tensor(cu[1:]) - 1  # one query a sequence, seeing all of its keys
    want = torch.cat([loop_reference(q, k, v, cu, True)[i : i + 1] for i in last.tolist()])
    assert_close(row_attention(q[last], k, v, pack), want, 1e-5)
    rows = [0, 8, 9, 40, 41, 170, 186]  # causal rows of some sequences (none of the second)
    assert_close(row_attention(q[rows], k, v, pack, rows), loop_reference(q, k, v, cu, True)[rows], 1e-5)


@pytest.mark.parametrize("keywords", ["2.11", "2.10"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_torch_varlen_call_for_each_torch_version(monkeypatch, keywords, shape):
    fn, calls = fake_varlen(keywords)
    params = {"2.10": {"is_causal", "return_aux"}}.get(keywords, {"window_size", "enable_gqa", "scale", "return_aux"})
    monkeypatch.setattr(layers, "_torch_varlen", lambda: (fn, frozenset(params)))
    q, k, v = qkv(*SHAPES[shape])
    cu = offsets(LENGTHS)
    pack = packing(LENGTHS, CPU, "varlen")
    assert pack.cu.tolist() == cu and pack.max_len == max(LENGTHS)
    for causal in (False, True):
        assert_close(varlen_attention(q, k, v, pack, causal), loop_reference(q, k, v, cu, causal), 1e-5)
    last = torch.tensor(cu[1:]) - 1
    want = loop_reference(q, k, v, cu, True)[last]
    assert_close(row_attention(q[last], k, v, pack), want, 1e-5)  # one kernel call: a query row per sequence
    assert calls == [False, True, False]


def test_the_choice_is_made_once_and_explained():
    # on the CPU: rerankd's own kernel where it runs (x86-64 with AVX-512 and a C++ compiler), else the loop; in
    # bf16 too (q/k/v widened to its fp32)
    for dtype in (torch.float32, torch.bfloat16):
        assert attention_backend(CPU, dtype) == ("sdpa" if cpu_kernels.unavailable() else "avx512")
    assert attention_backend(torch.device("cuda"), torch.float32) == "sdpa"  # CUDA's fp32 is the parity mode
    with pytest.raises(ValueError, match="attention='flex' cannot run here: it is offered on CUDA only"):
        attention_backend(CPU, torch.float32, "flex")
    with pytest.raises(ValueError, match=r"attention='varlen' cannot run here: it runs on CUDA in float16/bfloat16 "
                                         r"only, and this model runs float32 on cpu; use 'auto' or 'sdpa'"):
        attention_backend(CPU, torch.float32, "varlen")
    with pytest.raises(ValueError, match=r"attention='avx512' cannot run here: it runs on the CPU in float32 \(or "
                                         r"bfloat16/float16, widened\) only, and this model runs float32 on cuda"):
        attention_backend(torch.device("cuda"), torch.float32, "avx512")
    with pytest.raises(ValueError, match="attention must be one of auto, flash-attn, varlen, flex, avx512, sdpa; got "
                                         "'fa3'"):
        attention_backend(CPU, torch.float32, "fa3")


def test_without_the_cpu_kernel_auto_takes_the_loop_and_a_forced_one_says_why(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_library", lambda: "no C++ compiler was found to build it (set $CXX, ...)")
    assert attention_backend(CPU, torch.float32) == "sdpa"
    with pytest.raises(ValueError, match=r"attention='avx512' cannot run here: no C\+\+ compiler was found"):
        attention_backend(CPU, torch.float32, "avx512")


needs_avx512 = pytest.mark.skipif(cpu_kernels.unavailable() is not None,
                                  reason=f"rerankd's CPU kernel cannot run here: {cpu_kernels.unavailable()}")
CPU_LENGTHS = [7, 1, 33, 130, 16, 300, 64, 65]  # one token; one past a 64-row block; more than a 256-row unit
CPU_SHAPES = {"v2": (12, 12, 64), "m0 text": (12, 2, 128), "m0 vision": (16, 16, 80), "gqa 16": (4, 2, 16),
              "qwen3 tiny": (4, 2, 24), "one head": (1, 1, 8)}  # fmt: skip


@needs_avx512
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_the_avx512_kernel_equals_the_loop(shape):
    heads, kv_heads, dim = CPU_SHAPES[shape]
    g = torch.Generator().manual_seed(1)
    tokens = sum(CPU_LENGTHS)
    q = torch.randn(tokens, heads, dim, generator=g)
    kv = torch.randn(tokens, 2, kv_heads, dim, generator=g)  # k, v as views of one tensor, as a fused projection
    k, v = kv[:, 0], kv[:, 1]
    cu = offsets(CPU_LENGTHS)
    pack = packing(CPU_LENGTHS, CPU, "avx512")
    for causal in (False, True):
        assert_close(varlen_attention(q, k, v, pack, causal), loop_reference(q, k, v, cu, causal), 1e-5)
    last = torch.tensor(cu[1:]) - 1
    assert_close(row_attention(q[last], k, v, pack), loop_reference(q, k, v, cu, True)[last], 1e-5)


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_avx512_kernel_computes_a_half_model_in_fp32(dtype):
    """bf16 (fp16) q/k/v are widened for the kernel and its output rounded back: the fp32 loop's result on the same
    values, to the dtype's rounding."""
    heads, kv_heads, dim = CPU_SHAPES["m0 text"]
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(sum(CPU_LENGTHS), h, dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads))
    cu = offsets(CPU_LENGTHS)
    pack = packing(CPU_LENGTHS, CPU, "avx512")
    for causal in (False, True):
        got = varlen_attention(q, k, v, pack, causal)
        assert got.dtype == dtype
        assert_close(got.float(), loop_reference(q.float(), k.float(), v.float(), cu, causal), 1e-2)
    last = torch.tensor(cu[1:]) - 1
    got = row_attention(q[last], k, v, pack)
    assert got.dtype == dtype
    assert_close(got.float(), loop_reference(q.float(), k.float(), v.float(), cu, True)[last], 1e-2)


@needs_avx512
@pytest.mark.parametrize("key_block", [1024, 32], ids=["keys at once", "keys in blocks"])
@pytest.mark.parametrize("shape", ["v2", "m0 text", "qwen3 tiny"])
def test_the_avx512_kernel_reads_and_writes_bf16_itself(monkeypatch, shape, key_block):
    """A bf16 model's q, k and v go to the kernel as they are, without widened copies (q as a view of its fused
    projection): the result is the fp32 call's on the widened values, rounded to bf16, bit for bit."""
    monkeypatch.setattr(cpu_kernels, "KEY_BLOCK", key_block)
    heads, kv_heads, dim = CPU_SHAPES[shape]
    tokens = sum(CPU_LENGTHS)
    g = torch.Generator().manual_seed(4)
    fused = torch.randn(tokens, heads + 2 * kv_heads, dim, generator=g).bfloat16()
    q, k, v = fused.split([heads, kv_heads, kv_heads], dim=1)
    cu = offsets(CPU_LENGTHS)
    pack = packing(CPU_LENGTHS, CPU, "avx512")
    for causal in (False, True):
        got = cpu_kernels.attention(q, k, v, pack.cpu_full, causal)
        assert got.dtype == torch.bfloat16
        widened = cpu_kernels.attention(q.float(), k.float(), v.float(), pack.cpu_full, causal)
        assert torch.equal(got, widened.bfloat16())
        assert_close(got.float(), loop_reference(q.float(), k.float(), v.float(), cu, causal), 1e-2)
    last = torch.tensor(cu[1:]) - 1
    got = cpu_kernels.attention(q[last], k, v, pack.cpu_rows, causal=False)
    widened = cpu_kernels.attention(q[last].float(), k.float(), v.float(), pack.cpu_rows, causal=False)
    assert torch.equal(got, widened.bfloat16())


@needs_avx512
@pytest.mark.parametrize("shape", ["m0 text", "qwen3 tiny", "one head"])
def test_the_avx512_kernel_takes_many_keys_in_blocks(monkeypatch, shape):
    """A unit with more keys than KEY_BLOCK takes them a block at a time (online softmax): blocks of 32 keys here,
    so that sequences of 33..300 tokens cross one to ten block boundaries, causal rows starting before a block too."""
    monkeypatch.setattr(cpu_kernels, "KEY_BLOCK", 32)
    heads, kv_heads, dim = CPU_SHAPES[shape]
    g = torch.Generator().manual_seed(3)
    tokens = sum(CPU_LENGTHS)
    q, k, v = (torch.randn(tokens, h, dim, generator=g) for h in (heads, kv_heads, kv_heads))
    cu = offsets(CPU_LENGTHS)
    pack = packing(CPU_LENGTHS, CPU, "avx512")
    for causal in (False, True):
        assert_close(varlen_attention(q, k, v, pack, causal), loop_reference(q, k, v, cu, causal), 1e-5)
    last = torch.tensor(cu[1:]) - 1
    assert_close(row_attention(q[last], k, v, pack), loop_reference(q, k, v, cu, True)[last], 1e-5)
    together = varlen_attention(q, k, v, pack, causal=True)  # still independent of the batch, bit for bit
    for a, b in zip(cu[:-1], cu[1:]):
        alone = varlen_attention(q[a:b], k[a:b], v[a:b], packing([b - a], CPU, "avx512"), causal=True)
        assert torch.equal(alone, together[a:b])


@needs_avx512
def test_the_avx512_kernel_refuses_what_it_cannot_read():
    q, k, v = qkv(*SHAPES["gqa"])
    pack = packing(LENGTHS, CPU, "avx512")
    with pytest.raises(TypeError, match="takes float32 or bfloat16 CPU tensors, all of one dtype; got torch.float16"):
        cpu_kernels.attention(q.half(), k.half(), v.half(), pack.cpu_full, causal=True)
    with pytest.raises(TypeError, match="all of one dtype; got torch.bfloat16 on cpu, torch.float32 on cpu"):
        cpu_kernels.attention(q.bfloat16(), k, v, pack.cpu_full, causal=True)


@needs_avx512
def test_the_avx512_kernel_does_not_depend_on_the_batch():
    """A sequence's attention is the same, bit for bit, alone or packed with others, at any place in the batch."""
    q, k, v = qkv(*CPU_SHAPES["m0 text"][:2], 128)
    cu = offsets(LENGTHS)
    together = varlen_attention(q, k, v, packing(LENGTHS, CPU, "avx512"), causal=True)
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        alone = varlen_attention(q[a:b], k[a:b], v[a:b], packing([b - a], CPU, "avx512"), causal=True)
        assert torch.equal(alone, together[a:b]), f"sequence {i} changed with its batch"


@needs_avx512
def test_the_avx512_kernel_is_built_into_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_kernels._library.cache_clear()
    try:
        assert cpu_kernels.unavailable() is None
        assert [p.name.startswith("cpu_kernels-") for p in (tmp_path / "rerankd" / "kernels").iterdir()] == [True]
        # a damaged cache entry is reported, not loaded (other flags: a name this process has not loaded yet)
        monkeypatch.setattr(cpu_kernels, "FLAGS", (*cpu_kernels.FLAGS, "-DRERANKD_TEST"))
        version = subprocess.run([cpu_kernels._compiler(), "--version"], capture_output=True, text=True).stdout
        (tmp_path / "rerankd" / "kernels" / cpu_kernels._file_name(version)).write_bytes(b"not a shared library")
        cpu_kernels._library.cache_clear()
        assert "does not load" in cpu_kernels.unavailable() and "delete it to rebuild" in cpu_kernels.unavailable()
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        cpu_kernels._library.cache_clear()
        assert "does not run" in cpu_kernels.unavailable()
    finally:
        cpu_kernels._library.cache_clear()


@pytest.fixture
def as_if_on_cuda(monkeypatch):
    """'auto' tries torch's varlen kernel on this CPU (every kernel available, the probe's results not cached)."""
    monkeypatch.setattr(layers, "_candidates", lambda device, dtype: ("varlen",))
    monkeypatch.setattr(layers, "_unavailable", lambda kernel, device, dtype: None)
    layers._disagrees.cache_clear()
    yield
    layers._disagrees.cache_clear()


def broken_varlen(wrong: str):
    fn, _ = fake_varlen("2.11")
    if wrong == "raises":
        def bad(*args, **kwargs):
            raise RuntimeError("FlashAttention only supports Ampere GPUs or newer")
    else:  # ignores the causal mask: the kind of misuse of a kernel's keywords the probe is there to catch
        def bad(*args, window_size=(-1, -1), **kwargs):
            return fn(*args, **kwargs)
    return bad


def test_a_kernel_that_agrees_with_the_loop_is_taken(monkeypatch, as_if_on_cuda):
    fn, _ = fake_varlen("2.11")
    monkeypatch.setattr(layers, "_torch_varlen", lambda: (fn, frozenset({"window_size", "enable_gqa"})))
    assert attention_backend(CPU, torch.float32) == "varlen"
    assert attention_backend(CPU, torch.bfloat16, "varlen") == "varlen"


@pytest.mark.parametrize("wrong", ["raises", "no causal mask"])
def test_a_kernel_that_fails_or_disagrees_is_passed_over_or_refused(monkeypatch, caplog, as_if_on_cuda, wrong):
    monkeypatch.setattr(layers, "_torch_varlen", lambda: (broken_varlen(wrong), frozenset({"window_size"})))
    why = "failed on a test batch \\(RuntimeError: FlashAttention" if wrong == "raises" else \
        "differs from the SDPA loop by"  # fmt: skip
    with caplog.at_level("WARNING", logger="rerankd"):
        assert attention_backend(CPU, torch.float32) == "sdpa"
    assert "passing over 'varlen'" in caplog.text
    with pytest.raises(ValueError, match=f"attention='varlen' cannot run here: .*{why}"):
        attention_backend(CPU, torch.float32, "varlen")


def test_a_flash_attn_that_does_not_import_is_as_if_absent(tmp_path, monkeypatch):
    """flash-attn built for another torch or CUDA fails at import (undefined symbols): loading goes on with torch's
    kernels instead of failing."""
    fake = tmp_path / "flash_attn"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c10')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    layers._flash_attn_varlen.cache_clear()
    try:
        assert layers._flash_attn_varlen() is None
    finally:
        layers._flash_attn_varlen.cache_clear()
