"""Stores and sources on S3, against a real S3-compatible server on loopback (conftest ``s3_server``).

Faults are real too: ``tests/s3faults.py`` is an HTTP proxy in front of the server that answers 503
SlowDown and drops connections (before a request, after it was handled, half-way through a response);
a writer process is SIGKILLed while its commit is in flight. The store conformance suite runs on S3 in
tests/test_store.py (``TestS3Store``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pytest
from faultkit import TALLY
from fixtures import write_good_photos
from s3faults import FaultProxy
from synthetic import make_arrays, prepared, write

from radio_dist.cache.config import CacheJobConfig
from radio_dist.cache.pipeline import run_cache
from radio_dist.store import S3_RETRIES, FeatureStore, row_checksum, shard_id_for, verify_store
from radio_dist.store.feature_store import S3_CONNECT_TIMEOUT_S
from radio_dist.teacher import preset_spec


def test_endpoint_and_credentials_from_the_environment(s3_server, monkeypatch):
    """No storage_options at all: AWS_ENDPOINT_URL + AWS_ACCESS_KEY_ID/... reach s3fs (botocore reads them)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    store = prepared(FeatureStore(s3_server.url("env")))
    write(store, ["a", "b"])
    report = verify_store(store)
    assert report["ok"] and report["rows"] == 2, report
    assert store.storage_options == {}  # nothing came from options (but the store's retry defaults)
    assert store.fs_options() == {
        "config_kwargs": {"retries": S3_RETRIES, "connect_timeout": S3_CONNECT_TIMEOUT_S}
    }


@pytest.mark.faults
def test_faults_are_retried_and_lose_nothing(s3_server):
    """503s and dropped connections on every kind of request while shards are written, committed and read.

    Rows are checked end to end: every row is read back through the faulty proxy and its checksum
    compared with that of the data the writer was given; then verify_store checks the store as a whole.
    """
    n_shards, rows_per_shard = 8, 30
    expected: dict[str, str] = {}  # id -> checksum of the row as written
    for s in range(n_shards):
        arrays = make_arrays(rows_per_shard, seed=s)
        for k in range(rows_per_shard):
            expected[f"img{s}-{k}"] = row_checksum(arrays, k)
    url = s3_server.url("faults")
    with FaultProxy(s3_server.endpoint, p_503=0.08, p_drop=0.05, p_drop_body=0.08, seed=5) as proxy:
        # retried by botocore (the store's default S3_RETRIES: "standard" mode, exponential backoff with
        # jitter) and s3fs (SlowDown, dropped connections, short reads; exponential backoff)
        store = FeatureStore(url, s3_server.storage_options(proxy.endpoint))
        prepared(store)

        def write_shard(s: int) -> None:
            write(store, [f"img{s}-{k}" for k in range(rows_per_shard)], seed=s)

        def read_back(shard: str) -> list[tuple[str, str]]:
            data = store.read_shard(shard)
            return [(r["id"], row_checksum(data, r["index"])) for r in by_shard[shard]]

        with ThreadPoolExecutor(8) as pool:  # several writers / readers at once, as Ray tasks would be
            list(pool.map(write_shard, range(n_shards)))
            writing = proxy.faults
            by_shard: dict[str, list[dict]] = {}
            for r in store.manifest(columns=["id", "shard", "index"]).to_pylist():
                by_shard.setdefault(r["shard"], []).append(r)
            read = [row for rows in pool.map(read_back, sorted(by_shard)) for row in rows]
    got = dict(read)
    lost = sum(got.get(i) != c for i, c in expected.items())  # missing, or not the bytes written
    duplicated = len(read) - len(got)
    c = proxy.counts
    print(
        f"S3 faults: injected {proxy.faults} (503: {c['503']}, dropped: {proxy.dropped} = {c['drop_before']} "
        f"before / {c['drop_after']} after the request was handled / {c['drop_body']} mid-response; "
        f"{writing} while writing, {proxy.faults - writing} while reading) in {c['requests']} requests, "
        f"rows checked {len(read)}, lost {lost}, duplicated {duplicated}"
    )
    TALLY.record("S3 503 / dropped / cut-short responses", proxy.faults, len(read), lost, duplicated)
    assert lost == 0 and duplicated == 0
    assert len(read) == len(expected) == n_shards * rows_per_shard
    report = verify_store(FeatureStore(url, s3_server.storage_options()))  # straight to the server
    assert report["ok"] and report["rows"] == report["rows_checksummed"] == len(expected), report
    # the run must actually have been hit: throttling, and each way of dropping a connection
    assert proxy.counts["503"] >= 5 and proxy.dropped >= 5, proxy.counts
    assert min(proxy.counts[k] for k in ("drop_before", "drop_after", "drop_body")) >= 2, proxy.counts


WRITER = """
import sys
sys.path.insert(0, {tests!r})
from synthetic import prepared, write
from radio_dist.store import FeatureStore
store = prepared(FeatureStore({url!r}, {options!r}))
for ids in {shards!r}:
    write(store, ids)
    print("committed", flush=True)
"""


