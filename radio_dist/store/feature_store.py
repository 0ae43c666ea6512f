"""The feature store: Zarr v3 shards + a Parquet manifest + JSON/safetensors metadata under one fsspec root.

Layout::

    ROOT/store.json                 format, partitions, per-teacher fingerprint, output shapes, PHI-S, dispersion
    ROOT/phis/<teacher>.safetensors PHI-S parameters (see radio_dist.phis)
    ROOT/shards/<shard>/            one immutable Zarr v3 group per shard, written whole by one writer
    ROOT/manifest/<shard>.parquet   the commit: written only after the shard's data is durable
    ROOT/manifest/snapshots/        committed parts compacted into larger objects (``radio_dist.store.compact``)

``FeatureStore`` is the root: paths, whole-object writes, ``store.json`` (``radio_dist.store.records``), the
manifest, and the shards' arrays read straight from their chunk files (``radio_dist.store.chunks``).
A shard is visible only through its manifest part, so a crash at any moment leaves only whole, committed
shards visible; a shard directory without a manifest part is an orphan that readers never touch. Shard ids
are derived from the image ids they hold, so a retried write (Ray tasks are at-least-once) targets the same
shard and is skipped once committed (``radio_dist.store.writer``).

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

import contextlib
import hashlib
import io
import json
import os
import uuid
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr
from pydantic import Field, ValidationError, field_validator

from radio_dist.config import StrictModel, format_validation_error
from radio_dist.phis import PhiS
from radio_dist.store.chunks import array_names
from radio_dist.store.codecs import Fidelity, TargetCodec, UnknownCodecError, get_codec, merge_fidelity
from radio_dist.store.errors import StoreError, StoreMismatchError
from radio_dist.store.manifest import (
    FIDELITY_KEY,
    REPLACES_KEY,
    SNAPSHOTS,
    ManifestView,
    array_key,
    gc_paused,
    scale_key,
    shard_of_part,
)
from radio_dist.store.preflight import check_object_store
from radio_dist.store.records import FORMAT, OutputShapes, PhisRecord, StoreMeta, TeacherRecord
from radio_dist.store.rows import ShardRowReader, open_rows
from radio_dist.store.views import ViewCodec, get_view_codec

# botocore retries for s3:// stores whose storage_options name none. "standard" retries throttling (503
# SlowDown), 5xx and connection errors with exponential backoff and jitter; botocore's default ("legacy", 4
# retries) gives up sooner under a burst of throttling. s3fs's own retries do not cover everything: a
# 503 on a HEAD has no body, so s3fs does not recognise it as SlowDown.
S3_RETRIES: dict[str, Any] = {"max_attempts": 10, "mode": "standard"}
# seconds botocore waits for one TCP connection (its default, 60, times 10 attempts hides an unreachable
# endpoint for minutes; the pre-flight check has already found the endpoint up)
S3_CONNECT_TIMEOUT_S = 10


class StoreConfig(StrictModel):
    url: str = Field(description="Store root: a local path or an fsspec URL (s3://bucket/prefix).")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options (S3 endpoint, credentials, ...)."
    )
    shard_size: int = Field(
        256, ge=1, description="Images per shard (aim for shards of ~100s of MB at scale)."
    )
    chunk_bytes: int = Field(1 << 20, ge=1, description="Target uncompressed bytes per Zarr chunk (>= 1 MB).")
    compact_fanout: int = Field(
        32,
        ge=0,
        description="Manifest objects a writer merges into one snapshot as it commits (radio_dist.store.compact: "
        "a store of N shards keeps about (F-1)·log_F N of them); 0 leaves compaction to `radio-dist store compact`.",
    )

    @field_validator("url")
    @classmethod
    def _url_ok(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("store url must not be empty")
        return v.rstrip("/") or "/"


class FeatureStore:
    """Reader/writer of one store root. Cheap to construct and picklable (sent to Ray tasks)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/") or "/"
        self.storage_options = dict(storage_options or {})
        self._fs: fsspec.AbstractFileSystem | None = None
        self._covered: tuple[tuple[str, ...], set[str]] | None = None  # committed shards, by snapshot names

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
            opts = self.fs_options()
            fs, root = fsspec.core.url_to_fs(self.url, **opts)
            if self.is_s3:  # reachable, credentials, bucket: told in a line within a bound (once a process)
                check_object_store(fs, self.url, root, opts)
            self._root = root
            self._fs = fs
        return self._fs

    def fs_options(self) -> dict[str, Any]:
        """The fsspec options in effect: ``storage_options``, plus ``S3_RETRIES`` on s3:// if none given."""
        opts = dict(self.storage_options)
        if self.is_s3:
            config = dict(opts.get("config_kwargs") or {})
            config.setdefault("retries", dict(S3_RETRIES))
            config.setdefault("connect_timeout", S3_CONNECT_TIMEOUT_S)
            opts["config_kwargs"] = config
        return opts

    @property
    def is_s3(self) -> bool:
        return self.url.startswith(("s3://", "s3a://"))

    @property
    def root(self) -> str:
        _ = self.fs
        return self._root

    @property
    def is_local(self) -> bool:
        return "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def fresh(self, path: str) -> str:
        """``path``, with any cached listing of it (and of its parents) dropped: others may have written."""
        self.fs.invalidate_cache(path)
        return path

    def exists(self) -> bool:
        return bool(self.fs.exists(self.fresh(self.path("store.json"))))

    # -- small atomic files ----------------------------------------------------------------------------------
    def put_atomic(self, rel: str, data: bytes) -> None:
        """Write a whole object so readers see all of it or none (rename locally; one PUT on object stores)."""
        path = self.path(rel)
        if self.is_local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except OSError as e:  # a full disk, say: leave no partial file, and name the one being written
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                if e.filename is None:
                    raise OSError(e.errno, e.strerror, path) from e
                raise
        else:  # one PUT of the whole object (a multipart upload above 100 MB is just as all-or-nothing)
            self.fs.pipe_file(path, data)

    def get(self, rel: str) -> bytes:
        return bytes(self.fs.cat_file(self.path(rel)))

    # -- metadata --------------------------------------------------------------------------------------------
    def meta(self) -> StoreMeta:
        """``store.json`` as typed records; a missing, unreadable or foreign file is a ``StoreError``."""
        if not self.exists():
            raise StoreError(
                f"{self.url} is not a radio-dist store (no store.json) — build one with "
                "`radio-dist cache-teachers --store URL`"
            )
        try:
            data = json.loads(self.get("store.json"))
        except ValueError as e:
            raise StoreError(
                f"{self.path('store.json')}: not valid JSON ({e}); run `radio-dist store verify`"
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise StoreError(f"{self.url}: unsupported store format {found!r} (expected {FORMAT})")
        try:
            return StoreMeta.model_validate(data)
        except ValidationError as e:
            raise StoreError(
                format_validation_error(e, self.path("store.json"), "store metadata")
                + "\n(written by another radio-dist version, or edited by hand: rebuild the store or restore the file)"
            ) from None

    def write_meta(self, meta: StoreMeta) -> None:
        blob = json.dumps(meta.model_dump(mode="json"), indent=1, sort_keys=True).encode()
        self.put_atomic("store.json", blob)

    def init_or_check(
        self,
        partitions: dict[str, int],
        teachers: dict[str, TeacherRecord],
        view_resample: str = "bilinear",
        view_codec: str = "raw",
    ) -> StoreMeta:
        """Create the store's metadata, or check an existing store matches this job (refuse otherwise).

        ``teachers`` maps name -> its record (fingerprint, family, spec); ``view_resample`` is how the job
        resamples canonical views (``source.resample``) and ``view_codec`` how it stores them
        (``pipeline.view_codec``): one store never mixes two.
        """
        if not self.exists():
            self.write_meta(
                StoreMeta(
                    partitions=partitions,
                    view_resample=view_resample,
                    view_codec=get_view_codec(view_codec).name,
                    teachers={k: v.model_copy() for k, v in teachers.items()},
                )
            )
            return self.meta()
        meta = self.meta()
        problems = []
        if meta.partitions != partitions:
            problems.append(f"partitions: store has {meta.partitions}, job asks for {partitions}")
        if meta.view_resample != view_resample:
            problems.append(
                f"source.resample: the store's views were resampled {meta.view_resample}, the job asks for "
                f"{view_resample} (set source.resample: {meta.view_resample} to add to this store)"
            )
        if meta.view_codec != get_view_codec(view_codec).name:
            problems.append(
                f"pipeline.view_codec: the store's views are stored {meta.view_codec}, the job asks for "
                f"{get_view_codec(view_codec).name} (set pipeline.view_codec: {meta.view_codec} to add to this store)"
            )
        have, want = set(meta.teachers), set(teachers)
        if have != want:
            problems.append(f"teachers: store has {sorted(have)}, job asks for {sorted(want)}")
        for name in sorted(have & want):
            a, b = meta.teachers[name].fingerprint, teachers[name].fingerprint
            if a != b:
                problems.append(
                    f"teacher {name!r}: fingerprint {a} in the store, {b} for the job "
                    "(its spec or weights changed)"
                )
            for p in sorted(set(meta.teachers[name].codecs) | set(teachers[name].codecs)):
                c_have, c_want = meta.teachers[name].codec_name(p), teachers[name].codec_name(p)
                if c_have != c_want:
                    problems.append(
                        f"teacher {name!r}, partition {p!r}: targets stored as {c_have}, the job asks for {c_want} "
                        f"(set codecs to {c_have} to add to this store, or write a new store from this one: "
                        f"`radio-dist store recode {self.url} NEW --codec {name}.{p}={c_want}`)"
                    )
        if problems:
            raise StoreMismatchError(
                f"store {self.url} was built with other settings than this job:\n  - "
                + "\n  - ".join(problems)
                + "\nUse a new --store, or run with the settings the store was built with."
            )
        return meta

    def save_phis(
        self,
        teacher: str,
        phis: PhiS,
        dispersion: float | None,
        outputs: dict[str, OutputShapes],
        fit_images: int,
    ) -> None:
        """Record a teacher's PHI-S parameters, summary dispersion and output shapes (before any commit)."""
        from safetensors.numpy import save

        blob = save({k: np.ascontiguousarray(v) for k, v in phis.to_arrays().items()})
        rel = f"phis/{teacher}.safetensors"
        self.put_atomic(rel, blob)
        meta = self.meta()
        record = meta.teachers[teacher]
        record.phis = PhisRecord(
            file=rel,
            sha256=hashlib.sha256(blob).hexdigest(),
            rotation=phis.rotation_kind,
            alpha=float(phis.alpha),
            fit_images=int(fit_images),
        )
        record.summary_dispersion = None if dispersion is None else float(dispersion)
        record.outputs = dict(outputs)
        self.write_meta(meta)

    def phis(self, teacher: str) -> PhiS:
        from safetensors.numpy import load

        record = self.meta().teachers.get(teacher)
        if record is None or record.phis is None:
            raise StoreError(f"{self.url}: no PHI-S parameters for teacher {teacher!r} yet")
        return PhiS.from_arrays(load(self.get(record.phis.file)))

    def view_codec(self, meta: StoreMeta | None = None) -> ViewCodec:
        """How the store's canonical views are stored (raw pixels, or encoded: ``radio_dist.store.views``)."""
        name = (meta or self.meta()).view_codec
        try:
            return get_view_codec(name)
        except ValueError as e:
            raise StoreError(f"{self.url}/store.json: {e} — written by a newer radio-dist?") from None

    def codec(self, teacher: str, partition: str, meta: StoreMeta | None = None) -> TargetCodec:
        """The codec of a teacher's stored dense targets at one partition; one this version does not know is a
        ``StoreError`` naming it."""
        meta = meta or self.meta()
        record = meta.teachers.get(teacher)
        if record is None:
            raise StoreError(
                f"{self.url}: no teacher {teacher!r} in this store (it has {sorted(meta.teachers)})"
            )
        try:
            return get_codec(record.codec_name(partition))
        except UnknownCodecError as e:
            raise StoreError(
                f"{self.path('store.json')}: teacher {teacher!r}, partition {partition!r}: {e} — the store was written "
                "by a newer radio-dist; read it with that version"
            ) from None

    def fidelity(self) -> dict[str, tuple[str, str, Fidelity]]:
        """``teacher/partition`` -> (codec, what it was measured against, Fidelity), merged over every commit."""
        return merge_fidelity(self.manifest_view(columns=["shard"]).metadata(FIDELITY_KEY))

    def has_phis(self) -> bool:
        return self.exists() and all(t.phis is not None for t in self.meta().teachers.values())

    # -- manifest --------------------------------------------------------------------------------------------
    def manifest_parts(self) -> list[str]:
        """Every manifest part (one per shard commit), also those a snapshot already holds."""
        self.fresh(self.path("manifest"))
        pattern = self.path("manifest", "*.parquet")
        return sorted(p for p in self.fs.glob(pattern) if ".tmp-" not in p)

    def snapshot_paths(self) -> list[str]:
        """Every manifest snapshot (``radio_dist.store.compact``), also those another one replaced."""
        self.fresh(self.path(SNAPSHOTS))
        pattern = self.path(SNAPSHOTS, "*.parquet")
        return sorted(p for p in self.fs.glob(pattern) if ".tmp-" not in p)

    def read_manifest_object(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """One snapshot or part, with its Parquet metadata; only ``columns`` are read (ranged reads remotely)."""
        try:
            if self.is_local:
                return pq.read_table(path, columns=columns)
            return pq.read_table(path, columns=columns, filesystem=self.fs)
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as e:
            if isinstance(e, PermissionError):
                raise
            raise StoreError(
                f"{path}: manifest object unreadable ({e}); run `radio-dist store verify`"
            ) from e

    def manifest_view(self, columns: list[str] | None = None, strict: bool = True) -> ManifestView:
        """The committed rows by the object holding them (see ``ManifestView``); ``strict=False`` records an
        unreadable object in ``problems`` instead of raising."""
        for attempt in range(5):
            try:
                return self._manifest_view(columns, strict)
            except FileNotFoundError:  # a compaction deleted what it merged after we listed: list again
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def _manifest_view(self, columns: list[str] | None, strict: bool) -> ManifestView:
        cols = None if columns is None else list(dict.fromkeys([*columns, "shard"]))
        view = ManifestView(columns=columns)

        def read(path: str, blob: bytes | None = None) -> pa.Table | None:
            try:
                if blob is None:
                    return self.read_manifest_object(path, cols)
                try:
                    return pq.read_table(io.BytesIO(blob), columns=cols)
                except (OSError, pa.ArrowException) as e:
                    raise StoreError(
                        f"{path}: manifest object unreadable ({e}); run `radio-dist store verify`"
                    ) from e
            except StoreError as e:
                if strict:
                    raise
                view.problems.append(str(e))
                return None

        snaps = self.snapshot_paths()
        tables = {p: t for p in snaps if (t := read(p)) is not None}
        replaced: set[str] = set()
        for t in tables.values():
            replaced.update(json.loads((t.schema.metadata or {}).get(REPLACES_KEY, b"[]")))
        for p in sorted(tables, reverse=True):  # the largest snapshot first
            if p.rsplit("/", 1)[-1] in replaced:
                view.redundant.append(p)
            else:
                view.objects.append((p, tables[p]))
        parts = self.manifest_parts()
        held_list = [False] * len(parts)
        if (
            view.objects and parts
        ):  # which parts' shards a snapshot holds (hashing the few parts, not the rows)
            names = pa.array([shard_of_part(p) for p in parts], pa.string())
            column = pa.chunked_array(
                [c for _, t in view.objects for c in t.column("shard").chunks], pa.string()
            )
            found = pc.unique(column.filter(pc.is_in(column, value_set=names)))
            held_list = pc.is_in(names, value_set=found).to_pylist()
        live = [p for p, h in zip(parts, held_list, strict=True) if not h]
        view.redundant.extend(p for p, h in zip(parts, held_list, strict=True) if h)
        blobs = self.fs.cat(live) if live else {}
        for p in live:
            if (t := read(p, blobs[p])) is not None:
                view.objects.append((p, t))
                view.part_shards.append(shard_of_part(p))
        return view

    def manifest(self, columns: list[str] | None = None) -> pa.Table:
        """All committed rows (of every live snapshot and part)."""
        return self.manifest_view(columns).table

    def committed_ids(self) -> set[str]:
        ids = self.manifest(columns=["id"]).column("id")
        with gc_paused():  # millions of strings: the cyclic collector would rescan them as they are made
            return set(ids.to_numpy().tolist())

    # -- shards ----------------------------------------------------------------------------------------------
    def zarr_store(self, shard: str) -> Any:
        if self.is_local:
            return zarr.storage.LocalStore(self.path("shards", shard))
        return zarr.storage.FsspecStore.from_url(
            f"{self.url}/shards/{shard}", storage_options=self.fs_options()
        )

    def is_committed(self, shard: str, snapshots: bool = True) -> bool:
        """Whether ``shard`` is committed: its part exists, or (``snapshots``) a snapshot holds it. The writer
        asks for its part only: a caching job never writes a shard whose images were committed before it
        started (it skips them), and the parts of shards it commits stay until it ends, when they are compacted
        — so a retried write still finds its first attempt's commit."""
        if self.fs.exists(self.fresh(self.path("manifest", f"{shard}.parquet"))):
            return True
        if not snapshots:
            return False
        names = tuple(self.snapshot_paths())
        if not names:
            return False
        if self._covered is None or self._covered[0] != names:  # snapshots are immutable: cached by name
            self._covered = (names, self.manifest_view(columns=["shard"]).shards)
        return shard in self._covered[1]

    def open_shard(self, shard: str) -> zarr.Group:
        # consolidated metadata (when the shard has it): one GET instead of a listing + one GET per node
        return zarr.open_group(self.zarr_store(shard), mode="r", zarr_format=3, use_consolidated=None)

    def open_rows(
        self,
        shard: str,
        names: list[str] | None = None,
        requests: int | None = None,
        direct: bool | None = None,
    ) -> ShardRowReader:
        """A reader of rows of ``names`` (default: every array) of a shard, into the caller's buffers: direct
        reads from the chunk files on a local file system, the chunk files fetched whole (concurrently) on an
        object store, ``requests`` at a time (``radio_dist.store.rows``). Close it when done (a context manager)."""
        where = f"{self.url}: shard {shard}"
        base = self.path("shards", shard)
        return open_rows(
            lambda: self.open_shard(shard), where, base, self.fs, self.is_local, names, requests, direct
        )

    def read_shard(self, shard: str, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays of one committed shard, as stored (uint8 images, float16 dense, float32 summary).

        Each array is read once into an array of its own (``open_rows``): with Zarr's own read path the bytes
        were copied and re-assembled at ~1/4 of their read rate."""
        if not self.is_committed(shard):
            raise StoreError(f"{self.url}: shard {shard} is not committed")
        with self.open_rows(shard, names) as rows:
            return {k: rows.read(k) for k in rows.arrays}

    def read_targets(
        self, shard: str, teacher: str, partition: str, space: str = "phis"
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(dense [N,h,w,C] float32, summary [N,C] float32 | None) of a shard, in PHI-S or teacher space."""
        if space not in {"phis", "teacher"}:
            raise ValueError(f"space must be 'phis' or 'teacher', got {space!r}")
        meta = self.meta()
        codec = self.codec(teacher, partition, meta)
        outputs = meta.teachers[teacher].outputs.get(partition)
        if outputs is None:
            raise StoreError(f"{self.url}: teacher {teacher!r} has no outputs for partition {partition!r}")
        dkey, skey = array_key(teacher, partition, "dense"), array_key(teacher, partition, "summary")
        group = self.open_shard(shard)
        names = set(array_names(group))
        wanted = [k for k in (dkey, scale_key(teacher, partition), skey) if k in names]
        if dkey not in names:
            raise StoreError(f"{self.url}: shard {shard} has no array {dkey}; run `radio-dist store verify`")
        arrays = self.read_shard(shard, wanted)
        scale = arrays.get(scale_key(teacher, partition))
        problem = codec_problem(codec, arrays[dkey], scale, tuple(outputs.dense))
        if problem:
            raise StoreError(f"{self.url}: shard {shard}, {dkey}: {problem}; run `radio-dist store verify`")
        dense = codec.decode_numpy(arrays[dkey], scale)
        summary = np.asarray(arrays[skey], dtype=np.float32) if skey in arrays else None
        if space == "teacher":
            dense = np.asarray(self.phis(teacher).inverse(dense), dtype=np.float32)
        else:
            dense = np.asarray(dense, dtype=np.float32)
        return dense, summary

    def shard_dirs(self) -> list[str]:
        base = self.fresh(self.path("shards"))
        if not self.fs.exists(base):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))

    def orphan_shards(self) -> list[str]:
        """Shard directories without a commit (left by interrupted writes; invisible to readers)."""
        return sorted(set(self.shard_dirs()) - self.manifest_view(columns=["shard"]).shards)

    def nbytes(self, rel: str = "") -> int:
        path = self.fresh(self.path(rel) if rel else self.root)
        return int(self.fs.du(path)) if self.fs.exists(path) else 0


def codec_problem(
    codec: TargetCodec, codes: np.ndarray, scale: np.ndarray | None, dense: tuple[int, ...]
) -> str | None:
    """What keeps stored codes and scales from decoding to targets of row shape ``dense`` (``[h, w, C]``):
    a wrong dtype or shape, or scales that do not match the codes; None when they fit."""
    if codes.dtype != codec.code_dtype:
        return f"codes are {codes.dtype}, codec {codec.name} stores {codec.code_dtype}"
    if tuple(codes.shape[1:]) != codec.code_shape(tuple(dense)):
        return f"codes have row shape {tuple(codes.shape[1:])}, {codec.code_shape(tuple(dense))} expected"
    if not codec.has_scale:
        return None
    if scale is None:
        return f"codec {codec.name} needs a scale array and there is none"
    if scale.dtype != np.float16:
        return f"scales are {scale.dtype}, float16 expected"
    want = (codes.shape[0], *(codec.scale_shape(tuple(dense)) or ()))
    if tuple(scale.shape) != want:
        return f"scale array has shape {tuple(scale.shape)}, the codes need {want} (codec {codec.name})"
    return None
