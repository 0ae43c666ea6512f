"""How big a caching job's actor pools are, what Ray resources it needs, and whether an instance holds them."""

from __future__ import annotations

from dataclasses import dataclass

from radio_dist.cache.config import CacheJobConfig
from radio_dist.teacher import TeacherSpec

# An actor costs seconds of start-up (a fresh Ray worker importing torch & co., building the model, a probe
# forward: 4.6-5.9 s of CPU for the CPU presets in a fresh process, before Ray's own worker start-up); one that
# would run only a few batches does not earn that back.
MIN_BATCHES_PER_ACTOR = 8


def actor_pool_size(spec: TeacherSpec, images: int) -> int:
    """Actors of ``spec``'s pool for a phase of ``images`` images: ``runtime.pool_size``, but no more than one
    per ``MIN_BATCHES_PER_ACTOR`` batches (at least one)."""
    batches = -(-images // spec.runtime.batch_size)
    return max(1, min(spec.runtime.pool_size, batches // MIN_BATCHES_PER_ACTOR))


@dataclass(frozen=True)
class Demand:
    """Ray resources a caching job holds at once: the actor pools' CPUs and GPUs and its tasks' CPUs."""

    actor_cpus: float
    task_cpus: float
    gpus: float

    @property
    def cpus(self) -> float:
        return self.actor_cpus + self.task_cpus


def resource_demand(cfg: CacheJobConfig, all_tasks: bool = False) -> Demand:
    """Every teacher actor at its full pool (actors hold theirs for the whole run) plus, to make progress, one
    decode or write task — or, with ``all_tasks`` (sizing a cluster for the job's busiest moment), every
    decode task the pipeline runs at once and a write task."""
    actors = sum(t.runtime.num_cpus * t.runtime.pool_size for t in cfg.teachers)
    gpus = sum(t.runtime.num_gpus * t.runtime.pool_size for t in cfg.teachers)
    pipe = cfg.pipeline
    if all_tasks:
        tasks = pipe.decode_tasks * pipe.decode_num_cpus + pipe.write_num_cpus
    else:
        tasks = max(pipe.decode_num_cpus, pipe.write_num_cpus)
    return Demand(actor_cpus=actors, task_cpus=tasks, gpus=gpus)


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
    if need.gpus > have_gpu + 1e-9:
        return (
            f"the teachers' actor pools ask for {need.gpus:g} GPUs ({pools}) but the Ray cluster has "
            f"{have_gpu:g}: lower teachers.N.runtime.pool_size or num_gpus (num_gpus: 0 runs on the CPU)"
        )
    if need.cpus > have_cpu + 1e-9:
        return (
            f"the teachers' actor pools hold {need.actor_cpus:g} Ray CPUs for the whole run ({pools}) and a "
            f"decode or write task needs {need.task_cpus:g} more, but the Ray cluster has {have_cpu:g}: lower "
            "teachers.N.runtime.pool_size or num_cpus (a Ray CPU is a scheduling share; an actor's torch "
            "threads are runtime.threads), or give Ray more CPUs (ray.num_cpus)"
        )
    return None
