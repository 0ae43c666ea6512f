"""`radio-dist bench manifest`: what opening a store costs at 10 k … 1 M shards, by simulation.

A store's metadata is its manifest; every job start reads all of it. The benchmark writes manifests of N shards
with no arrays behind them — rows as a caching job writes them (32-hex ids, sources, geometry, checksums), laid
out as the compaction policy keeps them (``radio_dist.store.compact``: fewer than F objects per level, so for N
written in base F, digit d at level l is d snapshots of F^l shards; level 0 is loose parts) — and times, each
from a fresh ``FeatureStore``: opening it (``store.json``), reading its manifest, listing its committed ids
(what a caching job does first) and planning an epoch (``radio_dist.train.reader``: committed shards, then
``epoch_plan`` for 8 workers). Up to ``loose_up_to`` shards it also times the same store uncompacted (one part
per shard, as before compaction existed) and a `store compact` of it. Locally, or on an S3 server (``--s3``:
moto's on loopback, from the dev extra).
"""

from __future__ import annotations

import io
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from radio_dist.bench.loopback import loopback_s3
from radio_dist.store import FeatureStore, TeacherRecord
from radio_dist.store.compact import DEFAULT_FANOUT, compact_store
from radio_dist.store.manifest import MANIFEST_SCHEMA, REPLACES_KEY, SNAPSHOTS, snapshot_name

ProgressFn = Callable[[str], None]


def tiered_sizes(n_shards: int, fanout: int) -> list[int]:
    """Shards per manifest object of a store of ``n_shards`` as the compaction policy keeps it (largest first)."""
    sizes: list[int] = []
    n, unit = n_shards, 1
    while n:
        sizes.extend([unit] * (n % fanout))
        n //= fanout
        unit *= fanout
    return sorted(sizes, reverse=True)


def synthetic_rows(first_shard: int, n_shards: int, rows_per_shard: int) -> pa.Table:
    """Manifest rows of shards ``first_shard ..`` (ok rows, as a caching job commits them)."""
    n = n_shards * rows_per_shard
    shard_no = np.repeat(np.arange(first_shard, first_shard + n_shards), rows_per_shard)
    row_no = first_shard * rows_per_shard + np.arange(n)
    ids = [f"{i:032x}" for i in row_no.tolist()]
    shards = [f"{s:024x}" for s in shard_no.tolist()]
    index = np.tile(np.arange(rows_per_shard, dtype=np.int32), n_shards)
    return pa.table(
        {
            "id": ids,
            "source": [f"s3://photos/train/{i}.jpg" for i in ids],
            "view": pa.array([""] * n),
            "status": pa.array(["ok"] * n),
            "error": pa.nulls(n, pa.string()),
            "shard": shards,
            "index": index,
            "width": np.full(n, 1600, np.int32),
            "height": np.full(n, 1200, np.int32),
            "mode": pa.array(["RGB"] * n),
            "geometry": pa.array(['{"low": {"crop": [200, 0, 1400, 1200], "size": 432}}'] * n),
            "checksum": [i + i for i in ids],
            "committed_at": np.full(n, 1.7e9),
        },
        schema=MANIFEST_SCHEMA,
    )


