"""`cache-teachers`: source -> ids -> decode -> teacher actor pools -> PHI-S -> shard writer, on Ray Data.

Stages (each a Ray Data ``map_batches``):

1. **ids** (tasks): read each input once, hash its content -> stable image id; unreadable inputs become
   error rows. The driver drops duplicate content and ids already committed in the store (resume).
2. **decode** (tasks): read + decode + one canonical square view per partition; bad input -> error row.
3. **teachers** (one actor pool per teacher): model loaded once per actor, inference mode; dense targets
   PHI-S-normalized in the actor and cast to fp16, summaries kept raw.
4. **write** (tasks): ``shard_size`` rows -> one immutable Zarr shard + its manifest part (the commit).

PHI-S needs statistics before anything is normalized: if the store has none yet, a deterministic fit
sample runs first through stages 2-3 *unnormalized*, its moments are merged and fitted, and the same
outputs are then normalized and written — so every teacher still runs exactly once per image.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import torch
from pydantic import Field, field_validator

from radio_dist.config import ConfigError, StrictModel
from radio_dist.phis import Moments, PhiS, angular_dispersion, fit_phis
from radio_dist.sources import (
    ImageError,
    SourceConfig,
    SourceError,
    SourceItem,
    canonical_view,
    decode_image,
    image_id,
    list_items,
    read_bytes,
)
from radio_dist.store import (
    FeatureStore,
    StoreConfig,
    WriterLock,
    array_key,
    image_key,
)
from radio_dist.teacher import ALLOCATOR_ENV, TeacherSpec, create_teacher, fingerprint, preset_spec

DEFAULT_TEACHERS = ("efficientnet_lite0", "mobilenet_v2")


class PipelineConfig(StrictModel):
    partitions: dict[str, int] = Field(
        default_factory=lambda: {"low": 224},
        description="Canonical square view size (px) per resolution partition, e.g. {low: 432, high: 1152}.",
    )
    decode_batch_size: int = Field(32, ge=1, description="Images per decode task batch.")
    id_batch_size: int = Field(64, ge=1, description="Inputs per content-hashing task batch.")
    decode_num_cpus: float = Field(0.5, gt=0, description="Ray CPUs per decode task.")
    decode_tasks: int = Field(2, ge=1, description="Most decode tasks in flight at once.")
    write_num_cpus: float = Field(0.25, gt=0, description="Ray CPUs per shard-write task.")

    @field_validator("partitions")
    @classmethod
    def _parts_ok(cls, v: dict[str, int]) -> dict[str, int]:
        if not v:
            raise ValueError("at least one partition is needed, e.g. {low: 224}")
        for name, size in v.items():
            if not name.isidentifier() or size < 16:
                raise ValueError(
                    f"partition {name!r}: name must be an identifier and size >= 16 px (got {size})"
                )
        return v


class PhisConfig(StrictModel):
    fit_images: int = Field(256, ge=2, description="Images in the PHI-S fit sample (first N by image id).")
    seed: int = Field(0, description="Seed of the orthogonal fallback rotation (no Hadamard order).")


class RayConfig(StrictModel):
    address: str | None = Field(
        None, description="Ray address; None starts (or joins via RAY_ADDRESS) a local one."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local instance (default: all).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local instance (default: detected).")
    progress_bars: bool = Field(False, description="Show Ray Data's own operator progress bars too.")
    log_to_driver: bool = Field(
        True, description="Forward worker/actor logs to this process (local instances started here)."
    )


class CacheJobConfig(StrictModel):
    """A `cache-teachers` job: the same file drives a laptop run and a cluster run."""

    source: SourceConfig = Field(default_factory=SourceConfig, description="Where the images come from.")
    teachers: list[TeacherSpec] = Field(
        default_factory=lambda: [preset_spec(n) for n in DEFAULT_TEACHERS],
        description="Teachers to cache (default: the two offline ImageNet teachers).",
    )
    store: StoreConfig = Field(description="Feature store root and shard layout.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Views and batching.")
    phis: PhisConfig = Field(default_factory=PhisConfig, description="PHI-S fitting.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster connection.")

    @field_validator("teachers")
    @classmethod
    def _unique(cls, v: list[TeacherSpec]) -> list[TeacherSpec]:
        names = [t.name for t in v]
        if not v or len(set(names)) != len(names):
            raise ValueError(f"teachers must be a non-empty list with unique names, got {names}")
        return v


@dataclass
class CacheSummary:
    listed: int = 0
    duplicates: int = 0
    skipped: int = 0  # already committed by an earlier run
    ok: int = 0
    error: int = 0
    shards: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    pipeline_seconds: float = 0.0  # decode + teachers + PHI-S + write of the images after the fit sample
    pipeline_images: int = 0  # images (ok + error) processed in that phase
    first_shard_seconds: float = 0.0  # main phase: start -> first commit (actor start-up, model load, fill)
    first_shard_images: int = 0
    fit_seconds: float = 0.0  # one-time PHI-S phase: fit sample through the teachers, fit, normalize, write
    phis_fitted: bool = False
    teacher_forwards: dict[str, dict[str, int]] = field(default_factory=dict)
    # teacher -> partition -> inputs its model ran on (= images, or ceil(images / k^2) with a k x k mosaic)
    teacher_inputs: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)  # first few error rows (source, message)

    @property
    def images_per_s(self) -> float:
        """Steady-state rate (after the one-time PHI-S fit phase, if that phase processed anything else)."""
        if self.pipeline_images and self.pipeline_seconds > 0:
            return self.pipeline_images / self.pipeline_seconds
        total = self.pipeline_seconds + self.fit_seconds
        return (self.ok + self.error) / total if total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s}


# --------------------------------------------------------------------------------------------------------
# Stage functions (run in Ray tasks / actors; pure apart from reading inputs)
# --------------------------------------------------------------------------------------------------------


def _col(kind: str, *parts: str) -> str:
    return "__".join((kind, *parts))


def unreadable_id(uri: str) -> str:
    """Ids for inputs whose bytes cannot be read live in their own namespace (hash of the uri)."""
    return "u" + image_id(uri.encode(), "unreadable")[1:]


class IdStage:
    def __init__(self, storage_options: dict[str, Any]) -> None:
        self.storage_options = storage_options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, errors = [], []
        for uri, view in zip(batch["uri"], batch["view"], strict=True):
            try:
                ids.append(image_id(read_bytes(str(uri), self.storage_options), str(view)))
                errors.append("")
            except ImageError as e:
                ids.append(unreadable_id(str(uri)))
                errors.append(str(e))
            except Exception as e:  # a reader bug must not kill the run: record it on the row
                ids.append(unreadable_id(str(uri)))
                errors.append(f"{uri}: unexpected {type(e).__name__} while reading: {e}")
        return {"uri": batch["uri"], "view": batch["view"], "id": np.array(ids), "error": np.array(errors)}


class DecodeStage:
    def __init__(self, source: SourceConfig, partitions: dict[str, int]) -> None:
        self.source = source
        self.partitions = partitions

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["id"])
        out: dict[str, Any] = {k: batch[k] for k in ("id", "uri", "view")}
        status, error, width, height, mode, geometry = [], [], [], [], [], []
        images = {p: np.zeros((n, s, s, 3), np.uint8) for p, s in self.partitions.items()}
        for i in range(n):
            uri, view, iid, err = (
                str(batch["uri"][i]),
                str(batch["view"][i]),
                str(batch["id"][i]),
                str(batch["error"][i]),
            )
            w = h = 0
            m = ""
            geo: dict[str, Any] = {}
            if not err:
                try:
                    data = read_bytes(uri, self.source.storage_options)
                    if image_id(data, view) != iid:
                        raise ImageError(
                            f"{uri}: content changed while caching (id mismatch); re-run the job"
                        )
                    img = decode_image(
                        data,
                        uri,
                        self.source.min_side,
                        self.source.max_pixels,
                        draft_for=(view, max(self.partitions.values())),
                    )
                    w, h, m = img.width, img.height, img.mode
                    for p, size in self.partitions.items():
                        images[p][i], geo[p] = canonical_view(
                            img.image, size, view, self.source.resample, img.original_size
                        )
                except ImageError as e:
                    err = str(e)
                except Exception as e:  # a decoder bug must not kill the run: record it on the row
                    err = f"{uri}: unexpected {type(e).__name__} while decoding: {e}"
            status.append("error" if err else "ok")
            error.append(err)
            width.append(w)
            height.append(h)
            mode.append(m)
            geometry.append(json.dumps(geo))
        out.update(
            status=np.array(status),
            error=np.array(error),
            width=np.array(width, np.int32),
            height=np.array(height, np.int32),
            mode=np.array(mode),
            geometry=np.array(geometry),
        )
        for p in self.partitions:
            out[_col("img", p)] = images[p]
        return out


def phis_targets(phis: PhiS, dense: torch.Tensor) -> torch.Tensor:
    """Raw teacher features -> stored targets: PHI-S space, clamped to the fp16 range, fp16."""
    return cast(torch.Tensor, phis.forward(dense)).clamp_(-65000, 65000).half()


class TeacherStage:
    """Actor UDF: one teacher, loaded once; adds its dense (+ summary) columns for every partition."""

    def __init__(self, spec: TeacherSpec, partitions: dict[str, int], store: StoreConfig | None) -> None:
        """``store`` given: normalize with the store's PHI-S (read here, not shipped through Ray)."""
        self.threads = actor_threads(spec)
        torch.set_num_threads(self.threads)
        device = "cuda" if spec.runtime.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.teacher = create_teacher(spec, device)
        self.spec = spec
        self.partitions = [p for p in partitions if spec.only_partitions is None or p in spec.only_partitions]
        self.sizes = partitions
        self.phis = FeatureStore.from_config(store).phis(spec.name) if store is not None else None
        # Output shapes per partition from one probe forward (not counted), so an all-error batch still
        # yields columns of the right shape and dtype.
        self.shapes: dict[str, tuple[tuple[int, ...], int | None]] = {}
        for p in self.partitions:
            s = self.sizes[p]
            out = self.teacher(
                np.zeros((1, s, s, 3), np.uint8), resolution=self.teacher.input_resolution(p, s)
            )
            self.shapes[p] = (
                tuple(out.dense.shape[1:]),
                None if out.summary is None else out.summary.shape[1],
            )
        self.teacher.forward_images = self.teacher.forward_calls = self.teacher.model_inputs = 0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        # Ray Data may call the UDF from another thread than __init__; OpenMP's thread count is per thread,
        # so without this the forward ran with one OpenMP thread per core in every actor (oversubscribed).
        torch.set_num_threads(self.threads)
        ok = np.asarray(batch["status"]) == "ok"
        n = len(ok)
        name = self.spec.name
        before_i, before_c = self.teacher.forward_images, self.teacher.forward_calls
        dtype = np.float16 if self.phis is not None else np.float32
        for p in self.partitions:
            dshape, sdim = self.shapes[p]
            dense_out = np.zeros((n, *dshape), dtype)
            summ_out = np.zeros((n, sdim), np.float32) if sdim is not None else None
            inputs_before = self.teacher.model_inputs
            if ok.any():
                res = self.teacher.input_resolution(p, self.sizes[p])
                out = self.teacher(np.asarray(batch[_col("img", p)])[ok], resolution=res)
                dense = out.dense
                dense_out[ok] = (
                    (phis_targets(self.phis, dense) if self.phis is not None else dense).cpu().numpy()
                )
                if summ_out is not None and out.summary is not None:
                    summ_out[ok] = out.summary.cpu().numpy()
            batch[_col("dense", name, p)] = dense_out
            if summ_out is not None:
                batch[_col("summary", name, p)] = summ_out
            fw_inputs = np.zeros(n, np.int64)
            fw_inputs[0] = self.teacher.model_inputs - inputs_before
            batch[_col("fwin", name, p)] = fw_inputs
        fw_img = np.zeros(n, np.int64)
        fw_calls = np.zeros(n, np.int64)
        fw_img[0] = self.teacher.forward_images - before_i
        fw_calls[0] = self.teacher.forward_calls - before_c
        batch[_col("fwimg", name)] = fw_img
        batch[_col("fwcalls", name)] = fw_calls
        return batch


