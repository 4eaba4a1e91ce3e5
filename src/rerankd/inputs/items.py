"""The two kinds of thing a query or a document can be, and how user values map onto them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from ..errors import InputError

ItemType = Literal["text", "image"]


@dataclass(frozen=True)
class TextItem:
    text: str


@dataclass(frozen=True)
class ImageItem:
    """An image by any accepted source: a PIL image, a local path, an http(s) URL, a data: URI, base64, or bytes."""

    source: object


Item = Union[TextItem, ImageItem]


def parse_item(value: object, default_type: ItemType, param: str) -> Item:
    """A string (read as `default_type`), {"text": str}, {"image": source}, a PIL image or bytes -> an Item."""
    if isinstance(value, (TextItem, ImageItem)):
        return value
    if isinstance(value, str):
        if default_type == "text":
            return TextItem(valid_text(value, param))
        if default_type == "image":
            return ImageItem(value)
        raise InputError(f"unknown type {default_type!r}; use 'text' or 'image'", param)
    if isinstance(value, dict):
        keys = set(value) - {"type"}
        if keys == {"text"}:
            if not isinstance(value["text"], str):
                raise InputError(f"'text' must be a string, got {type(value['text']).__name__}", param)
            return TextItem(valid_text(value["text"], f"{param}.text"))
        if keys == {"image"}:
            if not isinstance(value["image"], (str, bytes)) and not _is_pil(value["image"]):
                raise InputError(
                    f"'image' must be a URL, data URI, base64 string, path or PIL image, "
                    f"got {type(value['image']).__name__}",
                    param,
                )
            return ImageItem(value["image"])
        raise InputError(f"an object must have exactly one of the keys 'text' or 'image', got {sorted(value)}", param)
    if isinstance(value, (bytes, bytearray)) or _is_pil(value):
        return ImageItem(value)
    raise InputError(
        f"unsupported type {type(value).__name__}; pass a string, {{'text': ...}}, {{'image': ...}} or a PIL image",
        param,
    )


def valid_text(text: str, param: str) -> str:
    """The text, or InputError if it is not valid Unicode (a lone surrogate such as "\\ud800", which JSON allows)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"is not valid Unicode text ({e.reason} at character {e.start})", param) from None
    return text


def _is_pil(value: object) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)
