"""`radio-dist bench ingest`: the store reader against raw reads of the same bytes, and S students trained
together on one read per step against each trained alone (figures in the README)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch

from radio_dist.bench.fresh_process import in_fresh_process
from radio_dist.ray_setup import ALLOCATOR_ENV
from radio_dist.store import FeatureStore, StoreConfig
from radio_dist.testing import DEMO_TEACHERS, write_random_store
from radio_dist.train.config import DistillConfig, TrainConfig, default_students
from radio_dist.train.plan import prepare_run
from radio_dist.train.reader import ReaderConfig, ShardStream, committed_shards, epoch_plan
from radio_dist.train.step import StudentState, student_step, to_images
from radio_dist.train.transfer import to_device


def bench_ingest(
    store_url: str | None = None,
    images: int = 1024,
    shard_size: int = 256,
    batch_size: int = 32,
    steps: int = 6,
    students: list[Any] | None = None,
    workdir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``_bench_ingest`` in a fresh process with the allocator settings every Ray worker of a local instance
    gets (``ALLOCATOR_ENV``): the reader and the students run in Ray Train workers, and without them every
    batch-sized allocation page-faults (the raw read ran at ~3.5k samples/s instead of ~13k, the reader's
    figures moved by 2x between passes). Progress lines go to stderr from there."""
    log("measuring in a fresh process with the training workers' allocator settings ...")
    args = (store_url, images, shard_size, batch_size, steps, students, workdir)
    return dict(in_fresh_process(dict(ALLOCATOR_ENV), _bench_ingest, *args))


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _bench_ingest(
    store_url: str | None,
    images: int,
    shard_size: int,
    batch_size: int,
    steps: int,
    students: list[Any] | None,
    workdir: Path | None,
) -> dict[str, Any]:
    """Store reader vs raw reads of the same bytes, and S students trained together vs one by one
    (``bench_ingest``'s arguments; progress lines to stderr).

    - ``ratio``: samples/s that ``ShardStream`` delivers to a consumer (as torch tensors) over a whole epoch,
      divided by samples/s of reading the same shard files raw (fsspec ``cat`` + ``np.frombuffer``). Both read
      warm (a first pass fills the page cache), so this isolates the reader's own overhead.
    - ``multi_student_ratio``: wall time of ``steps`` steps training every student on each batch (one read per
      step), divided by the sum over students of ``steps`` steps training that student alone (its own read per
      step). ``multi_student_overhead``: the together time over the students' pure compute (no reading).
    """
    log = _log_stderr
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = tempfile.TemporaryDirectory(dir=workdir) if store_url is None else None
    if store_url is None:
        assert tmp is not None
        store_url = str(Path(tmp.name) / "store")
        n_shards = -(-images // shard_size)
        log(f"writing a {images}-image store with random targets shaped like the demo teachers' ...")
        write_random_store(
            store_url, [min(shard_size, images - i * shard_size) for i in range(n_shards)], DEMO_TEACHERS, 224
        )
    store = FeatureStore(store_url)
    meta = store.meta()
    teachers = sorted(meta.teachers)
    partition = sorted(meta.partitions)[0]
    shards = committed_shards(store)
    fs, root = fsspec.core.url_to_fs(store_url)
    files = [
        f for s in shards for f in fs.find(f"{root.rstrip('/')}/shards/{s.shard}") if "/c/" in f
    ]  # chunks
    rows = sum(len(s.ids) for s in shards)

    def raw_pass() -> tuple[float, int]:
        t0 = time.perf_counter()
        nbytes = 0
        for blob in fs.cat(files).values():
            nbytes += np.frombuffer(blob, dtype=np.uint8).size
        return time.perf_counter() - t0, nbytes

    def reader_pass() -> float:
        plan = epoch_plan(shards, 0, 0, 1, batch_size, 4)[0]
        t0 = time.perf_counter()
        n = 0
        for b in ShardStream(store, plan, teachers, [partition], lambda s: partition, ReaderConfig()):
            _ = torch.from_numpy(b.images), {t: torch.from_numpy(v) for t, v in b.dense.items()}
            n += len(b)
        assert n == rows
        return time.perf_counter() - t0

    raw_pass()  # warm the page cache for both
    raw_s, nbytes = min(raw_pass() for _ in range(2))
    reader_s = min(reader_pass() for _ in range(2))
    res: dict[str, Any] = {
        "rows": rows,
        "bytes_per_sample": nbytes / rows,
        "raw_samples_per_s": rows / raw_s,
        "raw_mb_per_s": nbytes / raw_s / 1e6,
        "reader_samples_per_s": rows / reader_s,
        "ratio": raw_s / reader_s,
    }
    log(f"reader {res['reader_samples_per_s']:.0f} samples/s vs raw {res['raw_samples_per_s']:.0f} samples/s")

    # -- S students together vs separately --------------------------------------------------------------------
    specs = students or default_students()
    train = TrainConfig(batch_size=batch_size)
    job = DistillConfig(  # the plan a distillation job of these students would train on (out is not written)
        store=StoreConfig(url=store_url),
        out="unused-by-bench",
        students=specs,
        train=train,
        partitions=[partition],
    )
    plan = prepare_run(job)
    px = int(meta.partitions[partition])
    device = torch.device("cpu")
    epoch = epoch_plan(shards, 0, 0, 1, batch_size, 4)[0]

    def train_steps(names: list[str], read: bool) -> tuple[float, float]:
        states = {s.name: StudentState(s, plan.heads, train, device) for s in specs if s.name in names}
        stream = iter(ShardStream(store, epoch, teachers, [partition], lambda s: partition, ReaderConfig()))
        cached = next(stream)
        compute = 0.0
        t0 = time.perf_counter()
        for step in range(steps + 1):  # step 0 warms up (allocations, first-call overheads); not timed
            if step == 1:
                t0, compute = time.perf_counter(), 0.0
            batch = next(stream) if read and step else cached
            c0 = time.perf_counter()
            on_device = to_device(batch, device)
            images = to_images(on_device.images, px)
            for i, st in enumerate(states.values()):
                rng = np.random.default_rng([step, i])
                student_step(st, images, on_device, plan, train, rng, train.lr, train.damp_sigma, device)
            compute += time.perf_counter() - c0
        return time.perf_counter() - t0, compute

    if epoch.steps < steps + 2:
        raise ValueError(f"the store has {rows} rows: too few for {steps + 2} steps of {batch_size}")
    names = [s.name for s in specs]
    together, _ = train_steps(names, read=True)
    separate = {}
    compute_only = {}
    for n in names:
        separate[n], _ = train_steps([n], read=True)
        _, compute_only[n] = train_steps([n], read=False)
    res.update(
        {
            "students": names,
            "batch_size": batch_size,
            "steps": steps,
            "together_step_s": together / steps,
            "separate_step_s": {n: v / steps for n, v in separate.items()},
            "compute_step_s": {n: v / steps for n, v in compute_only.items()},
            "multi_student_ratio": together / sum(separate.values()),
            "multi_student_overhead": together / sum(compute_only.values()),
        }
    )
    log(
        f"{len(names)} students together {together / steps:.2f} s/step vs separately "
        f"{sum(separate.values()) / steps:.2f} s/step (pure compute {sum(compute_only.values()) / steps:.2f})"
    )
    if tmp is not None:
        tmp.cleanup()
    return res
