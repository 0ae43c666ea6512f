"""Rows of a committed shard's arrays, read straight into a caller's buffers (the training reader's gather).

A training batch takes a few rows from each of several shards of a shuffle window. Reading whole shards and then
gathering rows copied every byte three times (the read, the chunks joined into one array, the rows taken into
the batch), and the reader delivered 0.2–0.4 of a raw read of the same bytes. Here:

- ``LocalRows`` (a local file system): rows straight into their places in the caller's buffers with
  ``os.preadv`` — the kernel's copy out of the page cache is the only one, and no shard is held in memory.
  ``read_many`` takes several batches' rows of an array at once (the training reader gives it a shuffle
  window's batches): rows that lie next to each other in a chunk file are one call with a buffer per row, so a
  window read together is about one call per chunk file. One call per row was what bounded the reader at the
  demo's ~100 kB rows (the kernel's cost per call and Python's around it: replaying the merged calls alone ran
  at the speed of reading the files whole). Rows up to ``SMALL_ROW_BYTES`` (scales, summaries) whose chunk is
  mostly wanted are read a chunk at a time and gathered with one copy per batch. Tried and measured slower:
  each shard's arrays read whole then gathered (a second copy of every byte into fresh memory), and the chunk
  files mapped (``mmap``: populating the page tables ran at ~1 GB/s, once per epoch).
- ``FetchedRows`` (object stores, any other fsspec URL): the shard's chunk files fetched whole and concurrently
  (one request per chunk file: the writer's ``chunk_bytes`` sets the request size) into its arrays, rows then
  gathered from them as above. Arrays in a layout other than the one this store writes
  (raw bytes in row chunks: ``chunks.plain_layout``) are read through Zarr.

Each checks what it opens against the shard's Zarr metadata first — the arrays asked for exist and have one
length, every chunk file holds the bytes its array's chunk needs — so a truncated chunk is an error naming the
shard, the array and the chunk before any of its rows reaches a batch.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import zarr

from radio_dist.store.chunks import (
    PlainLayout,
    array_names,
    chunk_keys,
    consolidated_arrays,
    member,
    plain_layout,
)
from radio_dist.store.errors import StoreError

# rows at most this large are read a chunk at a time and then gathered, when most of the chunk is wanted
SMALL_ROW_BYTES = 16 << 10

try:  # buffers one readv-family call may take (Linux: 1024)
    IOV_MAX = max(1, min(1024, int(os.sysconf("SC_IOV_MAX"))))
except (AttributeError, ValueError, OSError):
    IOV_MAX = 16


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
        # math.prod: np.prod took 5 µs an array, for every array of every shard opened
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        if layout is None:
            return cls(name, shape, dtype, None, (), row_bytes)
        paths = tuple("/".join([base, name, *c]) for c in chunk_keys(shape, layout.rows))
        return cls(name, shape, dtype, layout, paths, row_bytes, layout.rows * row_bytes)


class ShardRowReader(ABC):
    """Rows of some arrays of one shard, read into the caller's buffers. Thread-safe; close when done."""

    def __init__(self, where: str, arrays: dict[str, ArrayRows], length: int) -> None:
        self.where, self.arrays, self.length = where, arrays, length  # where: "URL: shard S", for errors

    @abstractmethod
    def read_into(self, name: str, index: Sequence[int] | np.ndarray, out: np.ndarray) -> None:
        """``out[k] = name[index[k]]`` (``out``: C-contiguous, the array's row shape and dtype)."""

    def read_many(self, name: str, requests: Sequence[tuple[Sequence[int] | np.ndarray, np.ndarray]]) -> None:
        """``read_into`` for each ``(index, out)`` — several batches' rows of one array at once, so a reader
        that can merge reads of neighbouring rows (``LocalRows``) sees them all."""
        for index, out in requests:
            self.read_into(name, index, out)

    def read(self, name: str) -> np.ndarray:
        """The whole array (a writable array of its own)."""
        a = self.arrays[name]
        out = np.empty(a.shape, a.dtype)
        self.read_into(name, np.arange(a.shape[0]), out)
        return out

    @abstractmethod
    def close(self) -> None:
        """Let go of the shard's files or fetched arrays."""

    def __enter__(self) -> ShardRowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _where(self, name: str) -> str:
        return f"{self.where}, array {name}"

    def _check_out(self, a: ArrayRows, index: Sequence[int] | np.ndarray, out: np.ndarray) -> list[int]:
        """The rows as ints, once ``out`` is checked: C-contiguous, ``[len(index), *row shape]`` of the array's
        dtype — or, for rows of one axis (encoded views), rows at least as wide (the rest is left as it is)."""
        if isinstance(index, list):
            idx = index
        else:
            idx = index.tolist() if isinstance(index, np.ndarray) else [int(i) for i in index]
        shape = out.shape  # (checked for every request of every read: kept to a few comparisons)
        fits = shape[0] == len(idx) and (
            shape[1:] == a.shape[1:] or (len(a.shape) == 2 and len(shape) == 2 and shape[1] >= a.shape[1])
        )
        if not fits or out.dtype != a.dtype or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(
                f"{a.name}: buffer {out.shape} {out.dtype} does not fit {len(idx)} rows of "
                f"{a.shape[1:]} {a.dtype} (a C-contiguous, writable buffer of that shape and dtype is needed)"
            )
        if idx and (min(idx) < 0 or max(idx) >= a.shape[0]):
            raise IndexError(f"{self._where(a.name)}: rows {min(idx)}..{max(idx)} of {a.shape[0]}")
        return idx


