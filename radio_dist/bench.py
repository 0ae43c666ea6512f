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
