"""`radio-dist bench cache`: what the caching pipeline delivers vs. the teachers alone.

Both measurements use the same images (sample-photo views), teachers, partitions and batch sizes:

- **teacher_only**: one process, images decoded and preloaded as uint8 tensors (one canonical view per
  partition), a bare loop calling every teacher on every batch at every partition it runs on (its
  ``only_partitions``, resized to its ``resolution``, mosaicked when its spec says so) with all cores
  (torch threads = cores), on CUDA where the pipeline would put it there (``runtime.num_gpus > 0`` and a GPU
  visible). This is the limit: pure teacher compute, the same model work per image as the pipeline's.
- **pipeline**: ``run_cache`` into a fresh store — content ids, decode, Ray Data actor pools, PHI-S fit and
  normalization, Zarr/Parquet writes and commits.

``pipeline_images_per_s`` is the rate a long run converges to: the images of the main phase (after the
one-time PHI-S fit sample) committed after its first shard, over the time from that first commit to the last
— Ray start-up, actor start-up, model loading and the pipeline's fill are not in it (the issue's target is
for "a run long enough that Ray start-up is not what is measured"). They are reported apart:
``pipeline_first_shard_seconds`` (main phase start -> first commit), ``phis_fit_phase_seconds``, and
``pipeline_images_per_s_with_startup`` (every main-phase image over the main phase's whole time, first
actor start-up included). When no image comes after the first commit (e.g. ``fit_images >= images``) the
with-start-up rate is all there is: ``pipeline_rate_includes_startup`` is then true.

``ratio = pipeline_images_per_s / teacher_only_images_per_s`` (target >= 0.8 on a 2-core CPU machine);
``ratio_with_startup`` the same with the with-start-up rate. The limit is measured before and after the
pipeline (``teacher_only_images_per_s_before_after``) and ``teacher_only_images_per_s`` is their mean: a
shared machine's speed drifts ~10 % over minutes, and a limit taken at one end of the run moved the ratio
by as much.

``repeats=R`` (``--repeats``) alternates the two R times — limit, pipeline (a fresh store), limit, ... —
each pipeline run divided by the mean of the limits on either side (``ratio_each``); the result's rates and
``ratio`` are those of the run with the median ratio (``ratio_median_of``: R). On the 2-core development
machine one run's ratio moved by +-0.1, more than a change worth measuring.

Teachers: the two offline ImageNet teachers by default; any presets by name (``--teachers dinov3_tiny``);
``--seed-teachers``: C-RADIOv4's seed teachers as their tiny random-init presets (dinov3_tiny,
siglip2_tiny, sam3_tiny with its k=2 mosaic) at the partitions those presets are built for
(``SEED_PARTITIONS``: low 64 px, high 128 px; SAM3 resizes them to 56/112 px); ``--config FILE``: the
``teachers:`` and ``pipeline.partitions`` of a cache job file — real weights on a GPU machine, each
teacher at its own ``runtime.batch_size`` unless ``--batch-size`` is given::

    radio-dist bench cache --json
    radio-dist bench cache --seed-teachers --images 256 --fit-images 32 --json
    radio-dist bench cache --config jobs/configs/cache_sample.yaml --json   # any cache job file

Keys of the result besides the rates (``T/P`` = teacher T at partition P):

- ``batch_size``: T -> its batch size (both measurements); ``devices``: T -> cpu | cuda (both measurements).
- ``steady_state_images_per_s``: the main phase after its first commit (= ``pipeline_images_per_s``); null
  when nothing came after it.
- ``teacher_forwards_per_image``: T -> images the teacher was called on per stored image (one per partition
  it runs on: proves every teacher ran once per image and partition).
- ``model_inputs_per_image``: ``T/P`` -> inputs the model itself ran on per image, counted in the pipeline
  run (1.0, or ceil(b / k^2) / b per batch of b views with a k x k mosaic: 0.25 for k = 2).
- ``teacher_only_model_inputs_per_image``: the same counted in the teacher-only loop (same work: same figures
  up to batch boundaries).
- ``adaptations``: T -> ``{adaptation, options}`` for every teacher with one (e.g. SAM3's ``mosaic`` with
  ``mosaic_k``; empty without one).
- ``model_inputs_per_image_without_adaptation``: ``T/P`` for the teachers whose adaptation their family
  implements (``has_plain_baseline``: a mosaic, not FeatSharp), counted by running the plain copy of the spec
  (``spec.without_adaptation()``: adaptation none, its options gone; same weights) over the same batches in
  the teacher-only process, after (and outside) the timed loop.
- ``teacher_only_images_per_s_per_teacher``: T -> images/s of that teacher alone (all its partitions) in the
  timed loop; ``teacher_only_images_per_s_without_adaptation``: T -> the same for the plain copy;
  ``adaptation_speedup``: T -> the ratio of the two (with / without).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radio_dist.bench.fresh_process import in_fresh_process
from radio_dist.cache.config import DEFAULT_TEACHERS, CacheJobConfig
from radio_dist.cache.pipeline import CacheSummary, run_cache
from radio_dist.cache.stages import teacher_device, teacher_partitions
from radio_dist.config import ConfigError, read_yaml, validate
from radio_dist.sources import SourceConfig, SourceKind, canonical_view, decode_image, list_items, read_bytes
from radio_dist.store import FeatureStore, StoreConfig, store_info
from radio_dist.teacher import (
    NO_ADAPTATION,
    TeacherSpec,
    create_teacher,
    preset_spec,
    registered_adaptations,
)

SEED_TEACHERS = ("dinov3_tiny", "siglip2_tiny", "sam3_tiny")
# The views the tiny presets are built for (tests/test_seed_teachers.py): DINOv3/SigLIP2 at 64 px (4x4
# patches of 16) and 128 px; SAM3 resizes them to its spec's 56 px (2x2 of them mosaicked into its 112 px
# native input) and 112 px.
SEED_PARTITIONS = {"low": 64, "high": 128}


def _preload(source: SourceConfig, partitions: dict[str, int]) -> dict[str, np.ndarray]:
    """partition -> [N, s, s, 3] uint8 canonical views, as the pipeline's decode stage makes them."""
    views: dict[str, list[np.ndarray]] = {p: [] for p in partitions}
    for it in list_items(source):
        img = decode_image(read_bytes(it.uri), it.uri)
        for p, size in partitions.items():
            views[p].append(canonical_view(img.image, size, it.view, source.resample)[0])
    return {p: np.stack(v) for p, v in views.items()}


