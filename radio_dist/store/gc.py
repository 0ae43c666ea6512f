"""What interrupted writes leave in a store, and removing it: ``radio-dist store gc``.

Garbage is what no commit references and no reader sees: shard directories without a manifest part (a writer
killed between its data and its commit; on object stores also the objects of a failed upload), temporary
files (``*.tmp-*``: a write killed before its rename) and redundant manifest objects (what a compaction merged
and had not yet deleted: ``radio_dist.store.compact``). Removing it never touches committed data. A store that
a live job is writing is refused — its shard in progress looks exactly like an orphan — by taking the writer
lock for the removal, so no caching job can start meanwhile either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from radio_dist.store.feature_store import FeatureStore
from radio_dist.store.lock import LOCK_REL, WriterLock
from radio_dist.store.manifest import SNAPSHOTS

TEMP_MARK = ".tmp-"


@dataclass
class Garbage:
    """Orphan shard directories (by shard id), temporary files (store-relative paths) and their bytes."""

    orphan_shards: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    bytes: int = 0
    redundant_manifest: list[str] = field(default_factory=list)  # store-relative paths

    @property
    def empty(self) -> bool:
        return not self.orphan_shards and not self.temp_files and not self.redundant_manifest

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_garbage(store: FeatureStore) -> Garbage:
    """What ``collect_garbage`` would remove. Reads listings only, and not of the shards' data: temporary
    files come from the atomic writes of small files (``store.json``, ``phis/``, ``manifest/``, ...), which sit
    at the top level and one level below it."""
    view = store.manifest_view(columns=["shard"])
    orphans = sorted(set(store.shard_dirs()) - view.shards)
    total = sum(store.nbytes(f"shards/{s}") for s in orphans)
    root = store.root.rstrip("/")
    redundant = sorted(p[len(root) + 1 :] for p in view.redundant)
    total += sum(store.nbytes(rel) for rel in redundant)
    temps: list[str] = []
    folders = _top_dirs(store, root)
    if "manifest" in folders and store.fs.exists(store.fresh(store.path(SNAPSHOTS))):
        folders.append(SNAPSHOTS)
    for folder in ["", *folders]:
        base = f"{root}/{folder}" if folder else root
        for info in store.fs.ls(store.fresh(base), detail=True):
            name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            if info.get("type") == "file" and TEMP_MARK in name:
                temps.append(f"{folder}/{name}" if folder else name)
                total += int(info.get("size") or 0)
    return Garbage(orphans, sorted(temps), total, redundant)


def _top_dirs(store: FeatureStore, root: str) -> list[str]:
    """The store's top-level folders but the shards' data and the writer lock's (a live job's heartbeat
    writes a temporary file there)."""
    if not store.fs.exists(store.fresh(root)):
        return []
    skip = {"shards", LOCK_REL.split("/", 1)[0]}
    names = [
        str(i["name"]).rstrip("/").rsplit("/", 1)[-1]
        for i in store.fs.ls(root, detail=True)
        if i.get("type") == "directory"
    ]
    return sorted(n for n in names if n not in skip)


def collect_garbage(store: FeatureStore, dry_run: bool = False) -> dict[str, Any]:
    """Remove the store's garbage (or only list it, ``dry_run``); the writer lock is held while removing, so a
    store a live job writes is refused (``StoreLockedError``, naming the job)."""
    if dry_run:
        found = find_garbage(store)
        return {**found.as_dict(), "removed": False, "dry_run": True}
    with WriterLock(store, job="store gc"):
        found = find_garbage(store)
        for shard in found.orphan_shards:
            store.fs.rm(store.path("shards", shard), recursive=True)
        for rel in found.temp_files:
            store.fs.rm_file(store.path(rel))
        # smallest first, as a compaction deletes: a snapshot goes only after those it replaced
        for rel in sorted(found.redundant_manifest, key=lambda r: (SNAPSHOTS in r, r)):
            store.fs.rm_file(store.path(rel))
    return {**found.as_dict(), "removed": not found.empty, "dry_run": False}