class LocalRows(ShardRowReader):
    """A local shard's plain arrays, read with ``os.preadv`` straight into place (chunk files opened once)."""

    def __init__(self, where: str, arrays: dict[str, ArrayRows], length: int) -> None:
        super().__init__(where, arrays, length)
        self._by_array: dict[str, list[int | None]] = {}  # array -> its chunk files (None: not written)
        self._lock = threading.Lock()
        try:
            for a in arrays.values():  # sizes first: a truncated chunk is named before any row is read
                fds = self._by_array[a.name] = []
                for i, path in enumerate(a.paths):
                    fds.append(self._open(a, i, path))
        except BaseException:
            self.close()  # the files opened before the bad one
            raise

    def _open(self, a: ArrayRows, chunk: int, path: str) -> int | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None  # Zarr does not write a chunk that is all fill value
        except PermissionError:
            raise  # the machine's problem, not the store's: told as such
        except OSError as e:
            raise StoreError(f"{self._where(a.name)}: reading {path} failed: {e!r}") from e
        size = os.fstat(fd).st_size
        if size != a.chunk_bytes:
            os.close(fd)
            raise StoreError(
                f"{self._where(a.name)}: chunk {chunk} holds {size} bytes, {a.chunk_bytes} expected; "
                "run `radio-dist store verify`"
            )
        return fd

    def read_into(self, name: str, index: Sequence[int] | np.ndarray, out: np.ndarray) -> None:
        self.read_many(name, [(index, out)])

    def read_many(self, name: str, requests: Sequence[tuple[Sequence[int] | np.ndarray, np.ndarray]]) -> None:
        """Every requested row straight into its place, rows that lie next to each other in a chunk file in
        one ``os.preadv`` (one buffer per row, up to the system's limit of buffers per call): a batch read
        alone is mostly a read per row, a shuffle window's batches read together mostly a read per chunk file
        (measured: the kernel's cost per call, not the bytes, bounded the reader at the demo's ~100 kB rows)."""
        a = self.arrays[name]
        assert a.layout is not None
        per_chunk, row_bytes, fill = a.layout.rows, a.row_bytes, a.layout.fill
        fds = self._fds_of(a)
        asked = [(idx, out) for idx, out in ((self._check_out(a, i, o), o) for i, o in requests) if idx]
        if row_bytes <= SMALL_ROW_BYTES and all(out.shape[1:] == a.shape[1:] for _, out in asked):
            chunks = sorted({r // per_chunk for idx, _ in asked for r in idx})
            if 2 * row_bytes * sum(len(idx) for idx, _ in asked) >= len(chunks) * a.chunk_bytes:
                self._gather(a, fds, chunks, asked)
                return
        rows_of: list[int] = []
        slots: list[memoryview] = []
        for idx, out in asked:
            # each row's place as a slice of one flat view (wider rows, of encoded views: the start of its own)
            whole, width = out.reshape(-1).view(np.uint8).data, out.nbytes // len(idx)
            rows_of.extend(idx)
            slots.extend(whole[k : k + row_bytes] for k in range(0, len(idx) * width, width))
        n = len(rows_of)
        order = sorted(range(n), key=rows_of.__getitem__)  # stable: a row asked for twice keeps its order
        pread = os.preadv
        i = 0
        while i < n:  # the reader's hot path: a run of consecutive rows of one chunk file, then one read
            row = rows_of[order[i]]
            c, first = divmod(row, per_chunk)
            j, stop = i + 1, min(n, i + IOV_MAX, i + per_chunk - first)
            while j < stop and rows_of[order[j]] == row + j - i:
                j += 1
            fd = fds[c]
            if fd is None:  # a chunk Zarr did not write (all fill value)
                for k in order[i:j]:
                    np.frombuffer(slots[k], a.dtype)[...] = fill
            elif pread(fd, [slots[k] for k in order[i:j]], first * row_bytes) != (j - i) * row_bytes:
                raise StoreError(  # the file shrank since it was opened
                    f"{self._where(name)}: chunk {c} gave too few bytes at row {row}; run `radio-dist store verify`"
                )
            i = j

    def _gather(
        self,
        a: ArrayRows,
        fds: list[int | None],
        chunks: list[int],
        asked: list[tuple[list[int], np.ndarray]],
    ) -> None:
        """Small rows most of whose chunk is asked for: each chunk read whole (one buffer), then each request's
        rows gathered from it in one copy — a buffer per row cost more than copying its bytes twice."""
        whole, raw = LoadedRows._buffer(a)
        for c in chunks:
            part = raw[c * a.chunk_bytes : (c + 1) * a.chunk_bytes]
            fd = fds[c]
            if fd is None:  # a chunk Zarr did not write (all fill value)
                part.view(a.dtype)[...] = a.layout.fill if a.layout is not None else 0
            elif os.preadv(fd, [part.data], 0) != a.chunk_bytes:
                raise StoreError(
                    f"{self._where(a.name)}: chunk {c} gave too few bytes; run `radio-dist store verify`"
                )
        for idx, out in asked:  # rows checked above; mode="raise" would copy each result through a buffer
            np.take(whole, idx, axis=0, out=out, mode="clip")

    def _fds_of(self, a: ArrayRows) -> list[int | None]:
        got = self._by_array.get(a.name)
        if got is None:
            raise StoreError(f"{self._where(a.name)}: read after the shard was closed")
        return got

    def close(self) -> None:
        with self._lock:
            for fds in self._by_array.values():
                for fd in fds:
                    if fd is not None:
                        os.close(fd)
            self._by_array.clear()


class LoadedRows(ShardRowReader):
    """A shard's arrays held whole (each chunk copied once into place), rows gathered from them with one
    vectorized copy per array and shard of a batch. Subclasses fill ``_whole``."""

    def __init__(self, where: str, arrays: dict[str, ArrayRows], length: int) -> None:
        super().__init__(where, arrays, length)
        self._whole: dict[str, np.ndarray] = {}

    @staticmethod
    def _buffer(a: ArrayRows) -> tuple[np.ndarray, np.ndarray]:
        """(the array's rows, the same memory as bytes in whole chunks: the last chunk is stored padded)."""
        assert a.layout is not None
        n_chunks = len(a.paths)
        whole = np.empty((n_chunks * a.layout.rows, *a.shape[1:]), a.dtype)
        return whole[: a.shape[0]], whole.reshape(-1).view(np.uint8)

    def _check_size(self, a: ArrayRows, chunk: int, size: int) -> None:
        if size != a.chunk_bytes:
            raise StoreError(
                f"{self._where(a.name)}: chunk {chunk} holds {size} bytes, {a.chunk_bytes} expected; "
                "run `radio-dist store verify`"
            )

    def read_into(self, name: str, index: Sequence[int] | np.ndarray, out: np.ndarray) -> None:
        a = self.arrays[name]
        idx = self._check_out(a, index, out)
        if out.shape[1:] == a.shape[1:]:
            np.take(self._whole[name], idx, axis=0, out=out)
        else:  # wider rows (encoded views): each row into the start of its own
            out[:, : a.shape[1]] = self._whole[name][idx]

    def close(self) -> None:
        self._whole.clear()


def _missing(e: OSError) -> bool:
    """Whether a ranged read failed because the object is not there (s3fs and local files say it differently)."""
    return isinstance(e, FileNotFoundError) or "NoSuchKey" in repr(e) or "Not Found" in repr(e)


class FetchedRows(LoadedRows):
    """A shard's arrays fetched whole (chunk files concurrently, or through Zarr), then held as arrays."""

    def __init__(
        self,
        where: str,
        arrays: dict[str, ArrayRows],
        length: int,
        fs: fsspec.AbstractFileSystem,
        group: zarr.Group | Callable[[], zarr.Group],
        requests: int | None = None,
    ) -> None:
        super().__init__(where, arrays, length)
        plain = {k: a for k, a in arrays.items() if a.layout is not None}
        paths = [p for a in plain.values() for p in a.paths]
        ends = [a.chunk_bytes for a in plain.values() for _ in a.paths]
        # ranged GETs of the sizes the metadata gives (fsspec's `cat` asked for each object's size first: half
        # the rate on the loopback S3 server); an async file system (s3fs) sends ``requests`` of them at once
        opts = {"batch_size": requests} if requests and getattr(fs, "async_impl", False) else {}
        got = fs.cat_ranges(paths, [0] * len(paths), ends, on_error="return", **opts) if paths else []
        blobs = dict(zip(paths, got, strict=True))
        for k, a in plain.items():
            assert a.layout is not None
            rows, raw = self._buffer(a)
            for i, p in enumerate(a.paths):
                blob = blobs.pop(p, FileNotFoundError(p))
                if isinstance(blob, OSError) and not isinstance(blob, PermissionError) and _missing(blob):
                    blob = FileNotFoundError(p)
                part = raw[i * a.chunk_bytes : (i + 1) * a.chunk_bytes]
                if isinstance(blob, FileNotFoundError):
                    part.view(a.dtype)[...] = a.layout.fill  # Zarr does not write a chunk that is all fill
                elif isinstance(blob, PermissionError):
                    raise blob
                elif isinstance(blob, BaseException):
                    raise StoreError(f"{self._where(k)}: reading {p} failed: {blob!r}") from blob
                else:
                    self._check_size(a, i, len(blob))
                    part[...] = np.frombuffer(blob, np.uint8)
            self._whole[k] = rows
        if len(plain) < len(arrays):
            group = group if isinstance(group, zarr.Group) else group()
            for k in arrays.keys() - plain.keys():
                try:
                    self._whole[k] = np.asarray(member(group, k)[...])
                except Exception as e:  # a chunk Zarr cannot decode: name it
                    raise StoreError(f"{self._where(k)}: {e}; run `radio-dist store verify`") from e


@functools.lru_cache(maxsize=16)
def _parsed(
    doc: bytes, names: frozenset[str] | None
) -> dict[str, tuple[tuple[int, ...], np.dtype, PlainLayout | None]] | None:
    """``consolidated_arrays``, remembered: a store's shards of one length hold the same ``zarr.json`` byte
    for byte, and parsing it was a fifth of opening a local shard. (Callers do not change what it returns.)"""
    return consolidated_arrays(doc, names)


def open_rows(
    open_group: Callable[[], zarr.Group],
    where: str,
    base: str,
    fs: fsspec.AbstractFileSystem,
    local: bool,
    names: Sequence[str] | None = None,
    requests: int | None = None,
    direct: bool | None = None,
) -> ShardRowReader:
    """A row reader of ``names`` (default: every array) of the shard whose ``zarr.json`` and chunk files lie
    under ``base`` on ``fs``: direct reads where ``local``, the chunk files fetched whole elsewhere. The arrays
    come from the shard's consolidated metadata; Zarr (``open_group``) is asked only for a shard without it or
    an array in another layout. Raises ``StoreError`` (``where``: "URL: shard S") when an array is missing, the
    arrays differ in length, or a chunk file is cut short. ``requests``: chunk requests in flight when fetching
    (default: fsspec's). ``direct=False``: load a local shard's arrays whole as on an object store (what the
    row-by-row reads are measured against). (``FeatureStore.open_rows`` fills these in.)"""
    try:
        found = _parsed(fs.cat_file(f"{base}/zarr.json"), None if names is None else frozenset(names))
    except FileNotFoundError as e:
        raise StoreError(f"{where} cannot be opened ({e}); run `radio-dist store verify`") from e
    group: zarr.Group | None = None
    if found is None:
        group = open_group()
        found = {}
        for k in array_names(group):
            za: Any = member(group, k)
            found[k] = (tuple(int(x) for x in za.shape), np.dtype(za.dtype), plain_layout(za))
    keys = list(names) if names is not None else sorted(found)
    missing = [k for k in keys if k not in found]
    if missing:
        raise StoreError(f"{where} has no array {missing}; run `radio-dist store verify`")
    arrays = {k: ArrayRows.make(k, *found[k], base) for k in keys}
    lengths = {k: a.shape[0] for k, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise StoreError(f"{where}: arrays of different lengths {lengths}; run `store verify`")
    length = next(iter(lengths.values()), 0)
    if (
        local
        and all(a.layout is not None for a in arrays.values())
        and hasattr(os, "preadv")
        and direct is not False
    ):
        return LocalRows(where, arrays, length)
    return FetchedRows(where, arrays, length, fs, group or open_group, requests)
