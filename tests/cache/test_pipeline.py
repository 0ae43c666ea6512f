"""`cache-teachers` end to end: real Ray (local), real teachers and photos, real Zarr/Parquet store.

The run over a folder of good and bad files is shared by several tests (module fixture): a caching run
costs ~30 s on two cores, mostly Ray actor start-up and model loading.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from faultkit import TALLY
from fixtures import FIXTURE_MAX_PIXELS, make_bad_inputs, write_good_photos

from radio_dist.cache.config import CacheJobConfig
from radio_dist.cache.pipeline import check_resources, run_cache
from radio_dist.cache.resources import actor_pool_size, resource_problem
from radio_dist.config import ConfigError
from radio_dist.store import (
    FeatureStore,
    StoreLockedError,
    StoreMismatchError,
    store_info,
    verify_store,
)
from radio_dist.teacher import create_teacher, preset_spec

TEACHERS = ["efficientnet_lite0", "mobilenet_v2"]


def job(source: dict, store: str, **kw) -> CacheJobConfig:
    specs = []
    for n in TEACHERS:
        s = preset_spec(n)
        s.runtime.batch_size = 4
        specs.append(s)
    return CacheJobConfig.model_validate(
        {
            "source": source,
            "teachers": [s.model_dump(mode="json") for s in specs],
            # compaction at every second commit: every test of this module reads a compacted manifest
            "store": {"url": store, "shard_size": 5, "compact_fanout": 2},
            # small decode blocks (the default is 32): the kill tests need a run that commits shard by shard
            "pipeline": {"partitions": {"low": 96}, "decode_batch_size": 4},
            "phis": {"fit_images": 12},
            **kw,
        }
    )


@pytest.fixture(scope="module")
def cached(tmp_path_factory, ray_local):
    folder = tmp_path_factory.mktemp("inputs")
    expected = make_bad_inputs(folder)
    expected.pop("bomb.png", None)  # 144 MP of one colour: covered by test_sources, slow to hash here
    (folder / "bomb.png").unlink(missing_ok=True)
    good = write_good_photos(folder / "good", 10)
    expected.update({f"good/{p.name}": "ok" for p in good})
    (folder / "dup").mkdir()
    (folder / "dup" / "copy.png").write_bytes(good[0].read_bytes())  # same content, other path
    # a CSV list of URIs (relative to the list file), including one that cannot be read
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    expected["missing.jpg"] = "error"
    (folder / "list.csv").write_text("uri\n" + "\n".join([*names, "missing.jpg"]) + "\n")
    url = str(tmp_path_factory.mktemp("stores") / "store")
    source = {"kind": "list", "path": str(folder / "list.csv"), "max_pixels": FIXTURE_MAX_PIXELS}
    cfg = job(source, url, codecs={"default": "fp16", "mobilenet_v2": "int8"})  # both paths of the store
    summary = run_cache(cfg)
    return cfg, summary, expected, folder


def test_every_input_becomes_exactly_one_row(cached):
    cfg, summary, expected, folder = cached
    store = FeatureStore(cfg.store.url)
    rows = {Path(r["source"]).relative_to(folder).as_posix(): r for r in store.manifest().to_pylist()}
    assert summary.duplicates == 1  # dup/copy.png has the bytes of good/photo_0000_*: one row for both
    good0 = next(n for n in expected if n.startswith("good/photo_0000"))
    assert ("dup/copy.png" in rows) != (good0 in rows)
    rows.setdefault(good0, rows.pop("dup/copy.png", None))
    for name, status in expected.items():
        assert rows[name]["status"] == status, (name, rows[name]["error"])
        if status == "error":
            assert str(folder / name) in rows[name]["error"]  # the message names the input
    assert summary.ok == sum(s == "ok" for s in expected.values())
    assert summary.error == sum(s == "error" for s in expected.values())
    report = verify_store(store)
    assert report["ok"], report["problems"]
    assert report["rows"] == report["unique_ids"] == len(expected)


def test_each_teacher_runs_once_per_image(cached):
    _, summary, _, _ = cached
    for name in ("effnet_lite0", "mobilenet_v2"):
        assert summary.teacher_forwards[name]["images"] == summary.ok
        assert summary.teacher_forwards[name]["calls"] <= -(-summary.ok // 4) + 3  # batched, not per image


def test_targets_are_phis_normalized_and_invert_to_the_teacher(cached):
    cfg, _, _, _ = cached
    store = FeatureStore(cfg.store.url)
    info = store_info(store)
    assert info["teachers"]["effnet_lite0"]["outputs"]["low"] == {"dense": [3, 3, 1280], "summary": [1280]}
    man = [r for r in store.manifest().to_pylist() if r["status"] == "ok"]
    shard = man[0]["shard"]
    data = store.read_shard(shard)
    for spec in (preset_spec(n) for n in TEACHERS):
        dense, summary = store.read_targets(shard, spec.name, "low")
        assert data[f"{spec.name}/low/dense"].dtype == (
            np.int8 if spec.name == "mobilenet_v2" else np.float16
        )
        teacher_space, _ = store.read_targets(shard, spec.name, "low", space="teacher")
        ref = create_teacher(spec)(data["images/low"], resolution=96)
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(teacher_space), ref.dense, dim=-1)
        assert cos.min() > 0.999, cos.min()  # fp16 / int8 PHI-S storage round-trips to the teacher's features
        torch.testing.assert_close(torch.from_numpy(summary), ref.summary, rtol=1e-4, atol=1e-4)
    # over every stored row, PHI-S space has mean ~0 and per-dimension variance ~1 on average; the fit saw
    # 12 images x 9 tokens of 1280-d features, so the other rows carry that small sample's error (the mean
    # was 0.12 with bilinear views; it stayed under 0.1 with bicubic ones)
    all_dense = np.concatenate(
        [store.read_targets(s, "mobilenet_v2", "low")[0] for s in sorted({r["shard"] for r in man})]
    ).reshape(-1, 1280)
    assert abs(all_dense.mean()) < 0.2 and 0.7 < all_dense.var(axis=0).mean() < 1.3


def test_rerun_skips_everything_committed(cached):
    cfg, first, expected, _ = cached
    again = run_cache(cfg)
    assert again.skipped == len(expected) and again.ok == again.error == again.shards == 0
    assert all(fw["images"] == 0 for fw in again.teacher_forwards.values())
    assert verify_store(FeatureStore(cfg.store.url))["rows"] == len(expected)


def test_store_refuses_a_job_with_other_teachers(cached):
    cfg, _, _, _ = cached
    other = cfg.model_copy(deep=True)
    other.teachers[0].mean = (0.4, 0.4, 0.4)
    with pytest.raises(StoreMismatchError, match="teacher 'effnet_lite0': fingerprint"):
        run_cache(other)


@pytest.mark.slow  # ~35 s: a caching job of its own (the module's shared job stores int8 and fp16)
def test_targets_are_stored_through_each_teachers_codec_with_their_fidelity(tmp_path, ray_local):
    """int8 for one teacher, nf4 for the other: codes and scales in the shards, the fidelity of every image (the
    PHI-S fit sample's and the rest's) recorded, the targets decoding to the teacher's features; a rerun that asks
    for another codec is refused before it writes, pointing at `store recode`."""
    url = str(tmp_path / "store")
    cfg = job({"kind": "sample-photos", "views": 16}, url, codecs={"default": "int8", "mobilenet_v2": "nf4"})
    summary = run_cache(cfg)
    assert summary.ok == 16 and summary.phis_fitted
    store = FeatureStore(url)
    info = store_info(store)["teachers"]
    int8, nf4 = info["effnet_lite0"]["targets"]["low"], info["mobilenet_v2"]["targets"]["low"]
    assert (int8["codec"], nf4["codec"]) == ("int8", "nf4")
    assert int8["vs_fp16"] <= 0.51 and nf4["vs_fp16"] <= 0.28
    assert int8["fidelity"]["tokens"] == nf4["fidelity"]["tokens"] == 16 * 9  # 12 fit-sample images + 4 more
    assert int8["fidelity"]["cos_mean"] >= 0.9999 and nf4["fidelity"]["cos_mean"] >= 0.995
    assert int8["fidelity"]["against"] == "float" and nf4["fidelity"]["cos_p1"] >= 0.99
    assert verify_store(store)["ok"]
    man = [r for r in store.manifest().to_pylist() if r["status"] == "ok"]
    for shard in sorted({r["shard"] for r in man}):
        data = store.read_shard(shard)
        assert (
            data["effnet_lite0/low/dense"].dtype == np.int8
            and data["mobilenet_v2/low/dense"].dtype == np.uint8
        )
        assert data["mobilenet_v2/low/dense"].shape[1:] == (3, 3, 640)
        assert data["mobilenet_v2/low/dense_scale"].shape[1:] == (3, 3, 20)
        for spec, floor in (
            (preset_spec("efficientnet_lite0"), 0.9999),
            (preset_spec("mobilenet_v2"), 0.995),
        ):
            # in PHI-S space, where the codecs work and the losses compare (in teacher space a token near the
            # features' mean has a small norm, so the same error is a larger angle there)
            decoded, _ = store.read_targets(shard, spec.name, "low")
            ref = store.phis(spec.name).forward(create_teacher(spec)(data["images/low"], resolution=96).dense)
            cos = torch.nn.functional.cosine_similarity(torch.from_numpy(decoded), ref, dim=-1)
            assert cos.mean() > floor, (spec.name, cos.mean())
    before = sorted(p.name for p in (tmp_path / "store" / "manifest").iterdir())
    other = cfg.model_copy(update={"codecs": {"default": "fp16"}})
    with pytest.raises(
        StoreMismatchError,
        match=r"partition 'low': targets stored as int8, the job asks for fp16.*store recode",
    ):
        run_cache(other)
    assert sorted(p.name for p in (tmp_path / "store" / "manifest").iterdir()) == before


def _pools(cfg: CacheJobConfig, pool_size: int, num_cpus: float, num_gpus: float = 0.0) -> CacheJobConfig:
    out = cfg.model_copy(deep=True)
    out.teachers[0].runtime = out.teachers[0].runtime.model_copy(
        update={"pool_size": pool_size, "num_cpus": num_cpus, "num_gpus": num_gpus}
    )
    return out


def test_actor_pools_are_sized_to_the_work():
    spec = preset_spec("efficientnet_lite0")  # the CPU presets: two actors per teacher
    assert (spec.runtime.pool_size, spec.runtime.num_cpus) == (2, 0.25)
    spec.runtime.batch_size = 32
    # fewer than 8 batches per actor start fewer actors: 15 batches of 32 -> 1, 16 -> 2 (481 images: 16)
    assert [actor_pool_size(spec, n) for n in (0, 13, 64, 480, 481, 512, 100_000)] == [1, 1, 1, 1, 2, 2, 2]
    spec.runtime.pool_size = 5
    assert actor_pool_size(spec, 8 * 32 * 3) == 3 and actor_pool_size(spec, 8 * 32 * 5 + 1) == 5


def test_a_job_the_ray_instance_cannot_hold_is_refused_before_the_store_is_touched(tmp_path, ray_local):
    """Actors that hold every Ray CPU leave none for decode: Ray would wait forever, so the job is refused
    with the settings to change (the local fixture instance has 2 CPUs and no GPU)."""
    url = str(tmp_path / "store")
    cfg = job({"kind": "sample-photos", "views": 4}, url)
    assert resource_problem(cfg, ray_local.cluster_resources()) is None  # the presets fit two cores
    big = _pools(cfg, pool_size=4, num_cpus=0.5)  # 2 CPUs of actors + 0.25 of mobilenet_v2's + a task
    with pytest.raises(ConfigError, match=r"effnet_lite0: 4 x 0.5 CPU.*Ray cluster has 2: lower"):
        run_cache(big)
    with pytest.raises(ConfigError, match=r"ask for 1 GPUs.*has 0"):
        run_cache(_pools(cfg, pool_size=1, num_cpus=0.25, num_gpus=1))
    assert not FeatureStore(url).exists()  # refused before the store was initialized


def test_on_a_cluster_a_job_too_big_for_it_now_is_a_warning(ray_local):
    """A cluster may autoscale: a job bigger than its present resources is announced, not refused."""
    cfg = _pools(job({"kind": "sample-photos", "views": 4}, "unused"), pool_size=8, num_cpus=1)
    cfg.ray.address = "ray://head:10001"
    events: list[tuple[str, dict]] = []
    check_resources(cfg, lambda kind, ev: events.append((kind, ev)))
    assert [k for k, _ in events] == ["warning"]
    assert "effnet_lite0: 8 x 1 CPU" in events[0][1]["message"] and "waits" in events[0][1]["message"]
    cfg.ray.address = None
    with pytest.raises(ConfigError, match="8 x 1 CPU"):
        check_resources(cfg, None)


def _radio_dist(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "radio-dist"), *args]


@pytest.mark.slow  # ~2 min: a job of its own with its own local Ray, killed and run again
@pytest.mark.faults
def test_sigkill_then_rerun_finishes_without_recompute_or_duplicates(tmp_path):
    """Kill the whole job (driver + its local Ray) mid-run; the re-run only computes what was not committed."""
    store_url = str(tmp_path / "store")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps(job({"kind": "sample-photos", "views": 60}, store_url).model_dump(mode="json")))
    cmd = _radio_dist(
        "cache-teachers",
        "--config",
        str(cfg),
        "--set",
        "store.shard_size=4",
        "--set",
        "ray.num_cpus=2",
        "--json",
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    store = FeatureStore(store_url)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if store.exists() and len(store.manifest_parts()) >= 5:  # fit sample written + some of the rest
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    # a second caching job on the same store is refused, naming the running one, and writes nothing
    with pytest.raises(StoreLockedError, match=rf"another cache-teachers: host \S+ pid {proc.pid}"):
        run_cache(job({"kind": "sample-photos", "views": 60}, store_url))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Ray workers are not in the driver's process group: they die with it (fate sharing) but a write
    # already in flight may still commit. Count once the store has been quiet for a few seconds.
    committed, quiet_since = len(store.committed_ids()), time.time()
    while time.time() - quiet_since < 5 and time.time() < deadline + 60:
        time.sleep(0.5)
        now = len(store.committed_ids())
        if now != committed:
            committed, quiet_since = now, time.time()
    assert 0 < committed < 60
    assert verify_store(store)["ok"]
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # takes over the dead job's lock
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert summary["skipped"] == committed
    assert summary["ok"] + summary["error"] == 60 - committed
    for fw in summary["teacher_forwards"].values():
        assert fw["images"] == summary["ok"]  # nothing committed was recomputed
    report = verify_store(store)
    assert report["ok"], report["problems"]
    assert report["rows"] == report["unique_ids"] == 60
    TALLY.record("caching job SIGKILLed (driver + Ray)", 1, report["rows"], 60 - report["unique_ids"])


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (Linux /proc walk: the job's local Ray runs under its driver)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        return (
            (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


@pytest.mark.slow  # ~1-2 min: a job of its own with its own local Ray
@pytest.mark.faults
def test_killed_teacher_actors_are_replaced_and_every_image_lands_once(tmp_path):
    """SIGKILL a teacher actor three times mid-run, each time after more shards landed: Ray Data restarts it
    and retries its batches; the job completes with every image once."""
    store_url = str(tmp_path / "store")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps(job({"kind": "sample-photos", "views": 60}, store_url).model_dump(mode="json")))
    cmd = _radio_dist("cache-teachers", "--config", str(cfg), "--set", "store.shard_size=4", "--json")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, text=True
    )
    store = FeatureStore(store_url)
    victims: list[int] = []
    at_parts = [3, 6, 9]  # manifest parts (the fit sample's among them) committed before each kill
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None and len(victims) < len(at_parts):
            if store.exists() and store.has_phis() and len(store.manifest_parts()) >= at_parts[len(victims)]:
                actors = [
                    p for p in _descendants(proc.pid) if "TeacherStage" in _cmdline(p) and p not in victims
                ]
                if actors:
                    victims.append(actors[0])
                    os.kill(actors[0], signal.SIGKILL)
            time.sleep(0.1)
        assert len(victims) == len(at_parts), f"killed {len(victims)} teacher actors before the run ended"
        stdout, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0
    # with --json, stdout is the summary alone: Ray's core worker prints notices of the killed actor (before and
    # after the summary, seen in CI) and they go to stderr
    summary = json.loads(stdout)
    report = verify_store(store)
    assert report["ok"], report["problems"]
    lost = 60 - report["unique_ids"]
    duplicated = report["rows"] - report["unique_ids"]
    print(
        f"caching actors SIGKILLed (pids {victims}): rows checked {report['rows']}, lost {lost}, "
        f"duplicated {duplicated}"
    )
    TALLY.record("teacher actor SIGKILLed", len(victims), report["rows"], lost, duplicated)
    assert summary["ok"] + summary["error"] == 60 and lost == 0 and duplicated == 0


_WORKER_ENV = """
import os, ray
from radio_dist.ray_setup import RayConfig, init_ray
init_ray(RayConfig(num_cpus=1))
@ray.remote
def env():
    return {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
print(repr(ray.get(env.remote())))
"""


@pytest.mark.slow  # ~11 s: a Ray start of its own
def test_a_local_instance_gives_every_worker_the_allocator_settings():
    """The local Ray instance radio-dist starts passes the allocator settings to all of the job's workers
    (tasks, Ray Train workers), not only to teacher actors. Runs in a fresh process: Ray starts there."""
    from radio_dist.ray_setup import ALLOCATOR_ENV

    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "RAY_ADDRESS"}
    res = subprocess.run(
        [sys.executable, "-c", _WORKER_ENV],
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert eval(res.stdout.strip().splitlines()[-1]) == ALLOCATOR_ENV
