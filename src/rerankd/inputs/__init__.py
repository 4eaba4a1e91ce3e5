"""Turning user inputs (text, images in any of their accepted forms) into model-ready pieces."""

from .items import ImageItem, Item, TextItem, parse_item

__all__ = ["ImageItem", "Item", "TextItem", "parse_item"]
