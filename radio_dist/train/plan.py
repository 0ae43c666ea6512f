"""The run plan: what a distillation job trains on, fixed once by the driver and handed to every worker.

``prepare_run`` checks the store against the job (teachers, fingerprints, PHI-S, partitions, resolutions)
and freezes the result as a ``RunPlan``: the teachers and partitions, each teacher's head shapes and summary
dispersion, the committed shards and their digest. Workers re-check the shards against it, checkpoints and
exported students record its fingerprints and digest.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict

from radio_dist.store import FeatureStore, StoreError, StoreMismatchError
from radio_dist.teacher import TeacherSpec, fingerprint
from radio_dist.train import losses as L
from radio_dist.train.config import DistillConfig, TrainConfig
from radio_dist.train.live import live_specs
from radio_dist.train.reader import ShardRows, committed_shards, shards_digest
from radio_dist.train.students import TeacherHeadInfo


class RunPlan(BaseModel):
    """Frozen: every worker trains on exactly this."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    teachers: tuple[str, ...]  # every teacher the students learn: the cached ones, then the live ones
    live: dict[str, TeacherSpec] = {}  # the teachers run live in the workers (radio_dist.train.live)
    partitions: tuple[str, ...]
    resolutions: dict[str, tuple[int, ...]]  # partition -> the student resolutions sampled from it
    heads: dict[str, TeacherHeadInfo]  # live teachers' are added by the workers, after their first use
    dispersion: dict[str, float | None]  # teacher -> angular dispersion of its summaries
    fingerprints: dict[str, str]
    phis_sha256: dict[str, str]
    shards: tuple[str, ...]
    digest: str  # shards_digest of those shards
    rows: int
    views: str = "all"  # train.views: every row, or one view per image, each epoch

    @property
    def cached(self) -> tuple[str, ...]:
        """The teachers whose targets are read from the store."""
        return tuple(t for t in self.teachers if t not in self.live)

    def has_summary(self, teacher: str) -> bool:
        return self.heads[teacher].summary_dim is not None

    def shard_rows(self, store: FeatureStore) -> list[ShardRows]:
        """The plan's shards as the store holds them now; refused if any is gone or changed under the run."""
        now = {s.shard: s for s in committed_shards(store)}
        missing = [s for s in self.shards if s not in now]
        if missing:
            raise StoreError(
                f"store {store.url}: {len(missing)} shard(s) of this run are gone (e.g. {missing[0]})"
            )
        shards = [now[s] for s in self.shards]
        if shards_digest(shards) != self.digest:
            raise StoreError(f"store {store.url}: the shards of this run changed under it")
        return shards


def prepare_run(cfg: DistillConfig) -> RunPlan:
    """Check the store against the job and fix what the run trains on (raises StoreMismatchError)."""
    store = FeatureStore.from_config(cfg.store)
    meta = store.meta()
    have = sorted(meta.teachers)
    live = {s.name: s for s in live_specs(cfg.live_teachers, store)}
    problems = []
    if len(live) != len(cfg.live_teachers):
        problems.append("live_teachers names a teacher twice")
    teachers = [t for t in have if t not in live] if cfg.teachers is None else list(cfg.teachers)
    for t in teachers:
        if t not in meta.teachers:
            problems.append(f"teacher {t!r} is not in the store (it has {have})")
        if t in live:
            problems.append(
                f"teacher {t!r} is both cached (teachers) and live (live_teachers): drop it from one of them"
            )
    if not teachers and not live:
        problems.append("no teacher to distill: teachers is empty and live_teachers names none")
    for t, exp in sorted(cfg.expect.items()):
        if t in live:
            if exp.fingerprint and fingerprint(live[t]) != exp.fingerprint:
                problems.append(
                    f"live teacher {t!r}: fingerprint {fingerprint(live[t])}, {exp.fingerprint} expected"
                )
            continue
        rec = meta.teachers.get(t)
        if rec is None:
            problems.append(f"expected teacher {t!r} is not in the store (it has {have})")
            continue
        if exp.fingerprint and rec.fingerprint != exp.fingerprint:
            problems.append(
                f"teacher {t!r}: fingerprint {rec.fingerprint} in the store, {exp.fingerprint} expected "
                "(its spec or weights differ)"
            )
        sha = rec.phis.sha256 if rec.phis else None
        if exp.phis_sha256 and sha != exp.phis_sha256:
            problems.append(
                f"teacher {t!r}: PHI-S parameters sha256 {sha} in the store, {exp.phis_sha256} expected"
            )
    partitions = cfg.partitions or sorted(meta.partitions)
    for p in partitions:
        if p not in meta.partitions:
            problems.append(f"partition {p!r} is not in the store (it has {sorted(meta.partitions)})")
    for t, spec in live.items():
        skipped = [
            p for p in partitions if spec.only_partitions is not None and p not in spec.only_partitions
        ]
        if skipped:
            problems.append(
                f"live teacher {t!r} does not run on trained partition(s) {skipped} (its only_partitions): every "
                "teacher of a step gives targets; widen only_partitions or set partitions"
            )
    for t in teachers:
        if t in meta.teachers and meta.teachers[t].phis is None:
            problems.append(f"teacher {t!r} has no PHI-S parameters yet (the caching job never fitted them)")
    if problems:
        raise StoreMismatchError(
            f"store {store.url} does not match this distillation job:\n  - " + "\n  - ".join(problems)
        )
    resolutions = cfg.train.resolutions or {p: [int(meta.partitions[p])] for p in partitions}
    for p, rs in resolutions.items():
        if p not in partitions:
            raise StoreMismatchError(
                f"train.resolutions names partition {p!r}, which this job does not train on"
            )
        if not rs or any(r < 16 for r in rs):
            raise StoreMismatchError(
                f"train.resolutions[{p!r}] must be a non-empty list of sizes >= 16, got {rs}"
            )
    shards = committed_shards(store)
    if not shards:
        raise StoreError(
            f"store {store.url} has no committed images yet — run `radio-dist cache-teachers` first"
        )
    heads, phis_sha256 = {}, {}
    for t in teachers:
        rec = meta.teachers[t]
        outs = rec.outputs[partitions[0]]
        heads[t] = TeacherHeadInfo(summary_dim=outs.summary_dim, dense_dim=outs.dense_dim)
        assert rec.phis is not None  # refused above
        phis_sha256[t] = rec.phis.sha256
    return RunPlan(
        teachers=(*teachers, *live),
        live=live,
        partitions=tuple(partitions),
        resolutions={p: tuple(rs) for p, rs in resolutions.items()},
        heads=heads,
        dispersion={t: meta.teachers[t].summary_dispersion for t in teachers},
        fingerprints={
            **{t: meta.teachers[t].fingerprint for t in teachers},
            **{t: fingerprint(spec) for t, spec in live.items()},
        },
        phis_sha256=phis_sha256,
        shards=tuple(s.shard for s in shards),
        digest=shards_digest(shards),
        rows=sum(len(s.ids) for s in shards),
        views=cfg.train.views.value,
    )


def step_choice(
    plan: RunPlan, train: TrainConfig, epoch: int, step: int, segment: int = 0
) -> tuple[str, int]:
    """(partition, resolution) of one step of an epoch's plan (``segment``: its re-plans after a relaunch
    with other settings): a pure function of the seed, identical on every worker."""
    seg = [segment] if segment else []
    rng = np.random.default_rng([train.seed & 0xFFFFFFFF, epoch, step, *seg, 0xDE5])
    return L.sample_resolution(rng, plan.resolutions, train.partition_weights)
