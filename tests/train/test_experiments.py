"""`radio-dist experiment`: the derived store with a fixed pattern, the pattern's share in a student's features,
every arm's config, and (slow) whole experiments on real cached photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from radio_dist.cache.config import CacheJobConfig
from radio_dist.config import read_yaml
from radio_dist.store import FeatureStore, StoreError, verify_store
from radio_dist.testing import write_random_store
from radio_dist.train.experiments import (
    EXPERIMENTS,
    PATTERN_STRENGTH,
    arm_config,
    fixed_pattern,
    pattern_share,
    pattern_store,
    two_partitions,
)
from radio_dist.train.reader import committed_shards

REPO = Path(__file__).resolve().parents[2]


def test_fixed_pattern_is_seeded_and_has_the_energy_asked_for():
    p = fixed_pattern((5, 6), 32, energy=8.0, seed=3)
    assert p.shape == (5, 6, 32)
    assert float(p.double().square().sum(-1).mean()) == pytest.approx(8.0, rel=1e-5)
    assert torch.equal(p, fixed_pattern((5, 6), 32, energy=8.0, seed=3))
    assert not torch.equal(p, fixed_pattern((5, 6), 32, energy=8.0, seed=4))
    # smooth (the default, 4 x 4 cells upsampled): neighbours alike; per token (cells=None): unrelated
    big = fixed_pattern((16, 16), 64, energy=1.0, seed=0)
    white = fixed_pattern((16, 16), 64, energy=1.0, seed=0, cells=None)

    def neighbour_cos(q: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(q[:, 1:], q[:, :-1], dim=-1).mean())

    assert neighbour_cos(big) > 0.8 and abs(neighbour_cos(white)) < 0.1


def test_pattern_store_adds_the_pattern_to_one_teacher_only_and_resumes(tmp_path):
    src = FeatureStore(str(tmp_path / "src"))
    write_random_store(src.url, [6, 5], {"t1": (4, 32, 16), "t2": (4, 64, None)}, 64)
    dst_url = str(tmp_path / "dst")
    pattern = pattern_store(src, dst_url, "t2")
    dst = FeatureStore(dst_url)
    assert verify_store(dst)["ok"]
    energies = []
    for sh in committed_shards(src):
        a2, b2 = src.read_targets(sh.shard, "t2", "low")[0], dst.read_targets(sh.shard, "t2", "low")[0]
        np.testing.assert_allclose(b2 - a2, np.broadcast_to(pattern.numpy(), a2.shape), atol=2e-2)
        energies.append(np.square(a2.astype(np.float64)).sum(-1).mean())
        a1, b1 = src.read_targets(sh.shard, "t1", "low"), dst.read_targets(sh.shard, "t1", "low")
        np.testing.assert_array_equal(a1[0], b1[0])
        np.testing.assert_array_equal(a1[1], b1[1])
        np.testing.assert_array_equal(
            src.read_shard(sh.shard)["images/low"], dst.read_shard(sh.shard)["images/low"]
        )
    # the pattern's energy per token is PATTERN_STRENGTH of the targets' (measured on the first shard)
    assert float(pattern.double().square().sum(-1).mean()) == pytest.approx(
        PATTERN_STRENGTH * energies[0], rel=1e-3
    )
    assert pattern_store(src, dst_url, "t2").shape == pattern.shape  # run again: resumed, nothing rewritten
    with pytest.raises(StoreError, match="no teacher 'nope' to add a pattern to"):
        pattern_store(src, str(tmp_path / "other"), "nope")


def test_pattern_share_is_one_for_a_student_that_reproduces_it_and_zero_without(tmp_path):
    """Two stand-in students (plain functions with a student's call signature; the measurement is under test,
    not a model): one adds the pattern to image-dependent features, one does not."""
    store = FeatureStore(str(tmp_path / "s"))
    write_random_store(store.url, [4], {"t": (7, 48, None)}, 224)
    pattern = fixed_pattern((7, 7), 48, energy=10.0, cells=None)  # per token: orthogonal to smooth features

    def features(x: torch.Tensor) -> torch.Tensor:  # depends on the image: its mean colour per 32 px cell
        cells = torch.nn.functional.adaptive_avg_pool2d(x, (7, 7)).permute(0, 2, 3, 1)
        return cells.repeat(1, 1, 1, 16) * 3.0

    copies = lambda x: {"t": {"dense": features(x) + pattern}}  # noqa: E731
    clean = lambda x: {"t": {"dense": features(x)}}  # noqa: E731
    share = pattern_share(store, {"copies": copies, "clean": clean}, "t", pattern, images=6)
    assert share["copies"] == pytest.approx(1.0, abs=0.05)
    assert abs(share["clean"]) < 0.05


def test_every_arm_is_a_valid_distill_job_that_differs_in_its_one_setting():
    for exp in EXPERIMENTS.values():
        cfgs = [arm_config("./store", f"./out/{a.name}", a, steps=50, seed=1) for a in exp.arms]
        for cfg, arm in zip(cfgs, exp.arms, strict=True):
            assert cfg.train.max_steps == 50 and cfg.train.seed == 1
            assert [s.name for s in cfg.students] == list(arm.students)
        if len(cfgs) == 2:
            a, b = (c.model_dump(mode="json") for c in cfgs)
            diff = {k for k in a["train"] if a["train"][k] != b["train"][k]}
            t0, t1 = exp.arms[0].train, exp.arms[1].train
            assert diff == {k for k in set(t0) | set(t1) if t0.get(k) != t1.get(k)}
            assert bool(diff) != (a["students"] != b["students"])  # one setting or the students, not both
    assert two_partitions({"low": 224, "high": 448}) == {
        "low": [128, 160, 192, 224],
        "high": [320, 352, 416, 448],
    }
    with pytest.raises(ValueError, match="unknown students"):
        arm_config("./s", "./o", type(EXPERIMENTS["together"].arms[0])("x", students=("nope",)), 5, 0)


def demo_cache(url: str, views: int, partitions: dict[str, int] | None = None) -> CacheJobConfig:
    data = read_yaml(REPO / "jobs/configs/cache_demo.yaml")
    data["source"]["views"] = views
    data["store"] = {"url": url, "shard_size": 32}
    data["phis"] = {"fit_images": 32}
    if partitions:
        data["pipeline"]["partitions"] = partitions
    return CacheJobConfig.model_validate(data)


@pytest.mark.slow  # ~4 min: caches 32 views with the demo's teachers, trains 2 arms of 2 experiments (Ray)
@pytest.mark.timeout(900)
def test_shift_and_summary_loss_experiments_write_their_tables(ray_local, tmp_path):
    from radio_dist.cache.pipeline import run_cache
    from radio_dist.train.experiments import run_experiment

    url = str(tmp_path / "store")
    assert run_cache(demo_cache(url, 32)).ok == 32
    out = tmp_path / "exp"
    shift = run_experiment("shift", url, str(out), steps=8, images=6)
    shares = {a: r["pattern_share"]["vit_tiny"] for a, r in shift["arms"].items()}
    assert all(np.isfinite(v) for v in shares.values())
    assert (out / "shift.md").read_text().startswith("**shift**")
    assert json.loads((out / "shift.json").read_text())["rows"][0][0] == "cached targets"
    loss = run_experiment("summary-loss", url, str(out), steps=8, images=6)
    assert [r[0] for r in loss["rows"]] == ["effnet_lite0", "mobilenet_v2"]
    # a second call reuses the exported arms (nothing trained: the exports' files are unchanged)
    stamp = (out / "summary-loss" / "angular" / "students" / "cradio" / "config.json").stat().st_mtime_ns
    run_experiment("summary-loss", url, str(out), steps=8, images=6)
    assert (
        out / "summary-loss" / "angular" / "students" / "cradio" / "config.json"
    ).stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"trained with other settings \(steps: 8 -> 9\)"):
        run_experiment("summary-loss", url, str(out), steps=9, images=6)  # nothing trained or overwritten
    with pytest.raises(StoreError, match="needs two"):
        run_experiment("resolutions", url, str(out), steps=8)
