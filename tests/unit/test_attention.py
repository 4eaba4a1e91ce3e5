"""The attention kernels (rerankd.models.layers): each one equals the per-sequence SDPA loop, the choice is made once
and named, and torch's varlen call is built right for every version of its keywords."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rerankd.models import layers
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
    assert attention_backend(CPU, torch.float32) == "sdpa"  # the fastest measured on CPUs
    assert attention_backend(CPU, torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="attention='flex' cannot run here: it is offered on CUDA only"):
        attention_backend(CPU, torch.float32, "flex")
    with pytest.raises(ValueError, match=r"attention='varlen' cannot run here: it runs on CUDA in float16/bfloat16 "
                                         r"only, and this model runs float32 on cpu; use 'auto' or 'sdpa'"):
        attention_backend(CPU, torch.float32, "varlen")
    with pytest.raises(ValueError, match="attention must be one of auto, flash-attn, varlen, flex, sdpa; got 'fa3'"):
        attention_backend(CPU, torch.float32, "fa3")




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