class NormalizeStage:
    """PHI-S-normalize raw dense columns (only used for the fit sample, which ran unnormalized)."""

    def __init__(self, phis: dict[str, PhiS]) -> None:
        self.phis = phis

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        for key in list(batch):
            if key.startswith("dense__"):
                teacher = key.split("__")[1]
                raw = torch.from_numpy(np.array(batch[key], np.float32))
                batch[key] = phis_targets(self.phis[teacher], raw).numpy()
        return batch


def moments_stage(batch: dict[str, Any]) -> dict[str, Any]:
    """Per-batch float64 moments of every teacher's raw dense features (all partitions pooled)."""
    ok = np.asarray(batch["status"]) == "ok"
    out: dict[str, Any] = {}
    per_teacher: dict[str, Moments] = {}
    for key in batch:
        if key.startswith("dense__"):
            teacher = key.split("__")[1]
            dense = np.asarray(batch[key])
            # an all-error batch still reports (empty) moments so every batch has the same columns
            m = Moments.from_features(dense[ok]) if ok.any() else Moments.empty(dense.shape[-1])
            per_teacher[teacher] = per_teacher[teacher].merge(m) if teacher in per_teacher else m
    for teacher, m in per_teacher.items():
        for k, v in m.to_arrays().items():
            out[f"{teacher}__{k}"] = np.asarray(v)[None]
    return out


