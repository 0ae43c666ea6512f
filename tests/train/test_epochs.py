"""The data position across relaunches with other settings: every sample of an epoch exactly once.

Pure functions over fake shards (no store, no Ray): the Ray Train test of the same property is
``test_distill.py::test_relaunched_with_other_workers_and_batch_size_trains_every_sample_once``.
"""

from __future__ import annotations

from collections import Counter

import pytest
from fixtures import fake_shards

from radio_dist.train.epochs import PlanInputs, Position, plans_for, remaining_samples
from radio_dist.train.reader import epoch_plan

SHARDS = fake_shards([10, 3, 25, 8, 8, 1, 17, 12])
ALL = {i for s in SHARDS for i in s.ids}


def inputs(workers: int, batch: int, shuffle: int = 2, seed: int = 0) -> PlanInputs:
    return PlanInputs(workers=workers, batch_size=batch, shuffle_shards=shuffle, seed=seed)


def run_segment(pos: Position, steps: int | None) -> tuple[Position, Counter[str]]:
    """Train ``steps`` steps of the position's plan (None: to the epoch's end); the ids each worker saw."""
    plans = plans_for(SHARDS, pos)
    end = plans[0].steps if steps is None else min(plans[0].steps, pos.next_step + steps)
    seen: Counter[str] = Counter()
    for step in range(pos.next_step, end):
        for p in plans:
            seen.update(s.id for s in p.batch(step))
    return pos.model_copy(
        update={"next_step": end, "global_step": pos.global_step + end - pos.next_step}
    ), seen


@pytest.mark.parametrize(
    "changes",
    [
        [(inputs(1, 4), 3), (inputs(2, 4), None)],  # 1 -> 2 workers
        [(inputs(2, 4), 3), (inputs(1, 4), None)],  # 2 -> 1 workers
        [(inputs(2, 4), 2), (inputs(2, 7), None)],  # batch size
        [(inputs(1, 4), 2), (inputs(3, 5, shuffle=1), 1), (inputs(2, 3, seed=9), 4), (inputs(1, 4), None)],
        [(inputs(4, 1), 5), (inputs(4, 1), 2), (inputs(1, 16), None)],  # same, then another
    ],
)
def test_relaunches_with_other_settings_see_every_sample_once(changes):
    pos = Position(epoch=3, inputs=changes[0][0])
    seen: Counter[str] = Counter()
    for new, steps in changes:
        pos = pos.resumed_with(new)
        assert pos.inputs == new
        left = remaining_samples(SHARDS, pos)
        pos, got = run_segment(pos, steps)
        assert sum(got.values()) == left - remaining_samples(SHARDS, pos)
        seen += got
    assert set(seen) == ALL and set(seen.values()) == {1}, "lost or repeated samples"
    assert remaining_samples(SHARDS, pos) == 0


def test_without_replanning_a_changed_job_would_lose_and_repeat_samples():
    """What the recorded plan inputs prevent: resuming step 3 of a 1-worker plan as step 3 of a 2-worker one."""
    old = epoch_plan(SHARDS, 0, 0, 1, 4, 2)
    new = epoch_plan(SHARDS, 0, 0, 2, 4, 2)
    seen = Counter(s.id for step in range(3) for s in old[0].batch(step))
    seen.update(s.id for p in new for step in range(3, p.steps) for s in p.batch(step))
    assert set(seen) != ALL or set(seen.values()) != {1}


def test_an_unchanged_relaunch_keeps_the_plan_and_a_change_at_a_segment_start_replaces_it():
    pos = Position(epoch=0, inputs=inputs(2, 4), next_step=3, global_step=3)
    assert pos.resumed_with(inputs(2, 4)) is pos
    assert plans_for(SHARDS, pos) == epoch_plan(SHARDS, 0, 0, 2, 4, 2)  # segment 0 is the epoch's own plan
    moved = pos.resumed_with(inputs(1, 4))
    assert moved.segment == 1 and moved.next_step == 0 and moved.global_step == 3
    fresh = Position(epoch=0, inputs=inputs(2, 4)).resumed_with(inputs(1, 8))
    assert fresh.segment == 0 and fresh.inputs == inputs(1, 8)  # nothing done yet: just the new plan
    # the position a checkpoint stores is JSON and back
    assert Position.model_validate(moved.model_dump(mode="json")) == moved


def test_the_remnant_plan_leaves_out_finished_shards_and_keeps_workers_in_lockstep():
    pos = Position(epoch=1, inputs=inputs(1, 10), next_step=6, global_step=6)  # 60 of 84 done
    plans = plans_for(SHARDS, pos.resumed_with(inputs(3, 2)))
    assert len({p.steps for p in plans}) == 1
    assert sum(len(p.samples) for p in plans) == len(ALL) - 60
    done_shards = {s.shard for s in epoch_plan(SHARDS, 1, 0, 1, 10, 2)[0].samples[:60]}
    left_shards = {s.shard for p in plans for s in p.samples}
    assert left_shards <= {s.shard for s in SHARDS}
    assert all(any(s.shard in w for w in p.windows) for p in plans for s in p.samples)
    assert done_shards - left_shards  # whole shards that were finished are not read again


def test_one_view_per_image_each_epoch_exactly_once_also_after_a_relaunch(tmp_path):
    """train.views: one — a store caching 4 views of each image trains each image once per epoch, on one view
    drawn from (seed, epoch): the same on every call, another in the next epoch, kept when the epoch is
    re-planned for other workers and batch size (even with another seed)."""
    from radio_dist.store import FeatureStore
    from radio_dist.testing import write_random_store
    from radio_dist.train.reader import committed_shards, view_choice

    url = str(tmp_path / "s")
    write_random_store(url, [12, 9, 11], {"t": (2, 8, 8)}, 32, views_per_image=4)  # 32 rows, 8 images
    store = FeatureStore(url)
    shards = committed_shards(store)
    views = view_choice(store, shards)
    assert views.images == 8 and len(views.groups) == 32
    source = {r["id"]: r["source"] for r in store.manifest(columns=["id", "source"]).to_pylist()}

    def epoch(e: int, pos: Position | None = None) -> list[str]:
        pos = pos or Position(epoch=e, inputs=inputs(2, 3))
        plans = plans_for(shards, pos, views)
        return [s.id for p in plans for s in p.samples]

    chosen = {e: epoch(e) for e in range(4)}
    for e, ids in chosen.items():
        assert len(ids) == 8 and sorted(source[i] for i in ids) == sorted(set(source.values()))
        assert ids == epoch(e)  # deterministic
    assert len({frozenset(v) for v in chosen.values()}) > 1  # other views in other epochs
    assert len({i for v in chosen.values() for i in v}) > 8
    # relaunched mid-epoch with 3 workers, batch 2 and another seed: the rest of the epoch, same views
    pos = Position(epoch=1, inputs=inputs(2, 3))
    first = [s.id for p in plans_for(shards, pos, views) for s in p.samples[:3]]  # one step of 2 workers
    relaunched = pos.model_copy(update={"next_step": 1}).resumed_with(inputs(3, 2, seed=5))
    rest = [s.id for p in plans_for(shards, relaunched, views) for s in p.samples]
    assert sorted(first + rest) == sorted(chosen[1])
    assert remaining_samples(shards, relaunched, views) == len(rest) == 8 - len(first)
    # without it, every row
    assert (
        len([s for p in plans_for(shards, Position(epoch=0, inputs=inputs(2, 3))) for s in p.samples]) == 32
    )
