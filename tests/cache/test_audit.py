"""`radio-dist store audit`: the cached teacher re-run live on sampled rows, compared with the stored targets.

The store is cached by the real pipeline (Ray Data) on the bundled photos with a tiny timm ViT whose weights are a
file (random init, saved by the test), so the audit can be shown what a user meets: a faithful store (fp16 and,
recoded, nf4), the weights file replaced, the weights file moved, and targets written against the wrong image
with checksums that agree (which `store verify` cannot see).
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from typer.testing import CliRunner

from radio_dist.cache.audit import audit_teacher, sample_rows
from radio_dist.cache.config import CacheJobConfig
from radio_dist.cache.pipeline import run_cache
from radio_dist.cli import app
from radio_dist.store import FeatureStore, StoreError, array_key, verify_store
from radio_dist.store.manifest import row_checksum
from radio_dist.store.recode import recode_store
from radio_dist.teacher import TeacherSpec, WeightsSpec, create_teacher

runner = CliRunner()


def vit_spec(weights: WeightsSpec) -> TeacherSpec:
    return TeacherSpec(
        name="vit",
        family="timm",
        arch="vit_tiny_patch16_224",
        summary="cls",
        options={"img_size": 64, "depth": 2, "no_embed_class": True},
        weights=weights,
    )


def save_weights(path, seed: int) -> None:
    torch.save(create_teacher(vit_spec(WeightsSpec(kind="none", seed=seed))).model.state_dict(), path)


@pytest.fixture(scope="module")
def cached(ray_local, tmp_path_factory):
    """(store url, weights path): 10 photo views in shards of 4, fp16 at low 64 px and int8 at high 96 px."""
    root = tmp_path_factory.mktemp("audit")
    weights = root / "vit.pth"
    save_weights(weights, seed=1)
    url = str(root / "store")
    spec = vit_spec(WeightsSpec(kind="file", path=str(weights))).model_dump(mode="json")
    spec["resolution"] = {"high": 64}  # the high views are resized to the teacher's 64 px, as in a real job
    cfg = CacheJobConfig.model_validate(
        {
            "source": {"kind": "sample-photos", "views": 10},
            "teachers": [spec],
            "store": {"url": url, "shard_size": 4},
            "pipeline": {"partitions": {"low": 64, "high": 96}},
            "phis": {"fit_images": 10},
            "codecs": {"vit": {"high": "int8"}},
        }
    )
    assert run_cache(cfg).ok == 10
    return url, weights


def audit_cli(*args: str):
    r = runner.invoke(app, ["store", "audit", *args, "--json"])
    return r, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else None)


def test_a_faithful_store_passes_at_the_fidelity_it_recorded(cached, tmp_path):
    url, _ = cached
    r, report = audit_cli(url, "--teacher", "vit", "--rows", "6", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert report["passed"] and report["fingerprint_now"] == report["fingerprint_recorded"]
    parts = {p["partition"]: p for p in report["partitions"]}
    assert set(parts) == {"low", "high"}
    low, high = parts["low"], parts["high"]
    assert (low["codec"], high["codec"]) == ("fp16", "int8")
    assert low["rows"] == high["rows"] == 6 and low["tokens"] == 6 * 16
    for p in (low, high):  # the audit re-measures what the caching job measured when it wrote them
        assert p["cos_mean"] == pytest.approx(p["recorded"]["cos_mean"], abs=2e-5)
        assert p["rel_mse"] == pytest.approx(p["recorded"]["rel_mse"], rel=0.5, abs=1e-7)
        assert p["summary_cos_min"] > 0.99999
    assert low["cos_mean"] > 0.99999 and high["cos_mean"] > 0.9999
    # recoded to nf4, the same teacher now measures the nf4 error, still as recorded
    nf4 = str(tmp_path / "nf4")
    recode_store(FeatureStore(url), FeatureStore(nf4), {("vit", "low"): "nf4", ("vit", "high"): "nf4"})
    rep = audit_teacher(FeatureStore(nf4), "vit", rows=6, device="cpu")
    assert rep.passed
    for p in rep.partitions:
        assert p.codec == "nf4" and 0.98 < p.cos_mean < 0.999
        assert p.cos_mean == pytest.approx(p.recorded["cos_mean"], abs=1e-3)
    # the sample: without replacement, by seed, all rows when asked for more than there are
    store = FeatureStore(url)
    assert len({(r.shard, r.index) for r in sample_rows(store, 6, seed=0)}) == 6
    assert sample_rows(store, 6, seed=0) == sample_rows(store, 6, seed=0) != sample_rows(store, 6, seed=1)
    assert len(sample_rows(store, 100, seed=0)) == 10


def test_other_weights_in_the_recorded_file_fail_the_audit(cached, tmp_path):
    url, weights = cached
    kept = tmp_path / "kept.pth"
    shutil.copy(weights, kept)
    try:
        save_weights(weights, seed=2)  # the file the store recorded, overwritten by other weights
        r, report = audit_cli(url, "--teacher", "vit", "--rows", "4", "--partition", "low", "--device", "cpu")
        assert r.exit_code == 1, r.output
        assert not report["passed"] and report["fingerprint_now"] != report["fingerprint_recorded"]
        assert any("fingerprint" in n for n in report["notes"])
        (low,) = report["partitions"]
        assert low["cos_mean"] < 0.9 and low["failures"]
        assert any("row(s) below" in f for f in low["failures"])
        # moved: a clear error naming the recorded path and --weights; with --weights, the audit passes again
        weights.unlink()
        r = runner.invoke(app, ["store", "audit", url, "--teacher", "vit", "--rows", "2"])
        assert r.exit_code != 0 and str(weights) in r.output and "--weights" in r.output
        assert "Traceback" not in r.output
        r, report = audit_cli(
            url, "--teacher", "vit", "--rows", "4", "--weights", str(kept), "--device", "cpu"
        )
        assert r.exit_code == 0, r.output
        assert report["passed"] and report["fingerprint_now"] == report["fingerprint_recorded"]
    finally:
        shutil.copy(kept, weights)


def test_targets_written_against_the_wrong_image_are_caught_where_checksums_agree(cached, tmp_path):
    url = str(tmp_path / "store")
    shutil.copytree(cached[0], url)
    store = FeatureStore(url)
    shard = store.manifest(columns=["shard"]).column("shard")[0].as_py()
    key = array_key("vit", "low", "dense")
    # a writer bug: rows 0 and 1 of one shard got each other's targets, and their checksums were computed on that
    group = zarr.open_group(store.zarr_store(shard), mode="r+")
    arr = group[key]
    codes = np.asarray(arr[:])
    codes[[0, 1]] = codes[[1, 0]]
    arr[:] = codes
    arrays = store.read_shard(shard)
    part = store.path("manifest", f"{shard}.parquet")
    table = pq.read_table(part)
    sums = table.column("checksum").to_pylist()
    sums[0], sums[1] = row_checksum(arrays, 0), row_checksum(arrays, 1)
    table = table.set_column(table.schema.get_field_index("checksum"), "checksum", [sums])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.fs.pipe_file(part, buf.getvalue())
    assert verify_store(FeatureStore(url))["ok"]  # checksums cannot see it
    rep = audit_teacher(FeatureStore(url), "vit", rows=10, partitions=["low"], device="cpu")
    (low,) = rep.partitions
    assert not rep.passed
    bad = [c for c in low.worst if c.cos_mean < low.floor_row]
    assert {(c.shard, c.index) for c in bad} == {(shard, 0), (shard, 1)}
    assert any(f"shard {shard} row 0" in f for f in low.failures)


def test_bad_input_is_named(cached):
    url, _ = cached
    with pytest.raises(StoreError, match="no teacher 'nope'.*'vit'"):
        audit_teacher(FeatureStore(url), "nope")
    with pytest.raises(StoreError, match=r"partition\(s\) \['mid'\]"):
        audit_teacher(FeatureStore(url), "vit", partitions=["mid"])
    r = runner.invoke(app, ["store", "audit", url, "--teacher", "nope"])
    assert r.exit_code != 0 and "no teacher 'nope'" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["store", "audit", url, "--teacher", "vit", "--rows", "0"])
    assert r.exit_code != 0


def test_encoded_views_hold_the_pixels_the_teachers_saw(ray_local, tmp_path):
    """A caching job with `pipeline.view_codec: jpeg-80`: the store holds JPEG bytes (far fewer than raw), the
    teachers' targets belong to the decoded pixels (the audit re-runs the teacher on the decoded stored views
    and finds the fidelity recorded when written), the training reader hands over those decoded pixels, and a
    job asking for raw views is refused before it writes."""
    from radio_dist.store.views import get_view_codec, views_of
    from radio_dist.train.reader import ShardStream, committed_shards, epoch_plan

    weights = tmp_path / "vit.pth"
    save_weights(weights, seed=1)
    url = str(tmp_path / "store")
    spec = vit_spec(WeightsSpec(kind="file", path=str(weights))).model_dump(mode="json")
    job = {
        "source": {"kind": "sample-photos", "views": 8},
        "teachers": [spec],
        "store": {"url": url, "shard_size": 4},
        "pipeline": {"partitions": {"low": 64}, "view_codec": "jpeg-80"},
        "phis": {"fit_images": 8},
    }
    assert run_cache(CacheJobConfig.model_validate(job)).ok == 8
    store = FeatureStore(url)
    assert store.meta().view_codec == "jpeg-80" and verify_store(store)["ok"]
    r = runner.invoke(app, ["store", "info", url, "--json"])
    views = json.loads(r.stdout)["views"]
    assert views["codec"] == "jpeg-80"
    low = views["partitions"]["low"]
    assert low["raw_bytes"] == 64 * 64 * 3 and low["stored_bytes"] < 0.3 * low["raw_bytes"]
    rep = audit_teacher(store, "vit", rows=8, device="cpu")
    (p,) = rep.partitions
    assert rep.passed and p.cos_mean == pytest.approx(p.recorded["cos_mean"], abs=2e-5)
    # the reader decodes the stored bytes into the views the teachers saw
    shards = committed_shards(store)
    plan = epoch_plan(shards, 0, 0, 1, 3, 2)[0]
    got = {}
    for b in ShardStream(store, plan, ["vit"], ["low"], lambda s: "low"):
        assert b.images.shape == (len(b), 64, 64, 3) and b.images.dtype == np.uint8
        got.update(zip(b.ids, b.images, strict=True))
    codec = get_view_codec("jpeg-80")
    for sh in shards:
        stored = views_of(codec, store.read_shard(sh.shard, ["images/low"])["images/low"], 64)
        for i, rid in enumerate(sh.ids):
            np.testing.assert_array_equal(got[rid], stored[i])
    # a rerun with raw views is refused, naming the setting; nothing changes
    job["pipeline"]["view_codec"] = "raw"
    with pytest.raises(StoreError, match="pipeline.view_codec: the store's views are stored jpeg-80"):
        run_cache(CacheJobConfig.model_validate(job))
    # a row whose byte count no longer fits it is named by verify (its checksum disagrees too)
    shard = shards[0].shard
    arr = zarr.open_group(store.zarr_store(shard), mode="r+")["images/low"]
    rows = np.asarray(arr[:])
    rows[1, :4] = np.frombuffer(np.uint32(rows.shape[1]).tobytes(), np.uint8)
    arr[:] = rows
    problems = verify_store(FeatureStore(url))["problems"]
    assert any(f"shard {shard}: images/low: 1 row(s) whose byte length does not fit" in p for p in problems)