def has_plain_baseline(spec: TeacherSpec) -> bool:
    """True when the spec's adaptation is implemented by its family (e.g. SAM3's mosaic): the family's own
    model then runs the same views either way, and the plain teacher (``spec.without_adaptation()``) is the
    baseline its model inputs and speed are compared with. An adaptation that wraps the teacher in another
    model (FeatSharp) has no such baseline."""
    entry = registered_adaptations().get(spec.adaptation)
    return entry is not None and entry.wrap is None


def _run_teacher(
    spec: TeacherSpec, views: dict[str, np.ndarray], partitions: dict[str, int]
) -> tuple[float, dict[str, int]]:
    """One teacher over every view at each of its partitions, batched as in the pipeline, after a warm-up
    batch: (seconds, partition -> inputs its model ran on)."""
    device = teacher_device(spec)
    teacher = create_teacher(spec, device)
    bs = spec.runtime.batch_size
    parts = teacher_partitions(spec, partitions)
    res = {p: teacher.input_resolution(p, partitions[p]) for p in parts}
    for p in parts:  # warm-up (allocator, oneDNN primitives, CUDA kernels)
        teacher(views[p][:bs], resolution=res[p])
    n = len(next(iter(views.values())))
    inputs = dict.fromkeys(parts, 0)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, n, bs):
        for p in parts:
            before = teacher.model_inputs
            teacher(views[p][i : i + bs], resolution=res[p])
            inputs[p] += teacher.model_inputs - before
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, inputs


