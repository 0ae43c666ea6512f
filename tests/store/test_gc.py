"""`radio-dist store gc`: what interrupted writes left is listed by info/verify, removed by gc (never committed
data), and gc is refused while a job writes the store. Local and on the loopback S3 server."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from radio_dist.cli import app
from radio_dist.store import FeatureStore, StoreLockedError, WriterLock, collect_garbage, find_garbage
from radio_dist.testing import write_synthetic_store

runner = CliRunner()


def committed_state(store: FeatureStore) -> tuple[list, dict]:
    """The committed rows and every committed byte of shard data, to compare before and after gc."""
    rows = sorted(store.manifest().to_pylist(), key=lambda r: r["id"])
    data = {}
    for shard in {r["shard"] for r in rows}:
        base = store.path("shards", shard)
        data.update({p: store.fs.cat_file(p) for p in store.fs.find(base)})
    return rows, data


def test_gc_lists_then_removes_only_what_no_commit_references(tmp_path):
    url = str(tmp_path / "store")
    write_synthetic_store(url, [5, 4])
    store = FeatureStore(url)
    before = committed_state(store)
    # a writer killed between its data and its commit, and writes killed before their rename
    shard = store.manifest().column("shard").to_pylist()[0]
    shutil.copytree(tmp_path / "store" / "shards" / shard, tmp_path / "store" / "shards" / "deadbeef00")
    (tmp_path / "store" / "phis" / "t1.safetensors.tmp-1a2b").write_bytes(b"x" * 1000)
    (tmp_path / "store" / "manifest" / "deadbeef00.parquet.tmp-3c4d").write_bytes(b"y" * 10)
    (tmp_path / "store" / "store.json.tmp-5e6f").write_bytes(b"{")

    info = json.loads(runner.invoke(app, ["store", "info", url, "--json"]).stdout)
    assert (info["orphan_shards"], info["temp_files"]) == (1, 3) and info["garbage_bytes"] > 1010
    verify = runner.invoke(app, ["store", "verify", url])
    assert verify.exit_code == 0 and "store gc" in verify.output and "3 temporary file(s)" in verify.output

    dry = runner.invoke(app, ["store", "gc", url, "--dry-run"])
    assert dry.exit_code == 0 and "would remove uncommitted shard dir shards/deadbeef00" in dry.stdout
    assert (tmp_path / "store" / "shards" / "deadbeef00").is_dir()  # a dry run removes nothing

    res = runner.invoke(app, ["store", "gc", url, "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["removed"] and report["orphan_shards"] == ["deadbeef00"]
    assert sorted(report["temp_files"]) == [
        "manifest/deadbeef00.parquet.tmp-3c4d",
        "phis/t1.safetensors.tmp-1a2b",
        "store.json.tmp-5e6f",
    ]
    assert find_garbage(store).empty
    assert committed_state(store) == before  # committed rows and data untouched
    assert runner.invoke(app, ["store", "verify", url]).exit_code == 0
    assert "nothing to remove" in runner.invoke(app, ["store", "gc", url]).stdout
    assert not (tmp_path / "store" / "locks" / "writer.json").exists()  # gc's own lock released


def test_gc_is_refused_while_a_job_writes_the_store(tmp_path):
    url = str(tmp_path / "store")
    write_synthetic_store(url, [3])
    store = FeatureStore(url)
    (tmp_path / "store" / "shards" / "inprogress0").mkdir()  # what a live writer's shard looks like
    with WriterLock(store, job="cache-teachers"):
        with pytest.raises(StoreLockedError, match="being written by another cache-teachers"):
            collect_garbage(store)
        res = runner.invoke(app, ["store", "gc", url])
        assert res.exit_code == 2 and "being written by another cache-teachers" in res.output
        assert collect_garbage(store, dry_run=True)["orphan_shards"] == ["inprogress0"]  # listing is fine
    assert (tmp_path / "store" / "shards" / "inprogress0").is_dir()
    assert collect_garbage(store)["orphan_shards"] == ["inprogress0"]  # once the job is done
    assert not (tmp_path / "store" / "shards" / "inprogress0").exists()


def test_gc_on_an_object_store(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    url = s3_server.url("gc")
    write_synthetic_store(url, [4])
    store = FeatureStore(url)
    shard = store.manifest().column("shard").to_pylist()[0]
    store.fs.pipe(
        {
            store.path("shards", "orphan01", "zarr.json"): b"{}",
            store.path("shards", "orphan01", "a/c/0"): b"z",
        }
    )
    before = committed_state(store)
    found = find_garbage(store)
    assert found.orphan_shards == ["orphan01"] and found.bytes == 3
    report = collect_garbage(store)
    assert report["removed"] and not store.fs.exists(store.path("shards", "orphan01"))
    assert committed_state(store) == before and store.fs.exists(store.path("shards", shard))
