"""Arithmetic on address spans: sorted lists of disjoint (start, end) pairs, in C (hundreds of
thousands of them for a job that writes pages here and there)."""

from __future__ import annotations

import bisect

from hpccr import native

Spans = list[tuple[int, int]]


def union(a: Spans, b: Spans) -> Spans:
    """`a` and `b` (in any order) merged, touching spans joined."""
    out: Spans = []
    for start, end in sorted(a + b):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def intersect(a: Spans, b: Spans) -> Spans:
    """The parts of `a` inside `b` (spans of `a` that touch stay apart)."""
    return native.spans_op("intersect", a, b) if a and b else []


def subtract(a: Spans, b: Spans) -> Spans:
    """The parts of `a` outside `b` (spans of `a` that touch stay apart)."""
    return native.spans_op("subtract", a, b) if a and b else list(a)


def size(spans: Spans) -> int:
    return sum(end - start for start, end in spans)


def overlaps(spans: Spans, start: int, end: int) -> bool:
    """Whether [start, end) meets one of the sorted, disjoint `spans`."""
    if start >= end:
        return False
    i = bisect.bisect_right(spans, (start, float("inf"))) - 1
    if i >= 0 and spans[i][1] > start:
        return True
    return i + 1 < len(spans) and spans[i + 1][0] < end