def teacher_only(
    views: dict[str, np.ndarray], specs: list[TeacherSpec], partitions: dict[str, int]
) -> dict[str, Any]:
    """The limit: every teacher alone in this process, all cores. Returns images/s of all of them in sequence,
    seconds and model inputs per teacher, and the same for the plain copy of every teacher with a plain
    baseline (``has_plain_baseline``; run after the timed teachers, not part of the rate)."""
    torch.set_num_threads(os.cpu_count() or 1)
    n = len(next(iter(views.values())))
    seconds: dict[str, float] = {}
    inputs: dict[str, dict[str, int]] = {}
    for spec in specs:
        seconds[spec.name], inputs[spec.name] = _run_teacher(spec, views, partitions)
    alone: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if has_plain_baseline(spec):
            s, i = _run_teacher(spec.without_adaptation(), views, partitions)
            alone[spec.name] = {"seconds": s, "model_inputs": i}
    return {
        "images": n,
        "images_per_s": n / sum(seconds.values()),
        "seconds": seconds,
        "model_inputs": inputs,
        "without_adaptation": alone,
    }


def _teacher_only_child(
    source: SourceConfig, specs: list[TeacherSpec], partitions: dict[str, int]
) -> dict[str, Any]:
    return teacher_only(_preload(source, partitions), specs, partitions)


def teacher_only_in_subprocess(
    source: SourceConfig, specs: list[TeacherSpec], partitions: dict[str, int]
) -> dict[str, Any]:
    """The limit, measured in a fresh process with the environment the teacher actors get (``runtime.env``,
    by default glibc malloc tuned to keep freed memory)."""
    env = {k: v for s in specs for k, v in s.runtime.env.items()}
    return dict(in_fresh_process(env, _teacher_only_child, source, specs, partitions))


def config_teachers(path: str | Path) -> tuple[list[TeacherSpec], dict[str, int]]:
    """``teachers:`` and ``pipeline.partitions`` of a cache job file (validated as a ``CacheJobConfig``; its
    store, source and ray sections are not used: the benchmark writes its own store from sample photos)."""
    data = read_yaml(path)
    data["store"] = {"url": "unused-by-bench"}  # required by the model, replaced by the benchmark's own
    cfg = validate(CacheJobConfig, data, str(path))
    return list(cfg.teachers), dict(cfg.pipeline.partitions)


def _bench_spec(teacher: str | TeacherSpec, batch_size: int | None) -> TeacherSpec:
    """A preset (by name) or a spec, at ``batch_size`` (None: its own); bad input raises ``ConfigError``."""
    if isinstance(teacher, str):
        try:
            teacher = preset_spec(teacher)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"teacher {teacher!r}: {e.args[0]}") from None
    if batch_size is None:
        return teacher
    data = teacher.model_dump(mode="json")
    data["runtime"]["batch_size"] = batch_size
    # the whole spec re-checked: a mosaic needs batch_size % k^2 == 0
    return validate(TeacherSpec, data, f"teacher {teacher.name!r} at batch size {batch_size}")


def adaptation_of(spec: TeacherSpec) -> dict[str, Any]:
    """A teacher's adaptation and the options it owns, as the result reports them."""
    entry = registered_adaptations()[spec.adaptation]
    return {
        "adaptation": spec.adaptation,
        "options": {k: spec.options[k] for k in entry.options if k in spec.options},
    }


def _per_image(counts: dict[str, dict[str, int]], images: int) -> dict[str, float]:
    return {f"{t}/{p}": n / max(1, images) for t, parts in counts.items() for p, n in parts.items()}


