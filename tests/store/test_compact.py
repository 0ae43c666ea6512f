"""Manifest compaction: parts merged into snapshots keep every committed row exactly once, a compaction killed
at any moment changes no committed row, and every reader (training plan, verify, gc, recode, read_shard) sees
a compacted store as it saw the parts. Locally and on the loopback S3 server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from faultkit import TALLY, compacting, writer_context
from typer.testing import CliRunner

from radio_dist.bench.manifest import write_manifest
from radio_dist.cli import app
from radio_dist.store import FeatureStore, ShardWriter, find_garbage, verify_store
from radio_dist.store.codecs import NBINS, Fidelity, dump_fidelity
from radio_dist.store.compact import Compactor, compact_store, level
from radio_dist.store.manifest import FIDELITY_KEY, SNAPSHOTS
from radio_dist.testing import write_synthetic_store
from radio_dist.train.reader import committed_shards

runner = CliRunner()


def rows_of(store: FeatureStore) -> list[dict]:
    return sorted(store.manifest().to_pylist(), key=lambda r: r["id"])


def fidelity_of(store: FeatureStore) -> dict[str, tuple]:
    return {k: (c, a, f.tokens, f.summary()) for k, (c, a, f) in store.fidelity().items()}


def test_levels():
    assert [level(n, 4) for n in (1, 3, 4, 15, 16, 64, 65)] == [0, 0, 1, 1, 2, 3, 3]


def test_compaction_keeps_every_row_once_and_every_reader_agrees(tmp_path):
    url = str(tmp_path / "store")
    write_synthetic_store(url, [2, 3, 1] * 8, errors_per_shard=1)  # 24 parts, with error rows
    store = FeatureStore(url)
    before, shards, fid = rows_of(store), committed_shards(store), fidelity_of(store)
    assert fid
    assert len(store.manifest_parts()) == 24

    summary = compact_store(store, fanout=4)
    view = store.manifest_view()
    assert (len(view.snapshots), len(view.parts), view.redundant) == (1, 0, [])  # 24 level-0 parts: one merge
    assert (summary.objects_before, summary.objects_after, summary.deleted) == (24, 1, 24)
    assert store.manifest_parts() == []
    assert rows_of(store) == before and committed_shards(store) == shards and fidelity_of(store) == fid
    report = verify_store(store)
    assert report["ok"], report["problems"]
    assert report["rows"] == len(before) and report["shards"] == 24 and report["rows_checksummed"] > 0
    assert find_garbage(store).empty  # the compacted shards' data is not taken for orphans
    assert store.is_committed(shards[0].shard) and not store.is_committed("0" * 24)
    assert store.read_shard(shards[0].shard)["t1/low/dense"].shape[0] == len(shards[0].ids)

    info = json.loads(runner.invoke(app, ["store", "info", url, "--json"]).stdout)
    assert info["manifest"] == {"snapshots": 1, "parts": 0, "redundant": 0} and info["shards"] == 24
    # new commits land as parts beside the snapshot; --full folds them in
    add_shards(store, 3, "extra")
    assert len(store.manifest_view().parts) == 3
    res = runner.invoke(app, ["store", "compact", url, "--full", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["objects_after"] == 1
    assert len(rows_of(store)) == len(before) + 3 and verify_store(store)["ok"]


def add_shards(store: FeatureStore, n: int, prefix: str) -> None:
    """``n`` more one-row shards in a store ``write_synthetic_store`` made (copies of an existing row's data)."""
    arrays = store.read_shard(committed_shards(store)[0].shard)
    for k in range(n):
        iid = f"{prefix}-{k}"
        with ShardWriter(store, [iid]) as w:
            for name, a in arrays.items():
                w.add_array(name, a[:1])
            w.add_rows([{"id": iid, "source": iid, "view": "", "status": "ok"}])


def test_tiered_compaction_while_writing_bounds_the_objects_and_defers_deletion(tmp_path):
    """As a caching job does: a step every F commits, deletion deferred to the end. Objects stay under
    (F - 1) per level; until the end every merged part is still there (a retried write finds its commit)."""
    url = str(tmp_path / "store")
    write_synthetic_store(url, [1])
    store = FeatureStore(url)
    c = Compactor(store, fanout=3, defer_delete=True)
    for k in range(40):
        add_shards(store, 1, f"more{k}")
        c.step()
        live = store.manifest_view(columns=["shard"])
        n = len(live.objects)
        assert n <= 2 * (level(k + 2, 3) + 1), (k, n)
        assert len(store.manifest_parts()) == k + 2  # nothing deleted yet
    rows = rows_of(store)
    assert len(rows) == 41 and len({r["id"] for r in rows}) == 41
    view = store.manifest_view()
    assert (
        len(view.snapshots) >= 2 and view.redundant
    )  # chains of replaced snapshots are skipped, not read twice
    # a retried write of a compacted shard is skipped: its part is still there
    first = committed_shards(store)[0]
    arrays = store.read_shard(first.shard)
    with ShardWriter(store, list(first.ids)) as w:
        for name, a in arrays.items():
            w.add_array(name, a)
        w.add_rows([{"id": i, "source": i, "view": "", "status": "ok"} for i in first.ids])
    assert w.result is not None and w.result.skipped
    c.finish()
    assert store.manifest_view().redundant == [] and rows_of(store) == rows
    assert verify_store(store)["ok"] and find_garbage(store).empty


def test_what_an_interrupted_compaction_left_is_skipped_then_removed(tmp_path):
    url = str(tmp_path / "store")
    write_synthetic_store(url, [2])
    store = FeatureStore(url)
    c = Compactor(store, fanout=3, defer_delete=True)
    for k in range(8):  # parts merged 3 at a time, then the three snapshots into one; nothing deleted
        add_shards(store, 1, f"x{k}")
        c.step()
    before = rows_of(store)
    view = store.manifest_view()
    assert len(view.objects) == 1 and len(view.redundant) == 9 + 3
    assert rows_of(store) == before
    gc = runner.invoke(app, ["store", "gc", url, "--dry-run", "--json"])
    assert gc.exit_code == 0 and len(json.loads(gc.stdout)["redundant_manifest"]) == 12
    verify = runner.invoke(app, ["store", "verify", url])
    assert verify.exit_code == 0 and "12 redundant manifest object(s)" in verify.output
    assert compact_store(store, fanout=3).deleted == 12  # the next compaction removes them
    assert rows_of(store) == before and store.manifest_view().redundant == []


@pytest.mark.slow
@pytest.mark.faults
def test_sigkill_mid_compaction_changes_no_committed_row(tmp_path):
    """A `store compact` process killed at moments spread over its run: after every kill the committed rows
    are exactly those before; a rerun finishes the compaction. (A manifest of 600 parts with no arrays behind
    them, as `bench manifest` writes: compaction reads and writes only the manifest.)"""
    template = tmp_path / "template"
    write_manifest(FeatureStore(str(template)), 600, rows_per_shard=2, fanout=4, compacted=False)
    before = rows_of(FeatureStore(str(template)))
    ctx = writer_context()

    def run(url: str, kill_after: float | None = None, at_snapshot: bool = False) -> float:
        """Run a compaction; kill it ``kill_after`` s after it started, or as soon as its snapshot exists
        (the window between a snapshot's commit and the deletion of what it merged: milliseconds)."""
        started = ctx.Event()
        proc = ctx.Process(target=compacting, args=(url, 4, started))
        proc.start()
        assert started.wait(60)
        t0 = time.perf_counter()
        if at_snapshot:
            snaps = Path(url) / SNAPSHOTS
            while proc.is_alive() and not any(
                ".tmp-" not in p.name for p in (snaps.iterdir() if snaps.is_dir() else [])
            ):
                time.sleep(0.0005)
            kill_after = 0.0
        proc.join(timeout=kill_after)
        if kill_after is not None and proc.exitcode is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        return time.perf_counter() - t0

    whole = run(str(shutil.copytree(template, tmp_path / "timed")))
    interrupted = 0
    kills: list[tuple[float | None, bool]] = [(whole * f, False) for f in (0.2, 0.5, 0.8, 0.95)]
    kills += [(None, True)] * 4
    for k, (after, at_snapshot) in enumerate(kills):
        url = str(shutil.copytree(template, tmp_path / f"kill{k}"))
        run(url, after, at_snapshot)
        store = FeatureStore(url)
        view = store.manifest_view()
        interrupted += bool(view.redundant)
        assert rows_of(store) == before, f"kill {k}: {after} s / at the snapshot: {at_snapshot}"
        run(url)
        view = store.manifest_view()
        assert (len(view.objects), view.redundant) == (1, []) and rows_of(store) == before
        assert find_garbage(store).redundant_manifest == [] and not find_garbage(store).temp_files
    TALLY.record("compaction SIGKILLed", len(kills), len(before) * len(kills))
    assert interrupted >= 1, (
        f"no kill landed between a snapshot and its deletions (a run takes {whole:.2f} s)"
    )


def test_a_compacted_store_is_recoded_with_its_fidelity(tmp_path):
    """recode reads shards from snapshots; the fidelity DST records sums to SRC's (unchanged codec)."""
    from radio_dist.store.recode import recode_store

    src = FeatureStore(str(tmp_path / "src"))
    write_synthetic_store(src.url, [2] * 6)
    # give every part a fidelity record, as a caching job writes it
    for k, p in enumerate(src.manifest_parts()):
        t = pq.read_table(p)
        hist = np.zeros(NBINS, np.int64)
        hist[-1 - k] = 8
        fid = Fidelity(tokens=8, sq_err=0.01 * (k + 1), sq_ref=8.0, cos_sum=7.99 - 0.01 * k, hist=hist)
        blob = dump_fidelity({"t1/low": ("fp16", "float", fid)})
        pq.write_table(t.replace_schema_metadata({FIDELITY_KEY: blob}), p)

    want = fidelity_of(src)["t1/low"]
    assert want[2] == 48
    compact_store(src, fanout=2)
    assert src.manifest_parts() == [] and fidelity_of(src)["t1/low"] == want
    dst = FeatureStore(str(tmp_path / "dst"))
    recode_store(src, dst, {("t1", "low"): "fp16", ("t2", "low"): "int8"})
    same = [{k: v for k, v in r.items() if k not in ("checksum", "committed_at")} for r in rows_of(src)]
    assert [
        {k: v for k, v in r.items() if k not in ("checksum", "committed_at")} for r in rows_of(dst)
    ] == same
    assert fidelity_of(dst)["t1/low"] == want  # carried over once, not once per shard
    assert verify_store(dst)["ok"]


@pytest.mark.slow
def test_compaction_on_s3(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)  # write_synthetic_store takes a URL only
    url = s3_server.url("compact")
    write_synthetic_store(url, [2, 1] * 6)
    store = FeatureStore(url)
    before = rows_of(store)
    compact_store(store, fanout=4)
    view = store.manifest_view()
    assert (len(view.snapshots), len(view.parts), view.redundant) == (1, 0, [])
    assert store.fs.glob(store.path(SNAPSHOTS, "*.parquet"))
    assert rows_of(store) == before and verify_store(store)["ok"]
    shard = committed_shards(store)[0]
    assert store.read_shard(shard.shard)["t1/low/dense"].shape[0] == len(shard.ids)
