"""Incremental images: an image that leaves pages to its parent, and so on up to a full one.

image.json of an incremental image names its parent, a sibling directory, and the SHA-256 of
that image's ``checksums`` (which covers every file of it): a parent removed, replaced or
changed is a broken chain (ImageCorrupt, 13), never a restore of other pages. Each process's
``inherited-<pid>.bin`` lists the pages it had that the parent holds (image/pages.py).

Where each page of a process comes from is resolved here too for the pages it shares with its
parent process since fork (``forked-<pid>.bin``): from wherever its parent's come from.
"""

from __future__ import annotations

from hpccr.config import MAX_FULL_EVERY
from hpccr.errors import HpccrError, ImageCorrupt, ImageNotFound
from hpccr.image.pages import (
    PageReader,
    forked_name,
    inherited_name,
    pagemap_name,
    parse_runs,
    spans_of,
)
from hpccr.image.store import PAGE_SIZE, ImageReader, valid_name
from hpccr.spans import intersect, subtract, union

MAX_LENGTH = MAX_FULL_EVERY  # images in one chain


def parent_record(parent: ImageReader) -> dict:
    """What image.json of a child of `parent` says of it."""
    return {"image": parent.path.name, "checksums": parent.digest}


def open_parents(reader: ImageReader, deferred=None) -> list[ImageReader]:
    """The images `reader` leaves pages to, nearest first, each verified (`deferred`: as
    ImageReader.verify()); ImageCorrupt when the chain is broken."""
    parents: list[ImageReader] = []
    child = reader
    try:
        while (parent := _parent(child, reader, len(parents))) is not None:
            parents.append(parent)
            parent.verify(deferred)
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


def page_sources(reader: ImageReader, parents: list[ImageReader], pid: int,
                 parent_of: dict[int, int], in_place: list[tuple[int, int]] = (),
                 depth: int = 0) -> list[tuple[PageReader, list[tuple[int, int]] | None]]:
    """Where the pages of process `pid` come from: (a PageReader, the spans to take from it,
    None for all), the image's own pages first, then those it inherits from the parent images,
    then those it shares with its parent process since fork (`parent_of`: pid -> its parent's
    pid in the image), wherever that process's come from, but those `in_place` (a process
    forked from its restored parent has them already, engine/forked.py). ImageCorrupt if a
    page it inherits is in no parent image, or one it shares is not one of its parent
    process's, or the chain is broken."""
    sources = _own_sources(reader, parents, pid)
    try:
        name = forked_name(pid)
        if name in reader.files:
            forked = subtract(forked_spans(reader, pid), list(in_place))
            if pid not in parent_of or depth > len(parent_of):  # (the latter: a cycle)
                raise ImageCorrupt(f"{name}: process {pid} shares pages with a parent process "
                                   "that the image does not hold (image corrupted)")
            covered = []
            for pages, spans in page_sources(reader, parents, parent_of[pid], parent_of,
                                             depth=depth + 1):
                part = intersect(spans if spans is not None else spans_of(pages.runs), forked)
                if part:
                    sources.append((pages, part))
                    covered = union(covered, part)
                else:
                    pages.close()
            missing = subtract(forked, covered)
            if missing:
                raise ImageCorrupt(f"{name}: process {pid} shares pages at "
                                   f"{missing[0][0]:#x} with its parent "
                                   f"process {parent_of[pid]}, whose pages do not hold them "
                                   "(image corrupted)")
    except BaseException:
        for pages, _ in sources:
            pages.close()
        raise
    return sources


def _own_sources(reader: ImageReader, parents: list[ImageReader],
                 pid: int) -> list[tuple[PageReader, list[tuple[int, int]] | None]]:
    """The pages of process `pid` that its images hold: its own, then those it inherits."""
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


def forked_spans(reader: ImageReader, pid: int) -> list[tuple[int, int]]:
    """The (start, end) spans process `pid` of the image shares with its parent process since
    fork."""
    name = forked_name(pid)
    if name not in reader.files:
        return []
    return spans_of(parse_runs(reader.read_bytes(name), name))


def forked_pages(reader: ImageReader, pid: int) -> int:
    """How many pages process `pid` of the image shares with its parent process since fork."""
    return sum(end - start for start, end in forked_spans(reader, pid)) // PAGE_SIZE


def has_pages(reader: ImageReader, proc: dict) -> bool:
    """Whether process `proc` of the image of `reader` has pages to restore: its own, ones it
    leaves to the parent image, or ones it shares with its parent process."""
    return bool(proc["nr_pages"]) or any(name(proc["pid"]) in reader.files
                                         for name in (inherited_name, forked_name))
