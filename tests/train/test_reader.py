"""The store reader: deterministic, balanced, resumable epoch plans and a prefetching shard stream."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from fixtures import fake_shards

from radio_dist.store import FeatureStore, array_key
from radio_dist.testing import write_synthetic_store
from radio_dist.train.reader import (
    ReaderConfig,
    ShardStream,
    committed_shards,
    epoch_plan,
    shards_digest,
)


@pytest.mark.parametrize("workers,batch", [(1, 7), (2, 5), (3, 16), (4, 1)])
def test_plan_covers_every_sample_exactly_once(workers, batch):
    shards = fake_shards([10, 3, 25, 8, 8, 1, 17])
    plans = epoch_plan(shards, epoch=3, seed=1, num_workers=workers, batch_size=batch, shuffle_shards=2)
    seen = Counter(s.id for p in plans for step in range(p.steps) for s in p.batch(step))
    assert set(seen) == {i for s in shards for i in s.ids}
    assert set(seen.values()) == {1}
    assert len({p.steps for p in plans}) == 1  # every worker has every step (lockstep collectives)
    # a worker reads only its own shards
    owners = [{s.shard for s in p.samples} for p in plans]
    for a in range(workers):
        for b in range(a + 1, workers):
            assert not owners[a] & owners[b]


def test_plan_is_deterministic_shuffled_and_balanced():
    shards = fake_shards([20] * 8)
    a = epoch_plan(shards, 0, seed=5, num_workers=2, batch_size=4, shuffle_shards=2)
    b = epoch_plan(shards, 0, seed=5, num_workers=2, batch_size=4, shuffle_shards=2)
    c = epoch_plan(shards, 1, seed=5, num_workers=2, batch_size=4, shuffle_shards=2)
    assert a == b
    assert [s.id for s in a[0].samples] != [s.id for s in c[0].samples]  # a new order each epoch
    assert [len(p.samples) for p in a] == [80, 80]
    # samples inside a window are mixed across its shards, not read shard by shard
    first = [s.shard for s in a[0].batch(0) + a[0].batch(1) + a[0].batch(2)]
    assert len(set(first)) == 2


def test_plan_windows_are_shuffled_when_read_whatever_the_order_of_access():
    """Each window's permutation is made on first access: reading batches backwards, or one sample deep in the
    epoch first, gives the very order a front-to-back read gives, and sample ranges match ``windows``."""
    shards = fake_shards([10, 3, 25, 8, 8, 1, 17, 12, 5])
    args = dict(epoch=2, seed=4, num_workers=2, batch_size=3, shuffle_shards=2)
    front = [list(p.samples) for p in epoch_plan(shards, **args)]
    for p, want in zip(epoch_plan(shards, **args), front, strict=True):
        assert p.samples[len(p.samples) - 2] == want[-2]  # deep first
        got = [p.batch(step) for step in reversed(range(p.steps))][::-1]
        assert [s for b in got for s in b] == want
        b = p.samples.bounds
        for k, window in enumerate(p.windows):
            assert {s.shard for s in want[b[k] : b[k + 1]]} == set(window)
            assert p.samples.window_of(int(b[k])) == k
    assert front != [list(p.samples) for p in epoch_plan(shards, **{**args, "epoch": 3})]


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        epoch_plan(fake_shards([3]), 0, 0, num_workers=1, batch_size=0, shuffle_shards=1)


def test_digest_changes_with_the_data():
    a = fake_shards([3, 4])
    assert shards_digest(a) == shards_digest(fake_shards([3, 4]))
    assert shards_digest(a) != shards_digest(fake_shards([3, 5]))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("ingest") / "store")
    layout = write_synthetic_store(url, [12, 9, 16, 5], errors_per_shard=1)
    return FeatureStore(url), layout


def test_committed_shards_lists_ok_rows_in_array_order(synthetic):
    store, layout = synthetic
    got = {s.shard: list(s.ids) for s in committed_shards(store)}
    assert got == layout  # error rows (the first id of each shard) never reach training


@pytest.mark.parametrize("start", [0, 3])
def test_stream_yields_the_planned_rows_with_their_data(synthetic, start):
    store, _ = synthetic
    shards = committed_shards(store)
    plan = epoch_plan(shards, 0, seed=2, num_workers=2, batch_size=4, shuffle_shards=2)[1]
    stream = ShardStream(
        store, plan, ["t1", "t2"], ["low"], lambda s: "low", ReaderConfig(), start_step=start
    )
    batches = list(stream)
    assert [b.step for b in batches] == list(range(start, plan.steps))
    for b in batches:
        planned = {s.id: s for s in plan.batch(b.step)}
        assert sorted(b.ids) == sorted(planned) and len(b.ids) == len(
            planned
        )  # the plan's members, once each
        assert b.images.shape == (len(b), 32, 32, 3) and b.images.dtype == np.uint8
        assert b.dense["t1"].dtype == np.float16 and b.dense["t1"].shape == (len(b), 2, 2, 8)
        for sid, d, smry in zip(
            b.ids, b.dense["t2"], b.summary["t2"], strict=True
        ):  # row k belongs to ids[k]
            s = planned[sid]
            got = store.read_shard(
                s.shard, [array_key("t2", "low", "dense"), array_key("t2", "low", "summary")]
            )
            np.testing.assert_array_equal(d, got[array_key("t2", "low", "dense")][s.index])
            np.testing.assert_array_equal(smry, got[array_key("t2", "low", "summary")][s.index])


def test_a_windows_batches_read_together_equal_batches_read_one_by_one(synthetic, monkeypatch):
    """Steps are read in groups that never cross a shuffle window (read_together_mb), and a group's batches
    are the batches read one at a time, array for array, with fewer reads of the chunk files (the reading
    call wrapped to count calls; it still reads)."""
    import os

    import radio_dist.store.rows as rows_module

    store, _ = synthetic
    shards = committed_shards(store)
    plan = epoch_plan(shards, 1, seed=4, num_workers=1, batch_size=3, shuffle_shards=2)[0]
    calls = Counter()
    real, real_iov = os.preadv, rows_module.preadv_iov

    def counted(fd, buffers, offset):
        calls[mode] += 1
        return real(fd, buffers, offset)

    def counted_iov(fd, iov, count, offset):
        calls[mode] += 1
        return real_iov(fd, iov, count, offset)

    monkeypatch.setattr(rows_module.os, "preadv", counted)
    monkeypatch.setattr(rows_module, "preadv_iov", counted_iov)
    got = {}
    for mode, mb in (("alone", 0), ("together", 256)):
        stream = ShardStream(
            store, plan, ["t1", "t2"], ["low"], lambda s: "low", ReaderConfig(read_together_mb=mb)
        )
        units = stream.units()
        assert [s for u in units for s in u] == list(range(plan.steps))
        window = [plan.samples.window_of(s * plan.batch_size) for s in range(plan.steps)]
        for u in units:  # one window's steps (by their first sample), one step each when read alone
            assert len({window[s] for s in u}) == 1 and (mb or len(u) == 1)
        got[mode] = list(stream)
    assert len(stream.units()) == len(plan.windows) < plan.steps
    assert calls["together"] < calls["alone"]
    for a, b in zip(got["alone"], got["together"], strict=True):
        assert a.step == b.step and a.ids == b.ids and a.ids
        np.testing.assert_array_equal(a.images, b.images)
        for t in ("t1", "t2"):
            np.testing.assert_array_equal(a.dense[t], b.dense[t])
            np.testing.assert_array_equal(a.summary[t], b.summary[t])


def test_two_groups_of_steps_are_read_at_once(synthetic, monkeypatch):
    """The next group of steps is read while the one before it still is (prefetch_batches smaller than a group
    would otherwise leave one group in flight and the reading threads' Python in series with the reads):
    the first group's read waits until a second has started (``_read_steps`` wrapped; it still reads)."""
    import threading

    store, _ = synthetic
    plan = epoch_plan(committed_shards(store), 0, seed=2, num_workers=1, batch_size=2, shuffle_shards=1)[0]
    second = threading.Event()
    started = []
    real = ShardStream._read_steps

    def read(self, steps, *args):
        started.append(steps)
        if len(started) == 1:
            assert second.wait(10), "no second group was read while the first was"
        else:
            second.set()
        return real(self, steps, *args)

    monkeypatch.setattr(ShardStream, "_read_steps", read)
    stream = ShardStream(
        store, plan, ["t1", "t2"], ["low"], lambda s: "low", ReaderConfig(prefetch_batches=1, read_threads=2)
    )
    units = stream.units()
    assert len(units) >= 2 and len(units[0]) >= 2  # groups of several steps, more than prefetch_batches
    got = [b.step for b in stream]
    assert got == list(range(plan.steps))
    assert started[:2] == units[:2]


def test_groups_with_two_partitions_and_rows_left_out_read_the_right_rows(tmp_path):
    """A window's batches read together when steps alternate between two partitions and the plan leaves rows
    out (a selection, as `train.views: one` makes): each batch holds exactly its planned rows, at its step's
    partition, equal to the shard's arrays — also where other steps' partition and the selection leave holes
    in the runs of rows that the merged reads take."""
    from radio_dist.testing import write_synthetic_store

    url = str(tmp_path / "two")
    write_synthetic_store(url, [9, 12, 7], px={"low": 32, "high": 48})
    store = FeatureStore(url)
    shards = committed_shards(store)
    keep = np.random.default_rng(5).random(sum(len(s.ids) for s in shards)) < 0.6
    plan = epoch_plan(shards, 0, seed=3, num_workers=1, batch_size=3, shuffle_shards=3, select=keep)[0]
    part = lambda step: ("low", "high")[step % 2]  # noqa: E731
    stream = ShardStream(store, plan, ["t1", "t2"], ["low", "high"], part, ReaderConfig())
    assert len(stream.units()) == 1  # one window: every step read together
    arrays = {sh.shard: store.read_shard(sh.shard) for sh in shards}
    seen = []
    for b in stream:
        p = part(b.step)
        assert b.partition == p and b.images.shape[1] == {"low": 32, "high": 48}[p]
        planned = {s.id: s for s in plan.batch(b.step)}
        assert sorted(b.ids) == sorted(planned)
        for i, sid in enumerate(b.ids):
            s = planned[sid]
            np.testing.assert_array_equal(b.images[i], arrays[s.shard][f"images/{p}"][s.index])
            np.testing.assert_array_equal(
                b.dense["t2"][i], arrays[s.shard][array_key("t2", p, "dense")][s.index]
            )
            np.testing.assert_array_equal(
                b.summary["t1"][i], arrays[s.shard][array_key("t1", p, "summary")][s.index]
            )
        seen.extend(b.ids)
    assert len(seen) == len(set(seen)) == int(keep.sum())


def test_encoded_views_are_decoded_for_every_batch_of_a_group(tmp_path):
    """A store whose views are stored as JPEG (pipeline.view_codec): each batch of a window read together gets
    its views decoded (on the decoding threads), equal to decoding the stored rows one by one."""
    from radio_dist.store.views import get_view_codec, views_of
    from radio_dist.testing import write_random_store

    url = str(tmp_path / "jpeg")
    write_random_store(url, [6, 7, 5], {"t": (2, 8, None)}, 32, view_codec="jpeg-90")
    store = FeatureStore(url)
    shards = committed_shards(store)
    plan = epoch_plan(shards, 0, seed=1, num_workers=1, batch_size=4, shuffle_shards=2)[0]
    stream = ShardStream(store, plan, ["t"], ["low"], lambda s: "low", ReaderConfig(read_threads=2))
    assert min(len(u) for u in stream.units()) > 1  # batches read together
    stored = {sh.shard: store.read_shard(sh.shard, ["images/low"])["images/low"] for sh in shards}
    seen = 0
    for b in stream:
        assert b.images.shape == (len(b), 32, 32, 3) and b.images.dtype == np.uint8
        by_id = {s.id: s for s in plan.batch(b.step)}
        for i, sid in enumerate(b.ids):
            s = by_id[sid]
            want = views_of(get_view_codec("jpeg-90"), stored[s.shard][s.index : s.index + 1], 32)[0]
            np.testing.assert_array_equal(b.images[i], want)
            seen += 1
    assert seen == len(plan.samples) == 18


def test_stream_gives_empty_batches_when_a_worker_runs_out(synthetic):
    store, _ = synthetic
    shards = committed_shards(store)
    plans = epoch_plan(shards, 0, seed=0, num_workers=3, batch_size=8, shuffle_shards=1)
    short = min(plans, key=lambda p: len(p.samples))
    batches = list(ShardStream(store, short, ["t1"], ["low"], lambda s: "low"))
    assert len(batches) == short.steps
    assert len(batches[-1]) == 0 and batches[-1].images.shape == (0, 32, 32, 3)
    assert sum(len(b) for b in batches) == len(short.samples)
