"""The feature store: Zarr v3 shards + a Parquet manifest + JSON/safetensors metadata under one fsspec root.

Layout::

    ROOT/store.json                 format, partitions, per-teacher fingerprint, output shapes, PHI-S, dispersion
    ROOT/phis/<teacher>.safetensors PHI-S parameters (see radio_dist.phis)
    ROOT/shards/<shard>/            one immutable Zarr v3 group per shard, written whole by one writer
    ROOT/manifest/<shard>.parquet   the commit: written only after the shard's data is durable

A shard is visible only through its manifest part, so a crash at any moment leaves only whole, committed
shards visible; a shard directory without a manifest part is an orphan that readers never touch. Shard ids
are derived from the image ids they hold, so a retried write (Ray tasks are at-least-once) targets the same
shard and is skipped once committed.

Backends. Locally, small files are written to a temporary name, fsynced and renamed; shard data is fsynced
before its commit. On object stores (s3:// through s3fs) every object is written by exactly one PUT of its
whole bytes (no open()/close() streams: s3fs writes what it has on close even after an exception), a
shard's objects are built in memory and uploaded together, and its manifest part is PUT only once every
data PUT has succeeded. Each shard group carries consolidated Zarr metadata, so opening one costs a single
GET. Transient object-store errors (503 SlowDown, dropped connections, short reads) are retried with
backoff by botocore (on s3://, unless ``storage_options["config_kwargs"]["retries"]`` says otherwise:
``S3_RETRIES``) and by s3fs; a write that still fails raises before its commit, so nothing becomes visible
and a re-run redoes the shard.
Listings are never served from fsspec's listing cache: another process may have committed since.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from pydantic import Field, field_validator

from radio_dist.config import StrictModel
from radio_dist.phis import PhiS

FORMAT = "radio-dist-store/1"

MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("view", pa.string()),
        ("status", pa.string()),  # ok | error
        ("error", pa.string()),
        ("shard", pa.string()),
        ("index", pa.int32()),  # row in the shard's arrays; -1 for error rows
        ("width", pa.int32()),  # original image size (0 when unknown)
        ("height", pa.int32()),
        ("mode", pa.string()),  # original PIL mode
        ("geometry", pa.string()),  # JSON {partition: {"crop": [x0,y0,x1,y1], "size": px}}
        ("checksum", pa.string()),  # sha256 over the row's slices of every array ("" for error rows)
        ("committed_at", pa.float64()),
    ]
)
ROW_FIELDS = ("id", "source", "view", "status", "error", "width", "height", "mode", "geometry")

# botocore retries for s3:// stores whose storage_options name none. "standard" retries throttling (503
# SlowDown), 5xx and connection errors with exponential backoff and jitter; botocore's default ("legacy", 4
# retries) gives up sooner under a burst of throttling. s3fs's own retries do not cover everything: a
# 503 on a HEAD has no body, so s3fs does not recognise it as SlowDown.
S3_RETRIES: dict[str, Any] = {"max_attempts": 10, "mode": "standard"}


class StoreConfig(StrictModel):
    url: str = Field(description="Store root: a local path or an fsspec URL (s3://bucket/prefix).")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options (S3 endpoint, credentials, ...)."
    )
    shard_size: int = Field(
        256, ge=1, description="Images per shard (aim for shards of ~100s of MB at scale)."
    )
    chunk_bytes: int = Field(1 << 20, ge=1, description="Target uncompressed bytes per Zarr chunk (>= 1 MB).")

    @field_validator("url")
    @classmethod
    def _url_ok(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("store url must not be empty")
        return v.rstrip("/") or "/"


class StoreError(RuntimeError):
    """The store is missing, malformed or incompatible with the job; the message says what to do."""


class StoreMismatchError(StoreError):
    """The store was built with other teachers / partitions / PHI-S than the job asks for."""


class StoreLockedError(StoreError):
    """Another caching job holds the store's writer lock."""


LOCK_REL = "locks/writer.json"


