"""Where a training job stands in its data, so that a relaunch with other settings loses and repeats nothing.

An epoch's sample order is a pure function of its *plan inputs* (workers, batch size, shuffle window, seed;
``radio_dist.train.reader.epoch_plan``). A checkpoint records a ``Position``: the epoch, the inputs of the
plan being followed and how many of its steps are done, and — for an epoch that was already re-planned — the
earlier *segments* (inputs and steps done under each). A job relaunched with the same inputs continues the
same plan. A job relaunched with other inputs (a node was lost: fewer workers; a larger batch) closes the
current segment and plans the epoch's remaining samples — every sample no earlier segment trained on — for
the new inputs; the next epoch is planned whole again. So every committed sample of an epoch is trained on
exactly once, whatever changed between attempts, and the position is recomputed from the few numbers stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import ConfigDict, Field

from radio_dist.config import StrictModel
from radio_dist.train.reader import ShardRows, ViewChoice, WorkerPlan, epoch_plan


class PlanInputs(StrictModel):
    """Everything an epoch's sample order depends on, besides the store's shards and the epoch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    workers: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    shuffle_shards: int = Field(ge=1)
    seed: int

    def describe(self) -> str:
        return (
            f"{self.workers} worker(s) x batch {self.batch_size}, shuffle window {self.shuffle_shards} "
            f"shard(s), seed {self.seed}"
        )


class Segment(StrictModel):
    """A finished part of an epoch: ``steps`` steps of the plan made from ``inputs``."""

    inputs: PlanInputs
    steps: int = Field(ge=0)


class Position(StrictModel):
    """Where the data stands: the checkpoint's record, enough to rebuild every plan of the epoch."""

    epoch: int = Field(0, ge=0)
    done: list[Segment] = Field(default_factory=list, description="Earlier segments of this epoch.")
    inputs: PlanInputs
    next_step: int = Field(0, ge=0, description="Steps of the current segment's plan done.")
    global_step: int = Field(0, ge=0)

    @property
    def segment(self) -> int:
        return len(self.done)

    def after_step(self, step: int, global_step: int) -> Position:
        return self.model_copy(update={"next_step": step + 1, "global_step": global_step})

    def next_epoch(self, inputs: PlanInputs, global_step: int) -> Position:
        return Position(epoch=self.epoch + 1, inputs=inputs, global_step=global_step)

    def resumed_with(self, inputs: PlanInputs) -> Position:
        """The position a job with ``inputs`` continues from: the same plan when nothing changed, else the
        current segment closed and the rest of the epoch planned for ``inputs``."""
        if inputs == self.inputs:
            return self
        done = list(self.done)
        if self.next_step:
            done.append(Segment(inputs=self.inputs, steps=self.next_step))
        return self.model_copy(update={"done": done, "inputs": inputs, "next_step": 0})


def plans_for(
    shards: Sequence[ShardRows], pos: Position, views: ViewChoice | None = None
) -> list[WorkerPlan]:
    """Every worker's plan of the position's current segment: the epoch's samples no earlier segment took.
    ``views``: one view per image, chosen by the seed the epoch started with (a relaunch with another seed
    keeps the epoch's choice, so every image is still trained on once)."""
    first_seed = pos.done[0].inputs.seed if pos.done else pos.inputs.seed
    select = views.mask(first_seed, pos.epoch) if views is not None else None
    taken: set[tuple[str, int]] = set()
    for k, seg in enumerate(pos.done):
        for plan in _plans(shards, pos.epoch, seg.inputs, frozenset(taken), k, select):
            taken.update((s.shard, s.index) for s in plan.samples[: seg.steps * plan.batch_size])
    return _plans(shards, pos.epoch, pos.inputs, frozenset(taken), pos.segment, select)


def _plans(
    shards: Sequence[ShardRows],
    epoch: int,
    inputs: PlanInputs,
    exclude: frozenset[tuple[str, int]],
    k: int,
    select: np.ndarray | None,
) -> list[WorkerPlan]:
    return epoch_plan(
        shards,
        epoch,
        inputs.seed,
        inputs.workers,
        inputs.batch_size,
        inputs.shuffle_shards,
        exclude,
        k,
        select,
    )


def remaining_samples(shards: Sequence[ShardRows], pos: Position, views: ViewChoice | None = None) -> int:
    """Samples of the position's epoch not trained on yet."""
    plans = plans_for(shards, pos, views)
    return sum(max(0, len(p.samples) - pos.next_step * p.batch_size) for p in plans)
