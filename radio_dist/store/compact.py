"""Compacting the manifest: committed parts merged into snapshots, so that opening a store reads a few dozen
objects rather than one per shard (`radio-dist store compact`, and every caching job as it commits).

Policy (tiered): an object holding n shards is at level ``floor(log_F n)`` (a part, one shard: level 0).
When ``F`` (``fanout``) live objects share a level they are merged into one snapshot, which lands a level up.
A store of N shards then has fewer than F objects per level — at most ``(F - 1) * (log_F N + 1)`` in all
(F = 32: under 160 at a million shards) — and each row is rewritten about ``log_F N`` times. ``full=True``
merges every live object into one snapshot.

Crash safety. A snapshot is written whole (``put_atomic``) before anything it merged is deleted; until then
the merged objects are redundant (``ManifestView``): a part whose shard a snapshot holds is skipped by
readers, and so is a snapshot that another one names in its ``REPLACES_KEY``. Deletion goes from the
smallest object up, so a snapshot is never deleted before one it replaced (that one would come back). A
compaction killed at any point leaves the committed rows exactly as they were; the next one, or
`radio-dist store gc`, removes what it left.

A caching job compacts while it writes (it holds the writer lock, so nothing else compacts meanwhile) but
deletes the parts it merged only at its end: a Ray task retried after its shard was compacted must still find
its first attempt's commit (``FeatureStore.is_committed(snapshots=False)``).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from radio_dist.store.codecs import dump_fidelity, merge_fidelity
from radio_dist.store.feature_store import FeatureStore
from radio_dist.store.lock import WriterLock
from radio_dist.store.manifest import (
    FIDELITY_KEY,
    MANIFEST_SCHEMA,
    REPLACES_KEY,
    SNAPSHOTS,
    shard_of_part,
    snapshot_name,
    snapshot_size,
)

DEFAULT_FANOUT = 32


def level(n_shards: int, fanout: int) -> int:
    """``floor(log_fanout(n_shards))`` in integers (a part, or an empty snapshot: 0)."""
    lv = 0
    while n_shards >= fanout:
        n_shards //= fanout
        lv += 1
    return lv


@dataclass
class CompactSummary:
    objects_before: int = 0  # live manifest objects (snapshots + parts no snapshot holds) before
    objects_after: int = 0
    snapshots_written: int = 0
    objects_merged: int = 0
    rows_rewritten: int = 0
    deleted: int = 0  # redundant objects removed (merged ones, and what an interrupted compaction left)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_snapshot(path: str) -> bool:
    return f"/{SNAPSHOTS}/" in path


def _size(path: str) -> int:
    return snapshot_size(path) if _is_snapshot(path) else 1


class Compactor:
    """The manifest's live objects, tracked across compaction steps of one writer (the lock's holder).

    ``step()`` merges what the policy says and (unless ``defer_delete``) deletes what it merged; ``finish()``
    deletes what was deferred. Listing the parts is the only read a step makes when there is nothing to merge.
    """

    def __init__(self, store: FeatureStore, fanout: int = DEFAULT_FANOUT, defer_delete: bool = False) -> None:
        if fanout < 2:
            raise ValueError(f"compaction fanout must be >= 2, got {fanout}")
        self.store, self.fanout, self.defer_delete = store, fanout, defer_delete
        view = store.manifest_view(columns=["shard"])
        self.covered: set[str] = set()  # shards a live snapshot holds
        self.live: dict[str, int] = {}  # path -> shards it holds
        for path, table in view.objects:
            if _is_snapshot(path):
                self.covered.update(pc.unique(table.column("shard")).to_pylist())
                self.live[path] = snapshot_size(path)
            else:
                self.live[path] = 1
        self.pending: set[str] = set(view.redundant)  # to delete (smallest first)
        self.summary = CompactSummary(objects_before=len(self.live))

    def _refresh_parts(self) -> None:
        for p in self.store.manifest_parts():
            if p not in self.live and p not in self.pending:
                if shard_of_part(p) in self.covered:
                    self.pending.add(p)
                else:
                    self.live[p] = 1

    def step(self, full: bool = False) -> CompactSummary:
        """Merge per the policy (or everything, ``full``); returns the running summary."""
        t0 = time.perf_counter()
        self._refresh_parts()
        while True:
            if full:
                group = sorted(self.live) if len(self.live) > 1 else []
            else:
                by_level: dict[int, list[str]] = {}
                for p, n in self.live.items():
                    by_level.setdefault(level(n, self.fanout), []).append(p)
                full_levels = [lv for lv, ps in sorted(by_level.items()) if len(ps) >= self.fanout]
                group = sorted(by_level[full_levels[0]]) if full_levels else []
            if not group:
                break
            self._merge(group)
            if full:
                break
        if not self.defer_delete:
            self._delete()
        self.summary.objects_after = len(self.live)
        self.summary.seconds += time.perf_counter() - t0
        return self.summary

    def finish(self) -> CompactSummary:
        """Delete what the steps merged (the writer's job has ended: no retried task can look for it)."""
        t0 = time.perf_counter()
        self._delete()
        self.summary.seconds += time.perf_counter() - t0
        return self.summary

    def _merge(self, group: list[str]) -> None:
        store = self.store
        parts = [p for p in group if not _is_snapshot(p)]
        blobs = store.fs.cat(parts) if parts else {}
        tables = [
            pq.read_table(io.BytesIO(blobs[p])) if p in blobs else store.read_manifest_object(p)
            for p in group
        ]
        fidelity = merge_fidelity(
            [m[FIDELITY_KEY] for t in tables if FIDELITY_KEY in (m := t.schema.metadata or {})]
        )
        table = pa.concat_tables([t.replace_schema_metadata(None).cast(MANIFEST_SCHEMA) for t in tables])
        shards = pc.unique(table.column("shard")).to_pylist()
        replaces = sorted(p.rsplit("/", 1)[-1] for p in group if _is_snapshot(p))
        metadata = {REPLACES_KEY: json.dumps(replaces).encode()}
        if fidelity:
            metadata[FIDELITY_KEY] = dump_fidelity(fidelity)
        buf = io.BytesIO()
        pq.write_table(table.replace_schema_metadata(metadata), buf)
        name = snapshot_name(shards)
        store.put_atomic(f"{SNAPSHOTS}/{name}", buf.getvalue())  # durable before anything it merged goes
        for p in group:
            del self.live[p]
            self.pending.add(p)
        self.live[store.path(SNAPSHOTS, name)] = len(shards)
        self.covered.update(shards)
        self.summary.snapshots_written += 1
        self.summary.objects_merged += len(group)
        self.summary.rows_rewritten += table.num_rows

    def _delete(self) -> None:
        # smallest first: a snapshot goes only after every smaller one it may have replaced
        for p in sorted(self.pending, key=lambda p: (_size(p), p)):
            try:
                self.store.fs.rm_file(p)
            except FileNotFoundError:
                pass
            self.pending.discard(p)
            self.summary.deleted += 1


def compact_store(store: FeatureStore, fanout: int = DEFAULT_FANOUT, full: bool = False) -> CompactSummary:
    """`radio-dist store compact`: under the writer lock (a store a live job writes is refused)."""
    with WriterLock(store, job="store compact"):
        c = Compactor(store, fanout)
        return c.step(full=full)
