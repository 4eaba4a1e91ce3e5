"""Request and response bodies of the HTTP API (pydantic), in the shapes clients already send.

/v1/rerank and /rerank take Jina's and vLLM's shape (documents as strings, {"text"} or {"image"}, an image query
too; vLLM's and SGLang's content parts, {"content": [parts]} or [parts]); /v2/rerank takes Cohere v2's (string
documents, return_documents false by default, max_tokens_per_doc); /score takes vLLM's score request.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from ..config import COHERE_MAX_TOKENS_PER_DOC, RERANK_DEFAULTS, LongDocuments, ScoreOptions, field_docs
from ..errors import InputError

_DOCS = field_docs(ScoreOptions)
ACTIVATION_NAMES = AliasChoices("use_activation", "activation", "softmax")  # vLLM's, the newest first


class DocumentObject(BaseModel):
    """{"text": ...} or {"image": URL | data URI | base64}, not both; other fields are kept and echoed (Cohere v1's
    object documents, scored through `rank_fields`)."""

    model_config = ConfigDict(extra="allow")
    text: str | None = None
    image: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> "DocumentObject":
        if self.text is not None and self.image is not None:
            raise ValueError('give one of "text" or "image", not both')
        if self.text is None and self.image is None and not self.model_extra:
            raise ValueError('give "text" or "image"')
        return self

    def fields_text(self, fields: list[str]) -> str | None:
        """The text Cohere's rank_fields make of this document: the one field's value, or for several fields their
        `field: value` lines in the order given (fields it lacks are skipped); None when it has none of them."""
        values = [(f, getattr(self, f, None) if f in ("text", "image") else (self.model_extra or {}).get(f)) for f in fields]
        present = [(f, v) for f, v in values if v is not None]
        if not present:
            return None
        if len(fields) == 1:
            return str(present[0][1])
        return "\n".join(f"{f}: {v}" for f, v in present)


class ImageUrl(BaseModel):
    url: str


class ContentPart(BaseModel):
    """One of vLLM's (OpenAI chat's) content parts: {"type": "text", "text": ...} or {"type": "image_url",
    "image_url": {"url": URL | data URI}} (the url as a bare string too)."""

    type: str
    text: str | None = None
    image_url: ImageUrl | str | None = None

    def as_document(self, param: str) -> dict[str, str]:
        """{"text": ...} or {"image": ...}, as rerankd's items take them; InputError for another part."""
        if self.type == "text" and self.text is not None:
            return {"text": self.text}
        if self.type == "image_url" and self.image_url is not None:
            return {"image": self.image_url if isinstance(self.image_url, str) else self.image_url.url}
        raise InputError(f'a content part must be {{"type": "text", "text": ...}} or {{"type": "image_url", '
                         f'"image_url": {{"url": ...}}}}; got type {self.type!r}', param)  # fmt: skip


class ContentDocument(BaseModel):
    """vLLM's multimodal score input: {"content": [parts]}."""

    model_config = ConfigDict(extra="forbid")
    content: list[ContentPart]


def _shape_of(value: object) -> str:
    """Which kind of value a document (or a list of them) is: "Str", "List", "Content" (vLLM's {"content": [...]})
    or "Object" (any other object). Tags are capitalized: error locations leave them out (app._loc), so that a bad
    document reads "documents[3].text", and a bad value is reported against the one shape it has."""
    if isinstance(value, str):
        return "Str"
    if isinstance(value, list):
        return "List"
    if isinstance(value, dict) and isinstance(value.get("content"), list) and not {"text", "image"} & set(value):
        return "Content"  # (a Cohere v1 document's "content" field is a string)
    return "Object"


# a string, {"text"} / {"image"} (more fields kept), vLLM's {"content": [parts]}, SGLang's [parts]
Document = Annotated[
    Annotated[str, Tag("Str")] | Annotated[DocumentObject, Tag("Object")]
    | Annotated[ContentDocument, Tag("Content")] | Annotated[list[ContentPart], Tag("List")],
    Discriminator(_shape_of),
]
# a rerank request's documents: a list of them, or vLLM's one string or one {"content": [...]}
Documents = Annotated[
    Annotated[list[Document], Tag("List")] | Annotated[str, Tag("Str")] | Annotated[ContentDocument, Tag("Content")],
    Discriminator(lambda v: "List" if _shape_of(v) == "Object" else _shape_of(v)),  # others: "a valid list"
]


def content_parts(value: object) -> list[ContentPart] | None:
    """The content parts of a vLLM or SGLang document, None for another document."""
    if isinstance(value, ContentDocument):
        return value.content
    return value if isinstance(value, list) else None