class WriterLock:
    """One caching job writes a store at a time; a second one is refused with who holds it.

    The lock is an object created exclusively (``O_EXCL`` locally, a conditional PUT — If-None-Match — on
    object stores) holding owner, host, pid and a heartbeat the holder refreshes every ``ttl_s / 4``. A lock
    whose holder is gone (same host and its pid is dead, or a heartbeat older than ``ttl_s``) is taken over,
    so a job killed with SIGKILL can be re-run at once on the same machine, and after ``ttl_s`` elsewhere.
    """

    def __init__(self, store: FeatureStore, job: str = "cache-teachers", ttl_s: float = 120.0) -> None:
        self.store, self.job, self.ttl_s = store, job, ttl_s
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        import socket

        now = time.time()
        return json.dumps(
            {"owner": self.owner, "job": self.job, "host": socket.gethostname(), "pid": os.getpid(),
             "started": getattr(self, "_started", now), "heartbeat": now}
        ).encode()  # fmt: skip

    def _create(self) -> bool:
        path = self.store._path(LOCK_REL)
        data = self._record()
        if self.store.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        try:
            self.store.fs.pipe_file(path, data, mode="create")
        except (FileExistsError, OSError) as e:
            if isinstance(e, FileExistsError) or "PreconditionFailed" in str(e) or "412" in str(e):
                return False
            raise
        return True

    def holder(self) -> dict[str, Any] | None:
        path = self.store._fresh(self.store._path(LOCK_REL))
        try:
            return dict(json.loads(self.store.fs.cat_file(path)))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn lock file (its writer died mid-write): treat as stale
            return {"heartbeat": 0.0}

    def _stale(self, info: dict[str, Any]) -> bool:
        import socket

        if time.time() - float(info.get("heartbeat", 0.0)) > self.ttl_s:
            return True
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
            try:
                os.kill(info["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def acquire(self) -> WriterLock:
        self._started = time.time()
        for _ in range(3):
            if self._create():
                break
            info = self.holder()
            if info is None:
                continue  # released meanwhile
            if not self._stale(info):
                age = time.time() - float(info.get("heartbeat", 0.0))
                raise StoreLockedError(
                    f"store {self.store.url} is being written by another {info.get('job', 'job')}: host "
                    f"{info.get('host')} pid {info.get('pid')}, started "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(info.get('started', 0))))}, "
                    f"heartbeat {age:.0f} s ago. Wait for it to finish (re-running then resumes where it "
                    f"stopped); if it is dead, its lock expires {self.ttl_s:.0f} s after its last heartbeat "
                    f"(or delete {self.store._path(LOCK_REL)})."
                )
            self.store.fs.rm_file(self.store._path(LOCK_REL))  # a dead holder's lock: take it over
        else:
            raise StoreLockedError(f"store {self.store.url}: could not take the writer lock (contended)")
        self._thread = threading.Thread(target=self._beat, name="radio-dist-store-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            info = self.holder()
            if info is None or info.get("owner") != self.owner:
                return  # taken over (we were presumed dead): the other job owns the store now
            self.store._put_atomic(LOCK_REL, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        info = self.holder()
        if info is not None and info.get("owner") == self.owner:
            self.store.fs.rm_file(self.store._path(LOCK_REL))

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def view_resample_of(meta: dict[str, Any]) -> str:
    """How a store's canonical views were resampled; stores from before the setting existed used PIL's
    bicubic."""
    return str(meta.get("view_resample", "bicubic"))


def array_key(teacher: str, partition: str, kind: str) -> str:
    return f"{teacher}/{partition}/{kind}"


def image_key(partition: str) -> str:
    return f"images/{partition}"


def row_checksum(arrays: dict[str, np.ndarray], i: int) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name][i]).tobytes())
    return h.hexdigest()


def shard_id_for(ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:24]


@dataclass
class ShardResult:
    shard: str
    n_ok: int
    n_error: int
    nbytes: int
    skipped: bool = False  # already committed (a retried task): nothing was written


