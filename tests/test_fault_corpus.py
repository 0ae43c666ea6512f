"""The fault corpus: many real faults at seeded random points, each followed by a resumed run, rows counted.

Writers SIGKILLed at random moments (local disk and the loopback S3 server), a real tmpfs filling up at
random points (root only), S3 answering 503, dropping connections and cutting responses short. After each
fault: only whole shards are visible, nothing committed before it changed or went missing; after the last,
a resumed writer completes and every id is committed exactly once with the bytes it was written with
(``faultkit.check_rows``). The tally (``faultkit.TALLY``) adds these to the other fault tests' counts.
"""

from __future__ import annotations

import errno
import os
import random
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
from faultkit import TALLY, can_mount, check_rows, expected_rows, resume_writing, tmpfs, writer_context
from s3faults import FaultProxy
from synthetic import plan, prepared, write, write_missing

from radio_dist.failures import explain
from radio_dist.store import (
    FeatureStore,
    WriterLock,
    collect_garbage,
    find_garbage,
    row_checksum,
    verify_store,
)

pytestmark = [pytest.mark.faults]


def committed(store: FeatureStore) -> dict[str, bytes]:
    """commit record (path) -> its bytes: what no later fault may change."""
    return {p: bytes(store.fs.cat_file(p)) for p in store.manifest_parts()}


@pytest.mark.slow  # ~40 s: a writer forked 17 / 9 times
@pytest.mark.parametrize("backend, kills, n_shards", [("local", 16, 128), ("s3", 8, 64)])
def test_writers_killed_at_random_points(backend, kills, n_shards, tmp_path, request):
    """SIGKILL a writer at a seeded random moment (in a shard's data, its commit, the lock, PHI-S ...), check
    what is visible, start it again; the last one completes."""
    if backend == "local":
        url, options = str(tmp_path / "store"), None
    else:
        server = request.getfixturevalue("s3_server")
        url, options = server.url("kills"), server.storage_options()
    # enough shards that the kills land before the writer is done, also on a faster machine (~80 ms a local
    # shard here, a kill every 0.4 s on average)
    rng = random.Random(17)
    ctx = writer_context()
    injected, before = 0, {}
    store = FeatureStore(url, options)
    while True:
        proc = ctx.Process(target=resume_writing, args=(url, options, n_shards))
        proc.start()
        if injected < kills:
            proc.join(timeout=rng.uniform(0.05, 0.8 if backend == "local" else 2.0))
        else:
            proc.join(timeout=240)
        if proc.exitcode is None:  # still writing: kill it wherever it is
            assert injected < kills, "the last writer did not finish"
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            injected += 1
            if store.exists() and store.has_phis():
                now = committed(store)
                assert {s: now[s] for s in before} == before  # nothing committed before was lost or changed
                report = verify_store(store)
                assert report["ok"], report["problems"]
                assert report["rows"] % 8 == 0  # whole shards only
                before = now
            continue
        assert proc.exitcode == 0, f"writer exited with {proc.exitcode}"
        break
    assert injected == kills, f"only {injected} of {kills} kills landed before the writer finished"
    left = find_garbage(store)  # what the kills left (a shard's data without its commit, a *.tmp-* file)
    collect_garbage(store)
    assert find_garbage(store).empty
    rows, lost, duplicated = check_rows(store, expected_rows(n_shards))
    print(
        f"{backend} writer SIGKILLed {injected} times: left {len(left.orphan_shards)} orphan shards and "
        f"{len(left.temp_files)} temporary files (removed by gc); rows checked {rows}, lost {lost}, "
        f"duplicated {duplicated}"
    )
    TALLY.record(f"writer SIGKILLed ({backend})", injected, rows, lost, duplicated)
    assert lost == 0 and duplicated == 0 and rows == 8 * n_shards


