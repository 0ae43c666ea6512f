"""Store conformance: every backend subclasses ``StoreConformance`` and passes the same tests.

Here: the local-disk backend and S3 (a real S3-compatible server on loopback, see conftest ``s3_server``).
Crash safety is tested with a real writer process killed by SIGKILL (S3 faults: tests/test_s3.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from faultkit import TALLY, check_rows, expected_rows, resume_writing, writer_context
from synthetic import PARTS, TEACHERS, make_arrays, make_rows, prepared, write

from radio_dist.store import (
    FeatureStore,
    ShardWriter,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
    WriterLock,
    array_key,
    store_info,
    verify_store,
)
from radio_dist.store.chunks import plain_layout
from radio_dist.store.lock import LOCK_REL
from radio_dist.store.rows import Dest


class StoreConformance:
    """Subclasses provide a ``store`` fixture returning an empty FeatureStore of their backend."""

    def test_missing_store_is_a_clear_error(self, store):
        with pytest.raises(StoreError, match="not a radio-dist store"):
            store.meta()

    def test_meta_roundtrip_and_refusal(self, store):
        prepared(store)
        assert store.init_or_check(PARTS, TEACHERS).teachers["t1"].fingerprint == "f" * 32
        other = {"t1": TEACHERS["t1"].model_copy(update={"fingerprint": "0" * 32})}
        with pytest.raises(StoreMismatchError, match="teacher 't1': fingerprint f+ in the store"):
            store.init_or_check(PARTS, other)
        with pytest.raises(StoreMismatchError, match="partitions"):
            store.init_or_check({"low": 32}, TEACHERS)
        with pytest.raises(StoreMismatchError, match="teachers"):
            store.init_or_check(PARTS, {**TEACHERS, "t2": TEACHERS["t1"]})
        with pytest.raises(StoreMismatchError, match="resampled bilinear, the job asks for bicubic"):
            store.init_or_check(PARTS, TEACHERS, view_resample="bicubic")

    def test_a_store_from_before_the_resample_setting_holds_bicubic_views(self, store):
        """Stores written before ``source.resample`` existed were resampled with PIL's bicubic: a job with
        the new default is refused (no mixed views), one that asks for bicubic carries on."""
        prepared(store)
        old = json.loads(store.get("store.json"))
        del old["view_resample"]
        store.put_atomic("store.json", json.dumps(old).encode())
        with pytest.raises(StoreMismatchError, match="set source.resample: bicubic"):
            store.init_or_check(PARTS, TEACHERS)
        assert store.init_or_check(PARTS, TEACHERS, view_resample="bicubic").view_resample == "bicubic"
        assert "view_resample" not in json.loads(store.get("store.json"))  # checked, not rewritten

    def test_a_store_json_that_is_not_this_format_names_the_file(self, store):
        """store.json is read through typed records: an unknown key, a wrong type or broken JSON is an error
        that names the file and the key, not a KeyError somewhere in training."""
        prepared(store)
        good = json.loads(store.get("store.json"))
        bad = {**good, "teachers": {"t1": {**good["teachers"]["t1"], "fingerprnt": "x"}}}
        store.put_atomic("store.json", json.dumps(bad).encode())
        with pytest.raises(
            StoreError,
            match=r"(?s)store\.json: invalid store metadata.*teachers\.t1\.fingerprnt: unknown key",
        ):
            store.meta()
        store.put_atomic("store.json", json.dumps({**good, "partitions": {"low": "big"}}).encode())
        with pytest.raises(StoreError, match=r"partitions\.low"):
            store.meta()
        store.put_atomic("store.json", b'{"format": "radio-dist-store/1", ')
        with pytest.raises(StoreError, match="not valid JSON"):
            store.meta()

    def test_commit_read_roundtrip(self, store):
        prepared(store)
        res = write(store, ["a", "b", "c", "d"], errors=("c",))
        assert (res.n_ok, res.n_error, res.skipped) == (3, 1, False)
        man = store.manifest().to_pylist()
        assert sorted(r["id"] for r in man) == ["a", "b", "c", "d"]
        by_id = {r["id"]: r for r in man}
        assert (
            by_id["c"]["status"] == "error" and by_id["c"]["index"] == -1 and "broken" in by_id["c"]["error"]
        )
        assert [by_id[i]["index"] for i in "abd"] == [0, 1, 2]
        data = store.read_shard(res.shard)
        expect = make_arrays(3)
        for k, v in expect.items():
            np.testing.assert_array_equal(data[k], v)
            assert data[k].flags.writeable  # one chunk each: not the read-only bytes of the file
        dense, summ = store.read_targets(res.shard, "t1", "low")
        assert dense.dtype == np.float32 and summ.shape == (3, 8)
        teacher_space, _ = store.read_targets(res.shard, "t1", "low", space="teacher")
        np.testing.assert_allclose(
            teacher_space, store.phis("t1").inverse(dense.astype(np.float64)), rtol=1e-5, atol=1e-5
        )
        assert verify_store(store)["ok"]

    @staticmethod
    def chunked_shard(store, seed: int) -> tuple[str, dict[str, np.ndarray]]:
        """A committed shard of 7 rows in 100-byte chunks (64-byte dense rows, 2 per chunk): several chunks per
        array, a partial last chunk, and dense chunk 1 all zeros, so Zarr never writes it."""
        prepared(store)
        ids = [f"r{i}" for i in range(7)]
        arrays = make_arrays(7, seed=seed)
        arrays[array_key("t1", "low", "dense")][2:4] = 0
        with ShardWriter(store, ids, chunk_bytes=100) as w:
            for k, v in arrays.items():
                w.add_array(k, v)
            w.add_rows(make_rows(ids))
        assert w.result is not None
        return w.result.shard, arrays

    def test_chunk_files_read_directly_equal_zarr_reads(self, store):
        """read_shard reads this store's raw row chunks as files: the arrays equal Zarr's own reads, across
        several chunks per array, a partial last chunk, and a chunk Zarr never wrote (all fill value)."""
        shard, arrays = self.chunked_shard(store, seed=3)
        dense_key = array_key("t1", "low", "dense")
        group = store.open_shard(shard)
        for k, v in arrays.items():
            assert plain_layout(group[k]) is not None and group[k].chunks[0] < len(v)
        assert not store.fs.exists(store.path("shards", shard, dense_key, "c", "1", "0", "0", "0"))
        data = store.read_shard(shard)
        for k, v in arrays.items():
            np.testing.assert_array_equal(data[k], np.asarray(group[k][...]))
            np.testing.assert_array_equal(data[k], v)
            assert data[k].dtype == v.dtype and data[k].shape == v.shape and data[k].flags.writeable
        # a damaged chunk file is an error that names the array, never a silently short or shifted array
        chunk = store.path("shards", shard, dense_key, "c", "0", "0", "0", "0")
        store.fs.pipe(chunk, store.fs.cat(chunk)[:-2])
        with pytest.raises(StoreError, match=f"array {dense_key}: chunk 0 holds 126 bytes, 128 expected"):
            store.read_shard(shard)

    def test_rows_are_read_into_the_callers_buffer(self, store, expected_reader):
        """open_rows: any rows of any array into a caller's buffer — runs of consecutive rows, rows across chunk
        boundaries, the partial last chunk, a chunk Zarr never wrote — equal to the arrays as written. Local
        stores read each row with one preadv into place (or, asked, the arrays whole); object stores fetch the
        chunk files."""
        shard, arrays = self.chunked_shard(store, seed=5)
        dense_key = array_key("t1", "low", "dense")
        order = np.array([6, 0, 1, 2, 3, 4, 5, 5, 3, 1])  # runs, chunk edges, repeats, the last row
        for direct in (False, True):
            self.check_rows(store, shard, arrays, order, direct, expected_reader[direct])
        with pytest.raises(StoreError, match=f"shard {shard} has no array"):
            store.open_rows(shard, ["t9/low/dense"])
        # a chunk cut short is named when the shard is opened, before a row is read
        chunk = store.path("shards", shard, dense_key, "c", "2", "0", "0", "0")
        store.fs.pipe(chunk, store.fs.cat(chunk)[:-3])
        for direct in (False, True):
            with pytest.raises(
                StoreError, match=f"shard {shard}, array {dense_key}: chunk 2 holds 125 bytes"
            ):
                store.open_rows(shard, direct=direct)

    @staticmethod
    def check_rows(store, shard, arrays, order, direct, expected_reader):
        dense_key = array_key("t1", "low", "dense")
        with store.open_rows(shard, direct=direct) as rows:
            assert type(rows).__name__ == expected_reader and rows.length == 7
            assert set(rows.arrays) == set(arrays)
            for k, v in arrays.items():
                out = np.full((len(order), *v.shape[1:]), 77, v.dtype)
                rows.read_into(k, order, out)
                np.testing.assert_array_equal(out, v[order])
                half = np.empty((2, *v.shape[1:]), v.dtype)
                rows.read_into(k, [4, 1], half)
                np.testing.assert_array_equal(half, v[[4, 1]])
            with pytest.raises(ValueError, match="does not fit"):
                rows.read_into(dense_key, [0], np.empty((2, 1), np.float16))
            with pytest.raises(IndexError, match="rows 0..7 of 7"):
                rows.read_into(dense_key, [0, 7], np.empty((2, *arrays[dense_key].shape[1:]), np.float16))

    def test_exception_leaves_nothing_visible(self, store):
        prepared(store)
        with pytest.raises(RuntimeError):
            with ShardWriter(store, ["x", "y"]) as w:
                for k, v in make_arrays(2).items():
                    w.add_array(k, v)
                w.add_rows(make_rows(["x", "y"]))
                raise RuntimeError("crash before commit")
        assert store.committed_ids() == set()
        assert verify_store(store)["ok"]

    def test_failure_mid_upload_commits_nothing(self, store):
        """A write that fails after part of the shard's data is stored: no commit; a retry commits whole."""
        prepared(store)
        ids = ["p", "q"]
        with pytest.raises(ValueError, match="data type"):
            with ShardWriter(store, ids) as w:
                for k, v in make_arrays(2).items():
                    w.add_array(k, v)
                # zarr refuses object arrays: the commit fails after the arrays above were written
                w.add_array("t1/low/broken", np.array([[1], [2]], dtype=object))
                w.add_rows(make_rows(ids))
        assert store.committed_ids() == set()
        assert store.orphan_shards() == [w.shard]  # its data is there, invisible to readers
        report = verify_store(store)
        assert report["ok"] and report["rows"] == 0 and report["notes"], report
        res = write(store, ids)  # the retry writes the same shard over the orphan and commits it
        assert not res.skipped and res.shard == w.shard and store.orphan_shards() == []
        report = verify_store(store)
        assert report["ok"] and report["rows"] == report["rows_checksummed"] == 2, report

    def test_retried_write_is_idempotent(self, store):
        prepared(store)
        first = write(store, ["a", "b"])
        again = write(store, ["b", "a"])  # same ids, other order: same shard, already committed
        assert again.skipped and again.shard == first.shard
        assert store.manifest().num_rows == 2

    def test_verify_finds_duplicates_and_corruption(self, store):
        prepared(store)
        write(store, ["a", "b"])
        write(store, ["b", "c"], seed=1)
        report = verify_store(store)
        assert not report["ok"] and any("committed twice" in p for p in report["problems"])

    def test_verify_finds_bad_checksum(self, store):
        prepared(store)
        res = write(store, ["a", "b"])
        group = store.open_shard(res.shard)
        import zarr

        arr = zarr.open_array(store.zarr_store(res.shard), path=array_key("t1", "low", "summary"), mode="r+")
        arr[0, 0] = arr[0, 0] + 1.0
        del group
        report = verify_store(store)
        assert not report["ok"] and any("checksum mismatch" in p for p in report["problems"])

    def test_info(self, store):
        prepared(store)
        write(store, ["a", "b", "c"], errors=("b",))
        info = store_info(store)
        assert (info["rows_ok"], info["rows_error"], info["shards"]) == (2, 1, 1)
        assert info["teachers"]["t1"]["outputs"]["low"]["dense"] == [2, 2, 8]
        per_image = 16 * 16 * 3 + 2 * 2 * 8 * 2 + 8 * 4
        # data plus the shard's small Zarr metadata documents (a few kB per shard, shared by its rows;
        # the root document repeats the others: consolidated metadata, one GET to open a shard)
        shards = store.path("shards")
        meta_bytes = sum(
            int(store.fs.size(p)) for p in store.fs.find(shards) if p.rsplit("/", 1)[-1] == "zarr.json"
        )
        assert 0 < meta_bytes < 8192
        assert info["bytes_shards"] == 2 * per_image + meta_bytes
        assert info["bytes_per_image"] == (2 * per_image + meta_bytes) / 2

    def test_writer_lock_admits_one_job_and_takes_over_a_dead_one(self, store):
        import socket

        first = WriterLock(store, job="job-a").acquire()
        try:
            with pytest.raises(
                StoreLockedError, match=rf"another job-a: host {socket.gethostname()} pid {os.getpid()}"
            ):
                WriterLock(store, job="job-b").acquire()
        finally:
            first.release()
        assert WriterLock(store).holder() is None  # released: nothing left behind
        with WriterLock(store, job="job-b") as second:
            assert second.holder()["owner"] == second.owner
        # a holder that died on this host (its pid is gone) is taken over at once
        dead = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
        )
        pid = int(dead.stdout)
        lock = WriterLock(store)
        store.put_atomic(LOCK_REL, json.dumps({"owner": "x", "host": socket.gethostname(), "pid": pid,
                                                 "started": time.time(), "heartbeat": time.time()}).encode())  # fmt: skip
        with lock:
            assert lock.holder()["owner"] == lock.owner
        # another machine's lock: refused while its heartbeat is fresh, taken over once it expired
        other = {"owner": "y", "host": "elsewhere", "pid": 1, "started": time.time()}
        store.put_atomic(LOCK_REL, json.dumps({**other, "heartbeat": time.time()}).encode())
        with pytest.raises(StoreLockedError, match="host elsewhere"):
            WriterLock(store, ttl_s=60).acquire()
        store.put_atomic(LOCK_REL, json.dumps({**other, "heartbeat": time.time() - 61}).encode())
        with WriterLock(store, ttl_s=60) as taken:
            assert taken.holder()["owner"] == taken.owner


