"""The Zarr side of a shard: how its arrays are written, listed, and read straight from their chunk files.

A shard is one Zarr v3 group of uncompressed arrays chunked along rows (``fill_group``), with consolidated
metadata (``consolidate``: one GET opens it on an object store). Arrays in that layout are read as their
chunk files directly (``plain_layout`` + ``chunk_keys``): Zarr's own read path copied and re-assembled them
at ~1/4 of the bytes' read rate.
"""

from __future__ import annotations

import json
import sys
import threading
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr


@dataclass(frozen=True)
class PlainLayout:
    """An array stored as raw bytes in row chunks: ``rows`` rows per chunk file, ``dtype``, ``fill`` value."""

    rows: int
    dtype: np.dtype
    fill: Any

    def assemble(self, shape: tuple[int, ...], blobs: list[bytes | None]) -> np.ndarray:
        """The array from its chunk files in order (None: a chunk Zarr never wrote, all ``fill``)."""
        row_shape = tuple(shape[1:])
        size = self.rows * int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        parts = []
        for i, b in enumerate(blobs):
            if b is None:
                parts.append(np.full((self.rows, *row_shape), self.fill, self.dtype))
            elif len(b) != size:
                raise ValueError(f"chunk {i} holds {len(b)} bytes, {size} expected")
            else:
                parts.append(np.frombuffer(b, self.dtype).reshape(self.rows, *row_shape))
        if not parts:
            return np.empty(shape, self.dtype)
        # one copy either way: a writable array that owns its memory (the chunk bytes are read-only)
        whole = parts[0].copy() if len(parts) == 1 else np.concatenate(parts)
        return whole[: shape[0]]


def plain_layout(array: Any) -> PlainLayout | None:
    """How to read a Zarr v3 array's chunk files directly, when they hold its raw bytes in native byte order
    and are cut along rows only (what ``fill_group`` writes); None for any other layout."""
    meta = array.metadata
    if getattr(meta, "zarr_format", None) != 3 or len(array.shape) == 0:
        return None
    return layout_of(meta.to_dict(), tuple(array.shape), np.dtype(array.dtype))


def layout_of(d: dict[str, Any], shape: tuple[int, ...], dtype: np.dtype) -> PlainLayout | None:
    """``plain_layout`` from an array's Zarr v3 metadata document (as ``zarr.json`` holds it)."""
    codecs = d.get("codecs") or []
    if len(codecs) != 1 or codecs[0].get("name") != "bytes" or d.get("storage_transformers"):
        return None
    endian = (codecs[0].get("configuration") or {}).get("endian")
    if dtype.itemsize > 1 and endian != sys.byteorder:
        return None
    grid, keys = d.get("chunk_grid") or {}, d.get("chunk_key_encoding") or {}
    chunk_shape = list((grid.get("configuration") or {}).get("chunk_shape") or [])
    if grid.get("name") != "regular" or chunk_shape[1:] != list(shape[1:]) or not chunk_shape:
        return None
    if keys.get("name") != "default" or (keys.get("configuration") or {}).get("separator", "/") != "/":
        return None
    return PlainLayout(int(chunk_shape[0]), dtype, d.get("fill_value", 0))


def consolidated_arrays(
    doc: bytes, names: Collection[str] | None = None
) -> dict[str, tuple[tuple[int, ...], np.dtype, PlainLayout | None]] | None:
    """The arrays of a shard from its root ``zarr.json`` with consolidated metadata (one small read, parsed
    here: opening the group through Zarr took 5-10 ms a shard): name -> (shape, dtype, plain layout or None),
    for every array or those of ``names`` found (a reader of one partition skips the others' layouts). None
    when the document has no consolidated metadata or an array's data type is not a plain numpy one."""
    try:
        meta = json.loads(doc)
    except ValueError:
        return None
    nodes = (meta.get("consolidated_metadata") or {}).get("metadata")
    if meta.get("zarr_format") != 3 or not isinstance(nodes, dict):
        return None
    out: dict[str, tuple[tuple[int, ...], np.dtype, PlainLayout | None]] = {}
    for name, node in nodes.items():
        if node.get("node_type") != "array" or (names is not None and name not in names):
            continue
        try:
            dtype = np.dtype(node["data_type"])
            shape = tuple(int(x) for x in node["shape"])
        except (KeyError, TypeError, ValueError):
            return None
        out[name] = (shape, dtype, layout_of(node, shape, dtype) if shape else None)
    return out


def chunk_keys(shape: tuple[int, ...], rows: int) -> list[tuple[str, ...]]:
    """Zarr v3 default chunk keys (``c/i/0/...``) of an array cut into ``rows``-row chunks, in order."""
    n = -(-shape[0] // rows) if rows > 0 else 0
    return [("c", str(i), *(["0"] * (len(shape) - 1))) for i in range(n)]


def member(group: zarr.Group, name: str) -> Any:
    """A member array of a group (typed loosely: zarr's stubs do not narrow Array | Group)."""
    return group[name]


def fill_group(
    group: zarr.Group,
    arrays: dict[str, np.ndarray],
    chunk_bytes: int,
    after_array: Callable[[str], None] | None,
) -> None:
    """Create and fill one uncompressed array per entry, chunked along rows to ~``chunk_bytes``.

    ``after_array(name)``, if given, is called once each array is written.
    """
    for name, arr in arrays.items():
        per_row = max(1, arr[0].nbytes)
        k = int(min(len(arr), max(1, -(-chunk_bytes // per_row))))
        za = group.create_array(
            name, shape=arr.shape, dtype=arr.dtype, chunks=(k, *arr.shape[1:]), compressors=None
        )
        za[...] = arr
        if after_array is not None:
            after_array(name)


_WARNINGS_LOCK = threading.Lock()  # catch_warnings() swaps process-wide state: one thread at a time


def consolidate(store: Any) -> None:
    # Zarr warns that consolidated metadata is not (yet) in the v3 spec; zarr-python reads it, and opening
    # a shard with it costs one request instead of one per node, which matters on object stores.
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Consolidated metadata is currently not part", UserWarning)
        zarr.consolidate_metadata(store, zarr_format=3)


def array_names(group: zarr.Group, prefix: str = "") -> Iterator[str]:
    for name, member in group.members():
        full = f"{prefix}{name}"
        if isinstance(member, zarr.Group):
            yield from array_names(member, full + "/")
        else:
            yield full
