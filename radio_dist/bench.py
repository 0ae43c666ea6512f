"""`radio-dist bench cache`: what the caching pipeline delivers vs. the teachers alone.

Both measurements use the same images (sample-photo views), teachers and batch size:

- **teacher_only**: one process, images decoded and preloaded as uint8 tensors, a bare loop calling every
  teacher on every batch with all cores (torch threads = cores). This is the limit: pure teacher compute.
- **pipeline**: ``run_cache`` into a fresh store — content ids, decode, Ray Data actor pools, PHI-S fit and
  normalization, Zarr/Parquet writes and commits. Timed from the first decode to the last commit (Ray
  start-up and listing excluded and reported separately).

``ratio = pipeline_images_per_s / teacher_only_images_per_s`` (target >= 0.8 on a 2-core CPU machine).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radio_dist.pipeline import DEFAULT_TEACHERS, CacheJobConfig, run_cache
from radio_dist.sources import SourceConfig, SourceKind, canonical_view, decode_image, list_items, read_bytes
from radio_dist.store import FeatureStore, StoreConfig, store_info
from radio_dist.teacher import ALLOCATOR_ENV, create_teacher, preset_spec


def _preload(source: SourceConfig, size: int) -> np.ndarray:
    views = []
    for it in list_items(source):
        img = decode_image(read_bytes(it.uri), it.uri)
        views.append(canonical_view(img.rgb, size, it.view)[0])
    return np.stack(views)


def _teacher_only_child(source: SourceConfig, size: int, teacher_names: list[str], batch_size: int) -> float:
    return teacher_only_rate(_preload(source, size), teacher_names, batch_size)


def teacher_only_rate_in_subprocess(
    source: SourceConfig, size: int, teacher_names: list[str], batch_size: int
) -> float:
    """The limit, measured in a fresh process with the same allocator environment the actors get."""
    import multiprocessing as mp

    env = ALLOCATOR_ENV  # what every teacher actor runs with by default (TeacherRuntime.env)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by glibc at process start: set before spawning
    try:
        with mp.get_context("spawn").Pool(1) as pool:
            return float(pool.apply(_teacher_only_child, (source, size, teacher_names, batch_size)))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def teacher_only_rate(images: np.ndarray, teacher_names: list[str], batch_size: int) -> float:
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    teachers = [create_teacher(preset_spec(n)) for n in teacher_names]
    for t in teachers:  # warm-up (allocator, oneDNN primitives)
        t(images[:batch_size])
    t0 = time.perf_counter()
    for i in range(0, len(images), batch_size):
        for t in teachers:
            t(images[i : i + batch_size])
    return len(images) / (time.perf_counter() - t0)


def bench_cache(
    images: int = 1024,
    batch_size: int = 32,
    resolution: int = 224,
    fit_images: int = 64,
    workdir: Path | None = None,
    teachers: tuple[str, ...] = DEFAULT_TEACHERS,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    source = SourceConfig(kind=SourceKind.sample_photos, views=images)
    log(f"teacher-only loop over {images} preloaded views at {resolution}px ...")
    t_only = teacher_only_rate_in_subprocess(source, resolution, list(teachers), batch_size)
    log(f"  {t_only:.1f} images/s")
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="radio-dist-bench-")
        workdir = Path(tmp.name)
    store_url = str(Path(workdir) / f"bench-store-{int(time.time())}")
    specs = []
    for n in teachers:
        s = preset_spec(n)
        s.runtime.batch_size = batch_size
        specs.append(s)
    cfg = CacheJobConfig(
        source=source,
        teachers=specs,
        store=StoreConfig(url=store_url, shard_size=64),
        pipeline={"partitions": {"low": resolution}},
        phis={"fit_images": fit_images},
    )
    log("full pipeline (Ray Data) ...")
    summary = run_cache(cfg)
    pipe = summary.images_per_s
    log(f"  {pipe:.1f} images/s ({summary.ok} ok, {summary.error} error)")
    info = store_info(FeatureStore(store_url))
    if tmp is not None:
        tmp.cleanup()
    return {
        "images": images,
        "batch_size": batch_size,
        "resolution": resolution,
        "teachers": ",".join(teachers),
        "cpu_count": os.cpu_count() or 1,
        "teacher_only_images_per_s": t_only,
        "pipeline_images_per_s": pipe,
        "ratio": pipe / t_only if t_only else 0.0,
        "bytes_per_image": info["bytes_per_image"],
        "steady_state_images_per_s": (summary.pipeline_images - summary.first_shard_images)
        / max(1e-9, summary.pipeline_seconds - summary.first_shard_seconds),
        "pipeline_seconds": summary.pipeline_seconds,
        "pipeline_first_shard_seconds": summary.first_shard_seconds,
        "pipeline_images": summary.pipeline_images,
        "phis_fit_phase_seconds": summary.fit_seconds,
        "startup_and_listing_seconds": summary.seconds - summary.pipeline_seconds - summary.fit_seconds,
        "teacher_forwards_per_image": {
            t: fw["images"] / max(1, summary.ok) for t, fw in summary.teacher_forwards.items()
        },
    }


# -- bench ingest ----------------------------------------------------------------------------------------------


def write_random_store(
    url: str,
    shard_rows: list[int],
    teachers: dict[str, tuple[int, int, int | None]],
    px: int,
    errors_per_shard: int = 0,
    seed: int = 7,
) -> dict[str, list[str]]:
    """A real Zarr/Parquet store with random targets (no teacher runs) — same layout and bytes as a cached one.

    ``teachers`` maps name -> (grid, dense_dim, summary_dim | None). Returns {shard: ok ids in array order}.
    Used by the ingest benchmark and by tests of the reader and the training loop.
    """
    from radio_dist.phis import Moments, fit_phis
    from radio_dist.store import array_key, image_key

    store = FeatureStore(url)
    store.init_or_check(
        {"low": px},
        {t: {"fingerprint": f"fp-{t}", "family": "synthetic", "spec": {"name": t}} for t in teachers},
    )
    rng = np.random.default_rng(seed)
    for t, (grid, dim, sdim) in teachers.items():
        phis = fit_phis(Moments.from_features(rng.standard_normal((max(400, 2 * dim), dim)) * 2 + 1))
        outputs: dict[str, Any] = {"dense": [grid, grid, dim]}
        if sdim:
            outputs["summary"] = [sdim]
        store.save_phis(t, phis, 0.8 if sdim else None, {"low": outputs}, fit_images=400)
    out: dict[str, list[str]] = {}
    k = 0
    for s, n in enumerate(shard_rows):
        ids = [f"img{k + i:07d}" for i in range(n)]
        k += n
        errs = set(ids[:errors_per_shard])
        ok = [i for i in ids if i not in errs]
        rows = [
            {
                "id": i,
                "source": f"synthetic://{i}",
                "view": "",
                "status": "error" if i in errs else "ok",
                "error": f"synthetic://{i}: broken" if i in errs else None,
                "width": px,
                "height": px,
                "mode": "RGB",
                "geometry": "{}",
            }
            for i in ids
        ]
        r = np.random.default_rng(seed * 1000 + s)
        with store.shard_writer(ids) as w:
            w.add_array(image_key("low"), r.integers(0, 255, (len(ok), px, px, 3), dtype=np.uint8))
            for t, (grid, dim, sdim) in teachers.items():
                dense = r.standard_normal((len(ok), grid, grid, dim), dtype=np.float32).astype(np.float16)
                w.add_array(array_key(t, "low", "dense"), dense)
                if sdim:
                    w.add_array(
                        array_key(t, "low", "summary"), r.standard_normal((len(ok), sdim), dtype=np.float32)
                    )
            w.add_rows(rows)
        assert w.result is not None
        out[w.result.shard] = ok
    return out


DEMO_TEACHERS: dict[str, tuple[int, int, int | None]] = {
    "effnet_lite0": (7, 1280, 1280),
    "mobilenet_v2": (7, 1280, 1280),
}


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
    """Store reader vs raw reads of the same bytes, and S students trained together vs one by one.

    - ``ratio``: samples/s that ``ShardStream`` delivers to a consumer (as torch tensors) over a whole epoch,
      divided by samples/s of reading the same shard files raw (fsspec ``cat`` + ``np.frombuffer``). Both read
      warm (a first pass fills the page cache), so this isolates the reader's own overhead.
    - ``multi_student_ratio``: wall time of ``steps`` steps training every student on each batch (one read per
      step), divided by the sum over students of ``steps`` steps training that student alone (its own read per
      step). ``multi_student_overhead``: the together time over the students' pure compute (no reading).
    """
    import fsspec

    from radio_dist.distill import StudentState, TrainConfig, _to_images, default_students, student_losses
    from radio_dist.ingest import ReaderConfig, ShardStream, committed_shards, epoch_plan
    from radio_dist.losses import ema_update
    from radio_dist.students import TeacherHeadInfo

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
    teachers = sorted(meta["teachers"])
    partition = sorted(meta["partitions"])[0]
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
    outputs = meta["teachers"]
    heads = {
        t: TeacherHeadInfo(
            summary_dim=(outputs[t]["outputs"][partition].get("summary") or [None])[-1],
            dense_dim=outputs[t]["outputs"][partition]["dense"][-1],
        )
        for t in teachers
    }
    px = int(meta["partitions"][partition])
    train = TrainConfig(batch_size=batch_size)
    run = {"teachers": teachers, "dispersion": {t: outputs[t].get("summary_dispersion") for t in teachers}}
    device = torch.device("cpu")
    plan = epoch_plan(shards, 0, 0, 1, batch_size, 4)[0]

    def train_steps(names: list[str], read: bool) -> tuple[float, float]:
        states = {s.name: StudentState(s, heads, train, device) for s in specs if s.name in names}
        stream = iter(ShardStream(store, plan, teachers, [partition], lambda s: partition, ReaderConfig()))
        cached = next(stream)
        compute = 0.0
        t0 = time.perf_counter()
        for step in range(steps + 1):  # step 0 warms up (allocations, first-call overheads); not timed
            if step == 1:
                t0, compute = time.perf_counter(), 0.0
            batch = next(stream) if read and step else cached
            c0 = time.perf_counter()
            images = _to_images(batch, px, device)
            for i, st in enumerate(states.values()):
                st.opt.zero_grad(set_to_none=False)
                rng = np.random.default_rng([step, i])
                loss, _ = student_losses(st, images, batch, run, train, rng, train.damp_sigma, device)
                loss.backward()
                st.opt.step()
                if st.ema is not None:
                    ema_update(st.ema, st.model, train.ema_momentum)
            compute += time.perf_counter() - c0
        return time.perf_counter() - t0, compute

    if plan.steps < steps + 2:
        raise ValueError(f"the store has {rows} rows: too few for {steps + 2} steps of {batch_size}")
    names = [s.name for s in specs]
    together, together_compute = train_steps(names, read=True)
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
