"""Live teachers beside cached ones: the same targets the store holds, and a Ray Train job that trains on both.

The store is cached by the real pipeline (Ray Data) with a random-init tiny DINOv3 from the teacher
registry on the bundled photos, so a live copy of that teacher can be compared with its cached targets.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures import TINY_VIT

from radio_dist.cache.config import CacheJobConfig
from radio_dist.cache.pipeline import run_cache
from radio_dist.store import FeatureStore, StoreMismatchError, image_key
from radio_dist.teacher import create_teacher, preset_spec
from radio_dist.train.config import DistillConfig
from radio_dist.train.distill import run_distill
from radio_dist.train.live import LiveTeacher, fit_images, fit_live
from radio_dist.train.plan import prepare_run
from radio_dist.train.resume import ResumeError
from radio_dist.train.rundir import read_metrics
from radio_dist.train.students import load_student

STUDENT = TINY_VIT


@pytest.fixture(scope="module")
def store_url(ray_local, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("live") / "store")
    cfg = CacheJobConfig.model_validate(
        {
            "source": {"kind": "sample-photos", "views": 12},
            "teachers": [preset_spec("dinov3_tiny").model_dump(mode="json")],
            "store": {"url": url, "shard_size": 6},
            "pipeline": {"partitions": {"low": 64}},
            "phis": {"fit_images": 12},  # every image: the live fit below sees the same sample
        }
    )
    assert run_cache(cfg).ok == 12
    return url


def job(store_url: str, out, **kw) -> DistillConfig:
    return DistillConfig.model_validate(
        {
            "store": {"url": store_url},
            "out": str(out),
            "students": [STUDENT],
            "train": {"epochs": 1, "batch_size": 4, "checkpoint_every": 2, "threads": 1},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 0},
            **kw,
        }
    )


def test_a_live_copy_of_a_cached_teacher_gives_the_cached_targets(store_url, tmp_path):
    """The online baseline's targets: the store's teacher run live on the store's views, normalized by a
    PHI-S fitted the caching job's way, equal what the caching job wrote (up to its fp16)."""
    store = FeatureStore(store_url)
    plan = prepare_run(job(store_url, tmp_path / "unused", teachers=[], live_teachers=["dinov3_tiny"]))
    assert plan.cached == () and plan.teachers == ("dinov3_tiny",)
    assert plan.fingerprints["dinov3_tiny"] == store.meta().teachers["dinov3_tiny"].fingerprint
    spec = plan.live["dinov3_tiny"]
    teacher = create_teacher(spec)
    shards = plan.shard_rows(store)
    info = fit_live(spec, teacher, fit_images(store, shards, ["low"], 256), {"low": 64}, "fp")
    rec = store.meta().teachers["dinov3_tiny"]
    assert info.fit_images == 12 and rec.phis.fit_images == 12 * 16  # the store counts feature vectors
    assert (info.head.summary_dim, info.head.dense_dim) == (rec.outputs["low"].summary_dim, 64)
    assert info.dispersion == pytest.approx(rec.summary_dispersion, rel=1e-2, abs=1e-9)
    stored = store.phis("dinov3_tiny")
    np.testing.assert_allclose(info.phis.weight, stored.weight, rtol=1e-4, atol=1e-5)
    live = LiveTeacher(spec, teacher, info, {"low": 64})
    arrays = store.read_shard(shards[0].shard)
    summary, dense = live.targets(torch.from_numpy(arrays[image_key("low")]), "low")
    cached = arrays["dinov3_tiny/low/dense"].astype(np.float32)
    assert dense.shape == cached.shape
    np.testing.assert_allclose(dense.numpy(), cached, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(summary.numpy(), arrays["dinov3_tiny/low/summary"], rtol=1e-4, atol=1e-4)


def test_a_new_teacher_trains_live_beside_the_cached_one(store_url, tmp_path):
    """A teacher added without re-caching: cached dinov3_tiny + a live one with other weights, one job."""
    new = preset_spec("dinov3_tiny").model_copy(update={"name": "dino_new"})
    new = new.model_copy(update={"weights": new.weights.model_copy(update={"seed": 1})})
    out = tmp_path / "run"
    cfg = job(store_url, out, live_teachers=[new.model_dump(mode="json")])
    summary = run_distill(cfg)
    assert summary["teachers"] == ["dinov3_tiny", "dino_new"]
    info = json.loads((out / "live" / "dino_new" / "info.json").read_text())
    assert info["fit_images"] == 12 and info["dense_dim"] == 64
    metrics = read_metrics(str(out))
    assert summary["global_step"] == 3 == len(metrics)  # ceil(12 / 4)
    for m in metrics:
        assert np.isfinite(m["vit/dino_new/spatial"]) and np.isfinite(m["vit/dinov3_tiny/spatial"])
        assert m["live_teachers_s"] > 0
    student = load_student(str(out / "students" / "vit"))
    res = student(np.zeros((1, 64, 64, 3), np.uint8), denormalize=True)
    assert set(res) == {"dinov3_tiny", "dino_new"}
    # the live teacher's PHI-S was saved with the export; a changed live teacher is refused on relaunch
    other = new.model_copy(update={"weights": new.weights.model_copy(update={"seed": 2})})
    with pytest.raises(ResumeError, match="other data or teachers"):
        run_distill(job(store_url, out, live_teachers=[other.model_dump(mode="json")]))


def test_live_teachers_are_checked_before_training(store_url, tmp_path):
    with pytest.raises(StoreMismatchError, match="both cached .* and live"):
        prepare_run(job(store_url, tmp_path, teachers=["dinov3_tiny"], live_teachers=["dinov3_tiny"]))
    with pytest.raises(StoreMismatchError, match="live teacher 'nope' is not a teacher of store"):
        prepare_run(job(store_url, tmp_path, live_teachers=["nope"]))
    with pytest.raises(StoreMismatchError, match="no teacher to distill"):
        prepare_run(job(store_url, tmp_path, teachers=[]))
    # a cached teacher named live is left out of the cached ones by default
    plan = prepare_run(job(store_url, tmp_path, live_teachers=["dinov3_tiny"]))
    assert plan.cached == () and list(plan.live) == ["dinov3_tiny"]