class WriteStage:
    """Task UDF: a batch of ``shard_size`` rows becomes one committed shard; returns one stats row."""

    def __init__(self, store: StoreConfig, teachers: list[str], partitions: list[str]) -> None:
        self.store = FeatureStore.from_config(store)
        self.chunk_bytes = store.chunk_bytes
        self.teachers = teachers
        self.partitions = partitions

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        status = np.asarray(batch["status"])
        ok = status == "ok"
        rows = [
            {
                "id": str(batch["id"][i]),
                "source": str(batch["uri"][i]),
                "view": str(batch["view"][i]),
                "status": str(status[i]),
                "error": str(batch["error"][i]) or None,
                "width": int(batch["width"][i]),
                "height": int(batch["height"][i]),
                "mode": str(batch["mode"][i]),
                "geometry": str(batch["geometry"][i]),
            }
            for i in range(len(status))
        ]
        with self.store.shard_writer([str(r["id"]) for r in rows], self.chunk_bytes) as w:
            if ok.any():
                for p in self.partitions:
                    w.add_array(image_key(p), np.asarray(batch[_col("img", p)])[ok])
                for t in self.teachers:
                    for p in self.partitions:
                        for kind in ("dense", "summary"):
                            col = _col(kind, t, p)
                            if col in batch:
                                w.add_array(array_key(t, p, kind), np.asarray(batch[col])[ok])
            w.add_rows(rows)
        res = w.result
        assert res is not None
        stats: dict[str, Any] = {
            "shard": np.array([res.shard]),
            "n_ok": np.array([res.n_ok]),
            "n_error": np.array([res.n_error]),
            "nbytes": np.array([res.nbytes]),
            "skipped": np.array([res.skipped]),
            "errors": np.array([json.dumps([(r["source"], r["error"]) for r in rows if r["error"]][:5])]),
        }
        for t in self.teachers:
            stats[_col("fwimg", t)] = np.array([int(np.asarray(batch[_col("fwimg", t)]).sum())])
            stats[_col("fwcalls", t)] = np.array([int(np.asarray(batch[_col("fwcalls", t)]).sum())])
            for p in self.partitions:  # only the partitions this teacher runs on have the column
                if _col("fwin", t, p) in batch:
                    stats[_col("fwin", t, p)] = np.array([int(np.asarray(batch[_col("fwin", t, p)]).sum())])
        return stats


