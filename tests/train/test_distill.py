"""Multi-student distillation with real Ray Train on a real store: resumption counted by sample ids.

The store here is a real Zarr/Parquet store with random targets (``write_synthetic_store``) so that Ray Train's
start-up, not teacher compute, is what these tests pay; the fidelity test in test_fidelity.py uses real
teachers on real photos.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from faultkit import TALLY
from fixtures import TINY_VIT

from radio_dist.store import FeatureStore, StoreMismatchError
from radio_dist.testing import write_synthetic_store
from radio_dist.train.audit import sample_audit
from radio_dist.train.config import DistillConfig
from radio_dist.train.distill import run_distill
from radio_dist.train.plan import prepare_run
from radio_dist.train.resume import ResumeError
from radio_dist.train.rundir import read_metrics
from radio_dist.train.students import load_student

TINY_STUDENTS = [
    {"name": "cradio", "kind": "cradio", "arch": "tiny", "head_hidden": 32, "cpe_max_grid": 8},
    TINY_VIT,
]


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("distill") / "store")
    # 34 ok rows in 4 shards; two partitions as C-RADIO caches them (low and high, twice the grid)
    write_synthetic_store(url, [10, 7, 12, 9], px={"low": 32, "high": 64}, errors_per_shard=1)
    return url


def make_cfg(store_url: str, out: Path, **train) -> DistillConfig:
    return DistillConfig.model_validate(
        {
            "store": {"url": store_url},
            "out": str(out),
            "students": TINY_STUDENTS,
            "train": {"epochs": 2, "batch_size": 4, "checkpoint_every": 2, "threads": 1, **train},
            "reader": {"shuffle_shards": 2},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 1},
        }
    )


def assert_exactly_once(out: Path, store_url: str, epochs: int) -> int:
    """Every committed ok id trained exactly once per epoch (the sample audit); returns the samples checked."""
    ok_ids = {r["id"] for r in FeatureStore(store_url).manifest().to_pylist() if r["status"] == "ok"}
    audit = sample_audit(str(out))
    assert sorted(audit) == list(range(epochs))
    checked = 0
    for epoch, counts in audit.items():
        checked += sum(counts.values())
        dup = {k: v for k, v in counts.items() if v != 1}
        print(
            f"epoch {epoch}: {len(counts)} ids seen, {len(ok_ids - set(counts))} lost, {len(dup)} duplicated"
        )
        assert set(counts) == ok_ids, f"epoch {epoch}: lost {sorted(ok_ids - set(counts))[:5]}"
        assert not dup, f"epoch {epoch}: seen more than once: {dup}"
    return checked


def test_refuses_a_store_that_does_not_match(store_url, tmp_path):
    cfg = make_cfg(store_url, tmp_path / "run")
    run = prepare_run(cfg)
    assert run.teachers == ("t1", "t2") and run.rows == 34
    bad = DistillConfig.model_validate(
        {**cfg.model_dump(), "expect": {"t1": {"fingerprint": "something-else"}}}
    )
    with pytest.raises(
        StoreMismatchError, match="teacher 't1': fingerprint fp-t1 in the store, something-else"
    ):
        prepare_run(bad)
    with pytest.raises(StoreMismatchError, match="PHI-S parameters sha256"):
        prepare_run(
            DistillConfig.model_validate({**cfg.model_dump(), "expect": {"t2": {"phis_sha256": "0" * 64}}})
        )
    with pytest.raises(StoreMismatchError, match="teacher 'dino' is not in the store"):
        prepare_run(DistillConfig.model_validate({**cfg.model_dump(), "teachers": ["t1", "dino"]}))
    assert run.partitions == ("high", "low")
    with pytest.raises(StoreMismatchError, match="partition 'mid' is not in the store"):
        prepare_run(DistillConfig.model_validate({**cfg.model_dump(), "partitions": ["mid"]}))


@pytest.mark.slow  # ~1 min; the default run has the relaunch chain (stop, other settings, resume)
@pytest.mark.faults
def test_killed_worker_resumes_and_sees_every_sample_once(ray_local, store_url, tmp_path):
    """Two workers; one is SIGKILLed mid-epoch; Ray Train restarts both from the last checkpoint. The ViT
    student is sharded with FSDP2 (DAMP in place, a sharded EMA, a gathered checkpoint), the C-RADIO one DDP."""
    out = tmp_path / "run"
    cfg = make_cfg(store_url, out, resolutions={"low": [32, 48], "high": [64, 80]})
    cfg = DistillConfig.model_validate(
        {
            **cfg.model_dump(),
            "students": [TINY_STUDENTS[0], {**TINY_STUDENTS[1], "parallel": "fsdp"}],
            "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 1},
            "debug": {"kill_at_step": 4, "kill_rank": 1},
        }
    )
    summary = run_distill(cfg)
    assert (out / "killed-4").exists()  # the fault really happened
    starts = [
        json.loads(x)["start"]
        for x in (out / "samples" / "rank-1.jsonl").read_text().splitlines()
        if "start" in x
    ]
    assert starts[0] == [0, 0] and len(starts) == 2 and starts[1] != [0, 0]  # resumed, not restarted
    TALLY.record("training worker SIGKILLed", 1, assert_exactly_once(out, store_url, epochs=2))
    metrics = read_metrics(str(out))
    assert metrics[-1]["global_step"] == summary["global_step"] > 4
    # stochastic resolution from both partitions' sets, each step on its own partition's targets
    seen = {(m["partition"], m["resolution"]) for m in metrics}
    assert seen <= {("low", 32), ("low", 48), ("high", 64), ("high", 80)}
    assert {p for p, _ in seen} == {"low", "high"}
    for name in ("cradio", "vit"):
        assert np.isfinite(metrics[-1][f"{name}/total"])
        assert all(np.isfinite(m[f"{name}/grad_norm"]) for m in metrics)
    # the sharded student's checkpoints hold each worker's shards (DCP), none gathered on rank 0
    dirs = sorted((out / "ray").glob("*/checkpoint_*/vit.dcp"))
    assert dirs and all(
        sorted(p.name for p in d.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"] for d in dirs
    )
    assert "model" not in torch.load(dirs[-1].parent / "vit.pt", weights_only=True)
    assert not list((out / "ray").glob("*/checkpoint_*/cradio.dcp"))  # the DDP one: whole, from rank 0
    student = load_student(str(out / "students" / "vit"))  # the sharded student, exported whole
    assert json.loads((out / "students" / "vit" / "config.json").read_text())["spec"]["parallel"] == "fsdp"
    res = student(np.zeros((1, 32, 32, 3), np.uint8))
    assert np.isfinite(res["t1"]["dense"].numpy()).all()


@pytest.mark.slow  # ~1.5 min: two restarts of both workers
@pytest.mark.faults
def test_a_worker_killed_twice_resumes_each_time(ray_local, store_url, tmp_path):
    """Rank 0 (which writes the checkpoints) is SIGKILLed after step 2 and again after step 6: each time both
    workers restart from the last registered checkpoint and re-plan the epoch's rest; every sample is trained
    once per epoch."""
    out = tmp_path / "run"
    cfg = DistillConfig.model_validate(
        {
            **make_cfg(store_url, out).model_dump(),
            "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 2},
            "debug": {"kill_at_step": [2, 6], "kill_rank": 0},
        }
    )
    run_distill(cfg)
    assert (out / "killed-2").exists() and (out / "killed-6").exists()
    starts = [
        json.loads(x)["start"]
        for x in (out / "samples" / "rank-0.jsonl").read_text().splitlines()
        if "start" in x
    ]
    # two restarts, each from the newest checkpoint Ray Train had registered — which need not be the newest
    # one reported: rank 0 killed one step after a report restarted from the start of the epoch (seen here)
    assert len(starts) == 3 and starts[0] == [0, 0], starts
    TALLY.record("training worker SIGKILLed", 2, assert_exactly_once(out, store_url, epochs=2))


def relaunch(cfg: DistillConfig, workers: int, batch_size: int, stop_after: int | None) -> dict:
    """Run ``cfg`` as a user relaunching it would: other workers or batch size, stopping after a step."""
    data = cfg.model_dump()
    data["scaling"] = {**data["scaling"], "num_workers": workers, "max_failures": 0}
    data["train"] = {**data["train"], "batch_size": batch_size}
    data["debug"] = {"stop_after_step": stop_after}
    job = DistillConfig.model_validate(data)
    if stop_after is None:
        return run_distill(job)
    with pytest.raises(Exception, match="stop_after_step"):
        run_distill(job)
    return {}


def test_relaunched_with_other_workers_and_batch_size_trains_every_sample_once(
    ray_local, store_url, tmp_path, monkeypatch
):
    """A job stopped and relaunched as a user would after losing a node: 1 worker x 4 -> 2 workers x 3 ->
    1 worker x 4. Each relaunch re-plans the rest of the epoch; counted by sample ids, nothing is lost or
    repeated, and the second epoch is planned whole for the last settings."""
    out = tmp_path / "run"
    monkeypatch.chdir(
        tmp_path
    )  # relative paths, as `make demo` passes them (Ray Train workers run elsewhere)
    cfg = make_cfg(os.path.relpath(store_url, tmp_path), Path("run"), epochs=2, checkpoint_every=3)
    # the ViT student asks for FSDP2: whole checkpoints on one worker, sharded on two, each read by the other
    cfg = cfg.model_copy(
        update={"students": [cfg.students[0], cfg.students[1].model_copy(update={"parallel": "fsdp"})]}
    )
    # 1 worker x 4: checkpoints after 3 steps, stops after 4 (step 3 is rolled back)
    relaunch(cfg, workers=1, batch_size=4, stop_after=3)
    assert not (out / "students").exists()
    # 2 workers x 3: resumes from 12 samples done, re-plans the other 22; checkpoints at global step 4 (every
    # 2), stops after 5
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"checkpoint_every": 2})})
    relaunch(cfg, workers=2, batch_size=3, stop_after=4)
    assert list((out / "ray").glob("*/checkpoint_*/vit.dcp/__1_0.distcp"))
    # 1 worker x 4 to the end
    summary = relaunch(cfg, workers=1, batch_size=4, stop_after=None)
    assert summary["resumed"]["replanned_for"].startswith("1 worker(s) x batch 4")
    assert summary["resumed"]["plan"].startswith("2 worker(s) x batch 3")
    assert summary["resumed"]["global_step"] == 4 and summary["resumed"]["epoch"] == 0
    assert summary["resumed"]["remaining_in_epoch"] == 34 - 12 - 6
    assert_exactly_once(out, store_url, epochs=2)
    starts = [
        json.loads(x) for x in (out / "samples" / "rank-0.jsonl").read_text().splitlines() if "start" in x
    ]
    assert [(s["global_step"], s["segment"]) for s in starts] == [(0, 0), (3, 1), (4, 2)]
    assert (out / "samples" / "rank-1.jsonl").exists()  # the 2-worker attempt really had two
    metrics = read_metrics(str(out))
    # epoch 0: 3 steps of 4, 1 step of 2x3, 4 steps of 4 (16 left); epoch 1 whole at 1 x 4: ceil(34 / 4) = 9
    assert summary["global_step"] == 3 + 1 + 4 + 9 == metrics[-1]["global_step"]
    assert {m["segment"] for m in metrics if m["epoch"] == 0} == {0, 1, 2}
    for name in ("cradio", "vit"):
        assert all(np.isfinite(m[f"{name}/grad_norm"]) and m[f"{name}/skipped"] == 0 for m in metrics)
        for m in metrics:  # the phases of each student's step, inside its step time
            phases = m[f"{name}/forward_s"] + m[f"{name}/backward_s"] + m[f"{name}/optimizer_s"]
            assert 0 < m[f"{name}/backward_s"] and phases <= m[f"{name}/step_s"] + 1e-6
        # achieved TFLOP/s from the FLOPs counted at each attempt's first step per resolution
        rated = [m[f"{name}/tflops"] for m in metrics if f"{name}/tflops" in m]
        assert len(rated) >= len(metrics) // 2 and min(rated) > 0
    # TensorBoard holds the same history: the rolled-back steps of the stopped attempts are purged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("cradio/total")
    assert [e.step for e in scalars] == [m["global_step"] for m in metrics]
    np.testing.assert_allclose([e.value for e in scalars], [m["cradio/total"] for m in metrics], rtol=1e-6)
    # export: one call loads a student that returns per-teacher summary + dense, de-normalized on request
    student = load_student(str(out / "students" / "cradio"))
    imgs = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    res = student(imgs)
    assert set(res) == {"t1", "t2"}
    assert res["t1"]["summary"].shape == (2, 8) and res["t1"]["dense"].shape == (2, 2, 2, 8)
    raw = student(imgs, denormalize=True)["t1"]["dense"]
    phis = FeatureStore(store_url).phis("t1")
    torch.testing.assert_close(
        raw, torch.as_tensor(phis.inverse(res["t1"]["dense"].numpy())).float(), rtol=1e-4, atol=1e-4
    )
    cfgjson = json.loads((out / "students" / "cradio" / "config.json").read_text())
    assert cfgjson["extra"]["fingerprints"] == {"t1": "fp-t1", "t2": "fp-t2"}
    # what a relaunch cannot honour is refused before any worker starts, naming the change
    other = DistillConfig.model_validate({**cfg.model_dump(), "students": TINY_STUDENTS[:1]})
    with pytest.raises(ResumeError, match=r"removed \['vit'\].*new --out"):
        run_distill(other)
    fewer = DistillConfig.model_validate({**cfg.model_dump(), "teachers": ["t1"]})
    with pytest.raises(ResumeError, match=r"teachers \['t1', 't2'\], this job \['t1'\]"):
        run_distill(fewer)


@pytest.mark.slow  # ~100 s here: every checkpoint and log sync goes through the loopback S3 server
def test_run_directory_on_s3(ray_local, s3_server, store_url):
    """Checkpoints (through Ray Train), metrics, the sample audit and the export all land on S3."""
    out = s3_server.url("run")
    opts = s3_server.storage_options()
    cfg = DistillConfig.model_validate(
        {
            **make_cfg(store_url, Path("unused"), epochs=1, checkpoint_every=4).model_dump(),
            "out": out,
            "out_storage_options": opts,
        }
    )
    summary = run_distill(cfg)
    audit = sample_audit(out, opts)
    assert sorted(audit) == [0] and sorted(audit[0].values()) == [1] * 34
    metrics = read_metrics(out, opts)
    assert metrics[-1]["global_step"] == summary["global_step"] == 9  # ceil(34 / 4)
    import fsspec

    fs, root = fsspec.core.url_to_fs(out, **opts)
    names = {p.rsplit("/", 1)[-1] for p in fs.find(f"{root}/students/cradio")}
    assert {"model.safetensors", "config.json", "t1.safetensors", "t2.safetensors"} <= names
    assert any("checkpoint_" in p for p in fs.find(f"{root}/ray"))  # Ray Train's checkpoints, on S3
