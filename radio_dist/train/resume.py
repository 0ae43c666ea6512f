"""What a distillation checkpoint records, and what a relaunch may change.

A checkpoint's ``state.json`` holds the data ``Position`` (``radio_dist.train.epochs``: the epoch, its plan
inputs and segments), the students, teachers and partitions it trains, and the identity of the data (the
shards' digest and the teachers' fingerprints). A relaunch may change the plan inputs — workers, batch
size, shuffle window, seed — and anything that does not change what the students are (epochs, learning
rate, partitions and resolutions, reader threads): the rest of the epoch is re-planned. It may not change the
data, the teachers (the students' heads), or the set of students; ``relaunch_problem`` names what
changed and what to do, and the driver asks it before any worker starts (``check_relaunch``).
"""

from __future__ import annotations

import json
from typing import Any

from radio_dist.config import ConfigError
from radio_dist.store import FeatureStore
from radio_dist.train.config import DistillConfig
from radio_dist.train.epochs import PlanInputs, Position, remaining_samples
from radio_dist.train.plan import RunPlan
from radio_dist.train.reader import ShardRows, view_choice
from radio_dist.train.rundir import RunDir
from radio_dist.train.worker import STATE_FILE


def plan_inputs(cfg: DistillConfig, workers: int) -> PlanInputs:
    return PlanInputs(
        workers=workers,
        batch_size=cfg.train.batch_size,
        shuffle_shards=cfg.reader.shuffle_shards,
        seed=cfg.train.seed,
    )


def checkpoint_meta(pos: Position, plan: RunPlan, students: list[str]) -> dict[str, Any]:
    """The JSON a distillation checkpoint carries beside its state dicts."""
    return {
        "position": pos.model_dump(mode="json"),
        "epoch": pos.epoch,  # also inside position; kept flat for people reading state.json
        "next_step": pos.next_step,
        "global_step": pos.global_step,
        "students": sorted(students),
        "teachers": list(plan.teachers),
        "partitions": list(plan.partitions),
        "digest": plan.digest,
        "fingerprints": plan.fingerprints,
        "views": plan.views,
    }


def checkpoint_position(meta: dict[str, Any], inputs: PlanInputs) -> Position:
    """The position a checkpoint holds. Checkpoints of releases before plan inputs were recorded are read as
    made with ``inputs`` (they resumed only under the same settings)."""
    if "position" in meta:
        return Position.model_validate(meta["position"])
    return Position(
        epoch=int(meta["epoch"]),
        inputs=inputs,
        next_step=int(meta["next_step"]),
        global_step=int(meta["global_step"]),
    )


def relaunch_problem(meta: dict[str, Any], plan: RunPlan, students: list[str]) -> str | None:
    """Why this job cannot continue the checkpoint (None when it can)."""
    then = meta.get("teachers")
    if then is not None and list(then) != list(plan.teachers):
        return (
            f"the checkpoint trains teachers {then}, this job {list(plan.teachers)}: the students' heads are "
            f"made for the first; set teachers back to {then}, or use a new --out"
        )
    if meta.get("digest") != plan.digest or meta.get("fingerprints") != plan.fingerprints:
        return (
            "the checkpoint was trained on other data or teachers than the store now holds "
            f"(shards digest {meta.get('digest')} then, {plan.digest} now; fingerprints "
            f"{meta.get('fingerprints')} then, {plan.fingerprints} now); use a new --out for a new run"
        )
    if meta.get("views", "all") != plan.views:
        return (
            f"the checkpoint trains train.views: {meta.get('views', 'all')}, this job {plan.views}: an epoch "
            f"cannot switch between every row and one view per image; set train.views: {meta.get('views', 'all')}, "
            "or use a new --out"
        )
    then = meta.get("students")
    if then is not None and sorted(then) != sorted(students):
        added, removed = sorted(set(students) - set(then)), sorted(set(then) - set(students))
        return (
            f"the checkpoint holds students {sorted(then)}, this job trains {sorted(students)} "
            f"(added {added}, removed {removed}): a relaunch trains the students it started with; set them "
            "back, or use a new --out for another set"
        )
    return None


def latest_checkpoint_meta(out: RunDir, name: str) -> dict[str, Any] | None:
    """``state.json`` of the newest checkpoint Ray Train keeps for run ``name`` under ``out`` (None: none)."""
    paths = sorted(out.fs.glob(out.path(f"ray/{name}/checkpoint_*/{STATE_FILE}")))
    for path in reversed(paths):  # Ray Train names checkpoints by time: the last one is the newest
        try:
            with out.fs.open(path, "r") as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            continue  # a checkpoint being written or cut short; an older one tells the same
    return None


def check_relaunch(
    cfg: DistillConfig, plan: RunPlan, shards: list[ShardRows], out: RunDir
) -> dict[str, Any] | None:
    """Before any worker starts: None for a fresh run directory; for a relaunch, what it continues from
    and what it re-plans. Raises ``ResumeError`` for a change that cannot be honoured."""
    meta = latest_checkpoint_meta(out, cfg.name)
    if meta is None:
        return None
    problem = relaunch_problem(meta, plan, [s.name for s in cfg.students])
    if problem:
        raise ResumeError(f"{out.root}: {problem}")
    now = plan_inputs(cfg, cfg.scaling.num_workers)
    then = checkpoint_position(meta, now)
    pos = then.resumed_with(now)
    info: dict[str, Any] = {
        "epoch": then.epoch,
        "global_step": then.global_step,
        "plan": then.inputs.describe(),
        "remaining_in_epoch": remaining_samples(
            shards,
            pos,
            view_choice(FeatureStore.from_config(cfg.store), shards) if plan.views == "one" else None,
        ),
    }
    if pos is not then:
        info["replanned_for"] = now.describe()
    return info


class ResumeError(ConfigError):
    """A relaunch changes what its checkpoint cannot continue with."""
