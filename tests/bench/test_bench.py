"""Both benchmarks run end to end, small, and report what the README tables need: the ingest benchmark on a
small store; the cache benchmark with the seed teachers (model inputs per image with and without mosaic)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from radio_dist.bench.cache import (
    SEED_PARTITIONS,
    SEED_TEACHERS,
    bench_cache,
    config_teachers,
    has_plain_baseline,
    median_run,
    pipeline_rates,
    teacher_device,
    teacher_only,
)
from radio_dist.bench.ingest import bench_ingest
from radio_dist.cache.pipeline import CacheSummary
from radio_dist.cli import app
from radio_dist.config import ConfigError
from radio_dist.sources import SAMPLE_PHOTOS, load_sample_photo
from radio_dist.teacher import TeacherSpec, preset_spec
from radio_dist.train.students import StudentSpec

runner = CliRunner()


def photos(size: int, n: int) -> np.ndarray:
    return np.stack(
        [
            np.asarray(
                Image.fromarray(load_sample_photo(name)).convert("RGB").resize((size, size), Image.BICUBIC)
            )
            for name in SAMPLE_PHOTOS[:n]
        ]
    )


TINY = [
    StudentSpec(name="a", kind="cradio", arch="tiny", head_hidden=16, cpe_max_grid=8),
    StudentSpec(
        name="b",
        kind="timm",
        arch="vit_tiny_patch16_224",
        overrides={"embed_dim": 32, "depth": 1, "num_heads": 2},
        head_hidden=16,
    ),
]


def test_bench_ingest_small(tmp_path):
    res = bench_ingest(
        images=96, shard_size=32, batch_size=8, steps=2, students=TINY, workdir=tmp_path, log=print,
        codecs=("fp16", "nf4"), s3=True, s3_images=48, repeats=1, scale_rows=2,
    )  # fmt: skip
    assert res["rows"] == 96 and res["students"] == ["a", "b"] and res["steps"] == 2
    # the ratios are what their definitions say, from the rates and step times the result reports
    for x in [res, *res["scale_rows"].values(), *(v for c in res["by_codec"].values() for v in c.values())]:
        assert x["ratio"] == pytest.approx(x["reader_samples_per_s"] / x["raw_samples_per_s"])
        assert x["raw_mb_per_s"] == pytest.approx(x["raw_samples_per_s"] * x["bytes_per_sample"] / 1e6)
        assert x["ratio"] == max(x["ratio_each"]) and len(x["ratio_each"]) == 1
    assert set(res["by_codec"]) == {"fp16", "nf4"}
    assert {k: set(v) for k, v in res["by_codec"].items()} == {
        "fp16": {"local", "s3"},
        "nf4": {"local", "s3"},
    }
    assert res["by_codec"]["fp16"]["s3"]["rows"] == res["by_codec"]["nf4"]["s3"]["rows"] == 48
    assert set(res["separate_step_s"]) == set(res["compute_step_s"]) == {"a", "b"}
    together = res["together_step_s"]
    assert res["multi_student_ratio"] == pytest.approx(together / sum(res["separate_step_s"].values()))
    assert res["multi_student_overhead"] == pytest.approx(together / sum(res["compute_step_s"].values()))
    # 224 px views + 2 teachers x (7x7x1280 fp16 + 1280 fp32) per sample, as stored; the rest is the padding
    # of each shard's last (partial) Zarr chunk, a few rows per array at 32-row shards
    expected = 224 * 224 * 3 + 2 * (7 * 7 * 1280 * 2 + 1280 * 4)
    assert expected <= res["bytes_per_sample"] < 1.15 * expected
    # nf4: half a byte per channel and one fp16 scale per 64 channels instead of two bytes per channel
    nf4 = 224 * 224 * 3 + 2 * (7 * 7 * (1280 // 2 + 1280 // 64 * 2) + 1280 * 4)
    assert nf4 <= res["by_codec"]["nf4"]["local"]["bytes_per_sample"] < 1.15 * nf4
    # rows of C-RADIOv4's size: a 1152 px view and a 72x72x1024 fp16 target each
    big = res["scale_rows"]
    assert set(big) == {"fp16", "nf4"} and big["fp16"]["rows"] == big["nf4"]["rows"] == 2
    assert 1152 * 1152 * 3 + 72 * 72 * 1024 * 2 <= big["fp16"]["bytes_per_sample"] < 1.05 * 14.6e6
    assert 1152 * 1152 * 3 + 72 * 72 * (512 + 32) <= big["nf4"]["bytes_per_sample"] < 1.05 * 6.8e6
    assert list(tmp_path.iterdir()) == []  # its stores are removed


# -- bench cache -------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~1.5 min: two pipeline runs and three limit runs of three teachers
def test_bench_cache_seed_teachers_counts_model_inputs_with_and_without_mosaic(tmp_path, ray_local):
    """`bench cache --seed-teachers`, as a user runs it, on N views: every seed teacher at both partitions,
    SAM3's low partition at ceil(N / k^2) / N model inputs per image with its mosaic and 1.0 without.

    N and the batch size are multiples of k^2 and every image is in the PHI-S fit phase (one actor start-up
    per teacher): every teacher batch fills whole mosaics, so ceil(N / k^2) / N is exact."""
    n, batch = 16, 8
    k = preset_spec("sam3_tiny").options["mosaic_k"]
    assert batch % (k * k) == 0
    args = ["--seed-teachers", "--images", n, "--batch-size", batch, "--fit-images", n, "--repeats", 2]
    res = runner.invoke(app, ["bench", "cache", *map(str, args), "--workdir", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)

    every = {f"{t}/{p}" for t in SEED_TEACHERS for p in SEED_PARTITIONS}
    assert out["partitions"] == SEED_PARTITIONS and out["teachers"] == ",".join(SEED_TEACHERS)
    assert set(out["model_inputs_per_image"]) == every
    assert out["adaptations"] == {"sam3_tiny": {"adaptation": "mosaic", "options": {"mosaic_k": k}}}
    with_mosaic = math.ceil(n / k**2) / n
    expected = {key: with_mosaic if key == "sam3_tiny/low" else 1.0 for key in every}
    assert out["model_inputs_per_image"] == pytest.approx(expected)  # counted in the pipeline run
    assert out["teacher_only_model_inputs_per_image"] == pytest.approx(
        expected
    )  # the limit did the same work
    assert out["model_inputs_per_image_without_adaptation"] == pytest.approx(
        {"sam3_tiny/low": 1.0, "sam3_tiny/high": 1.0}
    )
    # each teacher called once per image and partition (a mosaic is still one call on all the views)
    assert out["teacher_forwards_per_image"] == pytest.approx(dict.fromkeys(SEED_TEACHERS, 2.0))
    assert out["batch_size"] == dict.fromkeys(SEED_TEACHERS, batch)
    per_teacher, plain = (
        out["teacher_only_images_per_s_per_teacher"],
        out["teacher_only_images_per_s_without_adaptation"],
    )
    assert set(per_teacher) == set(SEED_TEACHERS) and set(plain) == {"sam3_tiny"}
    assert out["adaptation_speedup"] == pytest.approx(
        {"sam3_tiny": per_teacher["sam3_tiny"] / plain["sam3_tiny"]}
    )
    # the first limit runs every teacher in sequence: its time per image is the sum of the teachers' own
    assert 1 / out["teacher_only_images_per_s_each"][0] == pytest.approx(
        sum(1 / r for r in per_teacher.values())
    )
    assert out["ratio"] == pytest.approx(out["pipeline_images_per_s"] / out["teacher_only_images_per_s"])
    # two runs, limit - pipeline - limit - pipeline - limit; the figures are the median run's (of two: the lower)
    assert out["ratio_median_of"] == 2 and len(out["ratio_each"]) == 2
    limits = out["teacher_only_images_per_s_each"]
    pick = median_run(out["ratio_each"])
    assert len(limits) == 3 and out["ratio"] == min(out["ratio_each"]) == out["ratio_each"][pick]
    before, after = out["teacher_only_images_per_s_before_after"]
    assert [before, after] == limits[pick : pick + 2] and min(limits) > 0
    assert out["teacher_only_images_per_s"] == pytest.approx((before + after) / 2)
    views = sum(px * px * 3 for px in SEED_PARTITIONS.values())  # each image's stored views, uint8
    assert out["bytes_per_image"] > views and set(out["devices"].values()) == {"cpu"}
    assert out["pipeline_images"] == 0 and out["steady_state_images_per_s"] is None  # all in the fit phase


def test_teacher_only_runs_each_teacher_where_the_pipeline_does():
    """only_partitions and per-partition resolution respected; a copy without mosaic counted apart."""
    sam = preset_spec("sam3_tiny")  # resolution {low: 56, high: 112}, mosaic k = 2, batch 16
    siglip = TeacherSpec.model_validate(
        {**preset_spec("siglip2_tiny").model_dump(), "only_partitions": ["low"]}
    )
    views = {"low": photos(64, 10), "high": photos(128, 10)}
    res = teacher_only(views, [siglip, sam], dict(SEED_PARTITIONS))
    assert res["images"] == 10
    # sam3: batches of 16 -> one batch of 10 views -> ceil(10 / 4) = 3 mosaics at low, 10 native inputs at high
    assert res["model_inputs"] == {"siglip2_tiny": {"low": 10}, "sam3_tiny": {"low": 3, "high": 10}}
    assert res["without_adaptation"]["sam3_tiny"]["model_inputs"] == {"low": 10, "high": 10}
    assert set(res["seconds"]) == {"siglip2_tiny", "sam3_tiny"}
    assert res["images_per_s"] == pytest.approx(10 / sum(res["seconds"].values()))
    plain = sam.without_adaptation()
    assert plain.adaptation == "none" and "mosaic_k" not in plain.options
    assert plain.resolution == sam.resolution and plain.weights == sam.weights
    # the mosaic is the family's own way of running the same views; FeatSharp wraps another model around it
    assert has_plain_baseline(sam) and not has_plain_baseline(siglip)
    featsharp = TeacherSpec.model_validate(
        {**siglip.model_dump(), "adaptation": "featsharp", "options": {**siglip.options, "featsharp": "f"}}
    )
    assert not has_plain_baseline(featsharp)


def test_bench_cache_config_file_and_bad_input(tmp_path):
    """--config takes a cache job's teachers and partitions; bad input is refused before anything runs."""
    job = tmp_path / "job.yaml"
    dino = preset_spec("dinov3_tiny").model_dump(mode="json")
    job.write_text(
        yaml.safe_dump(
            {
                "teachers": [{**dino, "runtime": {**dino["runtime"], "batch_size": 4, "num_gpus": 1}}],
                "pipeline": {"partitions": {"low": 96}},
                "store": {"url": "s3://ignored/by-bench"},
            }
        )
    )
    specs, parts = config_teachers(job)
    assert [s.name for s in specs] == ["dinov3_tiny"] and parts == {"low": 96}
    assert specs[0].runtime.batch_size == 4
    assert teacher_device(specs[0]) == ("cuda" if torch.cuda.is_available() else "cpu")

    with pytest.raises(ConfigError, match="not a multiple of mosaic_k"):
        bench_cache(images=8, batch_size=6, seed=True, workdir=tmp_path)
    with pytest.raises(ConfigError, match="unknown teacher family 'resnet9000'"):
        bench_cache(images=8, teachers=["resnet9000"], workdir=tmp_path)
    with pytest.raises(ConfigError, match="repeats must be >= 1"):
        bench_cache(images=8, teachers=["dinov3_tiny"], repeats=0, workdir=tmp_path)
    with pytest.raises(ConfigError, match="partition 'low-res'"):
        bench_cache(images=8, teachers=["dinov3_tiny"], partitions={"low-res": 64}, workdir=tmp_path)
    res = runner.invoke(app, ["bench", "cache", "--seed-teachers", "--config", str(job)])
    assert res.exit_code == 2 and "at most one of" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"teachers": [{**dino, "resolutoin": {}}]}))
    res = runner.invoke(app, ["bench", "cache", "--config", str(bad)])
    assert res.exit_code == 2 and "unknown key 'resolutoin'" in res.output


