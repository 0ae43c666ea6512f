"""`radio-dist bench ingest`: the store reader against raw reads of the same bytes, and S students trained
together on one read per step against each trained alone (figures in the README)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radio_dist.bench.fresh_process import in_fresh_process
from radio_dist.bench.loopback import loopback_s3
from radio_dist.ray_setup import ALLOCATOR_ENV
from radio_dist.store import FeatureStore, StoreConfig
from radio_dist.testing import DEMO_TEACHERS, write_random_store
from radio_dist.train.config import DistillConfig, TrainConfig, default_students
from radio_dist.train.plan import prepare_run
from radio_dist.train.reader import ReaderConfig, ShardStream, committed_shards, epoch_plan
from radio_dist.train.step import StudentState, student_step, to_images
from radio_dist.train.transfer import to_device

# rows as large as C-RADIOv4's high partition: the grid at 1152 px of a SAM3-sized teacher (REFERENCE.md)
SCALE_TEACHER: dict[str, tuple[int, int, int | None]] = {"sam3": (72, 1024, None)}


def bench_ingest(
    store_url: str | None = None,
    images: int = 1024,
    shard_size: int = 64,
    batch_size: int = 32,
    steps: int = 6,
    students: list[Any] | None = None,
    workdir: Path | None = None,
    log: Callable[[str], None] = print,
    codecs: Sequence[str] = ("fp16",),
    s3: bool = False,
    s3_images: int = 256,
    repeats: int = 2,
    students_too: bool = True,
    scale_rows: int = 0,
) -> dict[str, Any]:
    """``_bench_ingest`` in a fresh process with the allocator settings every Ray worker of a local instance
    gets (``ALLOCATOR_ENV``): the reader and the students run in Ray Train workers, and without them every
    batch-sized allocation page-faulted (the raw read ran at ~3.5k samples/s instead of ~13k, the reader's
    figures moved by 2x between passes). Progress lines go to stderr from there."""
    log("measuring in a fresh process with the training workers' allocator settings ...")
    args = (store_url, images, shard_size, batch_size, steps, students, workdir, tuple(codecs), s3, s3_images)
    return dict(
        in_fresh_process(dict(ALLOCATOR_ENV), _bench_ingest, *args, repeats, students_too, scale_rows)
    )


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def reader_vs_raw(store: FeatureStore, batch_size: int, repeats: int, cfg: ReaderConfig) -> dict[str, Any]:
    """One epoch through ``ShardStream`` (batches handed over as torch tensors) against a raw read of the same
    objects — the chunk files of the arrays the reader reads, fetched whole: ``fs.cat`` + ``np.frombuffer``
    on local disk, concurrent ranged GETs (``fs.cat_ranges``) on an object store. Both warm (one pass each
    first); ``repeats`` passes of each, alternating, the fastest of each kept (``*_each`` lists all). On local
    disk a plain ``open`` + ``read`` of each file is timed too (``os_read_*``): fsspec's ``cat`` adds its own
    cost per file. Two plain reads: ``held_read_*`` reads each file with one ``readinto`` into one buffer that
    holds the epoch's bytes, as the reader's batches hold them (the strict raw figure); ``os_read_*`` reads
    each file into memory freed at once, so every file lands in the same ~1 MB that stays in the CPU's cache —
    measured 1.4-1.9x the held read on this project's machine, an upper bound no reader that keeps its
    bytes can reach. The ranged GETs send ``cfg.requests`` at a time."""
    meta = store.meta()
    teachers = sorted(meta.teachers)
    partition = sorted(meta.partitions)[0]
    shards = committed_shards(store)
    rows = sum(len(s.ids) for s in shards)
    plan = epoch_plan(shards, 0, 0, 1, batch_size, cfg.shuffle_shards)[0]
    names = ShardStream(store, plan, teachers, [partition], lambda s: partition, cfg).array_names([partition])
    paths: list[str] = []
    sizes: list[int] = []
    for sh in shards:
        with store.open_rows(sh.shard, names) as r:
            for a in r.arrays.values():
                paths.extend(a.paths)
                sizes.extend([a.chunk_bytes] * len(a.paths))
    fs = store.fs

    def raw_pass() -> tuple[float, int]:
        t0 = time.perf_counter()
        if store.is_local:
            blobs = list(fs.cat(paths).values())
        else:
            blobs = fs.cat_ranges(paths, [0] * len(paths), sizes, batch_size=cfg.requests)
        nbytes = sum(np.frombuffer(b, dtype=np.uint8).size for b in blobs)
        return time.perf_counter() - t0, nbytes

    def os_read_pass() -> float:
        t0 = time.perf_counter()
        for p in paths:
            with open(p, "rb") as f:
                np.frombuffer(f.read(), dtype=np.uint8)
        return time.perf_counter() - t0

    held = np.ones(sum(sizes) if store.is_local else 0, np.uint8)  # touched once: no page faults when timed

    def held_read_pass() -> float:
        t0 = time.perf_counter()
        at = 0
        for p, n in zip(paths, sizes, strict=True):
            with open(p, "rb", buffering=0) as f:
                f.readinto(held[at : at + n].data)
            at += n
        return time.perf_counter() - t0

    def reader_pass() -> float:
        t0 = time.perf_counter()
        n = 0
        for b in ShardStream(store, plan, teachers, [partition], lambda s: partition, cfg):
            _ = torch.from_numpy(b.images), {t: torch.from_numpy(v) for t, v in b.dense.items()}
            n += len(b)
        assert n == rows
        return time.perf_counter() - t0

    raw_pass(), reader_pass()  # warm: the page cache (local), connections and the server (S3)
    raw_each, reader_each, os_each, held_each, nbytes = [], [], [], [], 0
    for _ in range(repeats):
        t, nbytes = raw_pass()
        raw_each.append(t)
        reader_each.append(reader_pass())
        if store.is_local:
            os_each.append(os_read_pass())
            held_each.append(held_read_pass())
    raw_s, reader_s = min(raw_each), min(reader_each)
    read_bytes = sum(sizes)  # what the reader reads: the same chunk files (every row of them once)
    extra = {}
    if os_each:
        extra = {
            "os_read_samples_per_s": rows / min(os_each),
            "ratio_vs_os_read": min(os_each) / reader_s,
            "held_read_samples_per_s": rows / min(held_each),
            "ratio_vs_held_read": min(held_each) / reader_s,
        }
    return {
        **extra,
        "rows": rows,
        "bytes_per_sample": read_bytes / rows,
        "raw_samples_per_s": rows / raw_s,
        "raw_mb_per_s": nbytes / raw_s / 1e6,
        "reader_samples_per_s": rows / reader_s,
        "reader_mb_per_s": read_bytes / reader_s / 1e6,
        "ratio": raw_s / reader_s,
        "ratio_each": [r / d for r, d in zip(raw_each, reader_each, strict=True)],
    }


def _bench_ingest(
    store_url: str | None,
    images: int,
    shard_size: int,
    batch_size: int,
    steps: int,
    students: list[Any] | None,
    workdir: Path | None,
    codecs: tuple[str, ...] = ("fp16",),
    s3: bool = False,
    s3_images: int = 256,
    repeats: int = 2,
    students_too: bool = True,
    scale_rows: int = 0,
) -> dict[str, Any]:
    """Store reader vs raw reads of the same bytes (per codec, on local disk and on a loopback S3 server), and
    S students trained together vs one by one (``bench_ingest``'s arguments; progress lines to stderr).

    - ``ratio``: samples/s that ``ShardStream`` delivers to a consumer (as torch tensors) over a whole epoch,
      divided by samples/s of reading the same objects raw (``reader_vs_raw``); ``by_codec`` holds it for each
      store written with one codec (``codecs``), and with ``s3`` the same on the loopback S3 server.
    - ``multi_student_ratio``: wall time of ``steps`` steps training every student on each batch (one read per
      step), divided by the sum over students of ``steps`` steps training that student alone (its own read per
      step). ``multi_student_overhead``: the together time over the students' pure compute (no reading).
    """
    log = _log_stderr
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = tempfile.TemporaryDirectory(dir=workdir)

    def shard_rows(n: int) -> list[int]:
        return [min(shard_size, n - i * shard_size) for i in range(-(-n // shard_size))]

    by_codec: dict[str, Any] = {}
    first_url = store_url
    for codec in codecs if store_url is None else ():
        url = str(Path(tmp.name) / f"store-{codec}")
        log(f"writing a {images}-image store with random {codec} targets shaped like the demo teachers' ...")
        write_random_store(url, shard_rows(images), DEMO_TEACHERS, 224, codec=codec)
        first_url = first_url or url
        by_codec[codec] = {"local": reader_vs_raw(FeatureStore(url), batch_size, repeats, ReaderConfig())}
        x = by_codec[codec]["local"]
        log(
            f"{codec} local: reader {x['reader_samples_per_s']:.0f} vs raw {x['raw_samples_per_s']:.0f} samples/s "
            f"({x['ratio']:.2f}; plain reads into held memory {x['held_read_samples_per_s']:.0f}, "
            f"{x['ratio_vs_held_read']:.2f}; into cache-hot memory {x['os_read_samples_per_s']:.0f}), "
            f"{x['bytes_per_sample'] / 1e3:.0f} kB/sample"
        )
        if codec != codecs[0] or not students_too:
            shutil.rmtree(url, ignore_errors=True)
    if s3 and store_url is None:
        with loopback_s3("bench ingest --s3") as (base, options):
            for codec in codecs:
                url = f"{base}/store-{codec}"
                log(f"writing a {s3_images}-image {codec} store to the loopback S3 server ...")
                write_random_store(
                    url, shard_rows(s3_images), DEMO_TEACHERS, 224, codec=codec, storage_options=options
                )
                s3_cfg = ReaderConfig(read_threads=8, requests=32)  # an object store likes requests in flight
                x = reader_vs_raw(FeatureStore(url, options), batch_size, repeats, s3_cfg)
                by_codec[codec]["s3"] = x
                log(
                    f"{codec} s3: reader {x['reader_samples_per_s']:.0f} vs ranged GETs {x['raw_samples_per_s']:.0f} "
                    f"samples/s ({x['ratio']:.2f})"
                )
    scale: dict[str, Any] = {}
    for codec in codecs if scale_rows else ():  # rows as large as C-RADIOv4's high partition, per codec
        url = str(Path(tmp.name) / f"store-scale-{codec}")
        log(f"writing {scale_rows} rows of C-RADIOv4 size (1152 px view + 72x72x1024 target) in {codec} ...")
        write_random_store(
            url, [min(16, scale_rows - i) for i in range(0, scale_rows, 16)], SCALE_TEACHER, 1152, codec=codec
        )
        x = scale[codec] = reader_vs_raw(FeatureStore(url), 8, repeats, ReaderConfig(shuffle_shards=2))
        shutil.rmtree(url, ignore_errors=True)
        log(
            f"{codec} C-RADIOv4-sized rows ({x['bytes_per_sample'] / 1e6:.1f} MB): reader "
            f"{x['reader_mb_per_s']:.0f} MB/s vs raw {x['raw_mb_per_s']:.0f} ({x['ratio']:.2f}; plain reads into "
            f"held memory {x['ratio_vs_held_read']:.2f}, into cache-hot memory {x['ratio_vs_os_read']:.2f})"
        )
    assert first_url is not None
    store = FeatureStore(first_url)
    res: dict[str, Any] = (
        dict(by_codec[codecs[0]]["local"])
        if by_codec
        else reader_vs_raw(store, batch_size, repeats, ReaderConfig())
    )
    res["by_codec"] = by_codec
    if scale:
        res["scale_rows"] = scale
    if not students_too:
        tmp.cleanup()
        return res
    meta = store.meta()
    teachers = sorted(meta.teachers)
    partition = sorted(meta.partitions)[0]
    shards = committed_shards(store)
    rows = sum(len(s.ids) for s in shards)

    # -- S students together vs separately --------------------------------------------------------------------
    specs = students or default_students()
    train = TrainConfig(batch_size=batch_size)
    job = DistillConfig(  # the plan a distillation job of these students would train on (out is not written)
        store=StoreConfig(url=first_url),
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
    tmp.cleanup()
    return res
