"""Incremental images: an image that leaves pages to its parent, and so on up to a full one.

image.json of an incremental image names its parent, a sibling directory, and the SHA-256 of
that image's ``checksums`` (which covers every file of it): a parent removed, replaced or
changed is a broken chain (ImageCorrupt, 13), never a restore of other pages. Each process's
``inherited-<pid>.bin`` lists the pages it had that the parent holds (image/pages.py).
"""

from __future__ import annotations

from hpccr.config import MAX_FULL_EVERY
from hpccr.errors import HpccrError, ImageCorrupt, ImageNotFound
from hpccr.image.pages import PageReader, inherited_name, pagemap_name, parse_runs, spans_of
from hpccr.image.store import ImageReader, valid_name
from hpccr.spans import intersect, subtract

MAX_LENGTH = MAX_FULL_EVERY  # images in one chain


def parent_record(parent: ImageReader) -> dict:
    """What image.json of a child of `parent` says of it."""
    return {"image": parent.path.name, "checksums": parent.digest}


def open_parents(reader: ImageReader) -> list[ImageReader]:
    """The images `reader` leaves pages to, nearest first, each verified; ImageCorrupt when
    the chain is broken."""
    parents: list[ImageReader] = []
    child = reader
    try:
        while (parent := _parent(child, reader, len(parents))) is not None:
            parents.append(parent)
            parent.verify()
            child = parent
    except BaseException:
        for parent in parents:
            parent.close()
        raise
    return parents


def _parent(child: ImageReader, image: ImageReader, depth: int = 0) -> ImageReader | None:
    """The parent image of `child` (a link of the chain of `image`), its digest checked but
    not its files; None for a full image."""
    record = child.meta().get("parent")
    if record is None:
        return None
    if depth >= MAX_LENGTH:
        raise ImageCorrupt(f"{image.path}: a chain of more than {MAX_LENGTH} incremental "
                           "images (image corrupted)")
    name = record["image"]
    if not valid_name(name) or name in (".", ".."):
        raise ImageCorrupt(f"{child.path}: invalid parent image name {name!r} "
                           "(image corrupted)")
    path = child.path.parent / name
    try:
        parent = ImageReader(path)
    except ImageNotFound:
        raise ImageCorrupt(f"{child.path} is incremental and its parent image {path} is "
                           "gone: the chain is broken") from None
    if parent.stat().st_uid != image.stat().st_uid:
        parent.close()
        raise ImageCorrupt(f"{path}, the parent image of {child.path}, belongs to "
                           f"uid {parent.stat().st_uid}, not to the image's owner: refused")
    if parent.digest != record["checksums"]:
        parent.close()
        raise ImageCorrupt(f"{path} is not the parent image {child.path} was taken after "
                           "(replaced or changed since): the chain is broken")
    return parent


def links(reader: ImageReader) -> list[dict]:
    """For hpccr show: the chain from `reader`'s image up to the full one, each image with its
    own pages and those it leaves to its parent; a broken link says why, and ends the list."""
    out = []
    child = reader
    while True:
        meta = child.meta()
        inherited = 0
        for proc in meta["processes"]:
            name = inherited_name(proc["pid"])
            if name in child.files:
                inherited += sum(nr for _, nr, _ in parse_runs(child.read_bytes(name), name))
        link = {"image": str(child.path), "own_pages": sum(p["nr_pages"]
                                                           for p in meta["processes"]),
                "inherited_pages": inherited, "problem": None}
        out.append(link)
        try:
            parent = _parent(child, reader, len(out) - 1)
        except HpccrError as exc:
            link["problem"] = str(exc)
            parent = None
        if child is not reader:
            child.close()
        if parent is None:
            return out
        child = parent


def page_sources(reader: ImageReader, parents: list[ImageReader],
                 pid: int) -> list[tuple[PageReader, list[tuple[int, int]] | None]]:
    """Where the pages of process `pid` come from: (its PageReader, the spans to take from it,
    None for all), the image's own pages first. ImageCorrupt if a page it inherits is in no
    parent, or the chain is broken."""
    sources = []
    try:
        own = PageReader(reader, pid)
        sources.append((own, None))
        wanted = own.inherited
        for parent in parents:
            if not wanted:
                break
            if pagemap_name(pid) not in parent.files:
                break
            pages = PageReader(parent, pid)
            held = spans_of(pages.runs)
            sources.append((pages, intersect(wanted, held)))
            wanted = subtract(wanted, held)
            if subtract(wanted, pages.inherited):
                break  # pages the parent did not have: reported below
        if wanted:
            raise ImageCorrupt(f"{reader.path}: process {pid} inherits pages at "
                               f"{wanted[0][0]:#x} that no parent image holds: the chain is "
                               "broken")
    except BaseException:
        for pages, _ in sources:
            pages.close()
        raise
    return sources


def inherits(reader: ImageReader, pid: int) -> bool:
    """Whether process `pid` leaves pages to the parent in the image of `reader`."""
    return inherited_name(pid) in reader.files
