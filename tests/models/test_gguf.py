"""The GGUF path: tiny m0 -> rerankd convert-gguf (f32, f16, q8_0) -> llama.cpp + the NumPy head, against the
torch engine on the same checkpoint (itself checked against transformers in test_m0_parity)."""

from __future__ import annotations

import json
import shutil
import unicodedata

import numpy as np
import pytest

from rerankd import Reranker
from rerankd.cli import main
from rerankd.convert_gguf import convert_gguf
from rerankd.errors import InputError, ModelLoadError, PairErrors
from rerankd.models.base import LengthOptions, Where
from rerankd.models.gguf import _char_offsets, gguf_tag_matches, nfc_with_map
from rerankd.inputs import TextItem

from ..conftest import assert_close, make_image
from .test_m0_parity import TEXT_DOCS, text_of

pytest.importorskip("llama_cpp", reason="the GGUF path needs llama-cpp-python: pip install 'rerankd[gguf]'")

TOL = {"f32": 2e-3, "f16": 5e-3, "q8_0": 0.03}
RANK_TOL = {**TOL, "q8_0": 0.05}  # see test_same_ranking_on_ten_documents
TRICKY = [
    "line one\nline two\n\n\tindented\r\nwindows line",
    "数据提取么?为什么不用正则啊,你用正则不就全解决了么? 绿茶富含儿茶素",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷, accents é è ü, math ∑∫",
    "mixed: Paris 数据 🙂\n**Query**: not a real query <|box_end|> inside",
    "decomposed: cafe\u0301 nai\u0308ve \u1100\u1161\u11a8 (NFD text, which Qwen2's tokenizer makes NFC first)",
    "",
    "x",
]