class TestLocalStore(StoreConformance):
    @pytest.fixture
    def store(self, tmp_path):
        return FeatureStore(str(tmp_path / "store"))

    @pytest.fixture
    def expected_reader(self):
        return {False: "FetchedRows", True: "LocalRows"}  # whole arrays, or row by row into place

    @pytest.mark.parametrize("vectored", [True, False])
    def test_several_batches_rows_merge_into_one_read_per_run(self, store, monkeypatch, vectored):
        """read_many: three batches' rows of one array (shuffled, one row twice, rows on both sides of chunk
        edges, a chunk Zarr never wrote) land where each batch wants them, equal to the array as written, with
        one read per run of consecutive rows in a chunk file — through the C library's preadv (iovecs built
        with numpy) and through os.preadv (a buffer per row). Reads are counted by wrapping each (a spy that
        still reads: the data checks go through the real call)."""
        import radio_dist.store.rows as rows_module

        if vectored and not rows_module.VECTORED:
            pytest.skip("this platform's C library has no preadv for ctypes")
        monkeypatch.setattr(rows_module, "VECTORED", vectored)
        shard, arrays = self.chunked_shard(store, seed=9)
        dense_key = array_key("t1", "low", "dense")  # 7 rows, 2 a chunk: chunks 0 1 2 3, chunk 1 not written
        calls: list[int] = []
        if vectored:
            real_iov = rows_module.preadv_iov

            def counted_iov(fd, iov, count, offset):
                calls.append(count)
                return real_iov(fd, iov, count, offset)

            monkeypatch.setattr(rows_module, "preadv_iov", counted_iov)
        else:
            real = os.preadv

            def counted(fd, buffers, offset):
                calls.append(len(buffers))
                return real(fd, buffers, offset)

            monkeypatch.setattr(rows_module.os, "preadv", counted)
        batches = [[5, 0, 3], [1, 6], [4, 2, 1]]
        v = arrays[dense_key]
        with store.open_rows(shard, [dense_key]) as rows:
            assert type(rows).__name__ == "LocalRows"
            outs = [np.full((len(b), *v.shape[1:]), 77, v.dtype) for b in batches]
            rows.read_many(dense_key, [(np.array(b), o) for b, o in zip(batches, outs, strict=True)])
            for b, o in zip(batches, outs, strict=True):
                np.testing.assert_array_equal(o, v[b])
            # chunk 0: rows 0 1 (and 1 again: a second run); chunk 1 is fill; chunk 2: rows 4 5; chunk 3: row 6
            assert calls == [2, 1, 2, 1]
            calls.clear()
            one = np.empty((2, *v.shape[1:]), v.dtype)
            rows.read_into(dense_key, [5, 4], one)  # one batch alone: consecutive rows still one read
            np.testing.assert_array_equal(one, v[[5, 4]])
            assert calls == [2]
            # indexes that point outside the rows or the buffers are refused before any read
            dest = Dest([one])
            for rows_, batch_, slot_ in (
                ([7], [0], [0]),
                ([0], [1], [0]),
                ([0], [0], [2]),
                ([0, 1], [0], [0]),
            ):
                with pytest.raises((IndexError, ValueError)):
                    rows.read_batches(dense_key, np.array(rows_), np.array(batch_), np.array(slot_), dest)
            assert calls == [2]
            # a buffer the reader may not write is refused before any read
            one.flags.writeable = False
            with pytest.raises(ValueError, match="writable"):
                rows.read_into(dense_key, [5, 4], one)
            one = np.empty_like(one)
            # a chunk file that shrank after it was opened is an error naming it, not a short batch
            os.truncate(store.path("shards", shard, dense_key, "c", "2", "0", "0", "0"), 100)
            with pytest.raises(StoreError, match=f"array {dense_key}: chunk 2 gave too few bytes"):
                rows.read_into(dense_key, [5, 4], one)
        with pytest.raises(StoreError, match="closed"):  # its files are let go: no read opens them again
            rows.read_into(dense_key, [0], one[:1])


