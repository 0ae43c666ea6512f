"""Rows of a committed shard's arrays, read straight into a caller's buffers (the training reader's gather).

A training batch takes a few rows from each of several shards of a shuffle window. Reading whole shards and then
gathering rows copied every byte three times (the read, the chunks joined into one array, the rows taken into
the batch), and the reader delivered 0.2–0.4 of a raw read of the same bytes. Here each row goes once:

- ``LocalRows`` (a local file system): one ``os.preadv`` per run of consecutive rows, at their offset in their
  chunk file, into their place in the caller's buffer — the kernel's copy out of the page cache is the only one.
- ``FetchedRows`` (object stores, any other fsspec URL, or where ``preadv`` is missing): the shard's chunk files
  fetched whole and concurrently (one request per chunk file: the writer's ``chunk_bytes`` sets the request
  size), each row then copied from them into place. Arrays in a layout other than the one this store writes
  (raw bytes in row chunks: ``chunks.plain_layout``) are read through Zarr.

Either checks what it opens against the shard's Zarr metadata first — the arrays asked for exist and have one
length, every chunk file holds the bytes its array's chunk needs — so a truncated chunk is an error naming the
shard, the array and the chunk before any of its rows reaches a batch.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import zarr

from radio_dist.store.chunks import PlainLayout, array_names, chunk_keys, member, plain_layout
from radio_dist.store.errors import StoreError


@dataclass(frozen=True)
class ArrayRows:
    """One array of a shard: its shape and dtype, and (plain layout) where its rows lie."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    layout: PlainLayout | None
    paths: tuple[str, ...]  # chunk files in order (plain layout only)
    row_bytes: int = 0
    chunk_bytes: int = 0  # what each chunk file holds (plain layout only)

    @classmethod
    def make(
        cls, name: str, shape: tuple[int, ...], dtype: np.dtype, layout: PlainLayout | None, base: str
    ) -> ArrayRows:
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        if layout is None:
            return cls(name, shape, dtype, None, (), row_bytes)
        paths = tuple("/".join([base, name, *c]) for c in chunk_keys(shape, layout.rows))
        return cls(name, shape, dtype, layout, paths, row_bytes, layout.rows * row_bytes)


def runs(index: Sequence[int], rows_per_chunk: int) -> list[tuple[int, int, int]]:
    """``(k, n, row)`` runs of ``index``: ``index[k:k+n] == row, row+1, …`` all in one chunk (one read each).
    (A plain loop: a batch takes a few rows per shard, where numpy's per-call cost is the larger.)"""
    out: list[tuple[int, int, int]] = []
    k0 = prev = -2
    out_row = 0
    for k, r in enumerate(index):
        if r == prev + 1 and r % rows_per_chunk:
            prev = r
            continue
        if k0 >= 0:
            out.append((k0, k - k0, out_row))
        k0, prev, out_row = k, r, r
    if k0 >= 0:
        out.append((k0, len(index) - k0, out_row))
    return out


class ShardRowReader:
    """Rows of some arrays of one shard, read into the caller's buffers. Thread-safe; close when done."""

    def __init__(self, where: str, arrays: dict[str, ArrayRows], length: int) -> None:
        self.where, self.arrays, self.length = where, arrays, length  # where: "URL: shard S", for errors

    def read_into(self, name: str, index: Sequence[int] | np.ndarray, out: np.ndarray) -> None:
        """``out[k] = name[index[k]]`` (``out``: C-contiguous, the array's row shape and dtype)."""
        raise NotImplementedError

    def read(self, name: str) -> np.ndarray:
        """The whole array (a writable array of its own)."""
        a = self.arrays[name]
        out = np.empty(a.shape, a.dtype)
        self.read_into(name, np.arange(a.shape[0]), out)
        return out

    def close(self) -> None:
        pass

    def __enter__(self) -> ShardRowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _where(self, name: str) -> str:
        return f"{self.where}, array {name}"

    def _check_out(self, a: ArrayRows, index: Sequence[int] | np.ndarray, out: np.ndarray) -> list[int]:
        """The rows as ints, once ``out`` is checked: C-contiguous, ``[len(index), *row shape]`` of the array's
        dtype — or, for rows of one axis (encoded views), rows at least as wide (the rest is left as it is)."""
        idx = index.tolist() if isinstance(index, np.ndarray) else [int(i) for i in index]
        fits = out.shape == (len(idx), *a.shape[1:]) or (
            len(a.shape) == 2 and out.ndim == 2 and out.shape[0] == len(idx) and out.shape[1] >= a.shape[1]
        )
        if not fits or out.dtype != a.dtype or not out.flags.c_contiguous:
            raise ValueError(
                f"{a.name}: buffer {out.shape} {out.dtype} does not fit {len(idx)} rows of "
                f"{a.shape[1:]} {a.dtype}"
            )
        if idx and (min(idx) < 0 or max(idx) >= a.shape[0]):
            raise IndexError(f"{self._where(a.name)}: rows {min(idx)}..{max(idx)} of {a.shape[0]}")
        return idx


