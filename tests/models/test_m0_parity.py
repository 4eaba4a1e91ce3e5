"""jina-reranker-m0 scores equal the reference (transformers' Qwen2-VL + the published head), fp32 <= 1e-4."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from rerankd import Reranker
from rerankd.models.decoder import TextConfig
from rerankd.tiny import make_tiny_checkpoint

from ..conftest import ELEMENTWISE, assert_close, data_uri, loaded_with_elementwise, make_image

TOL = 1e-4
WORDS = "markdown model web content extraction gold rush merchants Paris France capital 数据 提取 正则 Beiträge 🙂".split()


def text_of(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words))


TEXT_DOCS = [text_of(n, i) for i, n in enumerate([0, 1, 3, 10, 40, 120, 300, 7, 64])] + [
    "During the California Gold Rush, some merchants made more money selling supplies.\n\nSecond paragraph!",
    "数据提取么?为什么不用正则啊,你用正则不就全解决了么?",
]
IMAGES = [make_image(56, 56, 1), make_image(120, 40, 2), make_image(333, 217, 3), make_image(30, 600, 4),
          make_image(1100, 800, 5)]  # fmt: skip


def test_text_pairs_many_lengths_one_batch(m0, m0_ref):
    pairs = [["slm markdown", d] for d in TEXT_DOCS] + [[text_of(12, 99), d] for d in TEXT_DOCS[:4]]
    ours = m0.compute_score(pairs, max_length=1024)
    ref = m0_ref.compute_score(pairs, max_length=1024, batch_size=len(pairs))  # one left-padded batch
    assert_close(ours, ref, TOL)
    # the tiny model's scores must spread, or this test could pass with a constant
    assert 0.05 < min(ours) and max(ours) < 0.95 and np.std(ours) > 0.05, ours


def test_document_truncation_matches_reference(m0, m0_ref):
    long_doc = text_of(900, 7)
    pairs = [["slm markdown", long_doc], ["query", text_of(700, 8)]]
    # max_length 300 -> max_doc_length = max(300 - 100, 100) = 200 tokens: the documents are cut
    ours = m0.compute_score(pairs, max_length=300, max_query_length=100)
    ref = m0_ref.compute_score(pairs, max_length=300, max_query_length=100)
    assert_close(ours, ref, TOL)
    assert abs(ours[0] - m0.compute_score(pairs[:1], max_length=2048)[0]) > 1e-4  # the cut changed the score


def test_image_documents_sizes_and_aspect_ratios(m0, m0_ref):
    pairs = [["slm markdown", data_uri(im)] for im in IMAGES]
    ours = m0.compute_score(pairs, max_length=2048, doc_type="image")
    ref = m0_ref.compute_score(pairs, max_length=2048, doc_type="image")
    assert_close(ours, ref, TOL)
    assert np.std(ours) > 0.02, ours


def test_an_exif_rotated_photo_scores_alike_in_every_form(m0, m0_ref):
    """A phone's JPEG with an EXIF orientation: the reference (transformers' load_image) turns it upright whatever
    the source, a PIL image too; so does rerankd. A data URI without ';base64' is read as the reference reads it."""
    import base64
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    buf = io.BytesIO()
    make_image(120, 80).save(buf, format="JPEG", exif=exif)
    jpeg = buf.getvalue()
    b64 = base64.b64encode(jpeg).decode()
    forms = [Image.open(io.BytesIO(jpeg)), jpeg, b64, f"data:image/jpeg;base64,{b64}", f"data:image/jpeg,{b64}"]
    ours = m0.compute_score([["slm markdown", f] for f in forms], max_length=2048, doc_type="image")
    ref = m0_ref.compute_score([["slm markdown", Image.open(io.BytesIO(jpeg))]], max_length=2048, doc_type="image")
    assert_close(ours, ref * len(forms), TOL)
    upright_unrotated = make_image(120, 80)  # the pixels as stored, not turned: another score
    assert abs(m0.compute_score([["slm markdown", upright_unrotated]], doc_type="image")[0] - ref[0]) > 1e-3


def test_image_query_text_documents(m0, m0_ref):
    q = data_uri(IMAGES[2])
    pairs = [[q, d] for d in TEXT_DOCS[:6]]
    ours = m0.compute_score(pairs, max_length=2048, query_type="image")
    ref = m0_ref.compute_score(pairs, max_length=2048, query_type="image")
    assert_close(ours, ref, TOL)


def test_image_query_image_documents(m0, m0_ref):
    q = data_uri(IMAGES[1])
    pairs = [[q, data_uri(im)] for im in IMAGES[:4]]
    ours = m0.compute_score(pairs, max_length=4096, query_type="image", doc_type="image")
    ref = m0_ref.compute_score(pairs, max_length=4096, query_type="image", doc_type="image")
    assert_close(ours, ref, TOL)


def test_mixed_batch_rerank_equals_reference_per_kind(m0, m0_ref):
    docs = [TEXT_DOCS[4], {"image": data_uri(IMAGES[0])}, {"text": TEXT_DOCS[9]}, {"image": data_uri(IMAGES[3])},
            TEXT_DOCS[10], IMAGES[2]]  # fmt: skip
    results = m0.rerank("slm markdown", docs, max_length=2048)
    got = {r["index"]: r["relevance_score"] for r in results}
    text_idx, image_idx = [0, 2, 4], [1, 3, 5]
    texts = [TEXT_DOCS[4], TEXT_DOCS[9], TEXT_DOCS[10]]
    images = [data_uri(IMAGES[0]), data_uri(IMAGES[3]), data_uri(IMAGES[2])]
    ref_t = m0_ref.compute_score([["slm markdown", d] for d in texts], max_length=2048)
    ref_i = m0_ref.compute_score([["slm markdown", d] for d in images], max_length=2048, doc_type="image")
    assert_close([got[i] for i in text_idx], ref_t, TOL)
    assert_close([got[i] for i in image_idx], ref_i, TOL)
    assert [r["index"] for r in results] == sorted(range(6), key=lambda i: (-got[i], i))


PORT_HEAD_NAMES = {"score.0.": "score.dense.", "score.2.": "score.out_proj."}


def _renamed(name: str) -> str:
    """transformers >= 4.52's names for the decoder and the vision tower."""
    if name.startswith("model."):
        return "model.language_model." + name[6:]
    return "model.visual." + name[7:] if name.startswith("visual.") else name


