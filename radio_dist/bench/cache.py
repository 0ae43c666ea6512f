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
- ``mosaic_k``: T -> k for every teacher whose spec mosaics (empty without one).
- ``model_inputs_per_image_without_mosaic``: ``T/P`` for those teachers, counted by running a copy of the
  spec without mosaic (``adaptation: none``, no ``mosaic_k``; same weights) over the same batches in the
  teacher-only process, after (and outside) the timed loop.
- ``teacher_only_images_per_s_per_teacher``: T -> images/s of that teacher alone (all its partitions) in the
  timed loop; ``teacher_only_images_per_s_without_mosaic``: T -> the same for the copy without mosaic;
  ``mosaic_speedup``: T -> the ratio of the two (with / without).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radio_dist.config import ConfigError, read_yaml, validate
from radio_dist.pipeline import DEFAULT_TEACHERS, CacheJobConfig, CacheSummary, run_cache
from radio_dist.sources import SourceConfig, SourceKind, canonical_view, decode_image, list_items, read_bytes
from radio_dist.store import FeatureStore, StoreConfig, store_info
from radio_dist.teacher import ALLOCATOR_ENV, MOSAIC_K, Adaptation, TeacherSpec, create_teacher, preset_spec

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


def without_mosaic(spec: TeacherSpec) -> TeacherSpec:
    """The same teacher (same weights) with every view its own model input: adaptation none, no mosaic_k."""
    data = spec.model_dump(mode="json")
    data["adaptation"] = Adaptation.none.value
    data["options"] = {k: v for k, v in spec.options.items() if k != MOSAIC_K}
    return TeacherSpec.model_validate(data)


def teacher_partitions(spec: TeacherSpec, partitions: dict[str, int]) -> list[str]:
    """The partitions a teacher runs on in the pipeline (its ``only_partitions``, in the job's order)."""
    return [p for p in partitions if spec.only_partitions is None or p in spec.only_partitions]


def teacher_device(spec: TeacherSpec) -> str:
    """Where the pipeline's actor runs this teacher (``TeacherStage``): CUDA only with num_gpus > 0."""
    return "cuda" if spec.runtime.num_gpus > 0 and torch.cuda.is_available() else "cpu"


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
    seconds and model inputs per teacher, and the same for a copy without mosaic of every mosaic teacher
    (run after the timed teachers, not part of the rate)."""
    torch.set_num_threads(os.cpu_count() or 1)
    n = len(next(iter(views.values())))
    seconds: dict[str, float] = {}
    inputs: dict[str, dict[str, int]] = {}
    for spec in specs:
        seconds[spec.name], inputs[spec.name] = _run_teacher(spec, views, partitions)
    alone: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if spec.mosaic_k is not None:
            s, i = _run_teacher(without_mosaic(spec), views, partitions)
            alone[spec.name] = {"seconds": s, "model_inputs": i}
    return {
        "images": n,
        "images_per_s": n / sum(seconds.values()),
        "seconds": seconds,
        "model_inputs": inputs,
        "without_mosaic": alone,
    }


def _teacher_only_child(
    source: SourceConfig, specs: list[TeacherSpec], partitions: dict[str, int]
) -> dict[str, Any]:
    return teacher_only(_preload(source, partitions), specs, partitions)


def in_fresh_process(env: dict[str, str], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a spawned process started with ``env`` added to its environment (glibc reads its
    malloc settings once, at process start, so they cannot be given to a running process)."""
    import multiprocessing as mp

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with mp.get_context("spawn").Pool(1) as pool:
            return pool.apply(fn, args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    alone = only["without_mosaic"]
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
        "mosaic_k": {s.name: s.mosaic_k for s in specs if s.mosaic_k is not None},
        "model_inputs_per_image_without_mosaic": _per_image(
            {t: a["model_inputs"] for t, a in alone.items()}, n_only
        ),
        "teacher_only_images_per_s_per_teacher": per_teacher,
        "teacher_only_images_per_s_without_mosaic": per_teacher_alone,
        "mosaic_speedup": {t: per_teacher[t] / r for t, r in per_teacher_alone.items()},
    }


# -- bench ingest ----------------------------------------------------------------------------------------------


def write_random_store(
    url: str,
    shard_rows: list[int],
    teachers: dict[str, tuple[int, int, int | None]],
    px: int | dict[str, int],
    errors_per_shard: int = 0,
    seed: int = 7,
) -> dict[str, list[str]]:
    """A real Zarr/Parquet store with random targets (no teacher runs) — same layout and bytes as a cached one.

    ``teachers`` maps name -> (grid, dense_dim, summary_dim | None), the grid at the smallest partition;
    ``px`` is the view size of one partition ``low`` or a mapping partition -> px (each partition's grid
    scales with its size, as a teacher's does). Returns {shard: ok ids in array order}. Used by the ingest
    benchmark and by tests of the reader and the training loop.
    """
    from radio_dist.phis import Moments, fit_phis
    from radio_dist.store import array_key, image_key

    partitions = {"low": px} if isinstance(px, int) else dict(px)
    smallest = min(partitions.values())
    grids = {t: {p: g * s // smallest for p, s in partitions.items()} for t, (g, _, _) in teachers.items()}
    store = FeatureStore(url)
    store.init_or_check(
        partitions,
        {t: {"fingerprint": f"fp-{t}", "family": "synthetic", "spec": {"name": t}} for t in teachers},
    )
    rng = np.random.default_rng(seed)
    for t, (_, dim, sdim) in teachers.items():
        phis = fit_phis(Moments.from_features(rng.standard_normal((max(400, 2 * dim), dim)) * 2 + 1))
        outputs: dict[str, Any] = {}
        for p in partitions:
            outputs[p] = {"dense": [grids[t][p], grids[t][p], dim]}
            if sdim:
                outputs[p]["summary"] = [sdim]
        store.save_phis(t, phis, 0.8 if sdim else None, outputs, fit_images=400)
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
                "width": smallest,
                "height": smallest,
                "mode": "RGB",
                "geometry": "{}",
            }
            for i in ids
        ]
        r = np.random.default_rng(seed * 1000 + s)
        with store.shard_writer(ids) as w:
            for p, s_px in partitions.items():
                w.add_array(image_key(p), r.integers(0, 255, (len(ok), s_px, s_px, 3), dtype=np.uint8))
                for t, (_, dim, sdim) in teachers.items():
                    g = grids[t][p]
                    dense = r.standard_normal((len(ok), g, g, dim), dtype=np.float32).astype(np.float16)
                    w.add_array(array_key(t, p, "dense"), dense)
                    if sdim:
                        summary = r.standard_normal((len(ok), sdim), dtype=np.float32)
                        w.add_array(array_key(t, p, "summary"), summary)
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