def test_median_run_picks_the_middle_ratio():
    assert median_run([0.7, 0.9, 0.8]) == 2
    assert median_run([0.8, 0.7]) == 1  # even count: the lower middle
    assert median_run([0.75]) == 0
    with pytest.raises(ValueError, match="no runs"):
        median_run([])


def test_pipeline_rate_leaves_start_up_out_and_reports_it_apart():
    """The headline rate is the main phase after its first commit; the with-start-up rate and ratio stay in
    the result, and a run with nothing after the first commit falls back to the with-start-up rate, flagged."""
    s = CacheSummary(ok=1024, pipeline_images=960, pipeline_seconds=40.0, first_shard_images=64)
    s.first_shard_seconds = 16.0
    r = pipeline_rates(s, teacher_only_images_per_s=50.0)
    assert r["pipeline_images_per_s"] == pytest.approx(896 / 24.0) == r["steady_state_images_per_s"]
    assert r["ratio"] == pytest.approx(896 / 24.0 / 50.0) and not r["pipeline_rate_includes_startup"]
    assert r["pipeline_images_per_s_with_startup"] == pytest.approx(960 / 40.0)
    assert r["ratio_with_startup"] == pytest.approx(960 / 40.0 / 50.0)
    all_fit = CacheSummary(ok=16, fit_seconds=8.0)  # every image in the PHI-S fit phase
    r = pipeline_rates(all_fit, teacher_only_images_per_s=4.0)
    assert r["steady_state_images_per_s"] is None and r["pipeline_rate_includes_startup"]
    assert r["pipeline_images_per_s"] == pytest.approx(2.0) and r["ratio"] == pytest.approx(0.5)