def _port_head(name: str) -> str:
    return next((new + name[len(old):] for old, new in PORT_HEAD_NAMES.items() if name.startswith(old)), name)


@pytest.mark.parametrize("layout", ["sharded_with_lm_head", "transformers_4_52_names", "port_head_names"])
def test_other_checkpoint_layouts_load_to_the_same_scores(m0, m0_dir, tmp_path, layout):
    d = tmp_path / layout
    if layout == "sharded_with_lm_head":
        make_tiny_checkpoint("jina-reranker-m0", d, seed=0, shards=3, include_lm_head=True)
        assert (d / "model.safetensors.index.json").is_file()
    else:
        shutil.copytree(m0_dir, d)
        w = load_file(str(d / "model.safetensors"))
        rename = _renamed if layout == "transformers_4_52_names" else _port_head
        renamed = {rename(k): v for k, v in w.items()}
        assert set(renamed) != set(w)
        save_file(renamed, str(d / "model.safetensors"), metadata={"format": "pt"})
    pairs = [["slm markdown", t] for t in TEXT_DOCS[:5]]
    other = Reranker.from_pretrained(d, show_progress=False)
    assert_close(other.compute_score(pairs, max_length=1024), m0.compute_score(pairs, max_length=1024), 0.0)


@pytest.mark.parametrize("form", ["transformers_4_5x", "transformers_5"])
def test_config_with_nested_text_config_loads(m0, m0_dir, tmp_path, form):
    """transformers >= 4.5x nest the decoder's fields under text_config; 5.x also moves rope_theta and the M-RoPE
    section into rope_parameters (as Qwen2VLConfig.save_pretrained of 5.25 writes it)."""
    d = tmp_path / "nested"
    shutil.copytree(m0_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    text_keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "rms_norm_eps", "rope_theta", "vocab_size", "rope_scaling"]  # fmt: skip
    cfg["text_config"] = text = {k: cfg.pop(k) for k in text_keys}
    if form == "transformers_5":
        theta, scaling = text.pop("rope_theta"), text.pop("rope_scaling")
        text["rope_parameters"] = {"mrope_section": scaling["mrope_section"], "rope_theta": theta,
                                   "rope_type": "default", "type": "mrope"}  # fmt: skip
        other = {**cfg, "text_config": {**text, "rope_parameters": {**text["rope_parameters"], "rope_theta": 5e5}}}
        assert TextConfig.from_dict(other).rope_theta == 5e5  # read from there, not a default
    (d / "config.json").write_text(json.dumps(cfg))
    pairs = [["q", TEXT_DOCS[3]]]
    other = Reranker.from_pretrained(d, show_progress=False)
    assert other.compute_score(pairs) == m0.compute_score(pairs)


@pytest.mark.parametrize("gemm", ["torch", "onednn"])
def test_both_cpu_kernels_equal_the_reference(m0_dir, m0_ref, gemm):
    """The `m0` fixture runs whichever kernel `auto` picked on this CPU; each one must match on its own."""
    from rerankd.models.layers import onednn_available

    if gemm == "onednn" and not onednn_available():
        pytest.skip("this torch build has no oneDNN linear kernel")
    rr = Reranker.from_pretrained(m0_dir, show_progress=False, cpu_gemm=gemm)
    assert rr.options.cpu_gemm == gemm
    assert rr.backend.model.visual.patch_embed.uses_onednn == (gemm == "onednn")  # the one product outside nn.Linear
    texts = [["slm markdown", d] for d in TEXT_DOCS[:6]]
    images = [["slm markdown", data_uri(im)] for im in IMAGES[1:3]]
    assert_close(rr.compute_score(texts, max_length=2048), m0_ref.compute_score(texts, max_length=2048), TOL)
    ours = rr.compute_score(images, max_length=2048, doc_type="image")
    assert_close(ours, m0_ref.compute_score(images, max_length=2048, doc_type="image"), TOL)


@pytest.mark.parametrize("elementwise", ELEMENTWISE)
def test_both_elementwise_kernels_equal_the_reference(m0_dir, m0_ref, elementwise):
    """The decoder's norms, rotary embeddings and SiLU products on rerankd's CPU kernels and on torch's ops."""
    rr = loaded_with_elementwise(m0_dir, elementwise)
    texts = [["slm markdown", d] for d in TEXT_DOCS]
    assert_close(rr.compute_score(texts, max_length=2048), m0_ref.compute_score(texts, max_length=2048), TOL)
    images = [["slm markdown", data_uri(IMAGES[2])]]
    ours = rr.compute_score(images, max_length=2048, doc_type="image")
    assert_close(ours, m0_ref.compute_score(images, max_length=2048, doc_type="image"), TOL)
