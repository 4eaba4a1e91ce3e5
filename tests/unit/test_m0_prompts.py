"""Prompt building, cuts and M-RoPE positions of jina-reranker-m0."""

from __future__ import annotations

import pytest
import torch

from rerankd.errors import InputError
from rerankd.inputs import ImageItem, TextItem
from rerankd.models.base import LengthOptions, Where
from rerankd.models.jina_m0 import SCORE_TOKEN_ID

from ..conftest import make_image

W = Where.for_pair(0)


def test_prompt_is_tokenized_whole_and_ends_with_score_token(m0):
    be = m0.backend
    [s] = be.prepare(TextItem("slm markdown"), TextItem("a doc"), LengthOptions(1024, 512), W)
    whole = be.tokenizer.encode("**Document**:\na doc\n**Query**:\nslm markdown").ids
    assert s.input_ids.tolist() == whole + [SCORE_TOKEN_ID]
    assert torch.equal(s.positions, torch.arange(len(whole) + 1).expand(3, -1))


def test_image_tokens_and_positions(m0):
    be = m0.backend
    img = make_image(112, 56)  # width 112, height 56: 4 rows x 8 cols of patches -> 2 x 4 merged = 8 tokens
    [s] = be.prepare(TextItem("q"), ImageItem(img), LengthOptions(1024, 512), W)
    ids = s.input_ids.tolist()
    pad = be.special.image_pad
    first = ids.index(pad)
    assert ids.count(pad) == 8 and ids[first - 1] == be.special.vision_start and ids[first + 8] == be.special.vision_end
    pos = s.positions[:, first : first + 8]
    assert pos[0].tolist() == [first] * 8  # t
    assert pos[1].tolist() == [first + r for r in (0, 0, 0, 0, 1, 1, 1, 1)]  # rows (2 merged rows)
    assert pos[2].tolist() == [first + c for c in (0, 1, 2, 3) * 2]  # cols (4 merged cols)
    assert s.positions[:, first + 8].tolist() == [first + 4] * 3  # text after: max (first + 3) + 1


def test_doc_cut_to_max_doc_length_and_query_to_max_query_length(m0):
    be = m0.backend
    doc, query = "word " * 500, "query " * 100
    [s] = be.prepare(TextItem(query), TextItem(doc), LengthOptions(4096, 20, max_doc_length=50), W)
    [full] = be.prepare(TextItem(query), TextItem(doc), LengthOptions(4096, 512, max_doc_length=4000), W)
    assert s.length < full.length
    cut_doc = be.tokenizer.decode(be.tokenizer.encode(doc).ids[:50])
    cut_q = be.tokenizer.decode(be.tokenizer.encode(query).ids[:20])
    expected = be.tokenizer.encode(f"**Document**:\n{cut_doc}\n**Query**:\n{cut_q}").ids + [SCORE_TOKEN_ID]
    assert s.input_ids.tolist() == expected


def test_overlong_prompt_cuts_the_document_not_the_query(m0):
    be = m0.backend
    query = "the query text stays whole"
    [s] = be.prepare(TextItem(query), TextItem("word " * 2000), LengthOptions(128, 512), W)
    assert s.length <= 128
    tail = be.tokenizer.encode("\n**Query**:\n" + query).ids + [SCORE_TOKEN_ID]
    assert s.input_ids.tolist()[-len(tail) :] == tail


def test_image_that_cannot_fit_is_an_error_naming_the_pair(m0):
    with pytest.raises(InputError, match=r"pairs\[0\]: the prompt needs \d+ tokens .* lower max_pixels"):
        m0.backend.prepare(TextItem("q"), ImageItem(make_image(1000, 1000)), LengthOptions(64, 32), W)


def test_reserved_image_token_in_text_is_refused(m0):
    with pytest.raises(InputError, match="reserved token"):
        m0.backend.prepare(TextItem("q"), TextItem("see <|image_pad|> here"), LengthOptions(1024, 512), W)