class FeatureStore:
    """Reader/writer of one store root. Cheap to construct and picklable (sent to Ray tasks)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/") or "/"
        self.storage_options = dict(storage_options or {})
        self._fs: fsspec.AbstractFileSystem | None = None

    @classmethod
    def from_config(cls, cfg: StoreConfig) -> FeatureStore:
        return cls(cfg.url, cfg.storage_options)

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])  # type: ignore[misc]

    # -- paths ---------------------------------------------------------------------------------------------
    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:  # set _root first: other threads take a non-None _fs as "ready"
            fs, self._root = fsspec.core.url_to_fs(self.url, **self.fs_options())
            self._fs = fs
        return self._fs

    def fs_options(self) -> dict[str, Any]:
        """The fsspec options in effect: ``storage_options``, plus ``S3_RETRIES`` on s3:// if none given."""
        opts = dict(self.storage_options)
        if self.url.startswith(("s3://", "s3a://")):
            config = dict(opts.get("config_kwargs") or {})
            config.setdefault("retries", dict(S3_RETRIES))
            opts["config_kwargs"] = config
        return opts

    @property
    def root(self) -> str:
        _ = self.fs
        return self._root

    @property
    def is_local(self) -> bool:
        return "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _fresh(self, path: str) -> str:
        """``path``, with any cached listing of it (and of its parents) dropped: others may have written."""
        self.fs.invalidate_cache(path)
        return path

    def exists(self) -> bool:
        return bool(self.fs.exists(self._fresh(self._path("store.json"))))

    # -- small atomic files ----------------------------------------------------------------------------------
    def _put_atomic(self, rel: str, data: bytes) -> None:
        """Write a whole object so readers see all of it or none (rename locally; one PUT on object stores)."""
        path = self._path(rel)
        if self.is_local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:  # one PUT of the whole object (a multipart upload above 100 MB is just as all-or-nothing)
            self.fs.pipe_file(path, data)

    def _get(self, rel: str) -> bytes:
        return bytes(self.fs.cat_file(self._path(rel)))

    # -- metadata --------------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        if not self.exists():
            raise StoreError(
                f"{self.url} is not a radio-dist store (no store.json) — build one with "
                "`radio-dist cache-teachers --store URL`"
            )
        meta = json.loads(self._get("store.json"))
        if meta.get("format") != FORMAT:
            raise StoreError(
                f"{self.url}: unsupported store format {meta.get('format')!r} (expected {FORMAT})"
            )
        return meta

    def write_meta(self, meta: dict[str, Any]) -> None:
        meta = {**meta, "format": FORMAT}
        self._put_atomic("store.json", json.dumps(meta, indent=1, sort_keys=True).encode())

    def init_or_check(
        self,
        partitions: dict[str, int],
        teachers: dict[str, dict[str, Any]],
        view_resample: str = "bilinear",
    ) -> dict[str, Any]:
        """Create the store's metadata, or check an existing store matches this job (refuse otherwise).

        ``teachers`` maps name -> {"fingerprint", "family", "spec"}; ``view_resample`` is how the job
        resamples canonical views (``source.resample``): one store never mixes two.
        """
        if not self.exists():
            meta: dict[str, Any] = {
                "created_at": time.time(),
                "partitions": partitions,
                "view_resample": view_resample,
                "dense_dtype": "float16",
                "teachers": {k: dict(v) for k, v in teachers.items()},
            }
            self.write_meta(meta)
            return self.meta()
        meta = self.meta()
        problems = []
        if meta["partitions"] != partitions:
            problems.append(f"partitions: store has {meta['partitions']}, job asks for {partitions}")
        have_resample = view_resample_of(meta)
        if have_resample != view_resample:
            problems.append(
                f"source.resample: the store's views were resampled {have_resample}, the job asks for "
                f"{view_resample} (set source.resample: {have_resample} to add to this store)"
            )
        have, want = set(meta["teachers"]), set(teachers)
        if have != want:
            problems.append(f"teachers: store has {sorted(have)}, job asks for {sorted(want)}")
        for name in sorted(have & want):
            a, b = meta["teachers"][name]["fingerprint"], teachers[name]["fingerprint"]
            if a != b:
                problems.append(
                    f"teacher {name!r}: fingerprint {a} in the store, {b} for the job "
                    "(its spec or weights changed)"
                )
        if problems:
            raise StoreMismatchError(
                f"store {self.url} was built with other settings than this job:\n  - "
                + "\n  - ".join(problems)
                + "\nUse a new --store, or run with the settings the store was built with."
            )
        return meta

    def save_phis(
        self, teacher: str, phis: PhiS, dispersion: float | None, outputs: dict[str, Any], fit_images: int
    ) -> None:
        """Record a teacher's PHI-S parameters, summary dispersion and output shapes (before any commit)."""
        from safetensors.numpy import save

        blob = save({k: np.ascontiguousarray(v) for k, v in phis.to_arrays().items()})
        rel = f"phis/{teacher}.safetensors"
        self._put_atomic(rel, blob)
        meta = self.meta()
        meta["teachers"][teacher].update(
            {
                "phis": {
                    "file": rel,
                    "sha256": hashlib.sha256(blob).hexdigest(),
                    "rotation": phis.rotation_kind,
                    "alpha": float(phis.alpha),
                    "fit_images": int(fit_images),
                },
                "summary_dispersion": None if dispersion is None else float(dispersion),
                "outputs": outputs,
            }
        )
        self.write_meta(meta)

    def phis(self, teacher: str) -> PhiS:
        from safetensors.numpy import load

        meta = self.meta()
        info = meta["teachers"].get(teacher, {}).get("phis")
        if info is None:
            raise StoreError(f"{self.url}: no PHI-S parameters for teacher {teacher!r} yet")
        return PhiS.from_arrays(load(self._get(info["file"])))

    def has_phis(self) -> bool:
        return self.exists() and all("phis" in t for t in self.meta()["teachers"].values())

    # -- manifest --------------------------------------------------------------------------------------------
    def manifest_parts(self) -> list[str]:
        self._fresh(self._path("manifest"))
        pattern = self._path("manifest", "*.parquet")
        return sorted(p for p in self.fs.glob(pattern) if ".tmp-" not in p)

    def manifest(self, columns: list[str] | None = None) -> pa.Table:
        """All committed rows (concatenation of manifest parts)."""
        parts = self.manifest_parts()
        if not parts:
            return (
                MANIFEST_SCHEMA.empty_table()
                if columns is None
                else MANIFEST_SCHEMA.empty_table().select(columns)
            )
        tables = [pq.read_table(io.BytesIO(b), columns=columns) for b in self.fs.cat(parts).values()]
        return pa.concat_tables(tables)

    def committed_ids(self) -> set[str]:
        return set(self.manifest(columns=["id"]).column("id").to_pylist())

    # -- shards ----------------------------------------------------------------------------------------------
    def _zarr_store(self, shard: str) -> Any:
        if self.is_local:
            return zarr.storage.LocalStore(self._path("shards", shard))
        return zarr.storage.FsspecStore.from_url(
            f"{self.url}/shards/{shard}", storage_options=self.fs_options()
        )

    def is_committed(self, shard: str) -> bool:
        return bool(self.fs.exists(self._fresh(self._path("manifest", f"{shard}.parquet"))))

    def shard_writer(self, ids: Iterable[str], chunk_bytes: int = 1 << 20) -> ShardWriter:
        return ShardWriter(self, shard_id_for(ids), chunk_bytes)

    def open_shard(self, shard: str) -> zarr.Group:
        # consolidated metadata (when the shard has it): one GET instead of a listing + one GET per node
        return zarr.open_group(self._zarr_store(shard), mode="r", zarr_format=3, use_consolidated=None)

    def _write_shard_data(self, shard: str, arrays: dict[str, np.ndarray], chunk_bytes: int) -> int:
        """Write a shard's Zarr group whole and make it durable (before any commit); returns data bytes.

        Locally through Zarr's LocalStore, then fsync. On object stores each array is encoded in memory and
        its chunks uploaded together (one PUT per object), then the metadata documents; objects left under
        the shard's prefix by an earlier, interrupted attempt at the same shard are removed.
        """
        if self.is_local:
            local = zarr.storage.LocalStore(self._path("shards", shard))
            _fill_group(zarr.open_group(local, mode="w", zarr_format=3), arrays, chunk_bytes, None)
            _consolidate(local)
            _fsync_tree(self._path("shards", shard))
            return sum(a.nbytes for a in arrays.values())
        prefix = self._path("shards", shard)
        stale = set(self.fs.find(self._fresh(prefix)))
        objects: dict[str, Any] = {}  # zarr key -> Buffer

        def upload(keys: list[str]) -> None:  # concurrent PUTs, each retried by s3fs/botocore
            self.fs.pipe({f"{prefix}/{k}": objects.pop(k).to_bytes() for k in keys})
            stale.difference_update(f"{prefix}/{k}" for k in keys)

        def upload_chunks(name: str) -> None:  # as each array is done: one array's bytes in memory at a time
            upload([k for k in objects if k.startswith(f"{name}/c/")])

        mem = zarr.storage.MemoryStore(store_dict=objects)
        _fill_group(zarr.open_group(mem, mode="w", zarr_format=3), arrays, chunk_bytes, upload_chunks)
        _consolidate(mem)
        upload(list(objects))
        if stale:
            self.fs.rm(sorted(stale))
        return sum(a.nbytes for a in arrays.values())

    def read_shard(self, shard: str, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays of one committed shard, as stored (uint8 images, float16 dense, float32 summary)."""
        if not self.is_committed(shard):
            raise StoreError(f"{self.url}: shard {shard} is not committed")
        group = self.open_shard(shard)
        keys = names if names is not None else list(_array_names(group))
        arrays = {k: _arr(group, k) for k in keys}
        # The arrays this store writes (raw little-endian bytes, chunked along rows) are read as their chunk
        # files, all in one fsspec `cat` (concurrent on object stores), and used in place: Zarr's own read
        # path copied and re-assembled them at ~1/4 of the bytes' read rate (3.0k vs 12k samples/s of the
        # ingest benchmark's store, one thread, page cache warm). Any other layout is read through Zarr.
        layouts = {k: layout for k, a in arrays.items() if (layout := plain_layout(a)) is not None}
        paths = {
            k: [self._path("shards", shard, k, *chunk) for chunk in chunk_keys(arrays[k].shape, lay.rows)]
            for k, lay in layouts.items()
        }
        blobs = self.fs.cat([p for ps in paths.values() for p in ps], on_error="return") if paths else {}
        out: dict[str, np.ndarray] = {}
        for k, a in arrays.items():
            if k not in layouts:
                out[k] = np.asarray(a[...])
                continue
            chunks: list[bytes | None] = []
            for p in paths[k]:
                blob = blobs.get(p, FileNotFoundError(p))
                if isinstance(blob, FileNotFoundError):
                    chunks.append(None)  # Zarr does not write a chunk that is all fill value
                elif isinstance(blob, BaseException):
                    raise StoreError(f"{self.url}: shard {shard}: reading {p} failed: {blob!r}") from blob
                else:
                    chunks.append(blob)
            try:
                out[k] = layouts[k].assemble(a.shape, chunks)
            except ValueError as e:
                raise StoreError(
                    f"{self.url}: shard {shard}, array {k}: {e}; run `radio-dist store verify`"
                ) from e
        return out

    def read_targets(
        self, shard: str, teacher: str, partition: str, space: str = "phis"
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(dense [N,h,w,C] float32, summary [N,C] float32 | None) of a shard, in PHI-S or teacher space."""
        if space not in {"phis", "teacher"}:
            raise ValueError(f"space must be 'phis' or 'teacher', got {space!r}")
        group = self.open_shard(shard)
        dense = np.asarray(_arr(group, array_key(teacher, partition, "dense"))[...], dtype=np.float32)
        skey = array_key(teacher, partition, "summary")
        summary = (
            np.asarray(_arr(group, skey)[...], dtype=np.float32) if skey in _array_names(group) else None
        )
        if space == "teacher":
            dense = np.asarray(self.phis(teacher).inverse(dense), dtype=np.float32)
        return dense, summary

    def shard_dirs(self) -> list[str]:
        base = self._fresh(self._path("shards"))
        if not self.fs.exists(base):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))

    def orphan_shards(self) -> list[str]:
        """Shard directories without a commit (left by interrupted writes; invisible to readers)."""
        return sorted(set(self.shard_dirs()) - {shard_of_part(p) for p in self.manifest_parts()})

    def nbytes(self, rel: str = "") -> int:
        path = self._fresh(self._path(rel) if rel else self.root)
        return int(self.fs.du(path)) if self.fs.exists(path) else 0