def bench_cache(
    images: int = 1024,
    batch_size: int | None = 32,
    resolution: int = 224,
    fit_images: int = 64,
    workdir: Path | None = None,
    teachers: Sequence[str | TeacherSpec] | None = None,
    partitions: dict[str, int] | None = None,
    seed: bool = False,
    log: Callable[[str], None] = print,
    repeats: int = 1,
) -> dict[str, Any]:
    """Teacher-only loop vs ``run_cache`` on ``images`` sample-photo views (keys: see the module docstring).

    ``teachers``: preset names or specs (default: the two ImageNet teachers; ``seed``: the three seed
    presets). ``partitions``: name -> view px (default ``{low: resolution}``; ``seed``: ``SEED_PARTITIONS``).
    ``batch_size``: every teacher's batch size in both measurements (None: each spec's own).
    """
    if seed and teachers is not None:
        raise ConfigError("bench_cache: pass either seed=True or teachers, not both")
    if repeats < 1:
        raise ConfigError(f"bench_cache: repeats must be >= 1, got {repeats}")
    names = SEED_TEACHERS if seed else (teachers if teachers is not None else DEFAULT_TEACHERS)
    if not names:
        raise ConfigError(
            "bench_cache: no teachers given; name at least one preset (see `radio-dist teachers list`)"
        )
    specs = [_bench_spec(t, batch_size) for t in names]
    if partitions is None:
        partitions = dict(SEED_PARTITIONS) if seed else {"low": resolution}
    if fit_images >= images:
        log(f"note: fit_images={fit_images} >= images={images}: every image is in the PHI-S fit phase")
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="radio-dist-bench-")
        workdir = Path(tmp.name)
    store_url = str(Path(workdir) / f"bench-store-{int(time.time())}")
    source = SourceConfig(kind=SourceKind.sample_photos, views=images)
    try:
        cfg = validate(  # checked before either measurement runs (names, partitions, PHI-S sample)
            CacheJobConfig,
            {
                "source": source,
                "teachers": specs,
                "store": StoreConfig(url=store_url, shard_size=64),
                "pipeline": {"partitions": partitions},
                "phis": {"fit_images": fit_images},
            },
            "bench cache",
        )
        return _bench_cache(cfg, log, repeats)
    finally:
        if tmp is not None:
            tmp.cleanup()


def pipeline_rates(summary: CacheSummary, teacher_only_images_per_s: float) -> dict[str, Any]:
    """The pipeline's rates and ratios from a run's summary (definitions: the module docstring)."""
    with_startup = summary.images_per_s
    after_first = summary.pipeline_images - summary.first_shard_images
    after_seconds = summary.pipeline_seconds - summary.first_shard_seconds
    steady = after_first / after_seconds if after_first > 0 and after_seconds > 0 else None
    rate = steady if steady is not None else with_startup

    def ratio(r: float) -> float:
        return r / teacher_only_images_per_s if teacher_only_images_per_s > 0 else 0.0

    return {
        "pipeline_images_per_s": rate,
        "ratio": ratio(rate),
        "pipeline_rate_includes_startup": steady is None,
        "pipeline_images_per_s_with_startup": with_startup,
        "ratio_with_startup": ratio(with_startup),
        "steady_state_images_per_s": steady,
    }


