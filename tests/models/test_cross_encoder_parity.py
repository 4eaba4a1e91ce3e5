"""Text cross-encoders (jina-reranker-v2 in Jina's and HF's names, BERT) equal transformers, fp32 <= 1e-5."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rerankd import Reranker
from rerankd.errors import ModelLoadError, PairErrors
from rerankd.tiny import CORPUS, make_tiny_checkpoint

from ..conftest import ELEMENTWISE, assert_close, loaded_with_elementwise, to_legacy_layout

TOL = 1e-5
WORDS = " ".join(CORPUS).split() + ["unseenword", "ΑΒΓ", "🚀"]
# (kind, naming): "legacy" is a BERT checkpoint as older repos have it (vocab.txt only, pytorch_model.bin)
KINDS = [("jina-reranker-v2", "jina"), ("jina-reranker-v2", "hf"), ("bert-cross-encoder", None),
         ("bert-cross-encoder", "legacy")]  # fmt: skip


def text_of(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words))


@pytest.fixture(scope="module", params=KINDS, ids=lambda k: f"{k[0]}-{k[1] or 'hf'}")
def model(request, tmp_path_factory):
    pytest.importorskip("transformers")
    from ..references import ReferenceCrossEncoder

    kind, naming = request.param
    path = tmp_path_factory.mktemp(kind)
    make_tiny_checkpoint(kind, path, seed=1, **({"naming": naming} if naming in ("jina", "hf") else {}))
    if naming == "legacy":
        to_legacy_layout(path)
    return Reranker.from_pretrained(path, show_progress=False), ReferenceCrossEncoder(path), path


PAIRS = [
    ["capital of France", "Paris is the capital and most populous city of France."],
    ["green tea", "Le thé vert est riche en antioxydants et peut améliorer la fonction cérébrale."],
    ["", "an empty query is allowed"],
    ["an empty document", ""],
    ["one token", "a"],
    ["数据提取", "数据提取么?为什么不用正则啊,你用正则不就全解决了么?"],
    ["newlines\nand  spaces", "line one\n\nline   two\ttab 🙂"],
    # special tokens' text: a literal <pad> is the pad id, which RoBERTa's positions skip
    ["<pad> query [PAD]", "a <pad> b </s> c [SEP] d"],
    ["q", "<pad>"],
] + [[text_of(6, i), text_of(n, 100 + i)] for i, n in enumerate([2, 30, 90, 200, 380, 700])]
# pairs over max_length, truncated longest-first: a long document, and a long query with a long document
PAIRS += [[text_of(8, 7), text_of(1500, 8)], [text_of(600, 9), text_of(900, 10)]]


def test_scores_equal_transformers_in_one_batch(model):
    rr, ref, _ = model
    ml = rr.backend.default_max_length
    ours = rr.compute_score(PAIRS)
    theirs = ref.compute_score(PAIRS, max_length=ml, batch_size=len(PAIRS))
    assert_close(ours, theirs, TOL)
    assert 0.01 < min(ours) and max(ours) < 0.99 and np.std(ours) > 0.1, ours  # scores spread, not saturated
    raw = rr.compute_score(PAIRS, activation=None)
    assert_close(raw, ref.compute_score(PAIRS, max_length=ml, batch_size=len(PAIRS), activation=False), 1e-4)
    assert_close(torch.sigmoid(torch.tensor(raw)).tolist(), ours, 1e-6)


def test_scores_equal_transformers_at_a_short_max_length(model):
    rr, ref, _ = model
    ours = rr.compute_score(PAIRS, max_length=40)
    assert_close(ours, ref.compute_score(PAIRS, max_length=40, batch_size=4), TOL)


def test_tokenization_equals_transformers(model):
    rr, ref, _ = model
    from rerankd.inputs import TextItem
    from rerankd.models.base import LengthOptions, Where

    for i, (q, d) in enumerate(PAIRS):
        [seq] = rr.backend.prepare(TextItem(q), TextItem(d), LengthOptions(128, None), Where.for_pair(i))
        # as a batch, the way compute_score calls it (called with one pair, transformers drops an empty document)
        want = ref.tokenizer([[q, d]], truncation=True, max_length=128)
        assert seq.input_ids.tolist() == want["input_ids"][0]
        if seq.token_types is not None:
            assert seq.token_types.tolist() == want["token_type_ids"][0]


def test_batch_invariance(model):
    rr, _, path = model
    alone = [rr.compute_score([p])[0] for p in PAIRS]
    assert_close(rr.compute_score(PAIRS), alone, TOL)
    small = Reranker.from_pretrained(path, show_progress=False, max_batch_tokens=64)
    assert_close(small.compute_score(PAIRS[::-1])[::-1], alone, TOL)


def test_images_are_refused_clearly(model):
    rr, _, _ = model
    with pytest.raises(PairErrors, match=r"documents\[1\]: this model \(\w+ForSequenceClassification\) is text only"):
        rr.rerank("q", ["text", {"image": "https://example.com/x.png"}])


@pytest.mark.parametrize("gemm", ["torch", "onednn"])
def test_both_cpu_kernels_equal_transformers(model, gemm):
    """The fixture's model runs whichever kernel `auto` picked on this CPU; each one must match on its own."""
    _, ref, path = model
    from rerankd.models.layers import onednn_available

    if gemm == "onednn" and not onednn_available():
        pytest.skip("this torch build has no oneDNN linear kernel")
    rr = Reranker.from_pretrained(path, show_progress=False, cpu_gemm=gemm)
    assert rr.options.cpu_gemm == gemm
    assert_close(rr.compute_score(PAIRS), ref.compute_score(PAIRS, max_length=rr.backend.default_max_length), TOL)