class LocalRows(ShardRowReader):
    """A local shard's plain arrays, read with ``os.preadv`` straight into place (chunk files opened once)."""

    def __init__(self, where: str, arrays: dict[str, ArrayRows], length: int) -> None:
        super().__init__(where, arrays, length)
        self._fds: dict[tuple[str, int], int | None] = {}
        self._lock = threading.Lock()
        for a in arrays.values():  # sizes first: a truncated chunk is named before any row is read
            for i in range(len(a.paths)):
                self._fd(a, i)

    def _fd(self, a: ArrayRows, chunk: int) -> int | None:
        key = (a.name, chunk)
        fd = self._fds.get(key, -1)
        if fd != -1:
            return fd
        with self._lock:
            if key in self._fds:
                return self._fds[key]
            path = a.paths[chunk]
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                fd = None  # Zarr does not write a chunk that is all fill value
            except PermissionError:
                raise  # the machine's problem, not the store's: told as such
            except OSError as e:
                raise StoreError(f"{self._where(a.name)}: reading {path} failed: {e!r}") from e
            if fd is not None:
                size = os.fstat(fd).st_size
                if size != a.chunk_bytes:
                    os.close(fd)
                    raise StoreError(
                        f"{self._where(a.name)}: chunk {chunk} holds {size} bytes, {a.chunk_bytes} expected; "
                        "run `radio-dist store verify`"
                    )
            self._fds[key] = fd
            return fd

    def read_into(self, name: str, index: Sequence[int] | np.ndarray, out: np.ndarray) -> None:
        a = self.arrays[name]
        idx = self._check_out(a, index, out)
        assert a.layout is not None
        per_chunk, row_bytes = a.layout.rows, a.row_bytes
        flat = out.reshape(len(idx), -1).view(np.uint8) if len(idx) else out
        if out.shape[1:] != a.shape[1:]:  # wider rows: each row into the start of its own
            flat = flat[:, :row_bytes]
            for k, row in enumerate(idx):
                chunk, first = divmod(row, a.layout.rows)
                fd = self._fd(a, chunk)
                if fd is None:
                    out[k, : a.shape[1]] = a.layout.fill
                elif os.preadv(fd, [memoryview(flat[k])], first * row_bytes) != row_bytes:
                    raise StoreError(f"{self._where(name)}: chunk {chunk} gave too few bytes at row {row}")
            return
        for k, n, row in runs(idx, per_chunk):
            chunk, first = divmod(row, per_chunk)
            fd = self._fd(a, chunk)
            if fd is None:
                out[k : k + n] = a.layout.fill
                continue
            view = memoryview(flat[k : k + n]).cast("B")
            got = os.preadv(fd, [view], first * row_bytes)
            if got != n * row_bytes:  # the file shrank after it was opened
                raise StoreError(
                    f"{self._where(name)}: chunk {chunk} gave {got} bytes at row {row}, {n * row_bytes} "
                    "expected; run `radio-dist store verify`"
                )

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                if fd is not None:
                    os.close(fd)
            self._fds.clear()