class TestS3Store(StoreConformance):
    """The same contract on S3: endpoint from storage_options, credentials from the AWS_* variables."""

    @pytest.fixture
    def store(self, s3_server):
        return FeatureStore(s3_server.url("store"), s3_server.storage_options())

    @pytest.fixture
    def expected_reader(self):
        return {False: "FetchedRows", True: "FetchedRows"}


def test_a_job_that_stops_before_creating_its_store_leaves_no_folder_it_made(tmp_path):
    """The writer lock comes first (a second job is refused before anything): released with no store made, it
    removes the folders it created, and only those."""
    with WriterLock(FeatureStore(str(tmp_path / "new" / "store"))):
        assert (tmp_path / "new" / "store" / "locks").is_dir()
    assert (
        not (tmp_path / "new" / "store").exists() and (tmp_path / "new").is_dir()
    )  # the parent: not its own
    mine = tmp_path / "mine"
    mine.mkdir()
    with WriterLock(FeatureStore(str(mine))):
        pass
    assert mine.is_dir() and not list(mine.iterdir())  # the user's folder stays, without a locks/ in it
    store = prepared(FeatureStore(str(tmp_path / "real")))
    with WriterLock(store):
        pass
    assert (tmp_path / "real" / "locks").is_dir()  # a store that exists keeps its layout


