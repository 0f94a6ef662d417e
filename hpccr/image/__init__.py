"""Checkpoint images on disk (format: docs/image-format.md)."""

from hpccr.image.pages import PageReader, PageWriter, pagemap_name, pages_name
from hpccr.image.store import (
    FORMAT_VERSION,
    PAGE_SIZE,
    ImageFile,
    ImageReader,
    ImageWriter,
    StreamWriter,
)

__all__ = [
    "FORMAT_VERSION",
    "PAGE_SIZE",
    "ImageFile",
    "ImageReader",
    "ImageWriter",
    "PageReader",
    "PageWriter",
    "StreamWriter",
    "pagemap_name",
    "pages_name",
]