class FetchedRows(ShardRowReader):
    """A shard's arrays fetched whole (chunk files concurrently, or through Zarr), rows copied from them."""

    def __init__(
        self,
        where: str,
        arrays: dict[str, ArrayRows],
        length: int,
        fs: fsspec.AbstractFileSystem,
        group: zarr.Group,
        requests: int | None = None,
    ) -> None:
        super().__init__(where, arrays, length)
        self._chunks: dict[str, list[np.ndarray | None]] = {}
        self._whole: dict[str, np.ndarray] = {}
        plain = {k: a for k, a in arrays.items() if a.layout is not None}
        paths = [p for a in plain.values() for p in a.paths]
        # an async file system (s3fs) sends ``requests`` of them at once
        opts = {"batch_size": requests} if requests and getattr(fs, "async_impl", False) else {}
        blobs = fs.cat(paths, on_error="return", **opts) if paths else {}
        for k, a in plain.items():
            assert a.layout is not None
            chunks: list[np.ndarray | None] = []
            for i, p in enumerate(a.paths):
                blob = blobs.get(p, FileNotFoundError(p))
                if isinstance(blob, FileNotFoundError):
                    chunks.append(None)  # Zarr does not write a chunk that is all fill value
                elif isinstance(blob, PermissionError):
                    raise blob
                elif isinstance(blob, BaseException):
                    raise StoreError(f"{self._where(k)}: reading {p} failed: {blob!r}") from blob
                elif len(blob) != a.chunk_bytes:
                    raise StoreError(
                        f"{self._where(k)}: chunk {i} holds {len(blob)} bytes, {a.chunk_bytes} expected; "
                        "run `radio-dist store verify`"
                    )
                else:
                    chunks.append(np.frombuffer(blob, a.dtype).reshape(a.layout.rows, *a.shape[1:]))
            self._chunks[k] = chunks
        if len(plain) < len(arrays):
            for k in arrays.keys() - plain.keys():
                try:
                    self._whole[k] = np.asarray(member(group, k)[...])
                except Exception as e:  # a chunk Zarr cannot decode: name it
                    raise StoreError(f"{self._where(k)}: {e}; run `radio-dist store verify`") from e

    def read_into(self, name: str, index: Sequence[int] | np.ndarray, out: np.ndarray) -> None:
        a = self.arrays[name]
        idx = self._check_out(a, index, out)
        if name in self._whole:
            if out.shape[1:] == a.shape[1:]:
                np.take(self._whole[name], idx, axis=0, out=out)
            else:
                out[:, : a.shape[1]] = self._whole[name][idx]
            return
        assert a.layout is not None
        per_chunk = a.layout.rows
        chunks = self._chunks[name]
        for k, n, row in runs(idx, per_chunk):
            chunk, first = divmod(row, per_chunk)
            src = chunks[chunk]
            dst = out[k : k + n] if out.shape[1:] == a.shape[1:] else out[k : k + n, : a.shape[1]]
            if src is None:
                dst[...] = a.layout.fill
            else:
                dst[...] = src[first : first + n]

    def close(self) -> None:
        self._chunks.clear()
        self._whole.clear()


def open_rows(
    group: zarr.Group,
    where: str,
    base: str,
    fs: fsspec.AbstractFileSystem,
    local: bool,
    names: Sequence[str] | None = None,
    requests: int | None = None,
) -> ShardRowReader:
    """A row reader of ``names`` (default: every array) of the shard opened as ``group`` whose chunk files lie
    under ``base`` on ``fs``: direct reads where ``local``, the chunk files fetched whole elsewhere. Raises
    ``StoreError`` (``where``: "URL: shard S") when an array is missing, the arrays differ in length, or a chunk
    file is cut short. ``requests``: chunk requests in flight when fetching (default: fsspec's). (``FeatureStore.open_rows``
    fills these in.)"""
    have = set(array_names(group))
    keys = list(names) if names is not None else sorted(have)
    missing = [k for k in keys if k not in have]
    if missing:
        raise StoreError(f"{where} has no array {missing}; run `radio-dist store verify`")
    arrays: dict[str, ArrayRows] = {}
    for k in keys:
        za: Any = member(group, k)
        shape = tuple(int(s) for s in za.shape)
        arrays[k] = ArrayRows.make(k, shape, np.dtype(za.dtype), plain_layout(za), base)
    lengths = {k: a.shape[0] for k, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise StoreError(f"{where}: arrays of different lengths {lengths}; run `store verify`")
    length = next(iter(lengths.values()), 0)
    if local and hasattr(os, "preadv") and all(a.layout is not None for a in arrays.values()):
        return LocalRows(where, arrays, length)
    return FetchedRows(where, arrays, length, fs, group, requests)