def test_gpu_check_runs_at_toy_sizes_with_nothing_but_torch_and_timm(tmp_path):
    """`make bench-gpu` on CPU at toy sizes, in a fresh interpreter whose path has the tree but no project
    dependency beyond torch/timm/numpy may be imported: every configuration measured, none of Ray, zarr,
    pydantic or the engine's config loaded."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "gpu.json"
    code = (
        "import sys, runpy; sys.argv = ['gpu', '--tiny', '--device', 'cpu', '--iters', '1', '--out', sys.argv[1]]; "
        "runpy.run_module('radio_dist.bench.gpu', run_name='__main__'); "
        "bad = [m for m in ('ray', 'zarr', 'pydantic', 'radio_dist.config') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    students = {k: v for k, v in res["students"].items() if isinstance(v, dict)}
    assert len(students) == 3 * 2 * 2 and not res["skipped"]  # B/L/H x 2 resolutions x bf16/fp32
    for label, r in students.items():
        assert "error" not in r, (label, r)
        assert r["step_s"] > 0 and r["tflop_per_step"] > 0 and 0 < r["mfu_measured_ceiling"]
    # the student at the larger resolution does more work per image
    assert students["B@64/fp32"]["tflop_per_step"] / 2 > students["B@32/fp32"]["tflop_per_step"] / 4
    assert set(res["teachers"]) == {"dinov3_l", "dinov3_7b", "siglip2_g", "sam3"}
    for name, r in res["teachers"].items():
        assert "error" not in r, (name, r)
        assert r["images_per_s"] > 0 and r["target_mb_per_s"] > 0 and r["tflop_per_image"] > 0
    assert "MFU" in proc.stdout and "teacher sam3" in proc.stdout  # the closing table


@pytest.mark.slow  # ~3 min: a caching job and five short Ray Train jobs
def test_bench_train_small(ray_local, tmp_path):
    """`bench train` end to end at toy sizes: every job ran, every figure the README table needs is there."""
    from radio_dist.bench.train import bench_train
    from radio_dist.train.students import StudentSpec

    students = [
        StudentSpec(name="cradio", kind="cradio", arch="tiny", head_hidden=32, cpe_max_grid=8),
        StudentSpec(
            name="vit",
            kind="timm",
            arch="vit_tiny_patch16_224",
            overrides={"embed_dim": 32, "depth": 1, "num_heads": 2},
            head_hidden=32,
        ),
    ]
    res = bench_train(
        images=48,
        px=64,
        batch_size=4,
        workers=2,
        students=students,
        teachers=["dinov3_tiny"],
        workdir=tmp_path,
    )
    # one 48-row shard (shard_size 64): one worker reads it all, 12 steps of 4, the first 2 not timed
    assert res["cache_ok"] == 48 and res["timed_steps_per_job"] == 48 // 4 - 2
    assert set(res["separate_step_s"]) == {"cradio", "vit"} and len(res["multi_student_ratio_each"]) == 1
    together, alone = res["together_step_s"], sum(res["separate_step_s"].values())
    assert res["multi_student_ratio"] == pytest.approx(together / alone)
    assert 0 <= res["data_wait_share"] <= 1
    assert res["teacher_step_s"] > 0 and res["online_step_s"] > 0 and res["student_compute_step_s"] > 0
    assert res["cached_vs_online_theory"] > 1  # E > 1 and the teachers cost something
    assert res["cached_vs_online_of_theory"] == pytest.approx(
        res["cached_vs_online"] / res["cached_vs_online_theory"]
    )


def test_bench_manifest_simulates_the_compacted_layout_and_the_uncompacted_one(tmp_path):
    from radio_dist.bench.manifest import tiered_sizes

    assert tiered_sizes(3 * 16 + 2 * 4 + 3, fanout=4) == [16] * 3 + [4] * 2 + [1] * 3
    assert tiered_sizes(64, fanout=4) == [64]  # four objects of 16 are one of 64
    r = runner.invoke(
        app,
        ["bench", "manifest", "--shards", "59,9", "--fanout", "4", "--loose-up-to", "10", "--json",
         "--workdir", str(tmp_path)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = {(x["shards"], x["layout"]): x for x in json.loads(r.stdout)["results"]}
    assert set(rows) == {(59, "compacted"), (9, "compacted"), (9, "one part per shard")}
    assert rows[59, "compacted"]["objects"] == 3 + 2 + 3  # what the reader opened
    assert rows[9, "compacted"]["objects"] == 2 + 1
    assert rows[9, "one part per shard"]["objects"] == 9
    assert rows[9, "one part per shard"]["objects_after_compact"] == 1  # its 9 level-0 parts merge at once
    for x in rows.values():
        assert x["rows"] == x["planned_samples"] == x["shards"] * 4
    assert list(tmp_path.iterdir()) == []  # its stores are removed
    bad = runner.invoke(app, ["bench", "manifest", "--shards", "ten"])
    assert bad.exit_code != 0 and "--shards 'ten'" in bad.output


def test_bench_views_reports_bytes_decode_time_and_psnr_per_codec():
    r = runner.invoke(
        app, ["bench", "views", "--sizes", "48", "--codec", "raw,png,jpeg-90", "--repeats", "1", "--json"]
    )
    assert r.exit_code == 0, r.output
    rows = {x["codec"]: x for x in json.loads(r.stdout)["results"]}
    assert set(rows) == {"raw", "png", "jpeg-90"}
    assert rows["raw"]["bytes_per_view"] == 48 * 48 * 3 and rows["png"]["psnr_db"] == float("inf")
    assert rows["jpeg-90"]["bytes_per_view"] < rows["png"]["bytes_per_view"] < rows["raw"]["bytes_per_view"]
    assert 25 < rows["jpeg-90"]["psnr_db"] < 60 and rows["jpeg-90"]["decode_ms"] > 0
    bad = runner.invoke(app, ["bench", "views", "--codec", "gif"])
    assert bad.exit_code != 0 and "unknown view codec 'gif'" in bad.output