# --------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------

ProgressFn = Callable[[str, dict[str, Any]], None]


def _init_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"logging_level": "warning", "log_to_driver": cfg.log_to_driver}
    if cfg.address or os.environ.get("RAY_ADDRESS"):  # a cluster (inside a Ray job RAY_ADDRESS is set)
        if cfg.address:
            kwargs["address"] = cfg.address
    else:
        # Task workers (decode/write) must not be killed as soon as they idle: with actors holding most of
        # a small machine's CPUs, Ray's default soft limit (= num_cpus workers) recycles them after 1 s and
        # every new worker re-imports torch & co. — that churn cost more CPU than the teachers on 2 cores.
        kwargs.update(local_ray_options(cfg))
    ray.init(**kwargs)


def local_ray_options(cfg: RayConfig) -> dict[str, Any]:
    """``ray.init`` options of a local instance this process starts (see ``_init_ray``)."""
    return {
        "num_cpus": cfg.num_cpus,
        "num_gpus": cfg.num_gpus,
        "include_dashboard": False,
        "_system_config": {"num_workers_soft_limit": 32, "idle_worker_killing_time_threshold_ms": 600_000},
        # Every worker of the job (Ray Train workers run the training loop in a thread, like Ray Data's
        # actors) keeps freed memory in one arena: a FeatSharp step on MobileNetV2 took 3.8 s without, 2.3 s
        # with it (2-core CPU, sample config, step 10).
        "runtime_env": {"env_vars": dict(ALLOCATOR_ENV)},
    }