@pytest.mark.faults
def test_writer_killed_between_data_and_commit_leaves_nothing_visible(s3_server):
    """Another process commits shard a, then is SIGKILLed while shard b's data is on S3 and b's commit (the
    manifest PUT) is in flight: b stays invisible, a is seen by a store that had listed before; re-run."""
    url = s3_server.url("kill")
    ids_a, ids_b, ids_c = ([f"{x}-{k}" for k in range(8)] for x in "abc")
    store = prepared(FeatureStore(url, s3_server.storage_options()))
    write(store, ids_c)
    # listed here, so s3fs caches these listings: the store must not answer from that cache later
    assert len(store.manifest_parts()) == 1 and len(store.shard_dirs()) == 1
    commit_b = f"/manifest/{shard_id_for(ids_b)}.parquet"
    with FaultProxy(
        s3_server.endpoint, hold=lambda method, path: method == "PUT" and commit_b in path
    ) as proxy:
        code = WRITER.format(
            tests=str(Path(__file__).parents[1]),
            url=url,
            options=s3_server.storage_options(proxy.endpoint),
            shards=[ids_a, ids_b],
        )
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert proxy.held.wait(timeout=120), "the writer never reached its commit of shard b"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=60)
        proxy.release()  # the held commit is dropped, never forwarded: the writer died before it landed
    assert proc.returncode == -signal.SIGKILL and out.split() == ["committed"]  # shard a only
    assert store.committed_ids() == set(ids_a) | set(ids_c)
    assert store.orphan_shards() == [shard_id_for(ids_b)]  # b's data, uncommitted: readers never see it
    report = verify_store(store)
    assert report["ok"] and report["rows"] == 16 and report["notes"], report

    res = write(store, ids_b)  # the re-run commits shard b, once
    assert not res.skipped and store.orphan_shards() == []
    assert write(store, list(reversed(ids_b))).skipped  # a second re-run finds it committed
    report = verify_store(store)
    assert report["ok"] and report["rows"] == report["unique_ids"] == report["rows_checksummed"] == 24
    TALLY.record("writer SIGKILLed (s3)", 1, report["rows"])


def test_cache_teachers_from_s3_photos_into_s3_store(s3_server, ray_local, tmp_path):
    """The real pipeline on S3 both ends: photos under s3://bucket/.../photos/, the store on S3 too.

    Ray tasks and actors run in other processes: the endpoint reaches them inside the job config
    (SourceConfig / StoreConfig storage_options), the credentials through the AWS_* variables.
    """
    root, options = s3_server.url("pipeline"), s3_server.storage_options()
    photos = write_good_photos(tmp_path / "photos", 6, max_side=160)
    fs = fsspec.filesystem("s3", **options)
    fs.pipe({f"{root[len('s3://') :]}/photos/{p.name}": p.read_bytes() for p in photos})
    spec = preset_spec("mobilenet_v2")
    spec.runtime.batch_size = 4
    cfg = CacheJobConfig.model_validate(
        {
            "source": {"kind": "folder", "path": f"{root}/photos/", "storage_options": options},
            "teachers": [spec.model_dump(mode="json")],
            "store": {"url": f"{root}/store", "storage_options": options, "shard_size": 3},
            "pipeline": {"partitions": {"low": 64}},
            "phis": {"fit_images": 8},  # one phase: every image is in the PHI-S fit sample
        }
    )
    summary = run_cache(cfg)
    assert (summary.ok, summary.error, summary.skipped) == (6, 0, 0), summary.errors
    store = FeatureStore.from_config(cfg.store)
    report = verify_store(store)
    assert report["ok"], report["problems"]
    assert report["rows"] == report["rows_checksummed"] == 6 and store.orphan_shards() == []
    sources = sorted(r["source"] for r in store.manifest(columns=["source"]).to_pylist())
    assert sources == sorted(f"{root}/photos/{p.name}" for p in photos)
    again = run_cache(cfg)  # resuming on S3: a re-run finds every image committed, does nothing
    assert (again.skipped, again.ok, again.shards) == (6, 0, 0)


@pytest.mark.parametrize("rel", ["store.json", "manifest/x.parquet"])
def test_small_objects_are_single_puts(s3_server, rel):
    """Metadata and commits go up as one PUT each: nothing is streamed through open()/close()."""
    with FaultProxy(s3_server.endpoint) as proxy:  # no faults: a recording pass-through
        store = FeatureStore(s3_server.url("put"), s3_server.storage_options(proxy.endpoint))
        _ = store.fs  # the once-per-process pre-flight (endpoint, credentials, bucket) is not the write
        proxy.log.clear()
        store.put_atomic(rel, b"x" * 1000)
    assert len(proxy.log) == 1 and proxy.log[0][0] == "PUT" and proxy.log[0][1].endswith(rel), proxy.log
