"""List the external-data file locations an ONNX graph refers to, without importing `onnx`.

The runtime must refuse a graph whose weights live outside the bundle (`../../home/x`, an absolute
path) before onnxruntime opens them. `onnx` is an export-time dependency, so this walks the protobuf
wire format itself: only the few messages that can hold a TensorProto are entered, every other field
is skipped by its length, so a file with gigabytes of inline weights costs one mmap and no copies.

Field numbers are those of onnx.proto (ModelProto.graph = 7, GraphProto.initializer = 5, ...).
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Iterator

from ..errors import BundleError

# message -> {field number: message kind} for the fields we descend into (everything else is skipped)
_SCHEMA: dict[str, dict[int, str]] = {
    "model": {7: "graph", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_TENSOR_EXTERNAL_DATA = 13  # TensorProto.external_data: repeated StringStringEntryProto {key = 1, value = 2}
_MAX_DEPTH = 64  # nested subgraphs (If/Loop bodies); deeper means a hostile or broken file


class _Malformed(Exception):
    pass


def _varint(buf: bytes | mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes | mmap.mmap, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field number, wire type, start, stop) of each field in buf[pos:end]."""
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
            yield field, wire, pos, pos
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Malformed
            yield field, wire, pos, pos + n
            pos += n
        else:  # groups (3/4) are not used by onnx.proto
            raise _Malformed
    if pos != end:
        raise _Malformed


def _entry(buf: bytes | mmap.mmap, start: int, stop: int) -> tuple[bytes, bytes]:
    key = value = b""
    for f, w, s, e in _fields(buf, start, stop):
        if w == 2 and f == 1:
            key = bytes(buf[s:e])
        elif w == 2 and f == 2:
            value = bytes(buf[s:e])
    return key, value


def _walk(buf: bytes | mmap.mmap, kind: str, start: int, stop: int, depth: int, out: list[str]) -> None:
    if depth > _MAX_DEPTH:
        raise _Malformed
    if kind == "tensor":
        for f, w, s, e in _fields(buf, start, stop):
            if f == _TENSOR_EXTERNAL_DATA and w == 2:
                key, value = _entry(buf, s, e)
                if key == b"location":
                    out.append(value.decode("utf-8", "replace"))
        return
    children = _SCHEMA[kind]
    for f, w, s, e in _fields(buf, start, stop):
        if w == 2 and f in children:
            _walk(buf, children[f], s, e, depth + 1, out)


def external_locations(path: Path) -> list[str]:
    """Every `location` of every external-data tensor in the ONNX file at `path` (in file order)."""
    out: list[str] = []
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size == 0:
            raise BundleError(f"graph file {path} is empty; re-export the bundle")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:  # mmap indexing gives ints and slicing copies only the small slices we decode
                _walk(mm, "model", 0, size, 0, out)
            except _Malformed:
                raise BundleError(
                    f"graph file {path} is not a valid ONNX model (truncated or corrupt); "
                    f"run `skin-offline verify` or re-export the bundle"
                ) from None
    return out
