"""jina-reranker-m0: Qwen2-VL-2B with a two-layer score head on the last token.

Reproduces the model card's `compute_score` (Jina's modeling.py, `JinaVLForRanking`): the prompt
`**Document**:\\n{doc}\\n**Query**:\\n{query}` is tokenized as one string, images stand as
`<|vision_start|><|image_pad|><|vision_end|>` with the pad expanded to the image's merged-token count (the
document's image first), token 100 is appended, and the score is sigmoid(head(h_last) - 2.65) where h_last is the
final-norm hidden state of that last token. Text documents longer than max_doc_length tokens are cut at that
token count and decoded back to text, as the reference does.

Where rerankd differs on purpose (README, "Differences from the reference"): queries longer than
max_query_length are cut the same way (the reference never cuts them), and a prompt still longer than
max_length after those cuts loses document tokens rather than its tail (the reference right-truncates the whole
prompt, which would cut the query and could cut an image apart).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from tokenizers import Tokenizer
from torch import nn

from ..config import LoadOptions
from ..errors import InputError, ModelLoadError
from ..inputs import ImageItem, Item, TextItem
from ..inputs.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    ImageLimits,
    ImagePolicy,
    PreparedImage,
    load_image,
    qwen2_vl_patches,
    resized_pixels_bound,
)
from ..weights import Renames
from .base import (
    LengthOptions,
    Pointwise,
    PreparedSequence,
    Where,
    build_module,
    check_positions,
    cut_text,
    load_tokenizer,
    packed,
    token_id,
)
from .layers import Packing, attention_backend, to_device, use_cpu_gemm
from .decoder import TextConfig, TextModel
from .qwen2_vl import VisionConfig, VisionTransformer
from .windows import check_document_size, document_spans

SCORE_TOKEN_ID = 100  # appended after every prompt; the head reads its hidden state
LOGIT_BIAS = 2.65  # relevance = sigmoid(logit - LOGIT_BIAS)
DEFAULT_MAX_LENGTH = 10240
REFERENCE_MAX_QUERY_LENGTH = 512  # the model card's compute_score cuts queries here (a model fact)
DOC_PREFIX = "**Document**:\n"
QUERY_PREFIX = "\n**Query**:\n"
IMAGE_PAD = "<|image_pad|>"  # expanded to an image's tokens; refused in text
IMAGE_PLACEHOLDER = f"<|vision_start|>{IMAGE_PAD}<|vision_end|>"

# checkpoint name template -> module name template (None: dropped on purpose), read both ways; see rerankd.weights.
# jinaai/jina-reranker-m0 itself holds the module's names; backward gives the newer format.
WEIGHT_RENAMES: Renames = [
    ("model.language_model.", "model."),  # transformers >= 4.52 save format
    ("model.visual.", "visual."),  # idem
    ("lm_head.", None),  # the reranker never produces token logits
    ("score.0.", "score.0."),  # the published head names (before the ports' below, so that backward writes them)
    ("score.2.", "score.2."),
    ("score.dense.", "score.0."),  # the head as some ports name it
    ("score.out_proj.", "score.2."),
]


class JinaM0(nn.Module):
    """Vision tower + decoder + score head. Attribute names match the checkpoint."""

    def __init__(self, text: TextConfig, vision: VisionConfig):
        super().__init__()
        self.model = TextModel(text)
        self.visual = VisionTransformer(vision)
        h = text.hidden_size
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))

    def forward(
        self,
        input_ids: torch.Tensor,  # [tokens] packed
        positions: torch.Tensor,  # [3, tokens]
        pack: Packing,
        patches: torch.Tensor | None,  # [patches of all images, 1176]
        grids: list[tuple[int, int, int]],
        image_rows: torch.Tensor | None,  # [image tokens]: where in the packed tokens the image embeddings go
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # [tokens, hidden]
        if grids:
            image_embeds = self.visual(patches, grids, pack.kernel)  # [image tokens, hidden]
            x = x.index_copy(0, image_rows, image_embeds.to(x.dtype))
        h = self.model.hidden_at(x, positions, pack)  # [sequences, hidden]
        return self.score(h).squeeze(-1)  # [sequences]


@dataclass(frozen=True)
class SpecialTokens:
    """The vision tokens of a Qwen2-VL vocabulary that m0's prompts use."""

    image_pad: int
    vision_start: int
    vision_end: int


