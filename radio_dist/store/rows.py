"""Rows of a committed shard's arrays, read straight into a caller's buffers (the training reader's gather).

A training batch takes a few rows from each of several shards of a shuffle window. Reading whole shards and then
gathering rows copied every byte three times (the read, the chunks joined into one array, the rows taken into
the batch), and the reader delivered 0.2–0.4 of a raw read of the same bytes. Here:

- ``LocalRows`` (a local file system): rows straight into their places in the caller's buffers with
  ``preadv`` — the kernel's copy out of the page cache is the only one, and no shard is held in memory.
  ``read_batches`` takes several batches' rows of an array at once (the training reader gives it a shuffle
  window's batches, described by index arrays and a ``Dest``): rows that lie next to each other in a chunk file
  are one call with a buffer per row, so a window read together is about one call per chunk file. One call per
  row was what bounded the reader at the demo's ~100 kB rows (the kernel's cost per call and Python's around
  it: replaying the merged calls alone ran at the speed of reading the files whole). The buffers of a call are
  one array of iovecs built with numpy and given to the C library's ``preadv`` (ctypes), so no Python object
  is made per row; ``os.preadv`` with a slice per row where that is not available. Tried and measured slower:
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

import ctypes
import errno
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

try:  # buffers one readv-family call may take (Linux: 1024)
    IOV_MAX = max(1, min(1024, int(os.sysconf("SC_IOV_MAX"))))
except (AttributeError, ValueError, OSError):
    IOV_MAX = 16


def _libc_preadv() -> Any:
    """The C library's ``preadv`` through ctypes (which lets go of the GIL while it reads), taking an array of
    ``struct iovec`` that numpy builds for all of a call's rows at once; ``os.preadv`` wants a buffer object
    per row, and making those (with the Python around them) was most of the reader's own time at the demo's
    row sizes. None where it is not there or ``off_t`` may not be 64 bits (then ``os.preadv`` reads)."""
    if ctypes.sizeof(ctypes.c_void_p) != 8 or not hasattr(os, "preadv"):
        return None
    try:
        f = ctypes.CDLL(None, use_errno=True).preadv
    except (OSError, AttributeError):
        return None
    f.restype = ctypes.c_ssize_t
    f.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64)
    return f


_PREADV = _libc_preadv()
IOVEC = np.dtype([("base", np.uintp), ("len", np.uintp)])  # struct iovec {void *iov_base; size_t iov_len;}
VECTORED = _PREADV is not None  # read through the C library's preadv (tests turn it off for the other path)


def preadv_iov(fd: int, iov: int, count: int, offset: int) -> int:
    """``preadv(fd, iov, count, offset)`` over ``count`` iovecs at address ``iov``: the bytes read (EINTR
    retried, any other failure an ``OSError``)."""
    while True:
        got = _PREADV(fd, iov, count, offset)
        if got >= 0:
            return int(got)
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


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


class Dest:
    """Buffers rows are read into, checked once: ``outs[b][slot]`` is row ``slot`` of buffer ``b``. The buffers
    are C-contiguous and writable, of one dtype and one row shape (a training reader's batches of one array)."""

    def __init__(self, outs: Sequence[np.ndarray]) -> None:
        if not outs:
            raise ValueError("no buffers to read into")
        first = outs[0]
        self.outs = list(outs)
        self.dtype, self.row_shape = first.dtype, tuple(first.shape[1:])
        for out in self.outs:
            if (
                out.ndim == 0
                or tuple(out.shape[1:]) != self.row_shape
                or out.dtype != self.dtype
                or not out.flags.c_contiguous
                or not out.flags.writeable
            ):
                raise ValueError(
                    f"buffer {out.shape} {out.dtype} is not a C-contiguous, writable buffer of rows "
                    f"{self.row_shape} {self.dtype} like the others"
                )
        self.lens = np.array([len(o) for o in self.outs], np.int64)
        self.stride = math.prod(self.row_shape) * self.dtype.itemsize  # bytes from one row to the next
        self._bases: np.ndarray | None = None
        self._flat: list[memoryview] | None = None

    def bases(self) -> np.ndarray:
        """Each buffer's address (uint64; only the C library's preadv wants them)."""
        if self._bases is None:
            self._bases = np.array([o.ctypes.data for o in self.outs], np.uint64)
        return self._bases

    def flat(self) -> list[memoryview]:
        """Each buffer as bytes (``os.preadv`` wants a buffer object per row: slices of these)."""
        if self._flat is None:
            self._flat = [o.reshape(-1).view(np.uint8).data for o in self.outs]
        return self._flat

    def row(self, b: int, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        """Row ``slot`` of buffer ``b``, cut to an array's row ``shape`` where rows are wider (encoded views)."""
        r = self.outs[b][slot]
        return r if r.shape == shape else r[: shape[0]]


class ShardRowReader(ABC):
    """Rows of some arrays of one shard, read into the caller's buffers. Thread-safe; close when done."""

    def __init__(self, where: str, arrays: dict[str, ArrayRows], length: int) -> None:
        self.where, self.arrays, self.length = where, arrays, length  # where: "URL: shard S", for errors

    @abstractmethod
    def _read(self, a: ArrayRows, rows: np.ndarray, batch: np.ndarray, slot: np.ndarray, dest: Dest) -> None:
        """``read_batches`` once its arguments are checked."""

    def read_batches(
        self, name: str, rows: np.ndarray, batch: np.ndarray, slot: np.ndarray, dest: Dest
    ) -> None:
        """``dest.outs[batch[k]][slot[k]] = name[rows[k]]`` for every k: one array's rows of this shard for
        several batches at once (int arrays of one length). ``dest``'s rows have the array's row shape and
        dtype — or, for rows of one axis (encoded views), are at least as wide (the rest is left as it is)."""
        a = self.arrays[name]
        fits = dest.row_shape == a.shape[1:] or (
            len(a.shape) == 2 and len(dest.row_shape) == 1 and dest.row_shape[0] >= a.shape[1]
        )
        if not fits or dest.dtype != a.dtype:
            raise ValueError(
                f"{a.name}: buffers of rows {dest.row_shape} {dest.dtype} do not fit rows of "
                f"{a.shape[1:]} {a.dtype} (a C-contiguous, writable buffer of that shape and dtype is needed)"
            )
        rows = np.asarray(rows, np.int64).reshape(-1)
        batch = np.asarray(batch, np.int64).reshape(-1)
        slot = np.asarray(slot, np.int64).reshape(-1)
        if not len(rows) == len(batch) == len(slot):
            raise ValueError(f"{a.name}: {len(rows)} rows, {len(batch)} batches, {len(slot)} slots")
        if not len(rows):
            return
        if rows.min() < 0 or rows.max() >= a.shape[0]:
            raise IndexError(f"{self._where(a.name)}: rows {rows.min()}..{rows.max()} of {a.shape[0]}")
        if batch.min() < 0 or batch.max() >= len(dest.outs):
            raise IndexError(f"{a.name}: buffers {batch.min()}..{batch.max()} of {len(dest.outs)}")
        if slot.min() < 0 or (slot >= dest.lens[batch]).any():
            raise IndexError(f"{a.name}: a slot past the end of its buffer")
        self._read(a, rows, batch, slot, dest)

    def read_many(self, name: str, requests: Sequence[tuple[Sequence[int] | np.ndarray, np.ndarray]]) -> None:
        """``out[k] = name[index[k]]`` for each ``(index, out)`` (``out``: C-contiguous, ``[len(index), *row
        shape]`` of the array's dtype, or wider rows of one axis) — several batches' rows at once."""
        by_shape: dict[tuple[int, ...], list[tuple[np.ndarray, np.ndarray]]] = {}
        for index, out in requests:
            idx = np.asarray(index, np.int64).reshape(-1)
            if out.ndim == 0 or out.shape[0] != len(idx):
                a = self.arrays[name]
                raise ValueError(
                    f"{name}: buffer {out.shape} {out.dtype} does not fit {len(idx)} rows of {a.shape[1:]} "
                    f"{a.dtype} (a C-contiguous, writable buffer of that shape and dtype is needed)"
                )
            if len(idx):
                by_shape.setdefault(tuple(out.shape[1:]), []).append((idx, out))
        for asked in by_shape.values():
            dest = Dest([out for _, out in asked])
            rows = np.concatenate([idx for idx, _ in asked])
            batch = np.repeat(np.arange(len(asked)), [len(idx) for idx, _ in asked])
            slot = np.concatenate([np.arange(len(idx)) for idx, _ in asked])
            self.read_batches(name, rows, batch, slot, dest)

    def read_into(self, name: str, index: Sequence[int] | np.ndarray, out: np.ndarray) -> None:
        """``out[k] = name[index[k]]`` (``out``: C-contiguous, the array's row shape and dtype)."""
        self.read_many(name, [(index, out)])

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


class LocalRows(ShardRowReader):
    """A local shard's plain arrays, read with ``preadv`` straight into place (chunk files opened once)."""

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

    def _read(self, a: ArrayRows, rows: np.ndarray, batch: np.ndarray, slot: np.ndarray, dest: Dest) -> None:
        """Rows sorted, and each run of consecutive rows of a chunk file one ``preadv`` with a buffer per row
        (up to the system's limit of buffers per call): a shuffle window's batches read together are about
        one call per chunk file (measured: the kernel's cost per call, not the bytes, bounded the reader at
        the demo's ~100 kB rows when it read a row a call). Through the C library, the buffers are one array
        of iovecs that numpy builds; ``os.preadv`` (elsewhere) takes a slice of a buffer per row."""
        assert a.layout is not None
        fds = self._by_array.get(a.name)
        if fds is None:
            raise StoreError(f"{self._where(a.name)}: read after the shard was closed")
        per_chunk, row_bytes, n = a.layout.rows, a.row_bytes, len(rows)
        order = np.argsort(rows, kind="stable")  # stable: a row asked for twice keeps its order
        r = rows[order]
        chunk = r // per_chunk
        cut = np.ones(n, bool)
        cut[1:] = (r[1:] != r[:-1] + 1) | (chunk[1:] != chunk[:-1])
        first = np.flatnonzero(cut)
        b_of, s_of = batch[order], slot[order]
        if VECTORED:
            iov = np.empty(n, IOVEC)
            iov["base"] = dest.bases()[b_of] + s_of.astype(np.uint64) * np.uint64(dest.stride)
            iov["len"] = row_bytes
            at, size = iov.ctypes.data, IOVEC.itemsize
        else:
            flat, stride = dest.flat(), dest.stride
            slots = [
                flat[b][s * stride : s * stride + row_bytes]
                for b, s in zip(b_of.tolist(), s_of.tolist(), strict=True)
            ]
        ends = [*first[1:].tolist(), n]
        for i, j, c, row in zip(first.tolist(), ends, chunk[first].tolist(), r[first].tolist(), strict=True):
            fd = fds[c]
            if fd is None:  # a chunk Zarr did not write (all fill value)
                for b, s in zip(b_of[i:j].tolist(), s_of[i:j].tolist(), strict=True):
                    dest.row(b, s, a.shape[1:])[...] = a.layout.fill
                continue
            offset = (row - c * per_chunk) * row_bytes
            while i < j:  # the reader's hot path: one call per run of rows
                m = min(j - i, IOV_MAX)
                try:
                    got = (
                        preadv_iov(fd, at + i * size, m, offset)
                        if VECTORED
                        else os.preadv(fd, slots[i : i + m], offset)
                    )
                except OSError as e:
                    raise StoreError(f"{self._where(a.name)}: reading chunk {c} failed: {e!r}") from e
                if got != m * row_bytes:
                    raise StoreError(  # the file shrank since it was opened
                        f"{self._where(a.name)}: chunk {c} gave too few bytes at row {row}; "
                        "run `radio-dist store verify`"
                    )
                i, offset, row = i + m, offset + m * row_bytes, row + m

    def close(self) -> None:
        with self._lock:
            for fds in self._by_array.values():
                for fd in fds:
                    if fd is not None:
                        os.close(fd)
            self._by_array.clear()


class LoadedRows(ShardRowReader):
    """A shard's arrays held whole (each chunk copied once into place), rows gathered from them with one
    vectorized copy per array, shard and batch. Subclasses fill ``_whole``."""

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

    def _read(self, a: ArrayRows, rows: np.ndarray, batch: np.ndarray, slot: np.ndarray, dest: Dest) -> None:
        whole = self._whole.get(a.name)
        if whole is None:
            raise StoreError(f"{self._where(a.name)}: read after the shard was closed")
        order = np.argsort(batch, kind="stable")
        b_sorted = batch[order]
        cuts = [0, *(np.flatnonzero(np.diff(b_sorted)) + 1).tolist(), len(order)]
        for g in range(len(cuts) - 1):
            sel = order[cuts[g] : cuts[g + 1]]
            out, at = dest.outs[int(b_sorted[cuts[g]])], slot[sel]
            first = int(at[0])
            if (
                dest.row_shape != a.shape[1:]
            ):  # wider rows (encoded views): each row into the start of its own
                out[at, : a.shape[1]] = whole[rows[sel]]
            elif (
                at == np.arange(first, first + len(at))
            ).all():  # a run of slots (a training batch): one copy
                np.take(whole, rows[sel], axis=0, out=out[first : first + len(at)], mode="clip")
            else:
                out[at] = whole[rows[sel]]

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