@pytest.mark.parametrize("elementwise", ELEMENTWISE)
def test_both_elementwise_kernels_equal_transformers(model, elementwise):
    """Each layer's GELU and residual add + LayerNorm (the products' biases in them) on rerankd's CPU kernels and on
    torch's ops."""
    _, ref, path = model
    rr = loaded_with_elementwise(path, elementwise)
    assert_close(rr.compute_score(PAIRS), ref.compute_score(PAIRS, max_length=rr.backend.default_max_length), TOL)


def test_int8_quantization_stays_close(model):
    """int8 = dynamic quantization of every linear layer, checked layer by layer on the int8 model's own forward
    pass against what int8 rounding can do on any CPU; not the end scores' ranking, which on these toy random
    weights moves with the random draw (up to 0.2 per score, see docs/benchmarks.md) and with the batch (each
    activation tensor gets its own scale)."""
    rr, _, path = model
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    q8 = Reranker.from_pretrained(path, show_progress=False, quantize="int8")
    fp32_linear = {n: m for n, m in rr.backend.model.named_modules() if isinstance(m, torch.nn.Linear)}
    int8_linear = {n: m for n, m in q8.backend.model.named_modules() if isinstance(m, Int8Linear)}
    assert fp32_linear and set(int8_linear) == set(fp32_linear)  # every linear layer, each at its place
    assert not any(isinstance(m, torch.nn.Linear) for m in q8.backend.model.modules())
    assert q8.options.cpu_gemm == "torch"  # no fp32 linear layer left for oneDNN
    calls: dict[str, list] = {n: [] for n in int8_linear}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: calls[n].append((i[0], o.clone())))  # (GELU: in place)
             for n, m in int8_linear.items()]
    try:
        int8 = q8.compute_score(PAIRS)
    finally:
        for h in hooks:
            h.remove()
    act_err2 = act_var = 0.0
    for name, layer in int8_linear.items():
        w, b = fp32_linear[name].weight.float(), fp32_linear[name].bias
        qw = layer.weight()
        assert qw.dtype == torch.qint8, (name, qw.dtype)
        wq = qw.dequantize()  # int8 weights: within half a step of the fp32 ones, steps of at most max|w| / 127
        assert (wq - w).abs().max() <= w.abs().max() / 254 * (1 + 1e-4), name
        assert layer.bias() is not None and torch.equal(layer.bias(), b), name  # the bias stays fp32
        assert calls[name], f"{name} never ran"
        for x, y in calls[name]:
            # activations rounded to steps of at most their range / 127 (7 bits, per tensor; finer is fine)
            step = (x.max().clamp(min=0) - x.min().clamp(max=0)) / 127
            err = y - torch.nn.functional.linear(x, wq, b)  # what the activations' rounding moved
            slack = 1e-5 * (x.abs() @ wq.abs().T + 1)  # fp32 rounding of the two products
            assert (err.abs() <= step / 2 * wq.abs().sum(1) * (1 + 1e-4) + slack).all(), name  # worst case
            act_err2 += float(err.double().pow(2).sum())
            act_var += float(step.double() ** 2 / 12 * wq.double().pow(2).sum() * x.shape[0])  # uniform rounding
    assert 0 < act_err2 <= 2 * act_var, (act_err2, act_var)  # and typically no more than rounding noise
    fp32 = rr.compute_score(PAIRS)  # through the model: int8 scores are these scores, moved a little
    assert all(0 < s < 1 for s in int8) and 0 < max(abs(a - b) for a, b in zip(fp32, int8)) < 0.5  # really int8
    with pytest.raises(ValueError, match="quantize='int4' is not supported"):
        Reranker.from_pretrained(path, show_progress=False, quantize="int4")