@pytest.fixture(scope="module")
def ggufs(m0_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {t: convert_gguf(m0_dir, out / t, t, show_progress=False) for t in TOL}


@pytest.fixture(scope="module")
def gguf_models(ggufs):
    return {t: Reranker.from_pretrained(p) for t, p in ggufs.items()}


def pairs() -> list[list[str]]:
    docs = TEXT_DOCS + TRICKY + [text_of(600, 7)]  # the last one is longer than llama.cpp's 512-token micro-batch
    return [["slm markdown", d] for d in docs] + [[q, TEXT_DOCS[5]] for q in TRICKY]


@pytest.mark.parametrize("outtype", list(TOL))
def test_scores_match_the_torch_engine(m0, gguf_models, outtype):
    ref = m0.compute_score(pairs(), max_length=2048)
    ours = gguf_models[outtype].compute_score(pairs(), max_length=2048)
    assert_close(ours, ref, TOL[outtype])
    assert np.std(ref) > 0.05 and 0.05 < min(ref) and max(ref) < 0.95, ref  # scores spread: a constant would fail


@pytest.mark.parametrize("outtype", list(TOL))
def test_same_ranking_on_ten_documents(m0, gguf_models, outtype):
    """Ten documents whose reference scores lie at least 0.08 apart rank the same. Closer ones may swap under
    q8_0: on this random-weight model q8_0 moves a score by up to 0.044 (0.033 from quantizing the weights
    alone, measured by feeding llama.cpp the dequantized q8_0 weights in f32), so its bound here is 0.05."""
    pool = [text_of(n, 100 + i) for i, n in enumerate([5, 12, 30, 8, 60, 20, 3, 45, 15, 25] * 8)]
    pool_scores = m0.compute_score([["gold rush merchants", d] for d in pool])
    docs: list[str] = []
    chosen: list[float] = []
    for sc, d in sorted(zip(pool_scores, pool)):
        if (not chosen or sc - chosen[-1] >= 0.08) and len(docs) < 10:
            docs.append(d)
            chosen.append(sc)
    assert len(docs) == 10, "the tiny model should spread scores enough to pick ten documents"
    ref = m0.rerank("gold rush merchants", docs, return_documents=False)
    ours = gguf_models[outtype].rerank("gold rush merchants", docs, return_documents=False)
    assert [r["index"] for r in ours] == [r["index"] for r in ref]
    assert_close([r["relevance_score"] for r in ours], [r["relevance_score"] for r in ref], RANK_TOL[outtype])


def test_prompts_tokenize_identically(m0, gguf_models):
    """Whole prompts (newlines, CJK, emoji, a special token written in the text) give the same ids in both paths,
    the score token 100 included."""
    torch_b, gguf_b = m0.backend, gguf_models["f32"].backend
    assert gguf_b.tokenizer.token_to_id("<|box_end|>") == torch_b.tokenizer.token_to_id("<|box_end|>")
    lengths = LengthOptions(10240, 512)
    for q in TRICKY + ["slm markdown"]:
        for d in TRICKY + TEXT_DOCS:
            a = torch_b.prepare(TextItem(q), TextItem(d), lengths, Where.for_pair(0))[0].input_ids.tolist()
            b = gguf_b.prepare(TextItem(q), TextItem(d), lengths, Where.for_pair(0))[0].input_ids.tolist()
            assert a == b, (q, d)
            assert a[-1] == 100
    for text in TRICKY:
        assert gguf_b.tokenizer.encode(text).ids == torch_b.tokenizer.encode(text).ids
        ids = gguf_b.tokenizer.encode(text).ids
        decoded = torch_b.tokenizer.decode(ids, skip_special_tokens=False)
        assert gguf_b.tokenizer.decode(ids) == decoded == unicodedata.normalize("NFC", text)


def test_batch_invariance(gguf_models):
    rr = gguf_models["f32"]
    ps = pairs()
    together = rr.compute_score(ps, max_length=2048)
    alone = [rr.compute_score([p], max_length=2048)[0] for p in ps[::3]]
    assert_close(alone, together[::3], 1e-5)


def test_long_documents_are_windowed_like_the_torch_engine(m0, gguf_models):
    long_doc = text_of(700, 3)
    kw = dict(max_length=256, overlap=32, return_documents=False)
    ref = m0.rerank("gold rush", [long_doc, "short"], **kw)
    ours = gguf_models["f32"].rerank("gold rush", [long_doc, "short"], **kw)
    assert [r["index"] for r in ours] == [r["index"] for r in ref]
    by_index = {r["index"]: r for r in ours}
    ref_by_index = {r["index"]: r for r in ref}
    assert by_index[0]["window"] == ref_by_index[0]["window"]
    assert by_index[0]["window"]["count"] > 1
    assert_close([by_index[i]["relevance_score"] for i in (0, 1)], [ref_by_index[i]["relevance_score"] for i in (0, 1)], 2e-3)


def test_images_are_refused_with_a_clear_error(gguf_models):
    rr = gguf_models["f16"]
    with pytest.raises(InputError, match="GGUF .* text only"):
        rr.rerank({"image": make_image(56, 56)}, ["text"])
    with pytest.raises(PairErrors, match="text only") as e:
        rr.compute_score([["q", make_image(56, 56)]])
    assert list(e.value.errors) == [0] and "pairs[0].document" in str(e.value)


def test_loading_by_directory_tag_and_file(ggufs, tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    for t in ("f16", "q8_0"):
        shutil.copy(ggufs[t], both / ggufs[t].name)
    shutil.copy(ggufs["f16"].parent / "mlp_weights.npz", both / "mlp_weights.npz")
    with pytest.raises(ModelLoadError, match="several .gguf files match"):
        Reranker.from_pretrained(both)
    with pytest.raises(ModelLoadError, match="no .gguf file with the tag 'Q4_K_M'.*available: .*f16.gguf"):
        Reranker.from_pretrained(f"{both}:Q4_K_M")
    a = Reranker.from_pretrained(f"{both}:Q8_0").compute_score([["q", "d"]])  # tags match case-insensitively
    b = Reranker.from_pretrained(ggufs["q8_0"]).compute_score([["q", "d"]])
    assert a == b
    by_folder = Reranker.from_pretrained(ggufs["f16"].parent)
    assert by_folder.backend.path == ggufs["f16"]  # a folder with one .gguf
    assert by_folder.options.cpu_gemm == "none"  # llama.cpp runs it, no torch linear layer
    with pytest.raises(ModelLoadError, match="a .gguf file needs no tag"):
        Reranker.from_pretrained(f"{ggufs['q8_0']}:Q8_0")
    with pytest.raises(ModelLoadError, match="expected NAME:TAG"):
        Reranker.from_pretrained(":Q8_0")
    from fnmatch import fnmatchcase

    from rerankd.hub import gguf_tag_patterns

    files = ["jina-reranker-m0-Q4_K.gguf", "jina-reranker-m0-Q4_K_M.gguf", "m0.Q4_K-00001-of-00002.gguf",
             "jina-reranker-m0-F16.gguf", "Q4_K.gguf"]  # fmt: skip
    for tag in ("Q4_K", "q4_k", "F16", "Q4_K_M"):
        fetched = [f for f in files if any(fnmatchcase(f, p) for p in gguf_tag_patterns(tag))]
        assert fetched == [f for f in files if gguf_tag_matches(f, tag)], tag  # downloads what loading accepts
    assert gguf_tag_matches("jina-reranker-m0-Q8_0.gguf", "q8_0")
    assert not gguf_tag_matches("jina-reranker-m0-Q8_0.gguf", "Q8")


def test_hub_tag_offline_is_a_clear_error(tmp_path):
    """Offline with an empty cache (in a child process: huggingface_hub reads its settings at import)."""
    import os
    import subprocess
    import sys

    code = ("from rerankd import Reranker\ntry:\n    Reranker.from_pretrained('jinaai/jina-reranker-m0-GGUF:Q8_0')\n"
            "except Exception as e:\n    print(type(e).__name__, e)")  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("ModelLoadError") and "not in the local Hugging Face cache" in out, out


def test_missing_head_and_damaged_files(ggufs, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(ggufs["f16"], lone / "m.gguf")
    with pytest.raises(ModelLoadError, match="mlp_weights.npz is missing"):
        Reranker.from_pretrained(lone / "m.gguf")
    shutil.copy(ggufs["f16"].parent / "mlp_weights.npz", lone / "mlp_weights.npz")

    data = (lone / "m.gguf").read_bytes()
    (lone / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cut.gguf: .*(truncated|damaged)"):
        Reranker.from_pretrained(lone / "cut.gguf")
    (lone / "junk.gguf").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        Reranker.from_pretrained(lone / "junk.gguf")
    (lone / "hdr.gguf").write_bytes(data[:64])
    with pytest.raises(ModelLoadError, match="hdr.gguf: .*damaged"):
        Reranker.from_pretrained(lone / "hdr.gguf")

    np.savez(tmp_path / "mlp_weights.npz", W1=np.zeros((3, 3)))
    shutil.copy(ggufs["f16"], tmp_path / "m.gguf")
    with pytest.raises(ModelLoadError, match=r"missing arrays \['b1', 'W2', 'b2', 'logit_bias'\]"):
        Reranker.from_pretrained(tmp_path / "m.gguf")


def test_convert_refuses_other_architectures(tmp_path):
    from rerankd.tiny import make_tiny_checkpoint

    v2 = make_tiny_checkpoint("jina-reranker-v2", tmp_path / "v2")
    with pytest.raises(ModelLoadError, match="converts jina-reranker-m0 checkpoints only"):
        convert_gguf(v2, tmp_path / "out")


def test_plain_llama_cpp_prompt_ending_in_box_end_gives_the_same_score(m0, ggufs):
    """For llama.cpp's own tools the converted file follows Jina's recipe: the prompt text ending in <|box_end|>,
    tokenized by llama.cpp with special tokens parsed, yields the score token's hidden state."""
    import torch

    from rerankd.models.base import PreparedSequence

    backend = Reranker.from_pretrained(ggufs["f32"]).backend
    backend._feed = {}  # no rerankd remapping: token ids exactly as llama.cpp's tokenizer gives them
    prompt = "**Document**:\nParis is the capital of France.\n**Query**:\nslm markdown<|box_end|>"
    ids = backend.tokenizer.encode(prompt).ids
    assert ids[-1] == backend.tokenizer.token_to_id("<|box_end|>")
    logit = backend.forward([PreparedSequence(torch.tensor(ids))])[0]
    ref = m0.compute_score([["slm markdown", "Paris is the capital of France."]], activation=None)[0]
    assert abs(float(logit) - ref) < 1e-4


def test_convert_cli_writes_both_files(m0_dir, tmp_path, capsys):
    assert main(["convert-gguf", str(m0_dir), str(tmp_path), "--outtype", "q8_0", "--name", "tiny", "--quiet"]) == 0
    assert (tmp_path / "tiny-q8_0.gguf").is_file() and (tmp_path / "mlp_weights.npz").is_file()
    assert "tiny-q8_0.gguf" in capsys.readouterr().out
    import gguf

    reader = gguf.GGUFReader(str(tmp_path / "tiny-q8_0.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    head = np.load(tmp_path / "mlp_weights.npz")
    assert head["W1"].shape == (64, 64) and head["W2"].shape == (64, 1) and head["logit_bias"].shape == (1,) and head["logit_bias"][0] == np.float32(2.65)
    with pytest.raises(SystemExit):  # argparse: only the supported outtypes
        main(["convert-gguf", str(m0_dir), str(tmp_path), "--outtype", "q4"])


def test_char_offsets_map_bytes_to_characters():
    data = "aé🙂b".encode()  # 1 + 2 + 4 + 1 bytes
    floor, ceil = _char_offsets(data)
    for i, c in ((0, 0), (1, 1), (3, 2), (7, 3), (8, 4)):  # character boundaries
        assert floor[i] == ceil[i] == c
    assert (floor[2], ceil[2]) == (1, 2) and (floor[5], ceil[5]) == (2, 3)  # inside a character: it, its end


def test_token_spans_match_the_hugging_face_tokenizer(m0, gguf_models):
    """Character spans of tokens (they place document windows), multi-byte and decomposed text included. One
    difference on purpose: where NFC composed several characters into one (e + U+0301 -> é), Hugging Face's span
    covers only the first of them, rerankd's all of them."""
    for text in TRICKY:
        ours = gguf_models["f32"].backend.tokenizer.encode(text).offsets
        ref = m0.backend.tokenizer.encode(text).offsets
        if unicodedata.is_normalized("NFC", text):
            assert ours == ref, text
        else:
            assert len(ours) == len(ref) and all(a[0] == b[0] and a[1] >= b[1] for a, b in zip(ours, ref)), text
            assert ours[-1][1] == len(text) and ours != ref


def test_nfc_map_keeps_positions_in_the_original_text():
    normalized, at = nfc_with_map("cafe\u0301!")
    assert normalized == "caf\u00e9!" and at == ([0, 1, 2, 3, 5], [0, 1, 2, 3, 5, 6])
    assert nfc_with_map("already NFC") == ("already NFC", None)
    # Tamil's two-part vowel composes across clusters: one group, and the text after it keeps exact positions
    normalized, (begins, ends) = nfc_with_map("\u0bc6\u0bbe x")
    assert normalized == "\u0bca x" and begins == [0, 2, 3] and ends == [0, 2, 3, 4]


def test_spans_of_text_that_nfc_changes_cover_the_references(gguf_models, m0):
    """Token and window spans on text that NFC changes: the torch engine's (Hugging Face's alignments), or wider where
    a token begins or ends inside a group that NFC changed; never cut short or empty (before, a composition across
    clusters made every span of the text proportional, and a token ending inside a long cluster got (0, 0))."""
    texts = ["\u0bc6\u0bbe " + "cafe\u0301 " * 60 + "gold rush merchants " * 20,  # composition across clusters
             "a" + "\u0301" * 200 + " tail", "\u0958" * 60, "x\u0344y " * 30]  # fmt: skip
    for text in texts:
        ours = gguf_models["f32"].backend.tokenizer.encode(text).offsets
        ref = m0.backend.tokenizer.encode(text).offsets
        assert len(ours) == len(ref), text
        assert all(a[0] <= b[0] and b[1] <= a[1] <= len(text) and a[0] < a[1] for a, b in zip(ours, ref)), text
    lengths = LengthOptions(64, 16, None, "chunk", 8)
    for text in texts:  # every window of a chunked document: the same tokens, a span covering the torch engine's
        got = [s.window for s in gguf_models["f32"].backend.prepare(TextItem("q"), TextItem(text), lengths,
                                                                     Where.for_pair(0))]  # fmt: skip
        want = [s.window for s in m0.backend.prepare(TextItem("q"), TextItem(text), lengths, Where.for_pair(0))]
        assert len(got) == len(want) > 1, text
        assert all(w.start - 2 <= g.start <= w.start and w.end <= g.end <= w.end + 2 for g, w in zip(got, want)), \
            (text, got, want)  # fmt: skip


def test_served_over_http(ggufs):
    """The server, scheduler and API work unchanged on this backend; images get a 400 that says why."""
    from ..server.conftest import Server

    s = Server(ggufs["f32"])
    try:
        status, body, _ = s.post("/v1/rerank", {"query": "slm markdown", "documents": TRICKY[:3], "top_n": 2})
        assert status == 200 and len(body["results"]) == 2
        ref = Reranker.from_pretrained(ggufs["f32"]).rerank("slm markdown", TRICKY[:3], top_n=2)
        assert [r["index"] for r in body["results"]] == [r["index"] for r in ref]
        assert_close([r["relevance_score"] for r in body["results"]], [r["relevance_score"] for r in ref], 1e-5)
        status, body, _ = s.post("/v1/rerank", {"query": "q", "documents": ["a", {"image": "iVBORw0KGgo="}]})
        assert status == 400 and "documents[1]" in body["error"]["message"] and "text only" in body["error"]["message"]
        status, body, _ = s.get("/v1/models")
        assert status == 200 and json.dumps(body)
        from ..server.test_bench import bench

        r = bench("--base-url", s.url, "--num-prompts", "6", "--docs-per-request", "3", "--random-input", "24",
                  "--max-concurrency", "3")  # fmt: skip
        assert r.returncode == 0 and "completed / failed:      6 / 0" in r.stdout, r.stdout + r.stderr
        assert f"token counts: {ggufs['f32']}" in r.stderr  # the served GGUF's own tokenizer, not an estimate
    finally:
        assert s.stop() == 0