def median_run(ratios: list[float]) -> int:
    """Index of the run with the median ratio (the lower middle one of an even count)."""
    if not ratios:
        raise ValueError("median_run: no runs")
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])
    return order[(len(order) - 1) // 2]


def _bench_cache(cfg: CacheJobConfig, log: Callable[[str], None], repeats: int = 1) -> dict[str, Any]:
    import ray

    specs, partitions, images = cfg.teachers, cfg.pipeline.partitions, cfg.source.views
    parts_txt = ", ".join(f"{p} {s}px" for p, s in partitions.items())
    log(f"teacher-only loop over {images} preloaded views ({parts_txt}) ...")
    only = teacher_only_in_subprocess(cfg.source, specs, partitions)
    log(f"  {float(only['images_per_s']):.1f} images/s")
    limits = [float(only["images_per_s"])]
    summaries: list[CacheSummary] = []
    stores: list[str] = []
    for r in range(repeats):
        run_cfg = (
            cfg
            if r == 0
            else cfg.model_copy(
                update={"store": cfg.store.model_copy(update={"url": f"{cfg.store.url}-{r}"})}
            )
        )
        log(f"full pipeline (Ray Data){f', run {r + 1} of {repeats}' if repeats > 1 else ''} ...")
        started_here = not ray.is_initialized()
        summaries.append(run_cache(run_cfg))
        stores.append(run_cfg.store.url)
        if started_here:  # the limit runs on a quiet machine, not beside an idle Ray instance's services
            ray.shutdown()
        # The limit again after each pipeline run: a shared machine's speed drifts by ~10 % over minutes, so
        # each run's ratio divides by the mean of the limit measured before and after it.
        log("teacher-only loop again ...")
        limits.append(float(teacher_only_in_subprocess(cfg.source, specs, partitions)["images_per_s"]))
        log(f"  {limits[-1]:.1f} images/s")
    each = [pipeline_rates(s, (limits[i] + limits[i + 1]) / 2) for i, s in enumerate(summaries)]
    pick = median_run([e["ratio"] for e in each])
    summary, rates = summaries[pick], each[pick]
    t_only = (limits[pick] + limits[pick + 1]) / 2
    per_run = ", ".join(f"{e['ratio']:.2f}" for e in each)
    log(
        f"  {rates['pipeline_images_per_s']:.1f} images/s after start-up, "
        f"{rates['pipeline_images_per_s_with_startup']:.1f} with it ({summary.ok} ok, {summary.error} error)"
        + (f"; ratio per run {per_run}, median {rates['ratio']:.2f}" if repeats > 1 else "")
    )
    info = store_info(FeatureStore(stores[pick]))
    n_only = int(only["images"])
    alone = only["without_adaptation"]
    per_teacher = {t: n_only / s for t, s in only["seconds"].items()}
    per_teacher_alone = {t: n_only / a["seconds"] for t, a in alone.items()}
    return {
        "images": images,
        "batch_size": {s.name: s.runtime.batch_size for s in specs},
        "partitions": partitions,
        "teachers": ",".join(s.name for s in specs),
        "cpu_count": os.cpu_count() or 1,
        "devices": {s.name: teacher_device(s) for s in specs},
        "teacher_only_images_per_s": t_only,
        "teacher_only_images_per_s_before_after": limits[pick : pick + 2],
        **rates,
        "ratio_each": [e["ratio"] for e in each],
        "ratio_median_of": repeats,
        "teacher_only_images_per_s_each": limits,
        "bytes_per_image": info["bytes_per_image"],
        "pipeline_seconds": summary.pipeline_seconds,
        "pipeline_first_shard_seconds": summary.first_shard_seconds,
        "pipeline_images": summary.pipeline_images,
        "phis_fit_phase_seconds": summary.fit_seconds,
        "startup_and_listing_seconds": summary.seconds - summary.pipeline_seconds - summary.fit_seconds,
        "teacher_forwards_per_image": {
            t: fw["images"] / max(1, summary.ok) for t, fw in summary.teacher_forwards.items()
        },
        "model_inputs_per_image": _per_image(summary.teacher_inputs, summary.ok),
        "teacher_only_model_inputs_per_image": _per_image(only["model_inputs"], n_only),
        "adaptations": {s.name: adaptation_of(s) for s in specs if s.adaptation != NO_ADAPTATION},
        "model_inputs_per_image_without_adaptation": _per_image(
            {t: a["model_inputs"] for t, a in alone.items()}, n_only
        ),
        "teacher_only_images_per_s_per_teacher": per_teacher,
        "teacher_only_images_per_s_without_adaptation": per_teacher_alone,
        "adaptation_speedup": {t: per_teacher[t] / r for t, r in per_teacher_alone.items()},
    }
