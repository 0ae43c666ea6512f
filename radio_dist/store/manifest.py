"""What names what in a store: array keys, shard ids, the manifest's schema and the rows' checksums.

A shard's commit is its manifest part (``manifest/<shard>.parquet``, ``MANIFEST_SCHEMA``): one row per input
(ok or error), naming the shard, the row's index in the shard's arrays and a checksum over the row's slices of
every array. Shard ids are derived from the image ids they hold, so a retried write targets the same shard.

Parts are compacted into snapshots (``manifest/snapshots/<n shards>-<digest>.parquet``, same schema; see
``radio_dist.store.compact``): a snapshot holds the rows of many shards, so opening a store reads a few dozen
objects instead of one per shard. A part whose shard a snapshot holds, and a snapshot another one names in
its ``REPLACES_KEY`` metadata, are redundant — left by a compaction that stopped before deleting what it
merged — and readers skip them.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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


def array_key(teacher: str, partition: str, kind: str) -> str:
    return f"{teacher}/{partition}/{kind}"


def scale_key(teacher: str, partition: str) -> str:
    """The scales of a quantized codec, beside ``T/P/dense`` (its codes)."""
    return f"{teacher}/{partition}/dense_scale"


FIDELITY_KEY = (
    b"radio_dist.fidelity"  # manifest part metadata: the fidelity of the shard's targets as written
)


SNAPSHOTS = "manifest/snapshots"  # compacted manifest objects, relative to the store root
REPLACES_KEY = b"radio_dist.replaces"  # snapshot metadata: JSON list of the snapshot names it merged


def snapshot_name(shards: Iterable[str]) -> str:
    """A snapshot's file name: how many shards it holds (zero-padded, so names sort by size) and their digest."""
    shards = list(shards)
    return f"{len(shards):010d}-{shard_id_for(shards)}.parquet"


def snapshot_size(path: str) -> int:
    """How many shards a snapshot holds, from its name (no read)."""
    name = path.rsplit("/", 1)[-1]
    try:
        return int(name.split("-", 1)[0])
    except ValueError:
        return 0


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


def shard_of_part(path: str) -> str:
    """Shard id of a manifest part path (``.../manifest/<shard>.parquet``)."""
    return path.rsplit("/", 1)[-1][: -len(".parquet")]


@dataclass
class ManifestView:
    """The committed rows, as the live manifest objects (snapshots, then parts no snapshot holds) hold them.

    ``redundant`` lists what a compaction merged but did not delete (readers skip it; compaction and
    ``store gc`` remove it); ``problems`` the objects that could not be read (``FeatureStore.manifest_view``
    with ``strict=False``, for ``store verify``)."""

    objects: list[tuple[str, pa.Table]] = field(default_factory=list)  # (path, rows) per live object
    redundant: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    columns: list[str] | None = None
    part_shards: list[str] = field(default_factory=list)  # the shards of the live parts

    @functools.cached_property
    def snapshot_shards(self) -> pa.Array:
        """The shards the live snapshots hold (unique)."""
        chunks = [c for p, t in self.objects if f"/{SNAPSHOTS}/" in p for c in t.column("shard").chunks]
        return pc.unique(pa.chunked_array(chunks, pa.string()))

    @functools.cached_property
    def shards(self) -> set[str]:
        """Every committed shard."""
        return set(self.snapshot_shards.to_numpy(zero_copy_only=False).tolist()) | set(self.part_shards)

    @property
    def snapshots(self) -> list[str]:
        return [p for p, _ in self.objects if f"/{SNAPSHOTS}/" in p]

    @property
    def parts(self) -> list[str]:
        return [p for p, _ in self.objects if f"/{SNAPSHOTS}/" not in p]

    @property
    def table(self) -> pa.Table:
        """All committed rows (the columns asked for)."""
        schema = (
            MANIFEST_SCHEMA
            if self.columns is None
            else MANIFEST_SCHEMA.empty_table().select(self.columns).schema
        )
        tables = [t if self.columns is None else t.select(self.columns) for _, t in self.objects]
        return (
            pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
            if tables
            else schema.empty_table()
        )

    def metadata(self, key: bytes) -> list[bytes]:
        """``key``'s value in each live object's Parquet metadata that has it."""
        return [v for _, t in self.objects if (v := (t.schema.metadata or {}).get(key)) is not None]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while millions of acyclic objects (ids, tuples of them) are made."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