class Request(BaseModel):
    """A request body: unknown fields are ignored, and null for an optional field means its default, as Cohere's
    API reads it (its clients, langchain-cohere's among them, send every unset optional as null), except where null
    is a value of its own (max_query_length: null, queries are not cut). Numbers and booleans are strict: "2" or
    true for top_n is a 422, not 2 or 1."""

    model_config = ConfigDict(extra="ignore")
    NULL_IS_A_VALUE: ClassVar[frozenset[str]] = frozenset({"max_query_length"})  # null: queries are not cut

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        keep = {name for name, f in cls.model_fields.items() if f.is_required()} | cls.NULL_IS_A_VALUE
        return {k: v for k, v in data.items() if v is not None or k in keep}


class RerankRequest(Request):
    """Jina's /v1/rerank and vLLM's /rerank request."""

    model: str | None = Field(None, description="The served model's name; optional when one model is served.")
    query: Document = Field(description='A string, {"text": ...} or {"image": ...} (or one content part, as vLLM '
                            'and SGLang send it).')  # fmt: skip
    documents: Documents = Field(
        description='Strings, {"text": ...} or {"image": URL | data URI | base64}; vLLM\'s {"content": [parts]} '
        "(one document a part, inside the list or as the whole value) or SGLang's [parts]; a bare string is one "
        "document."
    )
    top_n: int | None = Field(None, strict=True, ge=0, description="Return the best N results (default, or 0 as vLLM "
                              "sends it: all).")  # fmt: skip
    return_documents: bool = Field(True, strict=True, description="Echo each document in its result.")
    use_activation: bool | None = Field(None, strict=True, validation_alias=ACTIVATION_NAMES,
                                        description="vLLM's: false gives the relevance logits (also read as "
                                        "'activation' and 'softmax').")  # fmt: skip
    raw_scores: bool = Field(False, strict=True, description="Infinity's: the relevance logits instead of scores.")
    max_length: int | None = Field(RERANK_DEFAULTS.max_length, strict=True, ge=1, description=_DOCS["max_length"])
    max_query_length: int | None = Field(RERANK_DEFAULTS.max_query_length, strict=True, ge=1, description=_DOCS["max_query_length"])
    max_doc_length: int | None = Field(RERANK_DEFAULTS.max_doc_length, strict=True, ge=1, description=_DOCS["max_doc_length"])
    long_documents: LongDocuments = Field(RERANK_DEFAULTS.long_documents, description=_DOCS["long_documents"])
    overlap: int = Field(RERANK_DEFAULTS.overlap, strict=True, ge=0, description=_DOCS["overlap"])
    instruction: str | None = Field(RERANK_DEFAULTS.instruction, description=_DOCS["instruction"] + ' Also read as "instruct" (SGLang).',
                                    validation_alias=AliasChoices("instruction", "instruct"))  # fmt: skip
    max_tokens_per_doc: int | None = Field(None, strict=True, ge=1, description="vLLM's and Cohere's field: documents are cut to "
                                           "this many tokens (max_doc_length with long_documents 'truncate').")  # fmt: skip
    max_tokens_per_query: int | None = Field(None, strict=True, ge=1, description="vLLM's field: the same as max_query_length.")
    rank_fields: list[str] | None = Field(None, min_length=1, description="Cohere v1: the fields of object documents "
                                          "to score, their values joined as 'field: value' lines in this order (one "
                                          "field: its value alone). Default: their 'text'.")  # fmt: skip
    truncate_prompt_tokens: int | None = Field(None, strict=True, ge=-1, description="vLLM's: cut each pair to this "
                                               "many tokens (-1: the model's limit) instead of scoring windows.")  # fmt: skip

    def document_list(self) -> list[str | DocumentObject | ContentDocument | list[ContentPart]]:
        """The documents as a list, as vLLM reads them: a bare string is one document, a {"content": [...]} one
        document a part."""
        return score_inputs(self.documents)  # type: ignore[arg-type]

    @property
    def raw(self) -> bool:
        """Whether the logits are asked for (raw_scores, or use_activation false)."""
        return self.raw_scores or self.use_activation is False

    def lengths(self) -> tuple[int | None, int | None, int | None, str]:
        """max_length, max_query_length, max_doc_length and long_documents, vLLM's names read as rerankd's."""
        query = self.max_tokens_per_query if self.max_tokens_per_query is not None else self.max_query_length
        max_length, long_documents = truncated(self.max_length, self.truncate_prompt_tokens, self.long_documents)
        if self.max_tokens_per_doc is not None:
            return max_length, query, self.max_tokens_per_doc, "truncate"
        return max_length, query, self.max_doc_length, long_documents


