"""Writing one shard whole and committing it: data first, made durable, then its manifest part.

Locally the shard's Zarr group is written through Zarr's LocalStore and fsynced before the commit; on object
stores every object is one PUT of its whole bytes, and the manifest part is PUT only once every data PUT has
succeeded. On an exception nothing is committed; a local shard's partial directory is removed (on an object store
the objects of an interrupted shard may remain, ignored by readers, until the shard is written again).
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from radio_dist.store.chunks import consolidate, fill_group
from radio_dist.store.codecs import Fidelity, dump_fidelity, fidelity_key
from radio_dist.store.feature_store import FeatureStore
from radio_dist.store.manifest import FIDELITY_KEY, MANIFEST_SCHEMA, ROW_FIELDS, row_checksum, shard_id_for


@dataclass
class ShardResult:
    shard: str
    n_ok: int
    n_error: int
    nbytes: int
    skipped: bool = False  # already committed (a retried task): nothing was written


class ShardWriter:
    """Context manager that writes one shard whole and commits it on a clean exit.

    Usage::

        with ShardWriter(store, ids) as w:
            w.add_array("images/low", imgs)           # ok rows only, in ok-row order
            w.add_rows(rows)                          # every row (ok and error), manifest fields
            w.add_fidelity("t1", "low", "int8", "float", fid)  # how close the stored codes are (optional)
    On an exception nothing is committed; an orphaned directory may remain and is ignored by readers.
    """

    def __init__(self, store: FeatureStore, ids: Iterable[str], chunk_bytes: int = 1 << 20) -> None:
        self.store = store
        self.shard = shard_id_for(ids)  # the same ids give the same shard: a retried write is recognised
        self.chunk_bytes = chunk_bytes
        self.arrays: dict[str, np.ndarray] = {}
        self.rows: list[dict[str, Any]] = []
        self.fidelity: dict[str, tuple[str, str, Fidelity]] = {}
        self.result: ShardResult | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def add_array(self, name: str, arr: np.ndarray) -> None:
        if name in self.arrays:
            raise ValueError(f"shard {self.shard}: array {name!r} added twice")
        self.arrays[name] = np.ascontiguousarray(arr)

    def add_rows(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)

    def add_fidelity(self, teacher: str, partition: str, codec: str, against: str, fid: Fidelity) -> None:
        """Record how close this shard's stored targets of (teacher, partition) are to ``against`` (``float``:
        the teacher's float output in PHI-S space); committed with the shard, in its manifest part's metadata."""
        self.fidelity[fidelity_key(teacher, partition)] = (codec, against, fid)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.result = self.commit()

    def commit(self) -> ShardResult:
        ok = [r for r in self.rows if r["status"] == "ok"]
        n_err = len(self.rows) - len(ok)
        for name, arr in self.arrays.items():
            if arr.shape[0] != len(ok):
                raise ValueError(
                    f"shard {self.shard}: array {name!r} has {arr.shape[0]} rows, {len(ok)} ok rows"
                )
        ids = [r["id"] for r in self.rows]
        if len(set(ids)) != len(ids):
            raise ValueError(f"shard {self.shard}: duplicate image ids in one shard")
        # a retried task: the first attempt already committed (its part stays until the job ends: compact.py)
        if self.store.is_committed(self.shard, snapshots=False):
            return ShardResult(self.shard, len(ok), n_err, 0, skipped=True)
        nbytes = write_shard_data(self.store, self.shard, self.arrays, self.chunk_bytes) if ok else 0
        now = time.time()
        table_rows = []
        ok_i = 0
        for r in self.rows:
            is_ok = r["status"] == "ok"
            table_rows.append(
                {
                    **{k: r.get(k) for k in ROW_FIELDS},
                    "error": r.get("error") or None,
                    "shard": self.shard,
                    "index": ok_i if is_ok else -1,
                    "checksum": row_checksum(self.arrays, ok_i) if is_ok else "",
                    "committed_at": now,
                }
            )
            ok_i += int(is_ok)
        schema = MANIFEST_SCHEMA
        if self.fidelity:
            schema = schema.with_metadata({FIDELITY_KEY: dump_fidelity(self.fidelity)})
        table = pa.Table.from_pylist(table_rows, schema=schema)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        try:
            self.store.put_atomic(f"manifest/{self.shard}.parquet", buf.getvalue())  # the commit
        except OSError:  # a full disk, say: a local put_atomic that raises has not renamed, so nothing was
            if ok and self.store.is_local:  # committed; the data of this attempt would be an orphan
                shutil.rmtree(self.store.path("shards", self.shard), ignore_errors=True)
            raise
        return ShardResult(self.shard, len(ok), n_err, nbytes + buf.tell())


def write_shard_data(store: FeatureStore, shard: str, arrays: dict[str, np.ndarray], chunk_bytes: int) -> int:
    """Write a shard's Zarr group whole and make it durable (before any commit); returns data bytes.

    Locally through Zarr's LocalStore, then fsync. On object stores each array is encoded in memory and
    its chunks uploaded together (one PUT per object), then the metadata documents; objects left under
    the shard's prefix by an earlier, interrupted attempt at the same shard are removed.
    """
    if store.is_local:
        root = store.path("shards", shard)
        try:
            local = zarr.storage.LocalStore(root)
            fill_group(zarr.open_group(local, mode="w", zarr_format=3), arrays, chunk_bytes, None)
            consolidate(local)
            fsync_tree(root)
        except OSError as e:  # a full disk, say: the uncommitted shard is removed, its path named
            settle_zarr_writes()
            shutil.rmtree(root, ignore_errors=True)
            if e.filename is None:
                raise OSError(e.errno, e.strerror, root) from e
            raise
        return sum(a.nbytes for a in arrays.values())
    prefix = store.path("shards", shard)
    stale = set(store.fs.find(store.fresh(prefix)))
    objects: dict[str, Any] = {}  # zarr key -> Buffer

    def upload(keys: list[str]) -> None:  # concurrent PUTs, each retried by s3fs/botocore
        store.fs.pipe({f"{prefix}/{k}": objects.pop(k).to_bytes() for k in keys})
        stale.difference_update(f"{prefix}/{k}" for k in keys)

    def upload_chunks(name: str) -> None:  # as each array is done: one array's bytes in memory at a time
        upload([k for k in objects if k.startswith(f"{name}/c/")])

    mem = zarr.storage.MemoryStore(store_dict=objects)
    fill_group(zarr.open_group(mem, mode="w", zarr_format=3), arrays, chunk_bytes, upload_chunks)
    consolidate(mem)
    upload(list(objects))
    if stale:
        store.fs.rm(sorted(stale))
    return sum(a.nbytes for a in arrays.values())


def settle_zarr_writes(timeout_s: float = 30.0) -> None:
    """Wait for the writes zarr still has in flight. When one write of a group fails, zarr's gather raises at
    once and leaves the others running on its I/O loop: they would recreate files in a shard directory just
    removed (seen with a full tmpfs: a 132-557 byte orphan after every few failures)."""
    from zarr.core.sync import sync

    async def settle() -> None:
        me = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not me]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    sync(settle())


def fsync_tree(path: str) -> None:
    """Make a local shard durable before its commit record is written."""
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