def shard_of_part(path: str) -> str:
    """Shard id of a manifest part path (``.../manifest/<shard>.parquet``)."""
    return path.rsplit("/", 1)[-1][: -len(".parquet")]


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
    and are cut along rows only (what ``_fill_group`` writes); None for any other layout."""
    meta = array.metadata
    if getattr(meta, "zarr_format", None) != 3 or len(array.shape) == 0:
        return None
    d = meta.to_dict()
    codecs = d.get("codecs") or []
    if len(codecs) != 1 or codecs[0].get("name") != "bytes" or d.get("storage_transformers"):
        return None
    dtype = np.dtype(array.dtype)
    endian = (codecs[0].get("configuration") or {}).get("endian")
    if dtype.itemsize > 1 and endian != sys.byteorder:
        return None
    grid, keys = d.get("chunk_grid") or {}, d.get("chunk_key_encoding") or {}
    chunk_shape = list((grid.get("configuration") or {}).get("chunk_shape") or [])
    if grid.get("name") != "regular" or chunk_shape[1:] != list(array.shape[1:]) or not chunk_shape:
        return None
    if keys.get("name") != "default" or (keys.get("configuration") or {}).get("separator", "/") != "/":
        return None
    return PlainLayout(int(chunk_shape[0]), dtype, d.get("fill_value", 0))


def chunk_keys(shape: tuple[int, ...], rows: int) -> list[tuple[str, ...]]:
    """Zarr v3 default chunk keys (``c/i/0/...``) of an array cut into ``rows``-row chunks, in order."""
    n = -(-shape[0] // rows) if rows > 0 else 0
    return [("c", str(i), *(["0"] * (len(shape) - 1))) for i in range(n)]


def _arr(group: zarr.Group, name: str) -> Any:
    """A member array of a group (typed loosely: zarr's stubs do not narrow Array | Group)."""
    return group[name]


def _fill_group(
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


def _consolidate(store: Any) -> None:
    # Zarr warns that consolidated metadata is not (yet) in the v3 spec; zarr-python reads it, and opening
    # a shard with it costs one request instead of one per node, which matters on object stores.
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Consolidated metadata is currently not part", UserWarning)
        zarr.consolidate_metadata(store, zarr_format=3)


def _array_names(group: zarr.Group, prefix: str = "") -> Iterator[str]:
    for name, member in group.members():
        full = f"{prefix}{name}"
        if isinstance(member, zarr.Group):
            yield from _array_names(member, full + "/")
        else:
            yield full


@dataclass
class ShardWriter:
    """Context manager that writes one shard whole and commits it on a clean exit.

    Usage::

        with store.shard_writer(ids) as w:
            w.add_array("images/low", imgs)           # ok rows only, in ok-row order
            w.add_rows(rows)                          # every row (ok and error), manifest fields
    On an exception nothing is committed; an orphaned directory may remain and is ignored by readers.
    """

    store: FeatureStore
    shard: str
    chunk_bytes: int = 1 << 20
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    result: ShardResult | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def add_array(self, name: str, arr: np.ndarray) -> None:
        if name in self.arrays:
            raise ValueError(f"shard {self.shard}: array {name!r} added twice")
        self.arrays[name] = np.ascontiguousarray(arr)

    def add_rows(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)

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
        if self.store.is_committed(self.shard):  # a retried task: the first attempt already committed
            return ShardResult(self.shard, len(ok), n_err, 0, skipped=True)
        nbytes = self.store._write_shard_data(self.shard, self.arrays, self.chunk_bytes) if ok else 0
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
        table = pa.Table.from_pylist(table_rows, schema=MANIFEST_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.store._put_atomic(f"manifest/{self.shard}.parquet", buf.getvalue())  # the commit
        return ShardResult(self.shard, len(ok), n_err, nbytes + buf.tell())


def _fsync_tree(path: str) -> None:
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


def store_info(store: FeatureStore) -> dict[str, Any]:
    """Summary for `radio-dist store info`: rows, teachers, shapes, bytes per image."""
    meta = store.meta()
    man = store.manifest(columns=["id", "status", "shard"])
    status = man.column("status").to_pylist()
    n_ok = sum(s == "ok" for s in status)
    shard_bytes = store.nbytes("shards")
    teachers = {}
    for name, t in meta["teachers"].items():
        teachers[name] = {
            "family": t.get("family"),
            "fingerprint": t["fingerprint"],
            "outputs": t.get("outputs", {}),
            "phis_rotation": t.get("phis", {}).get("rotation"),
            "phis_alpha": t.get("phis", {}).get("alpha"),
            "summary_dispersion": t.get("summary_dispersion"),
        }
    return {
        "url": store.url,
        "format": meta["format"],
        "partitions": meta["partitions"],
        "view_resample": view_resample_of(meta),
        "rows": len(status),
        "rows_ok": n_ok,
        "rows_error": len(status) - n_ok,
        "shards": len(set(man.column("shard").to_pylist())),
        "orphan_shards": len(store.orphan_shards()),
        "teachers": teachers,
        "bytes_shards": shard_bytes,
        "bytes_total": store.nbytes(),
        "bytes_per_image": (shard_bytes / n_ok) if n_ok else 0.0,
    }


def verify_store(store: FeatureStore, check_data: bool = True) -> dict[str, Any]:
    """Check counts, uniqueness, shapes, checksums and PHI-S files; ``ok`` is False on any problem."""
    problems: list[str] = []
    notes: list[str] = []
    meta = store.meta()
    for name, t in meta["teachers"].items():
        info = t.get("phis")
        if info is None:
            problems.append(f"teacher {name!r}: no PHI-S parameters recorded")
            continue
        try:
            blob = store._get(info["file"])
        except FileNotFoundError:
            problems.append(f"teacher {name!r}: PHI-S file {info['file']} is missing")
            continue
        if hashlib.sha256(blob).hexdigest() != info["sha256"]:
            problems.append(f"teacher {name!r}: PHI-S file {info['file']} checksum mismatch")
    expected: dict[str, tuple[int, ...]] = {}
    for p, size in meta["partitions"].items():
        expected[image_key(p)] = (size, size, 3)
    for name, t in meta["teachers"].items():
        for p, shapes in t.get("outputs", {}).items():
            expected[array_key(name, p, "dense")] = tuple(shapes["dense"])
            if shapes.get("summary"):
                expected[array_key(name, p, "summary")] = tuple(shapes["summary"])
    seen: dict[str, str] = {}
    n_rows = checked = 0
    parts = store.manifest_parts()
    for part in parts:
        shard = shard_of_part(part)
        try:
            table = pq.read_table(io.BytesIO(store.fs.cat_file(part)))
        except Exception as e:  # a corrupt commit record is itself the finding
            problems.append(f"manifest part {part}: unreadable ({e})")
            continue
        if not MANIFEST_SCHEMA.equals(table.schema, check_metadata=False):
            problems.append(f"manifest part {part}: unexpected schema")
            continue
        rows = table.to_pylist()
        n_rows += len(rows)
        for r in rows:
            if r["shard"] != shard:
                problems.append(f"row {r['id']}: shard {r['shard']} recorded in part of shard {shard}")
            if r["id"] in seen:
                problems.append(f"image id {r['id']} committed twice (shards {seen[r['id']]} and {shard})")
            seen[r["id"]] = shard
        ok_rows = [r for r in rows if r["status"] == "ok"]
        if not ok_rows:
            continue
        try:
            group = store.open_shard(shard)
            names = set(_array_names(group))
        except Exception as e:
            problems.append(f"shard {shard}: committed but unreadable ({e})")
            continue
        missing = set(expected) - names
        if missing:
            problems.append(f"shard {shard}: missing arrays {sorted(missing)}")
            continue
        arrays = {}
        for k in sorted(names):
            arr = _arr(group, k)
            if arr.shape[0] != len(ok_rows):
                problems.append(
                    f"shard {shard}: {k} has {arr.shape[0]} rows, manifest has {len(ok_rows)} ok rows"
                )
            if k in expected and tuple(arr.shape[1:]) != expected[k]:
                problems.append(f"shard {shard}: {k} shape {arr.shape[1:]} != {expected[k]} in store.json")
            if check_data:
                arrays[k] = np.asarray(arr[...])
        if check_data and all(a.shape[0] == len(ok_rows) for a in arrays.values()):
            for r in ok_rows:
                if row_checksum(arrays, r["index"]) != r["checksum"]:
                    problems.append(
                        f"shard {shard}: checksum mismatch for image {r['id']} (row {r['index']})"
                    )
                checked += 1
    orphans = store.orphan_shards()
    if orphans:
        notes.append(
            f"{len(orphans)} uncommitted shard dir(s) from interrupted writes (invisible to readers)"
        )
    return {
        "ok": not problems,
        "problems": problems,
        "notes": notes,
        "rows": n_rows,
        "unique_ids": len(seen),
        "shards": len(parts),
        "rows_checksummed": checked,
    }
