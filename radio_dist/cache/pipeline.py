"""`cache-teachers`: source -> ids -> decode -> teacher actor pools -> PHI-S -> shard writer, on Ray Data.

The driver: list the source, hash every input (``radio_dist.cache.stages``: ids, decode, teachers, write;
each a Ray Data ``map_batches``), drop duplicate content and ids already committed in the store (resume),
and run the rest through decode tasks, one actor pool per teacher and the shard writer.

PHI-S needs statistics before anything is normalized: if the store has none yet, a deterministic fit
sample runs first through stages 2-3 *unnormalized*, its moments are merged and fitted, and the same
outputs are then normalized and written — so every teacher still runs exactly once per image.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from radio_dist.cache.config import CacheJobConfig
from radio_dist.cache.resources import actor_pool_size, resource_problem
from radio_dist.cache.stages import (
    DecodeStage,
    IdStage,
    NormalizeStage,
    TeacherStage,
    WriteStage,
    actor_threads,
    column,
    moments_stage,
    teacher_partitions,
)
from radio_dist.config import ConfigError
from radio_dist.phis import Moments, PhiS, angular_dispersion, fit_phis
from radio_dist.ray_setup import configure_data, init_ray
from radio_dist.sources import SourceError, SourceItem, list_items
from radio_dist.store import FeatureStore, OutputShapes, TeacherRecord, WriterLock
from radio_dist.store.compact import Compactor
from radio_dist.teacher import fingerprint

ProgressFn = Callable[[str, dict[str, Any]], None]


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


def teacher_records(cfg: CacheJobConfig) -> dict[str, TeacherRecord]:
    """name -> its record (fingerprint, family, spec, codec per partition): what the store records and later
    checks against."""
    codecs = job_codecs(cfg)
    return {
        s.name: TeacherRecord(
            fingerprint=fingerprint(s), family=s.family, spec=s.identity(), codecs=codecs[s.name]
        )
        for s in cfg.teachers
    }


def job_codecs(cfg: CacheJobConfig) -> dict[str, dict[str, str]]:
    """teacher -> partition it runs on -> codec name."""
    return {
        s.name: {p: cfg.codec_name(s.name, p) for p in teacher_partitions(s, cfg.pipeline.partitions)}
        for s in cfg.teachers
    }


def check_resources(cfg: CacheJobConfig, progress: ProgressFn | None) -> None:
    """Refuse a job that cannot run on a local instance; on a cluster (which may autoscale) only warn."""
    import ray

    problem = resource_problem(cfg, ray.cluster_resources())
    if problem is None:
        return
    if cfg.ray.on_cluster:
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
                "codecs": job_codecs(cfg)[spec.name],
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
        DecodeStage(cfg.source, cfg.pipeline.partitions, cfg.pipeline.view_codec),
        batch_size=cfg.pipeline.decode_batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=cfg.pipeline.decode_tasks),
        num_cpus=cfg.pipeline.decode_num_cpus,
    )


def _write(
    ds: Any,
    cfg: CacheJobConfig,
    summary: CacheSummary,
    progress: ProgressFn | None,
    compactor: Compactor | None,
) -> float | None:
    """Run the pipeline ending in the shard writer; returns when the first shard committed (perf_counter).
    Every ``compact_fanout`` commits the driver compacts the manifest (deleting what it merged at the end)."""
    import ray.data

    first: float | None = None
    names = [t.name for t in cfg.teachers]
    out = ds.map_batches(
        WriteStage(cfg.store, names, list(cfg.pipeline.partitions), job_codecs(cfg), cfg.pipeline.view_codec),
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
            fw["images"] += int(row[column("fwimg", t)])
            fw["calls"] += int(row[column("fwcalls", t)])
            for p in cfg.pipeline.partitions:
                if column("fwin", t, p) in row:
                    inputs = summary.teacher_inputs.setdefault(t, {})
                    inputs[p] = inputs.get(p, 0) + int(row[column("fwin", t, p)])
        if len(summary.errors) < 20:
            summary.errors.extend({"source": s, "error": e} for s, e in json.loads(row["errors"]))
        if progress:
            progress("shard", {"ok": summary.ok, "error": summary.error, "bytes": summary.bytes_written})
        if compactor is not None and summary.shards % compactor.fanout == 0:
            compactor.step()
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
        outputs: dict[str, OutputShapes] = {}
        disp: float | None = None
        schema = ds_fit.schema()
        shapes = dict(zip(schema.names, schema.types, strict=True))
        summaries = []
        for p in cfg.pipeline.partitions:
            dcol, scol = column("dense", t, p), column("summary", t, p)
            if dcol not in shapes:
                continue
            outputs[p] = OutputShapes(
                dense=list(shapes[dcol].shape),
                summary=list(shapes[scol].shape) if scol in shapes else None,
            )
            if scol in shapes:
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
    init_ray(cfg.ray)
    check_resources(cfg, progress)  # before the store is touched: a refused job leaves it as it was
    store.init_or_check(
        cfg.pipeline.partitions, teacher_records(cfg), cfg.source.resample.value, cfg.pipeline.view_codec
    )

    items: list[SourceItem] = list_items(cfg.source)
    summary.listed = len(items)
    if progress:
        progress("listed", {"items": len(items)})
    configure_data(cfg.ray)

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
    fanout = cfg.store.compact_fanout
    compactor = Compactor(store, fanout, defer_delete=True) if fanout >= 2 else None
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
            NormalizeStage(phis, job_codecs(cfg)),
            batch_size=64,
            batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(),
        )
        _write(norm, cfg, summary, progress, compactor)
    t2 = time.perf_counter()
    summary.fit_seconds = t2 - t1
    if todo:
        first = _write(
            _teacher_stages(_decoded(todo, cfg), cfg, normalize=True, images=len(todo)),
            cfg,
            summary,
            progress,
            compactor,
        )
        summary.pipeline_images = len(todo)
        summary.first_shard_seconds = (first or t2) - t2
    summary.pipeline_seconds = time.perf_counter() - t2
    if compactor is not None:  # every task has ended: what the steps merged can go
        compactor.step()
        compactor.finish()
    summary.seconds = time.perf_counter() - t0
    return summary