@pytest.mark.faults
def test_sigkill_mid_write_leaves_only_whole_shards(tmp_path):
    """A writer killed at arbitrary moments never leaves a partial shard visible to readers; the resumed
    writer completes with every row once (the long version: tests/test_fault_corpus.py)."""
    url = str(tmp_path / "store")
    n_shards = 32
    ctx = writer_context()
    store = FeatureStore(url)
    for delay in (0.4, 0.9, 1.4):
        proc = ctx.Process(target=resume_writing, args=(url, None, n_shards))
        proc.start()
        proc.join(timeout=delay)
        assert proc.exitcode is None, "the writer finished before it was killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        if store.exists() and store.has_phis():
            report = verify_store(store)
            assert report["ok"], report["problems"]
            assert report["rows"] % 8 == 0  # shards are all-or-nothing
    proc = ctx.Process(target=resume_writing, args=(url, None, n_shards))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 0
    rows, lost, duplicated = check_rows(store, expected_rows(n_shards))
    TALLY.record("writer SIGKILLed (local)", 3, rows, lost, duplicated)
    assert (rows, lost, duplicated) == (8 * n_shards, 0, 0)


def test_layouts_this_store_does_not_write_are_read_through_zarr(tmp_path):
    """Compressed, big-endian or column-chunked arrays have no direct layout (Zarr reads them)."""
    import zarr

    g = zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=3)
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    plain = g.create_array("plain", shape=x.shape, dtype=x.dtype, chunks=(4, 4), compressors=None)
    gz = g.create_array(
        "gz", shape=x.shape, dtype=x.dtype, chunks=(4, 4), compressors=zarr.codecs.GzipCodec()
    )
    cols = g.create_array("cols", shape=x.shape, dtype=x.dtype, chunks=(4, 2), compressors=None)
    big = g.create_array(
        "big", shape=x.shape, dtype=x.dtype, chunks=(4, 4), compressors=None,
        serializer=zarr.codecs.BytesCodec(endian="big"),
    )  # fmt: skip
    layout = plain_layout(plain)
    assert layout is not None and layout.rows == 4
    assert [plain_layout(a) for a in (gz, cols, big)] == [None, None, None]