def truncated(max_length: int | None, truncate_prompt_tokens: int | None,
              long_documents: str) -> tuple[int | None, str]:  # fmt: skip
    """max_length and long_documents where vLLM's truncate_prompt_tokens is given: pairs cut to it (-1: to the
    model's limit)."""
    if truncate_prompt_tokens is None:
        return max_length, long_documents
    return (max_length if truncate_prompt_tokens == -1 else truncate_prompt_tokens), "truncate"


ScoreInputs = str | ContentDocument | list[str | ContentDocument]


class ScoreRequest(Request):
    """vLLM's /score request: queries and documents (also named text_1 / text_2, data_1 / data_2, or documents as
    items), each a string, {"content": [parts]} (one input a part) or a list of them; paired 1:1, 1:N or N:N."""

    model: str | None = None
    queries: ScoreInputs = Field(validation_alias=AliasChoices("queries", "text_1", "data_1"))
    documents: ScoreInputs = Field(validation_alias=AliasChoices("documents", "items", "text_2", "data_2"))
    use_activation: bool | None = Field(None, strict=True, validation_alias=ACTIVATION_NAMES,
                                        description="false: the relevance logits.")  # fmt: skip
    truncate_prompt_tokens: int | None = Field(None, strict=True, ge=-1, description="Cut each pair to this many "
                                               "tokens (-1: the model's limit) instead of scoring windows.")  # fmt: skip


def pair_up(nq: int, nd: int) -> list[tuple[int, int]]:
    """(query index, document index) of each pair of a score request, in order; ValueError unless 1:1, 1:N or N:N."""
    if not nq or not nd:
        raise ValueError("queries and documents must each hold at least one input")
    if nq == 1:
        return [(0, i) for i in range(nd)]
    if nq != nd:
        raise ValueError(f"{nq} queries and {nd} documents: pair them 1:1, 1:N or N:N")
    return [(i, i) for i in range(nd)]


def score_inputs(value: ScoreInputs) -> list[str | ContentDocument]:
    """One side of a score request as a list, as vLLM reads it: a string is one input, a {"content": [...]} one
    input a part."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, ContentDocument):
        return [ContentDocument(content=[part]) for part in value.content]
    return value


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: ScoreUsage


class CohereRerankRequest(Request):
    """Cohere's /v2/rerank request."""

    model: str | None = None
    query: str
    documents: list[str]
    top_n: int | None = Field(None, strict=True, ge=1)
    return_documents: bool = Field(False, strict=True)
    max_tokens_per_doc: int = Field(COHERE_MAX_TOKENS_PER_DOC, strict=True, ge=1, description="Documents are cut to this many tokens.")


class TEIRerankRequest(Request):
    """text-embeddings-inference's /rerank request."""

    query: str
    texts: list[str]
    raw_scores: bool = Field(False, strict=True, description="Relevance logits instead of scores.")
    return_text: bool = Field(False, strict=True, description="Echo each text in its result.")
    truncate: bool = Field(False, strict=True, description="Cut texts that do not fit; rerankd otherwise scores them as windows "
                           "(TEI would refuse them).")  # fmt: skip
    truncation_direction: Literal["Right", "right"] = Field("Right", description="Where texts are cut: rerankd cuts "
                                                            "their end (Right) only.")  # fmt: skip


def _shape(body: object) -> str:
    """Which request a /rerank body is: TEI's (`texts`, no `documents`) or Jina's / vLLM's."""
    return "TEI" if isinstance(body, dict) and "texts" in body and "documents" not in body else "Jina"


# POST /rerank's body, told apart by its fields so that a bad request is answered in its own shape's terms (tags
# are capitalized: error locations leave them out)
VllmOrTeiRequest = Annotated[
    Annotated[RerankRequest, Tag("Jina")] | Annotated[TEIRerankRequest, Tag("TEI")], Discriminator(_shape)
]


class TEIResult(BaseModel):
    index: int
    score: float
    text: str | None = None


class Usage(BaseModel):
    total_tokens: int
    prompt_tokens: int


class WindowInfo(BaseModel):
    index: int
    count: int
    start: int
    end: int


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: DocumentObject | None = None
    window: WindowInfo | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: Usage
    results: list[RerankResult]


class CohereDocument(BaseModel):
    text: str


class CohereResult(BaseModel):
    index: int
    relevance_score: float
    document: CohereDocument | None = None


class CohereResponse(BaseModel):
    """Cohere v2's answer, with vLLM's `model` and `usage` beside it (vLLM's /v2/rerank clients read them; Cohere's
    SDK ignores them)."""

    id: str
    results: list[CohereResult]
    meta: dict
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rerankd"
    root: str | None = Field(None, description="Where the model was loaded from (hub id or directory), as vLLM says.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
    detail: str = Field(description="The message again, where FastAPI's and Jina's clients read it.")