# ----------------------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory):
    return make_tiny_checkpoint("jina-reranker-v2", tmp_path_factory.mktemp("v2"), seed=2)


def _edit_weights(src, dst, edit):
    shutil.copytree(src, dst)
    w = load_file(str(dst / "model.safetensors"))
    edit(w)
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_jina_checkpoint_has_the_real_names(v2_dir):
    names = set(load_file(str(v2_dir / "model.safetensors")))
    assert {"roberta.emb_ln.weight", "roberta.encoder.layers.0.mixer.Wqkv.weight", "roberta.encoder.layers.2.norm2.bias",
            "roberta.encoder.layers.1.mlp.fc1.weight", "classifier.dense.weight", "classifier.out_proj.bias"} <= names  # fmt: skip
    assert not any("pooler" in n or ".layer." in n for n in names)
    cfg = json.loads((v2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["XLMRobertaForSequenceClassification"] and "model_type" not in cfg


def test_missing_or_unused_tensors_fail_loading(v2_dir, tmp_path):
    missing = _edit_weights(v2_dir, tmp_path / "missing", lambda w: w.pop("roberta.encoder.layers.1.norm1.weight"))
    with pytest.raises(ModelLoadError, match=r"1 parameters missing .*encoder\.layers\.1\.norm1\.weight"):
        Reranker.from_pretrained(missing, show_progress=False)
    extra = _edit_weights(v2_dir, tmp_path / "extra", lambda w: w.update({"roberta.extra.weight": torch.ones(2)}))
    with pytest.raises(ModelLoadError, match=r"1 checkpoint tensors match no parameter: \['roberta.extra.weight'\]"):
        Reranker.from_pretrained(extra, show_progress=False)


def test_hf_names_with_a_missing_qkv_part_fail(tmp_path):
    path = make_tiny_checkpoint("jina-reranker-v2", tmp_path / "hf", seed=0, naming="hf")
    broken = _edit_weights(path, tmp_path / "broken", lambda w: w.pop("roberta.encoder.layer.0.attention.self.key.bias"))
    with pytest.raises(ModelLoadError, match=r"encoder\.layers\.0\.mixer\.Wqkv\.bias"):
        Reranker.from_pretrained(broken, show_progress=False)


def test_hf_and_jina_names_give_the_same_scores(v2_dir, tmp_path):
    hf = make_tiny_checkpoint("jina-reranker-v2", tmp_path / "hf", seed=2, naming="hf")
    a = Reranker.from_pretrained(v2_dir, show_progress=False).compute_score(PAIRS[:8])
    b = Reranker.from_pretrained(hf, show_progress=False).compute_score(PAIRS[:8])
    assert a == b


def test_a_multi_label_classifier_is_refused(v2_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(v2_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "num_labels": 3}))
    with pytest.raises(ModelLoadError, match="a reranker has one output label; this config has 3"):
        Reranker.from_pretrained(bad, show_progress=False)


def test_max_length_beyond_the_position_table_is_an_error(v2_dir):
    """Refused once, before any pair is prepared (it was one error per pair), as for m0 and Qwen3."""
    rr = Reranker.from_pretrained(v2_dir, show_progress=False)
    for call in (lambda: rr.compute_score([["q", "d"]] * 3, max_length=2000),
                 lambda: rr.rerank("q", ["d"], max_length=2000)):  # fmt: skip
        with pytest.raises(ValueError, match=r"^max_length: 2000 is more than this model's 1024 positions; lower it$"):
            call()


def test_a_truncated_weights_file_is_a_load_error(v2_dir, tmp_path):
    """A partial download: one clear ModelLoadError naming the file, not the safetensors library's traceback."""
    bad = tmp_path / "partial"
    shutil.copytree(v2_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: not a readable safetensors file .*partial download"):
        Reranker.from_pretrained(bad, show_progress=False)