def _configure_data(cfg: RayConfig) -> None:
    import logging

    import ray.data

    if not cfg.progress_bars:  # radio-dist shows its own progress; keep Ray Data's per-dataset INFO lines out
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False


def teacher_records(specs: list[TeacherSpec]) -> dict[str, dict[str, Any]]:
    """name -> {fingerprint, family, spec}: what the store records and later checks against."""
    return {s.name: {"fingerprint": fingerprint(s), "family": s.family, "spec": s.identity()} for s in specs}


def actor_threads(spec: TeacherSpec) -> int:
    return spec.runtime.threads or max(1, round(spec.runtime.num_cpus))


# An actor costs seconds of start-up (a fresh Ray worker importing torch & co., building the model, a probe
# forward: 4.6-5.9 s of CPU for the CPU presets in a fresh process, before Ray's own worker start-up); one that
# would run only a few batches does not earn that back.
MIN_BATCHES_PER_ACTOR = 8


def actor_pool_size(spec: TeacherSpec, images: int) -> int:
    """Actors of ``spec``'s pool for a phase of ``images`` images: ``runtime.pool_size``, but no more than one
    per ``MIN_BATCHES_PER_ACTOR`` batches (at least one)."""
    batches = -(-images // spec.runtime.batch_size)
    return max(1, min(spec.runtime.pool_size, batches // MIN_BATCHES_PER_ACTOR))


def resource_demand(cfg: CacheJobConfig) -> dict[str, float]:
    """Ray resources a caching run needs at once to make progress: every teacher actor at its full pool
    (actors hold theirs for the whole run) plus one decode or write task. ``{"CPU": .., "GPU": ..}``."""
    actors = sum(t.runtime.num_cpus * t.runtime.pool_size for t in cfg.teachers)
    task = max(cfg.pipeline.decode_num_cpus, cfg.pipeline.write_num_cpus)
    gpus = sum(t.runtime.num_gpus * t.runtime.pool_size for t in cfg.teachers)
    return {"CPU": actors + task, "GPU": gpus}


def resource_problem(cfg: CacheJobConfig, available: dict[str, float]) -> str | None:
    """Why the job cannot run on a Ray cluster with ``available`` resources (``ray.cluster_resources()``),
    naming the settings to change; None when it fits. Ray itself would wait for the resources forever."""
    need = resource_demand(cfg)
    pools = ", ".join(
        f"{t.name}: {t.runtime.pool_size} x {t.runtime.num_cpus:g} CPU"
        + (f" + {t.runtime.num_gpus:g} GPU" if t.runtime.num_gpus else "")
        for t in cfg.teachers
    )
    have_cpu, have_gpu = float(available.get("CPU", 0.0)), float(available.get("GPU", 0.0))
    if need["GPU"] > have_gpu + 1e-9:
        return (
            f"the teachers' actor pools ask for {need['GPU']:g} GPUs ({pools}) but the Ray cluster has "
            f"{have_gpu:g}: lower teachers.N.runtime.pool_size or num_gpus (num_gpus: 0 runs on the CPU)"
        )
    if need["CPU"] > have_cpu + 1e-9:
        task = max(cfg.pipeline.decode_num_cpus, cfg.pipeline.write_num_cpus)
        return (
            f"the teachers' actor pools hold {need['CPU'] - task:g} Ray CPUs for the whole run ({pools}) and a "
            f"decode or write task needs {task:g} more, but the Ray cluster has {have_cpu:g}: lower "
            "teachers.N.runtime.pool_size or num_cpus (a Ray CPU is a scheduling share; an actor's torch "
            "threads are runtime.threads), or give Ray more CPUs (ray.num_cpus)"
        )
    return None


def _check_resources(cfg: CacheJobConfig, progress: ProgressFn | None) -> None:
    """Refuse a job that cannot run on a local instance; on a cluster (which may autoscale) only warn."""
    import ray

    problem = resource_problem(cfg, ray.cluster_resources())
    if problem is None:
        return
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        message = f"{problem}; the job waits until the cluster has them (an autoscaler may add nodes)"
        if progress:
            progress("warning", {"message": message})
        else:  # a Ray job (jobs/cache_teachers.py): stderr is the job's log
            print(f"warning: {message}", file=sys.stderr, flush=True)
        return
    raise ConfigError(f"cache job: {problem}")


def _teacher_stages(ds: Any, cfg: CacheJobConfig, normalize: bool, images: int) -> Any:
    import ray.data

    for spec in cfg.teachers:
        rt = spec.runtime
        ds = ds.map_batches(
            TeacherStage,
            fn_constructor_kwargs={
                "spec": spec,
                "partitions": cfg.pipeline.partitions,
                "store": cfg.store if normalize else None,
            },
            batch_size=rt.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actor_pool_size(spec, images)),
            num_cpus=rt.num_cpus,
            num_gpus=rt.num_gpus,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(actor_threads(spec)), **rt.env}},
        )
    return ds


