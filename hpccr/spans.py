"""Arithmetic on address spans: sorted lists of disjoint (start, end) pairs."""

from __future__ import annotations

Spans = list[tuple[int, int]]


def union(a: Spans, b: Spans) -> Spans:
    out: Spans = []
    for start, end in sorted(a + b):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def intersect(a: Spans, b: Spans) -> Spans:
    out: Spans = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Spans, b: Spans) -> Spans:
    out: Spans = []
    j = 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k = j
        while start < end:
            if k == len(b) or b[k][0] >= end:
                out.append((start, end))
                break
            if b[k][0] > start:
                out.append((start, b[k][0]))
            start = max(start, b[k][1])
            k += 1
    return out


def size(spans: Spans) -> int:
    return sum(end - start for start, end in spans)