class M0Prompts(Pointwise):
    """m0's prompts: pairs -> token ids and M-RoPE positions, with the cuts and document windows of LengthOptions.

    Thread-safe and free of model compute. Shared by the torch backend and the GGUF one (rerankd.models.gguf),
    which differ in the tokenizer object (anything with tokenizers.Tokenizer's `encode` and `decode`), in the
    score token appended to every prompt, and in whether images can be prepared (`prepare_image`).
    """

    def __init__(self, tokenizer: Tokenizer, score_token_id: int, image_pad: int | None, merge_size: int | None):
        self.tokenizer = tokenizer
        self.score_token_id = score_token_id
        self.image_pad = image_pad  # <|image_pad|>'s id (None: the vocabulary has none), expanded per image
        self.merge_size = merge_size  # the vision tower's spatial merge (None: no vision tower)

    def prepare_image(self, source: object, param: str, images: ImagePolicy | None = None) -> PreparedImage:
        raise NotImplementedError

    def prepare_query(self, query: Item, param: str, images: ImagePolicy | None = None) -> Item:
        """An image query shared by many pairs is decoded once: returns the item with its image prepared."""
        if isinstance(query, ImageItem):
            return ImageItem(self.prepare_image(query.source, f"{param}.image", images))
        return query

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def _cut(self, text: str, max_tokens: int) -> tuple[str, int]:
        return cut_text(self.tokenizer, text, max_tokens)

    def prepare(
        self, query: Item, doc: Item, lengths: LengthOptions, where: Where, images: ImagePolicy | None = None
    ) -> list[PreparedSequence]:
        qparam, dparam, param = where.query, where.document, where.pair
        for item, name in ((query, qparam), (doc, dparam)):  # blamed on the part that holds it
            if isinstance(item, TextItem) and IMAGE_PAD in item.text:
                raise InputError(f"the text contains the reserved token {IMAGE_PAD}; remove it", name)
        prepared: list[PreparedImage] = []
        if isinstance(doc, ImageItem):
            prepared.append(self.prepare_image(doc.source, f"{dparam}.image", images))
        if isinstance(query, ImageItem):
            prepared.append(self.prepare_image(query.source, f"{qparam}.image", images))
        image_tokens = sum(im.merged_tokens(self.merge_size) for im in prepared)  # type: ignore[arg-type]

        query_text = IMAGE_PLACEHOLDER
        if isinstance(query, TextItem) and lengths.max_query_length is not None:
            query_text, _ = self._cut(query.text, lengths.max_query_length)
        elif isinstance(query, TextItem):
            query_text = query.text
        if not isinstance(doc, TextItem):
            return [self._fit(query_text, None, IMAGE_PLACEHOLDER, 0, prepared, image_tokens, lengths, param)]
        max_doc = lengths.max_doc_length
        if max_doc is None:  # the reference's rule
            max_doc = max(lengths.max_length - (lengths.max_query_length or 0), lengths.max_query_length or 0)
        if lengths.long_documents == "truncate":
            doc_text, doc_tokens = self._cut(doc.text, max_doc)
            return [self._fit(query_text, doc.text, doc_text, doc_tokens, prepared, image_tokens, lengths, param)]

        # chunk: windows of what fits beside the query and template (2 tokens spare for merges at the seams)
        overhead = len(self._encode(DOC_PREFIX + QUERY_PREFIX + query_text)) - len(prepared) + image_tokens + 1
        room = min(max_doc, lengths.max_length - overhead - 2)
        check_document_size(self.tokenizer, doc.text, room, lengths, param)
        enc = self.tokenizer.encode(doc.text, add_special_tokens=True)
        ids = enc.ids  # read once: a tokenizers Encoding builds a new list on every read
        spans = document_spans(
            len(ids), room, lengths, lambda: enc.offsets, param,
            taken=f"the prompt around the document takes {overhead + 2} tokens",
            room_is="what max_length leaves beside the query and prompt",
        )  # fmt: skip
        if spans[0].window is None:
            return [self._fit(query_text, doc.text, doc.text, len(ids), prepared, image_tokens, lengths, param)]
        out = []
        for span in spans:
            text = self.tokenizer.decode(ids[span.start : span.end], skip_special_tokens=False)
            seq = self._fit(query_text, text, text, span.end - span.start, prepared, image_tokens, lengths, param)
            seq.window = span.window
            out.append(seq)
        return out

    def _fit(
        self,
        query_text: str,
        source: str | None,
        doc_text: str,
        doc_tokens: int,
        images: list[PreparedImage],
        image_tokens: int,
        lengths: LengthOptions,
        param: str,
    ) -> PreparedSequence:
        """Build the prompt; while it is longer than max_length, cut the document text `source` further."""
        for _ in range(4):  # a cut doc may re-tokenize a little differently at the seam: converge in a few steps
            ids = self._encode(DOC_PREFIX + doc_text + QUERY_PREFIX + query_text)
            total = len(ids) - len(images) + image_tokens + 1  # image pads expanded, score token appended
            overflow = total - lengths.max_length
            if overflow <= 0:
                break
            if source is None or doc_tokens - overflow < 1:
                what = "the images need" if images else "the query and prompt template need"
                raise InputError(
                    f"the prompt needs {total} tokens ({image_tokens} of them image tokens), more than "
                    f"max_length={lengths.max_length}; {what} too much room. Raise max_length"
                    + (", or lower max_pixels to shrink images" if images else ", or lower max_query_length"),
                    param,
                )
            doc_text, doc_tokens = self._cut(source, doc_tokens - overflow)
        else:  # pragma: no cover - the loop always converges in practice
            raise InputError(f"could not fit the prompt into max_length={lengths.max_length}", param)

        ids.append(self.score_token_id)
        input_ids, positions = self._expand_images(ids, images, param)
        return PreparedSequence(input_ids=input_ids, positions=positions, images=images)

    def _expand_images(
        self, ids: list[int], images: list[PreparedImage], param: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expand each <|image_pad|> to its merged-token count and compute M-RoPE positions [3, tokens].

        Text tokens: the same position on all three axes, counting on. An image: (t, row, col) of its merged grid,
        offset by the position where it starts; the text after it continues from the image's max position + 1.
        """
        merge = self.merge_size
        pad = self.image_pad
        out_ids: list[torch.Tensor] = []
        out_pos: list[torch.Tensor] = []
        next_pos, start, img_i = 0, 0, 0
        for i, tok in enumerate(ids + [None]):
            if tok is not None and tok != pad:
                continue
            n_text = i - start
            if n_text:
                out_ids.append(torch.tensor(ids[start:i], dtype=torch.long))
                out_pos.append(torch.arange(next_pos, next_pos + n_text).expand(3, -1))
                next_pos += n_text
            if tok is None:
                break
            if img_i >= len(images):
                raise InputError("the text contains the reserved token <|image_pad|>; remove it", param)
            t, h, w = images[img_i].grid
            gh, gw = h // merge, w // merge  # type: ignore[operator]
            tt = torch.arange(t).view(-1, 1, 1).expand(t, gh, gw).flatten()
            hh = torch.arange(gh).view(1, -1, 1).expand(t, gh, gw).flatten()
            ww = torch.arange(gw).view(1, 1, -1).expand(t, gh, gw).flatten()
            pos = torch.stack([tt, hh, ww]) + next_pos  # [3, image tokens]
            out_ids.append(torch.full((t * gh * gw,), pad, dtype=torch.long))
            out_pos.append(pos)
            next_pos = int(pos.max()) + 1
            start, img_i = i + 1, img_i + 1
        if img_i != len(images):
            raise InputError("the text contains the reserved token <|image_pad|>; remove it", param)
        return torch.cat(out_ids), torch.cat(out_pos, dim=1)


class JinaM0Backend(M0Prompts):
    architecture: ClassVar[str] = "JinaVLForRanking"
    supports_images: ClassVar[bool] = True
    text_only_reason: ClassVar[str] = ""
    default_max_length: ClassVar[int] = DEFAULT_MAX_LENGTH
    compute_score_max_query_length: ClassVar[int | None] = REFERENCE_MAX_QUERY_LENGTH

    def __init__(
        self,
        model: JinaM0,
        tokenizer: Tokenizer,
        special: SpecialTokens,
        vision: VisionConfig,
        device: torch.device,
        dtype: torch.dtype,
        image_limits: ImageLimits,
        min_pixels: int,
        max_pixels: int,
        cpu_gemm: str,
        attention: str = "auto",
    ):
        super().__init__(tokenizer, SCORE_TOKEN_ID, special.image_pad, vision.spatial_merge_size)
        self.special = special
        self.model = model
        self.vision = vision
        self.device = device
        self.dtype = dtype
        self.image_limits = image_limits  # the load-time limits; each call brings its source policy
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        # what one image may put through the model at most (the scheduler's admission bound): merged patches of the
        # largest resized image, and its two markers
        factor = vision.patch_size * vision.spatial_merge_size
        self.max_image_tokens = resized_pixels_bound(factor, min_pixels, max_pixels) // factor**2 + 2
        self.cpu_gemm = cpu_gemm
        self.attn_backend = attention_backend(device, dtype, attention)

    def check(self, lengths: LengthOptions) -> None:
        check_positions(lengths, self.model.model.cfg.max_position_embeddings)

    # ------------------------------------------------------------------ preparation (thread-safe, no model compute)

    def prepare_image(self, source: object, param: str, images: ImagePolicy | None = None) -> PreparedImage:
        if isinstance(source, PreparedImage):
            return source
        v = self.vision
        return load_image(source, self.image_limits.under(images), param, then=lambda img: qwen2_vl_patches(
            img,
            patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            merge_size=v.spatial_merge_size,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            param=param,
        ))  # fmt: skip

    @classmethod
    def load(
        cls, directory: Path, config: dict, device: torch.device, dtype: torch.dtype, opts: LoadOptions
    ) -> "JinaM0Backend":
        if opts.quantize is not None:
            raise ModelLoadError(f"quantize={opts.quantize!r} is offered for text cross-encoders only, not for {cls.architecture}")
        try:
            text = TextConfig.from_dict(config)
            vision = VisionConfig.from_dict(config["vision_config"])
        except (KeyError, ValueError) as e:
            raise ModelLoadError(f"{directory}/config.json: not a usable Qwen2-VL config ({e!r})") from None
        tokenizer = load_tokenizer(directory)
        special = SpecialTokens(
            image_pad=token_id(tokenizer, directory, "<|image_pad|>", config, "image_token_id"),
            vision_start=token_id(tokenizer, directory, "<|vision_start|>", config, "vision_start_token_id"),
            vision_end=token_id(tokenizer, directory, "<|vision_end|>", config, "vision_end_token_id"),
        )
        model = build_module(lambda: JinaM0(text, vision), directory, WEIGHT_RENAMES, device, dtype, opts)
        model.model.inv_freq = model.model.rope_inv_freq().to(device)
        model.visual.inv_freq = model.visual.rope_inv_freq().to(device)
        gemm = use_cpu_gemm(model, opts.cpu_gemm, device, dtype)
        return cls(model, tokenizer, special, vision, device, dtype, ImageLimits.from_options(opts),
                   opts.min_pixels or DEFAULT_MIN_PIXELS, opts.max_pixels or DEFAULT_MAX_PIXELS, gemm,
                   opts.attention)  # fmt: skip

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ compute

    @torch.inference_mode()
    def forward(self, batch: list[PreparedSequence]) -> torch.Tensor:
        images = [im for s in batch for im in s.images]
        image_rows = None
        if images:  # found on the host: no GPU sync, no [tokens, hidden] mask
            rows = (torch.cat([s.input_ids for s in batch]) == self.image_pad).nonzero().view(-1)
            merged = sum(im.grid[0] * im.grid[1] * im.grid[2] for im in images) // self.vision.spatial_merge_size**2
            if len(rows) != merged:
                raise RuntimeError(f"internal: {len(rows)} image tokens in the batch but {merged} image embeddings")
            image_rows = to_device(rows, self.device)
        input_ids, pack = packed(batch, self.device, self.attn_backend)
        positions = to_device(torch.cat([s.positions for s in batch], dim=1), self.device)
        patches = to_device(torch.cat([im.patches for im in images]), self.device, self.dtype) if images else None
        logits = self.model(input_ids, positions, pack, patches, [im.grid for im in images], image_rows)
        return logits.float() - LOGIT_BIAS  # relevance = sigmoid(head logit - LOGIT_BIAS); on the device