@pytest.mark.slow  # ~20 s
@pytest.mark.skipif(not can_mount(), reason="needs root to mount a size-limited tmpfs (the real fault)")
def test_disk_full_at_random_points(tmp_path):
    """The store's tmpfs fills up at a seeded random point (a filler file leaves 0 to ~2 shards' room): while
    the store is created, PHI-S saved, the lock taken, a shard's data or its commit written. Each time the
    error is ENOSPC naming a path in the store, explained as ``no-space``; no temporary file or partial shard
    is left; what was committed is unchanged; then the filler is removed and writing resumes."""
    faults, n_shards = 24, 96
    shards = plan(n_shards)
    rng = random.Random(23)
    points: dict[str, int] = {}
    with tmpfs(tmp_path / "mnt", "size=8m") as mnt:
        store = FeatureStore(str(mnt / "store"))
        filler = mnt / "filler"
        before: dict[str, bytes] = {}
        for _ in range(faults):
            st = os.statvfs(mnt)
            room = rng.randint(0, 96 * 1024)  # a shard here takes ~40 kB of tmpfs pages
            filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - room))
            with pytest.raises(OSError) as info:
                if not store.exists() or not store.has_phis():
                    prepared(store)
                with WriterLock(store):
                    write_missing(store, shards)
            e = info.value
            assert e.errno == errno.ENOSPC, e
            assert str(mnt / "store") in str(e.filename), "".join(__import__("traceback").format_exception(e))
            assert explain(e).kind == "no-space"
            where = os.path.relpath(str(e.filename), mnt / "store").split(os.sep)[0]
            points[where] = points.get(where, 0) + 1
            filler.unlink()
            if store.exists():
                garbage = find_garbage(store)
                assert garbage.empty, (garbage, "".join(__import__("traceback").format_exception(e)))
            if store.exists() and store.has_phis():
                now = committed(store)
                assert {s: now[s] for s in before} == before
                assert verify_store(store)["ok"]
                before = now
        with WriterLock(store):
            write_missing(store, shards)
        rows, lost, duplicated = check_rows(store, expected_rows(n_shards))
    print(f"disk full {faults} times at {points}: rows checked {rows}, lost {lost}, duplicated {duplicated}")
    TALLY.record("disk full (store writes)", faults, rows, lost, duplicated)
    assert lost == 0 and duplicated == 0 and rows == 8 * n_shards
    assert len(points) >= 2  # not always the same kind of write


@pytest.mark.slow  # ~30 s
def test_s3_responses_fail_at_random(s3_server):
    """503 SlowDown, connections dropped before or after the server handled a request, and responses cut
    short, on a fifth of all requests while 4 writers resume and 4 readers read every shard back."""
    n_shards = 24
    shards = plan(n_shards)
    url = s3_server.url("flaky")
    with FaultProxy(s3_server.endpoint, p_503=0.07, p_drop=0.07, p_drop_body=0.1, seed=29) as proxy:
        store = FeatureStore(url, s3_server.storage_options(proxy.endpoint))
        prepared(store)
        quarters = [range(i, n_shards, 4) for i in range(4)]

        def writer(part: range) -> None:
            for s in part:
                write(store, shards[s], seed=s)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(writer, quarters))
            rows = store.manifest(columns=["id", "shard", "index", "checksum"]).to_pylist()
            by_shard: dict[str, list[dict]] = {}
            for r in rows:
                by_shard.setdefault(r["shard"], []).append(r)
            data = dict(zip(sorted(by_shard), pool.map(store.read_shard, sorted(by_shard)), strict=True))
    mismatched = sum(row_checksum(data[r["shard"]], r["index"]) != r["checksum"] for r in rows)
    checked, lost, duplicated = check_rows(
        FeatureStore(url, s3_server.storage_options()), expected_rows(n_shards)
    )
    c = proxy.counts
    print(
        f"S3: injected {proxy.faults} (503: {c['503']}, dropped before {c['drop_before']} / after "
        f"{c['drop_after']} / mid-response {c['drop_body']}) in {c['requests']} requests; rows checked "
        f"{checked} (and read back through the faults: {len(rows)}, {mismatched} not as written), lost {lost}, "
        f"duplicated {duplicated}"
    )
    TALLY.record(
        "S3 503 / dropped / cut-short responses", proxy.faults, checked, lost + mismatched, duplicated
    )
    assert mismatched == 0 and lost == 0 and duplicated == 0 and checked == 8 * n_shards
    assert min(c[k] for k in ("503", "drop_before", "drop_after", "drop_body")) >= 3, c