def _decoded(items: list[dict[str, str]], cfg: CacheJobConfig) -> Any:
    import ray.data

    ds = ray.data.from_items(
        items, override_num_blocks=max(1, -(-len(items) // cfg.pipeline.decode_batch_size))
    )
    return ds.map_batches(
        DecodeStage(cfg.source, cfg.pipeline.partitions),
        batch_size=cfg.pipeline.decode_batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=cfg.pipeline.decode_tasks),
        num_cpus=cfg.pipeline.decode_num_cpus,
    )


def _write(ds: Any, cfg: CacheJobConfig, summary: CacheSummary, progress: ProgressFn | None) -> float | None:
    """Run the pipeline ending in the shard writer; returns when the first shard committed (perf_counter)."""
    import ray.data

    first: float | None = None
    names = [t.name for t in cfg.teachers]
    out = ds.map_batches(
        WriteStage(cfg.store, names, list(cfg.pipeline.partitions)),
        batch_size=cfg.store.shard_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(),
        num_cpus=cfg.pipeline.write_num_cpus,
    )
    for row in out.iter_rows():
        if first is None:
            first = time.perf_counter()
            summary.first_shard_images = int(row["n_ok"]) + int(row["n_error"])
        summary.shards += 1
        summary.ok += int(row["n_ok"])
        summary.error += int(row["n_error"])
        summary.bytes_written += int(row["nbytes"])
        for t in names:
            fw = summary.teacher_forwards.setdefault(t, {"images": 0, "calls": 0})
            fw["images"] += int(row[_col("fwimg", t)])
            fw["calls"] += int(row[_col("fwcalls", t)])
            for p in cfg.pipeline.partitions:
                if _col("fwin", t, p) in row:
                    inputs = summary.teacher_inputs.setdefault(t, {})
                    inputs[p] = inputs.get(p, 0) + int(row[_col("fwin", t, p)])
        if len(summary.errors) < 20:
            summary.errors.extend({"source": s, "error": e} for s, e in json.loads(row["errors"]))
        if progress:
            progress("shard", {"ok": summary.ok, "error": summary.error, "bytes": summary.bytes_written})
    return first


def _fit_phis(
    ds_fit: Any, cfg: CacheJobConfig, store: FeatureStore, progress: ProgressFn | None
) -> dict[str, PhiS]:
    rows = ds_fit.map_batches(moments_stage, batch_size=64, batch_format="numpy").take_all()
    summary_cols = [c for c in ds_fit.columns() if c.startswith("summary__")]
    small = [r for r in ds_fit.select_columns(["status", *summary_cols]).take_all() if r["status"] == "ok"]
    phis: dict[str, PhiS] = {}
    for spec in cfg.teachers:
        t = spec.name
        parts = [
            Moments.from_arrays({k.split("__", 1)[1]: np.asarray(r[k]) for k in r if k.startswith(f"{t}__")})
            for r in rows
            if f"{t}__count" in r
        ]
        if sum(part.count for part in parts) < 2:
            raise SourceError(
                f"PHI-S fit for teacher {t!r}: no decodable image among the first {cfg.phis.fit_images} inputs — "
                "check the source (see the error rows) or raise phis.fit_images"
            )
        m = parts[0]
        for part in parts[1:]:
            m = m.merge(part)
        phis[t] = fit_phis(m, seed=cfg.phis.seed)
        outputs: dict[str, Any] = {}
        disp: float | None = None
        schema = ds_fit.schema()
        shapes = dict(zip(schema.names, schema.types, strict=True))
        summaries = []
        for p in cfg.pipeline.partitions:
            dcol, scol = _col("dense", t, p), _col("summary", t, p)
            if dcol not in shapes:
                continue
            outputs[p] = {"dense": list(shapes[dcol].shape), "summary": None}
            if scol in shapes:
                outputs[p]["summary"] = list(shapes[scol].shape)
                summaries.append(np.stack([np.asarray(r[scol]) for r in small]))
        if summaries:
            disp = float(angular_dispersion(np.concatenate(summaries)))
        store.save_phis(t, phis[t], disp, outputs, fit_images=int(m.count))
        if progress:
            progress(
                "phis",
                {"teacher": t, "alpha": phis[t].alpha, "rotation": phis[t].rotation_kind, "dispersion": disp},
            )
    return phis


def run_cache(cfg: CacheJobConfig, progress: ProgressFn | None = None) -> CacheSummary:
    """Run a caching job to completion (or resume one): returns what was done."""

    store = FeatureStore.from_config(cfg.store)
    with WriterLock(store, job="cache-teachers"):  # a second caching job on this store is refused
        return _run_cache(cfg, store, progress)


def _run_cache(cfg: CacheJobConfig, store: FeatureStore, progress: ProgressFn | None) -> CacheSummary:
    import ray.data

    t0 = time.perf_counter()
    summary = CacheSummary()
    _init_ray(cfg.ray)
    _check_resources(cfg, progress)  # before the store is touched: a refused job leaves it as it was
    store.init_or_check(cfg.pipeline.partitions, teacher_records(cfg.teachers), cfg.source.resample.value)

    items: list[SourceItem] = list_items(cfg.source)
    summary.listed = len(items)
    if progress:
        progress("listed", {"items": len(items)})
    _configure_data(cfg.ray)

    ids_ds = ray.data.from_items(
        [{"uri": it.uri, "view": it.view} for it in items],
        override_num_blocks=max(1, min(200, -(-len(items) // cfg.pipeline.id_batch_size))),
    ).map_batches(
        IdStage(cfg.source.storage_options),
        batch_size=cfg.pipeline.id_batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(),
    )
    hashed = sorted(ids_ds.take_all(), key=lambda r: (r["uri"], r["view"]))
    committed = store.committed_ids()
    todo: list[dict[str, str]] = []
    seen: set[str] = set()
    for r in hashed:
        iid = str(r["id"])
        if iid in seen:
            summary.duplicates += 1
            continue
        seen.add(iid)
        if iid in committed:
            summary.skipped += 1
            continue
        todo.append({"uri": str(r["uri"]), "view": str(r["view"]), "id": iid, "error": str(r["error"])})
    if progress:
        progress("todo", {"todo": len(todo), "skipped": summary.skipped, "duplicates": summary.duplicates})

    t1 = time.perf_counter()
    if todo and not store.has_phis():
        todo.sort(key=lambda r: r["id"])
        fit, todo = todo[: cfg.phis.fit_images], todo[cfg.phis.fit_images :]
        ds_fit = _teacher_stages(_decoded(fit, cfg), cfg, normalize=False, images=len(fit)).materialize()
        phis = _fit_phis(ds_fit, cfg, store, progress)
        summary.phis_fitted = True
        norm = ds_fit.map_batches(
            NormalizeStage(phis), batch_size=64, batch_format="numpy", compute=ray.data.TaskPoolStrategy()
        )
        _write(norm, cfg, summary, progress)
    t2 = time.perf_counter()
    summary.fit_seconds = t2 - t1
    if todo:
        first = _write(
            _teacher_stages(_decoded(todo, cfg), cfg, normalize=True, images=len(todo)),
            cfg,
            summary,
            progress,
        )
        summary.pipeline_images = len(todo)
        summary.first_shard_seconds = (first or t2) - t2
    summary.pipeline_seconds = time.perf_counter() - t2
    summary.seconds = time.perf_counter() - t0
    return summary