def _parquet(table: pa.Table, metadata: dict[bytes, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(metadata) if metadata else table, buf)
    return buf.getvalue()


def write_manifest(
    store: FeatureStore, n_shards: int, rows_per_shard: int, fanout: int, compacted: bool
) -> int:
    """A store of ``n_shards`` shards' manifest and no arrays; returns the objects written."""
    store.init_or_check({"low": 432}, {"t": TeacherRecord(fingerprint="fp-t", family="synthetic", spec={})})
    sizes = tiered_sizes(n_shards, fanout) if compacted else [1] * n_shards
    if store.is_local:
        store.fs.makedirs(store.path(SNAPSHOTS), exist_ok=True)
    first = 0
    for size in sizes:
        table = synthetic_rows(first, size, rows_per_shard)
        first += size
        if size == 1:  # a loose part (level 0)
            shard = table.column("shard")[0].as_py()
            store.fs.pipe_file(store.path("manifest", f"{shard}.parquet"), _parquet(table))
        else:
            shards = sorted(set(table.column("shard").to_pylist()))
            blob = _parquet(table, {REPLACES_KEY: b"[]"})
            store.fs.pipe_file(store.path(SNAPSHOTS, snapshot_name(shards)), blob)
    return len(sizes)


def time_open(url: str, storage_options: dict[str, Any] | None, workers: int = 8) -> dict[str, float]:
    """Seconds to open the store, read its manifest, list its committed ids and plan an epoch (each fresh)."""
    from radio_dist.train.reader import committed_shards, epoch_plan

    out: dict[str, float] = {}
    t0 = time.perf_counter()
    store = FeatureStore(url, storage_options)
    store.meta()
    out["open_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    view = store.manifest_view(columns=["id", "shard", "index", "status"])
    out["manifest_read_s"] = time.perf_counter() - t0
    out["objects"] = len(view.objects)
    t0 = time.perf_counter()
    ids = FeatureStore(url, storage_options).committed_ids()
    out["committed_ids_s"] = time.perf_counter() - t0
    out["rows"] = len(ids)
    del ids, view
    t0 = time.perf_counter()
    shards = committed_shards(FeatureStore(url, storage_options))
    plans = epoch_plan(shards, epoch=0, seed=0, num_workers=workers, batch_size=256, shuffle_shards=4)
    out["plan_epoch_s"] = time.perf_counter() - t0
    out["planned_samples"] = sum(len(p.samples) for p in plans)
    return out


def run_manifest_bench(
    shards: list[int],
    rows_per_shard: int = 4,
    fanout: int = DEFAULT_FANOUT,
    loose_up_to: int = 10_000,
    s3: bool = False,
    workdir: Path | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-manifest-", dir=workdir))
    results: list[dict[str, Any]] = []
    try:
        with loopback_s3("bench manifest --s3") if s3 else _local(tmp) as (base, options):
            for n in shards:
                layouts = [("compacted", True)] + (
                    [("one part per shard", False)] if n <= loose_up_to else []
                )
                for name, compacted in layouts:
                    url = f"{base}/n{n}-{'c' if compacted else 'p'}"
                    if progress:
                        progress(f"{n} shards, {name}: writing the manifest")
                    store = FeatureStore(url, options)
                    t0 = time.perf_counter()
                    objects = write_manifest(store, n, rows_per_shard, fanout, compacted)
                    write_s = time.perf_counter() - t0
                    if progress:
                        progress(f"{n} shards, {name}: {objects} objects written in {write_s:.1f} s; timing")
                    row: dict[str, Any] = {"shards": n, "layout": name, "objects_written": objects}
                    row.update(time_open(url, options))
                    if not compacted:
                        t0 = time.perf_counter()
                        summary = compact_store(FeatureStore(url, options), fanout=fanout)
                        row["compact_s"] = time.perf_counter() - t0
                        row["objects_after_compact"] = summary.objects_after
                    results.append(row)
                    if not s3:
                        shutil.rmtree(store.root, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "backend": "s3 (moto on loopback)" if s3 else "local disk",
        "rows_per_shard": rows_per_shard,
        "fanout": fanout,
        "results": results,
    }


@contextmanager
def _local(tmp: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    yield str(tmp), {}


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"manifest at scale ({report['backend']}, {report['rows_per_shard']} rows per shard, fanout {report['fanout']})",
        f"{'shards':>8} {'layout':<19} {'objects':>7} {'open':>6} {'read':>7} {'ids':>7} {'plan':>7} {'compact':>8}",
    ]
    for r in report["results"]:
        compact = f"{r['compact_s']:7.1f}s" if "compact_s" in r else ""
        lines.append(
            f"{r['shards']:>8} {r['layout']:<19} {r['objects']:>7} {r['open_s']:5.2f}s {r['manifest_read_s']:6.2f}s "
            f"{r['committed_ids_s']:6.2f}s {r['plan_epoch_s']:6.2f}s {compact:>8}"
        )
    return "\n".join(lines) + "\n"
